"""Bench 1: one empty run through the warm trigger (in-process) vs `python -m shared.resume run`.

"Empty": a one-operation pipeline and no clients, so the run is only lock, run record, release
and report. Target: in-process >= 25x faster per run, <= 6 Firestore round trips (floor 5).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import _emulator as E

FLOOR = 5
ratio_target = 25


def run(quick: bool = E.QUICK) -> dict[str, float]:
    warm_runs = 20 if quick else 50
    spawn_runs = 3 if quick else 5
    pipeline = E.pipeline_file(E.NOOP_PIPELINE, "empty.toml")
    settings, client = E.configure(SMART_RESUME_PIPELINE=pipeline)
    E.clear()
    counter = E.round_trips(client)

    import functions_framework

    app = functions_framework.create_app(
        target="smart_resume", source=str(E.ROOT / "functions/smart_resume/main.py")
    )
    http = app.test_client()
    headers = {"X-Webhook-Secret": E.SECRET}
    E.quiet_logs()

    def trigger() -> dict:
        response = http.post("/", json={}, headers=headers)
        assert response.status_code == 200, (response.status_code, response.get_json())
        return response.get_json()

    trigger()  # warm: first request loads the client, channel and pipeline
    E.quiet_logs()
    counter.reset()
    times = []
    for _ in range(warm_runs):
        start = time.perf_counter()
        body = trigger()
        times.append(time.perf_counter() - start)
        assert body["status"] == "completed", body
    per_run = counter.total / warm_runs
    by_rpc = {k: round(v / warm_runs, 2) for k, v in sorted(counter.counts.items())}

    # The physical floor, measured side by side: the same five round trips, bare.
    lock_ref = client.collection("locks").document(settings.lock_name)
    scratch = client.collection("bench_floor").document("doc")
    query = client.collection("clients").limit(1)
    floors = []
    for i in range(warm_runs):
        start = time.perf_counter()
        lock_ref.get()
        scratch.set({"n": i})
        list(query.stream())
        scratch.set({"n": -i})
        scratch.set({"n": i, "done": True})
        floors.append(time.perf_counter() - start)
    floor = E.median(floors)

    env = {**os.environ, **E.base_env(SMART_RESUME_PIPELINE=pipeline)}
    env["PYTHONPATH"] = os.pathsep.join([str(E.ROOT), str(E.BENCH)])
    spawned = []
    for _ in range(spawn_runs):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "shared.resume", "run"],
            cwd=E.ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        spawned.append(time.perf_counter() - start)
        assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]

    warm = E.median(times)
    spawn = E.median(spawned)
    ratio = spawn / warm
    lines = E.table(
        ["path", "runs", "median ms/run", "p90 ms", "Firestore round trips/run"],
        [
            [
                "warm trigger (in-process, test client)",
                warm_runs,
                f"{warm * 1000:.1f}",
                f"{sorted(times)[int(len(times) * 0.9) - 1] * 1000:.1f}",
                f"{per_run:g} (floor {FLOOR})",
            ],
            [
                "floor: 5 bare round trips (get, 3 commits, query)",
                warm_runs,
                f"{floor * 1000:.1f}",
                f"{sorted(floors)[int(len(floors) * 0.9) - 1] * 1000:.1f}",
                FLOOR,
            ],
            [
                "spawn `python -m shared.resume run`",
                spawn_runs,
                f"{spawn * 1000:.0f}",
                f"{max(spawned) * 1000:.0f}",
                "same code path",
            ],
        ],
    )
    lines += [
        "",
        f"round trips per warm run by RPC: {by_rpc}",
        f"warm run = floor x {warm / floor:.2f}; spawn / floor = {spawn / floor:.0f}x, so a "
        f"{ratio_target}x ratio needs a warm run of <= {spawn / ratio_target * 1000:.1f} ms on "
        "this machine",
    ]
    verdicts = [
        E.verdict("in-process >= 25x faster", ratio >= 25, f"{ratio:.1f}x"),
        E.verdict("<= 6 round trips per empty run", per_run <= 6, f"{per_run:g} (floor {FLOOR})"),
    ]
    E.report("1. In-process vs subprocess (empty run)", lines, verdicts)
    return {
        "floor_ms": floor * 1000,
        "warm_ms": warm * 1000,
        "spawn_ms": spawn * 1000,
        "ratio": ratio,
        "rt": per_run,
    }


if __name__ == "__main__":
    run()
