"""Bench: polite calls. 40 clients x 3 chunks of one `http` operation against a service that
enforces 10 calls/s itself, with SMART_RESUME_CONCURRENCY 8 and `max_per_second = 10`.

The service runs in its own process (`tests/ops_server.py`) and answers its very first call 429
with `Retry-After: 1` (warming up), so the bench also shows that one 429 holds every worker
back instead of starting eight independent backoffs. Targets: achieved calls/s within 10% of
the limit, 0 violations, 0 429s after the first.

`python bench/polite.py [--quick] [--no-record]` (`--no-record`: print only, leave
bench/RESULTS.md alone).
"""

from __future__ import annotations

import argparse
import time

import _emulator as E

CLIENTS = 40
LIMIT = 10
PIPELINE = """fresh_hours = 24
[[operation]]
name = "scored"
kind = "http"
url = "{url}"
timeout_seconds = 10
max_per_second = {limit}
"""


def run(quick: bool = E.QUICK, record: bool = True) -> dict[str, float]:
    from ops_server import ServiceProcess

    from shared.resume.plan import RunOptions
    from shared.runner import start_run

    pages = 2 if quick else 3
    with ServiceProcess(LIMIT, pages, cold="1") as service:
        path = E.pipeline_file(
            PIPELINE.format(url=service.url + "/work", limit=LIMIT), "polite.toml"
        )
        settings, client = E.configure(SMART_RESUME_PIPELINE=path, SMART_RESUME_CONCURRENCY=8)
        E.clear()
        E.seed_clients(client, CLIENTS)
        started = time.perf_counter()
        outcome = start_run(settings, client, RunOptions(), trigger={"source": "bench"})
        seconds = time.perf_counter() - started
        stats = service.stats()
    summary = outcome.body.get("summary", {})
    assert outcome.status == "completed" and summary.get("processed") == CLIENTS, outcome.body
    calls = summary["calls"]["scored"]
    served = sorted(r["at"] for r in stats["requests"])[1:]  # after the warming-up 429
    achieved = (len(served) - 1) / (served[-1] - served[0])
    after_first = stats["rejected"]  # every 429 but the warming-up one
    busiest = _most_in_any_second(served)
    lines = E.table(
        [
            "clients",
            "calls",
            "run s",
            "calls/s",
            "busiest second",
            "violations",
            "429s",
            "retried",
            "throttled",
        ],
        [
            [
                CLIENTS,
                calls["calls"],
                f"{seconds:.2f}",
                f"{achieved:.2f}",
                busiest,
                stats["violations"],
                1 + after_first,
                calls["retried"],
                calls["throttled"],
            ]
        ],
    )
    lines += [
        "",
        f"{CLIENTS} clients x {pages} chunks, 8 workers, `max_per_second = {LIMIT}`; the service "
        f"(own process) enforces {LIMIT} calls in any second and answers its first call 429 "
        "with `Retry-After: 1`. calls/s from the first call it served to the last.",
    ]
    verdicts = [
        E.verdict(
            f"calls/s within 10% of the limit ({LIMIT})",
            LIMIT * 0.9 <= achieved <= LIMIT,
            f"{achieved:.2f}/s",
        ),
        E.verdict("0 violations", stats["violations"] == 0, str(stats["violations"])),
        E.verdict("0 429s after the first", after_first == 0, str(after_first)),
    ]
    if record:
        E.report("Polite calls", lines, verdicts)
    else:
        print("\n".join(["### Polite calls", "", *lines, "", *verdicts]), flush=True)
    return {"callsPerSecond": achieved, "violations": stats["violations"], "after": after_first}


def _most_in_any_second(times: list[float]) -> int:
    best, low = 0, 0
    for high, t in enumerate(times):
        while t - times[low] >= 1.0:
            low += 1
        best = max(best, high - low + 1)
    return best


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 chunks per client instead of 3")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    run(quick=args.quick, record=not args.no_record)
