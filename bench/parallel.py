"""Bench 4: 40 clients x one `http` operation whose service sleeps 100 ms, through `start_run`.

SMART_RESUME_CONCURRENCY 1, 4 and 8, measured side by side. Target: 8 workers >= 6x faster
than 1.
"""

from __future__ import annotations

import time
from typing import Any

import _emulator as E

CLIENTS = 40
SLEEP = 0.1
PIPELINE = """fresh_hours = 24
[[operation]]
name = "sleepy"
kind = "http"
url = "{url}"
timeout_seconds = 10
"""


def run(quick: bool = E.QUICK) -> dict[int, float]:
    from ops_server import OpsServer

    server = OpsServer()
    try:

        def handler(payload: dict[str, Any]) -> tuple[int, Any]:
            time.sleep(SLEEP)
            return 200, {"done": True, "counts": {"items": 1}}

        url = server.route("/sleep", handler)
        path = E.pipeline_file(PIPELINE.format(url=url), "sleepy.toml")
        levels = (1, 4, 8)
        times: dict[int, float] = {}
        trips: dict[int, int] = {}
        for level in levels:
            settings, client = E.configure(
                SMART_RESUME_PIPELINE=path, SMART_RESUME_CONCURRENCY=level
            )
            from shared.resume.plan import RunOptions
            from shared.runner import start_run

            E.clear()
            E.seed_clients(client, CLIENTS)
            counter = E.round_trips(client)
            counter.reset()
            start = time.perf_counter()
            outcome = start_run(settings, client, RunOptions(), trigger={"source": "bench"})
            times[level] = time.perf_counter() - start
            trips[level] = counter.total
            summary = outcome.body.get("summary", {})
            assert outcome.status == "completed" and summary.get("processed") == CLIENTS, (
                outcome.body
            )
    finally:
        server.close()
    ideal = CLIENTS * SLEEP
    rows = [
        [
            level,
            f"{times[level]:.2f}",
            f"{times[1] / times[level]:.2f}x",
            f"{ideal / level:.2f}",
            trips[level],
        ]
        for level in levels
    ]
    lines = E.table(
        ["SMART_RESUME_CONCURRENCY", "run s", "speed-up vs 1", "sleep-only floor s", "round trips"],
        rows,
    )
    lines += ["", f"{CLIENTS} clients x 1 http operation; the service sleeps {SLEEP * 1000:.0f} ms"]
    speedup = times[1] / times[8]
    verdicts = [E.verdict("8 workers >= 6x faster than 1", speedup >= 6, f"{speedup:.2f}x")]
    E.report("4. Parallel clients", lines, verdicts)
    return times


if __name__ == "__main__":
    run()
