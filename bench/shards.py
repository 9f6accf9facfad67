"""Bench 10: shards: 300 clients whose one `python` operation burns 20 ms of CPU
(`bench_ops:burn`), all due, through real `functions-framework` trigger processes on loopback
against one emulator: one process with SMART_RESUME_SHARDS=1 and one POST `{}`, against three
processes with SMART_RESUME_SHARDS=3 and three concurrent POSTs `{"shard": k}`.
SMART_RESUME_CONCURRENCY=1 in every process, so CPU is the limit: the speed-up should approach
the number of cores. The two take turns, round after round, so a noisy neighbour slows both.

The trigger answers with the summary only, so what a tick reads and commits is measured
in-process with `start_run`'s `Outcome.stats`: an idle tick per shard (target: <= 50 documents
read per shard, as without shards), a busy tick per shard, and a full pass per shard (what the
first tick after a change of SMART_RESUME_SHARDS reads).

The due state is seeded directly (`shard` stored on each client, the full pass recorded for
each lock at the engine's own path and fingerprint), so the timed ticks run no full pass
(checked).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _emulator as E
import _ticks as T
import requests
from http_floor import Served

CLIENTS = 300
SHARDS = 3
LOCK = "bench-shards"
PIPELINE = """fresh_hours = 24
[[operation]]
name = "burn"
kind = "python"
target = "bench_ops:burn"
"""


# -- state -------------------------------------------------------------------------------


def _seed(client: Any, pipeline: Any, *, due: bool) -> None:
    """Every client with its `burn` state, due or fresh, and its shard of SHARDS stored."""
    from shared.resume.shards import shard_of

    T.seed(client, pipeline, CLIENTS, due=due)
    col = client.collection("clients")
    ids = [T.client_id(i) for i in range(CLIENTS)]
    for start in range(0, CLIENTS, 250):
        batch = client.batch()
        for cid in ids[start : start + 250]:
            batch.update(col.document(cid), {"shard": shard_of(cid, SHARDS)})
        batch.commit()


def _reconciles(client: Any, settings: Any, pipeline: Any, shards: int) -> list[Any]:
    """The engine's `Reconcile` of each shard's lock (one without shards)."""
    from shared.resume.due import Reconcile, Selection
    from shared.resume.plan import RunOptions
    from shared.resume.shards import lock_name

    out = []
    for k in range(shards) if shards > 1 else (None,):
        shard_settings = dataclasses.replace(settings, shards=shards, lock_name=lock_name(LOCK, k))
        selection = Selection(client, shard_settings, pipeline, RunOptions(shard=k))
        out.append(Reconcile(selection, fence=None))
    return out


def _record_full_passes(client: Any, settings: Any, pipeline: Any) -> dict[str, Any]:
    """The record a completed full pass leaves, for 1 and for SHARDS shards."""
    at = dt.datetime.now(dt.UTC).replace(microsecond=0)
    recorded = {}
    for shards in (1, SHARDS):
        for reconcile in _reconciles(client, settings, pipeline, shards):
            sel = reconcile.selection
            reconcile.ref.set(
                {
                    "fingerprint": reconcile.fingerprint,
                    "activeCount": CLIENTS,
                    "reconciledAt": at,
                    "lockName": sel.settings.lock_name,
                    "stream": None,
                    "shard": sel.shard,
                }
            )
            recorded[reconcile.ref.path] = at
    return recorded


def _full_passes(client: Any, settings: Any, pipeline: Any) -> dict[str, Any]:
    out = {}
    for shards in (1, SHARDS):
        for reconcile in _reconciles(client, settings, pipeline, shards):
            snap = reconcile.ref.get()
            out[reconcile.ref.path] = (snap.to_dict() or {}).get("reconciledAt")
    return out


# -- CPU of process groups ---------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pgids: set[int]) -> float:
    """User + system CPU of every live process in these process groups."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) in pgids:  # pgrp
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


# -- the HTTP comparison -----------------------------------------------------------------


def _post(served: Served, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(
        served.url, json=body, headers={"X-Webhook-Secret": E.SECRET}, timeout=600
    )
    assert response.status_code == 200, (response.status_code, response.text)
    answer = response.json()
    assert answer["status"] == "completed", answer
    return answer


def _timed(
    servers: list[Served], bodies: list[dict[str, Any]], pgids: set[int]
) -> tuple[float, float, float, list[int]]:
    """The triggers POSTed at once: (wall s, trigger CPU s, emulator CPU s, processed each)."""
    emulator = {E._proc.pid} if E._proc is not None else set()
    cpu, emu = _cpu_seconds(pgids), _cpu_seconds(emulator)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(servers)) as pool:
        answers = list(pool.map(_post, servers, bodies))
    wall = time.perf_counter() - start
    cpu, emu = _cpu_seconds(pgids) - cpu, _cpu_seconds(emulator) - emu
    processed = [a["summary"]["processed"] for a in answers]
    return wall, cpu, emu, processed


