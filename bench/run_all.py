"""`make bench`: every benchmark in one go, against one emulator; `--quick` for a smaller run.

Each benchmark prints its figures and appends them to bench/RESULTS.md; at the end a summary
table of every target is printed (and appended).
"""

from __future__ import annotations

import argparse
import time

import _emulator as E
import cold_start
import contention
import due_scale
import http_floor
import idle_tick
import inprocess
import lock
import memory
import parallel
import rss
import shards
import writes

BENCHES = (
    ("0. lock", lock),
    ("1. in-process vs subprocess", inprocess),
    ("2. cold start", cold_start),
    ("3. idle and due ticks", idle_tick),
    ("4. parallel clients", parallel),
    ("5. memory", memory),
    ("6. write path", writes),
    ("7. contention", contention),
    ("8. peak RSS", rss),
    ("9. idle tick over HTTP", http_floor),
    ("10. shards", shards),
    ("11. due work at any scale", due_scale),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a few minutes")
    parser.add_argument("--only", metavar="N", help="run only the benchmark numbered N")
    args = parser.parse_args()
    started = time.perf_counter()
    E.emulator()
    timings = []
    for name, module in BENCHES:
        if args.only is not None and not name.startswith(f"{args.only}."):
            continue
        t = time.perf_counter()
        print(f"\n== {name} ==", flush=True)
        module.run()
        timings.append([name, f"{time.perf_counter() - t:.0f}"])
    total = time.perf_counter() - started
    E.report(
        "Bench run",
        E.table(["benchmark", "seconds"], timings),
        [f"- total {total:.0f} s"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
