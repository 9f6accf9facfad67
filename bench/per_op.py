"""Bench 6: the engine's bookkeeping per client-operation, in round trips and milliseconds.

N clients x 3 `python` operations that return at once (no checkpoints), run twice: the first run
executes every operation, the second finds them all fresh and skips them. The difference is
the engine's cost per executed client-operation. Side by side: one bare fenced commit, and one
fenced commit that carries two writes (what combining an outcome with the next `running`
mark costs).
"""

from __future__ import annotations

import time
from typing import Any

import _emulator as E

OPS = 3


def _run(settings: Any, client: Any) -> tuple[float, int, dict[str, int], dict[str, Any]]:
    from shared.resume.plan import RunOptions
    from shared.runner import start_run

    counter = E.round_trips(client)
    counter.reset()
    start = time.perf_counter()
    outcome = start_run(settings, client, RunOptions(), trigger={"source": "bench"})
    elapsed = time.perf_counter() - start
    return elapsed, counter.total, dict(counter.counts), outcome.body.get("summary", {})


def _commit_costs(settings: Any, client: Any, n: int) -> tuple[float, float]:
    """ms per fenced commit with one write, and with two writes, under a real lease."""
    from shared.lock import Lock, owner_info

    lock = Lock(client, settings)
    lease = lock.acquire("bench-commit-cost", owner_info("bench"))
    col = client.collection("bench_scratch")
    try:
        one, two = [], []
        for i in range(n):
            a, b = col.document(f"a{i}"), col.document(f"b{i}")
            t = time.perf_counter()
            lock.fenced_commit(lease, lambda batch, a=a: batch.set(a, {"status": "x"}, merge=True))
            one.append(time.perf_counter() - t)
            t = time.perf_counter()

            def both(batch: Any, a: Any = a, b: Any = b) -> None:
                batch.set(a, {"status": "success"}, merge=True)
                batch.set(b, {"status": "running"}, merge=True)

            lock.fenced_commit(lease, both)
            two.append(time.perf_counter() - t)
    finally:
        lock.release(lease)
    return E.median(one) * 1000, E.median(two) * 1000


def run(quick: bool = E.QUICK) -> dict[str, float]:
    clients = 100 if quick else 300
    path = E.pipeline_file(E.python_pipeline(OPS), "three.toml")
    settings, client = E.configure(SMART_RESUME_PIPELINE=path)
    E.clear()
    E.seed_clients(client, clients)
    t_exec, rt_exec, by_exec, s_exec = _run(settings, client)
    t_skip, rt_skip, by_skip, s_skip = _run(settings, client)
    executed = s_exec.get("processed", 0)
    assert executed == clients * OPS, s_exec
    assert s_skip.get("skipped", 0) == clients * OPS, s_skip
    per_op_rt = (rt_exec - rt_skip) / executed
    per_op_ms = (t_exec - t_skip) * 1000 / executed
    one_ms, two_ms = _commit_costs(settings, client, 30 if quick else 60)
    commits = by_exec.get("commit", 0) - by_skip.get("commit", 0)
    lines = E.table(
        ["run", "client-operations", "run s", "round trips", "by RPC"],
        [
            ["all executed", executed, f"{t_exec:.2f}", rt_exec, by_exec],
            ["all skipped (fresh)", 0, f"{t_skip:.2f}", rt_skip, by_skip],
        ],
    )
    lines += [
        "",
        f"per executed client-operation: {per_op_rt:.2f} round trips "
        f"({commits / executed:.2f} fenced commits), {per_op_ms:.2f} ms",
        f"one fenced commit (1 write + fence): {one_ms:.2f} ms; with 2 writes + fence: "
        f"{two_ms:.2f} ms",
        f"fenced commits per client: {commits / clients:.2f} for {OPS} operations "
        f"(floor {OPS}: each `running` mark must land before its operation starts; the last "
        "outcome can ride with the next client's first mark only within one worker)",
    ]
    verdicts = [
        E.verdict(
            "per-operation bookkeeping <= 2 round trips (running + outcome)",
            per_op_rt <= 2.0,
            f"{per_op_rt:.2f} round trips, {per_op_ms:.2f} ms per client-operation",
        )
    ]
    E.report("6. Per-operation overhead", lines, verdicts)
    return {"rt": per_op_rt, "ms": per_op_ms, "one_ms": one_ms, "two_ms": two_ms}


if __name__ == "__main__":
    run()