def _http(client: Any, pipeline: Any, path: Path, rounds: int) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMART_RESUME_")}
    env["PYTHONPATH"] = str(E.BENCH)  # the pipeline's `bench_ops:burn`
    common = {
        "SMART_RESUME_PIPELINE": path,
        "SMART_RESUME_CONCURRENCY": 1,
        "SMART_RESUME_LOCK_NAME": LOCK,
    }
    one: list[Served] = []
    many: list[Served] = []
    results = []
    try:
        one = [
            Served(
                E.ROOT / "functions/smart_resume/main.py",
                "smart_resume",
                {**env, **E.base_env(**common, SMART_RESUME_SHARDS=1)},
                "shards-1",
            )
        ]
        many = [
            Served(
                E.ROOT / "functions/smart_resume/main.py",
                "smart_resume",
                {**env, **E.base_env(**common, SMART_RESUME_SHARDS=SHARDS)},
                f"shards-{SHARDS}-{k}",
            )
            for k in range(SHARDS)
        ]
        # Each process leads its own group (start_new_session): its gunicorn worker included.
        configs = {
            1: (one, [{}], {s.proc.pid for s in one}),
            SHARDS: (many, [{"shard": k} for k in range(SHARDS)], {s.proc.pid for s in many}),
        }
        # Warm: an idle tick on every process (imports, channels, its lock's first commit),
        # then a due round of each, not timed (the operation's module, the emulator's JIT).
        _seed(client, pipeline, due=False)
        for servers, bodies, _ in configs.values():
            _timed(servers, bodies, set())
        for shards in (1, SHARDS):
            _seed(client, pipeline, due=True)
            _timed(*configs[shards])
        for r in range(rounds):
            order = (1, SHARDS) if r % 2 == 0 else (SHARDS, 1)
            row: dict[str, Any] = {}
            for shards in order:
                _seed(client, pipeline, due=True)
                wall, cpu, emu, processed = _timed(*configs[shards])
                assert sum(processed) == CLIENTS, processed
                row[shards] = {"wall": wall, "cpu": cpu, "emu": emu, "processed": processed}
            results.append(row)
    finally:
        for served in one + many:
            served.stop()
    return results


# -- in-process: what a tick reads and commits ---------------------------------------------


def _ticks(settings: Any, client: Any, shards: int) -> list[dict[str, Any]]:
    """One `start_run` per shard (one without shards), in turn: its stats and seconds."""
    from shared.resume.plan import RunOptions
    from shared.runner import start_run

    settings = dataclasses.replace(settings, shards=shards)
    out = []
    for k in range(shards) if shards > 1 else (None,):
        start = time.perf_counter()
        outcome = start_run(settings, client, RunOptions(shard=k), trigger={"source": "bench"})
        elapsed = time.perf_counter() - start
        assert outcome.status == "completed", outcome.body
        out.append(
            {
                "shard": "-" if k is None else k,
                "s": elapsed,
                "clients": outcome.body["summary"]["clients"],
                "docs": outcome.stats["documentsRead"],
                "commits": outcome.stats["commits"],
            }
        )
    return out


def _in_process(settings: Any, client: Any, pipeline: Any) -> dict[str, Any]:
    from google.cloud import firestore

    out: dict[str, Any] = {}
    _seed(client, pipeline, due=False)
    for shards in (1, SHARDS):
        _ticks(settings, client, shards)  # warm
        out[("idle", shards)] = _ticks(settings, client, shards)
    for shards in (1, SHARDS):
        _seed(client, pipeline, due=True)
        out[("busy", shards)] = _ticks(settings, client, shards)
    # The first tick after SMART_RESUME_SHARDS changes: no record of a full pass for this
    # number of shards (the fingerprint differs), no shard stored on the clients yet.
    _seed(client, pipeline, due=False)
    col = client.collection("clients")
    batch = client.batch()
    for i in range(CLIENTS):
        batch.update(col.document(T.client_id(i)), {"shard": firestore.DELETE_FIELD})
    batch.commit()
    for shards in (1, SHARDS):
        for reconcile in _reconciles(client, settings, pipeline, shards):
            reconcile.ref.delete()
        out[("full pass", shards)] = _ticks(settings, client, shards)
    return out


# -- the report ----------------------------------------------------------------------------


