"""Bench 0 (issue 3): the lock alone. Acquire/release latency uncontended (cold: read then
commit; warm: this process released last, so one commit), and the time for 20 contenders to
all get an answer.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import _emulator as E

OWNER = {"host": "bench", "pid": 0, "function": "bench"}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _contend(settings: Any, client: Any, n: int) -> tuple[int, float]:
    from shared.errors import LockHeld
    from shared.lock import Lock

    barrier = threading.Barrier(n + 1)
    outcomes: list[str] = []
    mutex = threading.Lock()
    done_at: list[float] = []

    def one(i: int) -> None:
        barrier.wait()
        try:
            Lock(client, settings).acquire(f"contender-{i}", OWNER)
            result = "won"
        except LockHeld:
            result = "held"
        with mutex:
            outcomes.append(result)
            done_at.append(time.perf_counter())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return outcomes.count("won"), (max(done_at) - start) * 1000


def run(quick: bool = E.QUICK) -> dict[str, float]:
    from shared.lock import Lock

    settings, client = E.configure()
    E.clear()
    lock = Lock(client, settings)
    rounds = 30 if quick else 200
    cold_acquire: list[float] = []
    warm_acquire: list[float] = []
    release: list[float] = []
    for i in range(rounds):
        if i % 2 == 0:
            E.clear()  # no cached release: the acquire reads first
        t = time.perf_counter()
        lease = lock.acquire(f"bench-{i}", OWNER)
        (warm_acquire if i % 2 else cold_acquire).append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        lock.release(lease)
        release.append((time.perf_counter() - t) * 1000)
    trials = 3 if quick else 10
    contention = []
    for _ in range(trials):
        E.clear()
        contention.append(_contend(settings, client, 20))
    rows = [
        [
            "acquire, cold (read + commit)",
            len(cold_acquire),
            f"{E.median(cold_acquire):.1f}",
            f"{_percentile(cold_acquire, 0.99):.1f}",
        ],
        [
            "acquire, warm (one commit)",
            len(warm_acquire),
            f"{E.median(warm_acquire):.1f}",
            f"{_percentile(warm_acquire, 0.99):.1f}",
        ],
        ["release", len(release), f"{E.median(release):.1f}", f"{_percentile(release, 0.99):.1f}"],
    ]
    winners = [w for w, _ in contention]
    times = [ms for _, ms in contention]
    lines = [
        *E.table(["step", "n", "p50 ms", "p99 ms"], rows),
        "",
        f"20 contenders x {trials} trials: winners per trial {sorted(set(winners))}, "
        f"all answered in median {E.median(times):.0f} ms, worst {max(times):.0f} ms",
    ]
    verdicts = [
        E.verdict("exactly one winner", all(w == 1 for w in winners), f"{winners}"),
        E.verdict("20 contenders answered within 1 s", max(times) < 1000, f"{max(times):.0f} ms"),
    ]
    E.report("0. Lock latency and contention", lines, verdicts)
    return {"acquire_warm_ms": E.median(warm_acquire), "contention_ms": max(times)}


if __name__ == "__main__":
    run()
