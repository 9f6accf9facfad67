"""`python` operations used by the tests; behaviour is steered through `BEHAVIOUR`."""

from __future__ import annotations

import threading
import time
from typing import Any

BEHAVIOUR: dict[str, Any] = {}
SEEN: list[dict[str, Any]] = []
_lock = threading.Lock()


def reset() -> None:
    BEHAVIOUR.clear()
    SEEN.clear()


def record(ctx: Any) -> None:
    with _lock:
        SEEN.append(
            {
                "client": ctx.client_id,
                "operation": ctx.operation,
                "checkpoint": ctx.checkpoint,
                "runId": ctx.run_id,
            }
        )


def ok(ctx: Any) -> dict[str, Any]:
    record(ctx)
    delay = BEHAVIOUR.get("delay", 0)
    if delay:
        time.sleep(delay)
    counts = BEHAVIOUR.get("counts_for", {}).get(ctx.client_id, {"items": 2})
    return {"done": True, "counts": counts}


def boom(ctx: Any) -> None:
    record(ctx)
    if ctx.client_id in BEHAVIOUR.get("fail_for", {ctx.client_id}):
        raise ValueError(f"bad data for {ctx.client_id}")


def chunked(ctx: Any) -> dict[str, Any]:
    """Counts pages up to BEHAVIOUR['pages'], saving a checkpoint after each."""
    record(ctx)
    page = (ctx.checkpoint or {}).get("page", 0)
    pages = BEHAVIOUR.get("pages", 3)
    while page < pages:
        if ctx.should_stop():
            return {"done": False}
        time.sleep(BEHAVIOUR.get("page_delay", 0))
        page += 1
        ctx.count("pages")
        ctx.save_checkpoint({"page": page})
        hook = BEHAVIOUR.get("after_page")
        if hook:
            hook(ctx, page)
    return None


def wait_for_stop(ctx: Any) -> dict[str, Any]:
    """Works until told to stop (cancel, budget), checkpointing as it goes."""
    record(ctx)
    step = (ctx.checkpoint or {}).get("step", 0)
    started = time.monotonic()
    while not ctx.should_stop():
        if time.monotonic() - started > 20:
            raise RuntimeError("never told to stop")
        step += 1
        ctx.save_checkpoint({"step": step})
        event = BEHAVIOUR.get("started")
        if event is not None:
            event.set()
        time.sleep(0.05)
    return {"done": False}


def saver(ctx: Any) -> dict[str, Any]:
    """Saves each checkpoint of BEHAVIOUR['saves'] in turn, then reports not done."""
    record(ctx)
    for checkpoint in BEHAVIOUR.get("saves", []):
        ctx.save_checkpoint(checkpoint)
    return {"done": False}


def long_error(ctx: Any) -> None:
    """Fails with a 500-character error (the engine stores at most that)."""
    record(ctx)
    raise ValueError("x" * 600)


def gate(ctx: Any) -> None:
    """Signals BEHAVIOUR['entered'], then waits for BEHAVIOUR['release'] (both Events)."""
    record(ctx)
    BEHAVIOUR["entered"].set()
    if not BEHAVIOUR["release"].wait(30):
        raise RuntimeError("never released")


def cancel_then_finish(ctx: Any) -> None:
    """Asks for a cancel of its own run, waits for the heartbeat to see it, and finishes."""
    from shared import status
    from shared.config import get_settings
    from shared.store import get_client

    record(ctx)
    settings = get_settings()
    status.cancel(settings, get_client(settings))
    time.sleep(BEHAVIOUR.get("wait", 0.6))
