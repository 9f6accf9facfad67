"""Bench 3: planning over 500, 2,000 and 10,000 clients x 3 operations.

Batched planning (`Planner`: pages of 500 clients, one `get_all` per page) vs a naive planner
that reads each operation state with its own `get()`. Op states are seeded in a realistic mix
(fresh and stale successes, failures, never ran). Target: batched >= 5x faster at 2,000, and
time per client flat from 500 to 10,000.
"""

from __future__ import annotations

import time
from typing import Any

import _emulator as E

OPS = ("op0", "op1", "op2")


class _PerDocumentClient:
    """The real client, except `get_all` reads each document with its own `get()`."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def get_all(self, refs: Any, **kwargs: Any) -> Any:
        for ref in refs:
            yield ref.get(**kwargs)


def _plan(client: Any, settings: Any, pipeline: Any, naive: bool) -> tuple[float, int, int]:
    from shared.resume.plan import Planner, RunOptions

    counter = E.round_trips(client)
    counter.reset()
    planner = Planner(_PerDocumentClient(client) if naive else client, settings, pipeline)
    start = time.perf_counter()
    plans = planner.plan(RunOptions())
    elapsed = time.perf_counter() - start
    return elapsed, counter.total, len(plans)


def run(quick: bool = E.QUICK) -> dict[str, Any]:
    sizes = (500, 2000) if quick else (500, 2000, 10000)
    naive_sizes = (500,) if quick else (500, 2000)
    repeats = 2 if quick else 3
    path = E.pipeline_file(E.python_pipeline(3), "three.toml")
    settings, client = E.configure(SMART_RESUME_PIPELINE=path)
    from shared.resume.pipeline import load_pipeline

    pipeline = load_pipeline(settings.pipeline_path)
    E.clear()
    rows = []
    figures: dict[str, Any] = {}
    seeded = 0
    for size in sizes:
        t0 = time.perf_counter()
        E.seed_clients(client, size, OPS, states=True, start=seeded)
        seed_s = time.perf_counter() - t0
        seeded = size
        _plan(client, settings, pipeline, naive=False)  # warm
        batched = [_plan(client, settings, pipeline, naive=False) for _ in range(repeats)]
        b_time = E.median([b[0] for b in batched])
        b_reads, planned = batched[0][1], batched[0][2]
        assert planned == size, (planned, size)
        row = [
            size,
            f"{seed_s:.1f}",
            f"{b_time * 1000:.0f}",
            b_reads,
            f"{b_time / size * 1e6:.0f}",
        ]
        figures[size] = {"batched_ms": b_time * 1000, "batched_reads": b_reads}
        if size in naive_sizes:
            n_time, n_reads, _ = _plan(client, settings, pipeline, naive=True)
            row += [
                f"{n_time * 1000:.0f}",
                n_reads,
                f"{n_time / size * 1e6:.0f}",
                f"{n_time / b_time:.1f}x",
            ]
            figures[size].update(naive_ms=n_time * 1000, naive_reads=n_reads)
        else:
            row += ["not run (too slow)", f"~{size * len(OPS) + size // 500 + 1}", "-", "-"]
        rows.append(row)
    lines = E.table(
        [
            "clients",
            "seed s",
            "batched ms",
            "batched reads",
            "batched us/client",
            "naive ms",
            "naive reads",
            "naive us/client",
            "batched speed-up",
        ],
        rows,
    )
    lines += [
        "",
        f"{len(OPS)} operations per client; seeded op states: 1/3 fresh success (skipped), "
        "1/3 stale success, 1/6 failed, 1/6 never ran. Batched: median of "
        f"{repeats} after a warm-up; naive: one pass.",
    ]
    at = 2000 if 2000 in figures and "naive_ms" in figures[2000] else 500
    speedup = figures[at]["naive_ms"] / figures[at]["batched_ms"]
    per_client = {s: figures[s]["batched_ms"] / s for s in sizes}
    growth = per_client[sizes[-1]] / per_client[sizes[0]]
    verdicts = [
        E.verdict(f"batched >= 5x faster at {at}", speedup >= 5, f"{speedup:.1f}x"),
        E.verdict(
            f"time per client flat from {sizes[0]} to {sizes[-1]} (<= 1.5x)",
            growth <= 1.5,
            f"{per_client[sizes[0]] * 1000:.0f} -> {per_client[sizes[-1]] * 1000:.0f} us/client "
            f"({growth:.2f}x)",
        ),
    ]
    E.report("3. Planning scale", lines, verdicts)
    return figures


if __name__ == "__main__":
    run()