def run(quick: bool = E.QUICK) -> dict[str, Any]:
    rounds = 2 if quick else 5
    path = E.pipeline_file(PIPELINE, "shards.toml")
    settings, client = E.configure(
        SMART_RESUME_PIPELINE=path, SMART_RESUME_CONCURRENCY=1, SMART_RESUME_LOCK_NAME=LOCK
    )
    from shared.resume.pipeline import load_pipeline

    pipeline = load_pipeline(settings.pipeline_path)
    E.clear()
    _seed(client, pipeline, due=False)
    recorded = _record_full_passes(client, settings, pipeline)
    http = _http(client, pipeline, path, rounds)
    assert _full_passes(client, settings, pipeline) == recorded, "a timed tick ran a full pass"
    ticks = _in_process(settings, client, pipeline)

    cores = os.cpu_count() or 1
    ratios = [row[1]["wall"] / row[SHARDS]["wall"] for row in http]
    one_s = E.median([row[1]["wall"] for row in http])
    many_s = E.median([row[SHARDS]["wall"] for row in http])
    speedup = E.median(ratios)
    rows = [
        [
            r + 1,
            f"{row[1]['wall']:.2f}",
            f"{row[SHARDS]['wall']:.2f}",
            f"{ratios[r]:.2f}x",
            f"{row[1]['cpu']:.1f} / {row[SHARDS]['cpu']:.1f}",
            f"{row[1]['emu']:.1f} / {row[SHARDS]['emu']:.1f}" if E._proc else "n/a",
            " + ".join(str(n) for n in row[SHARDS]["processed"]),
        ]
        for r, row in enumerate(http)
    ]
    lines = E.table(
        [
            "round",
            "1 shard s",
            f"{SHARDS} shards s",
            "speed-up",
            "trigger CPU s (1 / 3)",
            "emulator CPU s (1 / 3)",
            "clients per shard",
        ],
        rows,
    )
    burn_cpu = CLIENTS * 0.020
    lines += [
        "",
        f"Median: 1 shard {one_s:.2f} s ({one_s / CLIENTS * 1000:.1f} ms per client), "
        f"{SHARDS} shards {many_s:.2f} s; median speed-up {speedup:.2f}x on {cores} cores. "
        f"The operations alone are {burn_cpu:.1f} s of CPU per tick.",
        "",
        f"{CLIENTS} clients x 1 `python` operation burning 20 ms of CPU (`bench_ops:burn`), "
        f"every one due; SMART_RESUME_CONCURRENCY=1 per process; one `functions-framework` "
        f"process (SMART_RESUME_SHARDS=1, POST {{}}) vs {SHARDS} (SMART_RESUME_SHARDS={SHARDS}, "
        f'{SHARDS} concurrent POSTs {{"shard": k}}), one emulator, alternating order, '
        f"{rounds} rounds after a warm-up; no full pass in a timed tick (checked). CPU: user + "
        "system of the trigger processes and of the emulator's JVM during the tick (/proc).",
        "",
        "What a tick reads and commits, in-process (`start_run`, `Outcome.stats`; shards run "
        "one after another):",
        "",
    ]
    table_rows = []
    for (kind, shards), per in ticks.items():
        for t in per:
            table_rows.append(
                [
                    kind,
                    shards,
                    t["shard"],
                    t["clients"],
                    t["docs"],
                    t["commits"],
                    f"{t['s'] * 1000:.0f}",
                ]
            )
        if shards > 1:
            table_rows.append(
                [
                    kind,
                    shards,
                    "all",
                    sum(t["clients"] for t in per),
                    sum(t["docs"] for t in per),
                    sum(t["commits"] for t in per),
                    f"{sum(t['s'] for t in per) * 1000:.0f}",
                ]
            )
    lines += E.table(
        ["tick", "SHARDS", "shard", "clients run", "documents read", "engine commits", "ms"],
        table_rows,
    )
    lines += [
        "",
        "idle: nothing due (the second idle tick of each); busy: all due; full pass: the first "
        "tick after a change of SMART_RESUME_SHARDS (no full-pass record for that number of "
        "shards, no `shard` stored on the clients), nothing due.",
    ]
    idle_worst = max(t["docs"] for t in ticks[("idle", SHARDS)])
    idle_one = ticks[("idle", 1)][0]["docs"]
    busy_one = ticks[("busy", 1)][0]
    busy_all = ticks[("busy", SHARDS)]
    verdicts = [
        E.verdict(
            f"{SHARDS} shards about {cores}x faster than 1 (the core count) on CPU-bound work",
            speedup >= 0.8 * min(cores, SHARDS),
            f"median {speedup:.2f}x ({one_s:.2f} -> {many_s:.2f} s); per round "
            + ", ".join(f"{x:.2f}x" for x in ratios),
        ),
        E.verdict(
            "an idle tick reads <= 50 documents per shard",
            idle_worst <= 50,
            f"worst shard {idle_worst} (1 shard: {idle_one})",
        ),
        f"- busy tick: 1 shard {busy_one['docs']} documents / {busy_one['commits']} commits; "
        f"{SHARDS} shards together {sum(t['docs'] for t in busy_all)} / "
        f"{sum(t['commits'] for t in busy_all)}",
    ]
    E.report("10. Shards", lines, verdicts)
    return {"speedup": speedup, "one_s": one_s, "many_s": many_s, "ticks": ticks}


if __name__ == "__main__":
    run()
