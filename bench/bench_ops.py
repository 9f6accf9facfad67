"""`python` operations for the benchmarks: as cheap as an operation can be."""

from __future__ import annotations

from typing import Any


def noop(ctx: Any) -> None:
    """Done at once, no checkpoint: only the engine's own bookkeeping is measured."""
    return None


def slow(ctx: Any) -> None:
    """Holds the run (and so the lock) long enough for rivals to be refused."""
    import time

    time.sleep(1.5)


#: CPU each `burn` call uses (bench/shards.py).
BURN_SECONDS = 0.020


def burn(ctx: Any) -> None:
    """A CPU-bound operation: a busy loop until this thread has used BURN_SECONDS of CPU
    (CPU time, not wall time: under contention it takes longer, as real work would)."""
    import time

    end = time.thread_time() + BURN_SECONDS
    while time.thread_time() < end:
        pass


#: Checkpoints each `pager` call saves, ~100 a second (bench/writes.py).
PAGES = 300


def pager(ctx: Any) -> None:
    """Pages as fast as it can, saving a checkpoint after every page: the writes are coalesced
    to about one a second per document, the last one always saved."""
    import time

    page = (ctx.checkpoint or {}).get("page", 0)
    while page < PAGES:
        time.sleep(0.01)  # ~100 checkpoints a second for ~3 s
        page += 1
        ctx.save_checkpoint({"page": page})
        ctx.count("pages")
