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
