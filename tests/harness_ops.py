"""The `python` operation the fault harness runs: pages with a checkpoint after each page, and
records every page it works (run, client, page, when) for the invariants."""

from __future__ import annotations

import threading
import time
from typing import Any

PAGES = 30
PAGE_DELAY = 0.03
CALLS: list[tuple[str, str, int, float]] = []
_mutex = threading.Lock()


def pager(ctx: Any) -> dict[str, Any] | None:
    page = (ctx.checkpoint or {}).get("page", 0)
    while page < PAGES:
        if ctx.should_stop():
            return {"done": False}
        time.sleep(PAGE_DELAY)
        page += 1
        with _mutex:
            CALLS.append((ctx.run_id, ctx.client_id, page, time.monotonic()))
        ctx.save_checkpoint({"page": page})
        ctx.count("pages")
    return None
