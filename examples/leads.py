"""Demo `python` operations over demo data in Firestore (`clients/{id}/leads/{leadId}`).

`score_leads` shows the pattern every long operation should follow: work in chunks, save a
checkpoint after each, and return early when `ctx.should_stop()` says the budget is spent.
"""

from __future__ import annotations

import time
from typing import Any

from google.cloud import firestore

from shared import store
from shared.config import get_settings

CHUNK = 20


def _leads(ctx: Any) -> firestore.CollectionReference:
    client = store.get_client(get_settings())
    return client.collection(store.CLIENTS).document(ctx.client_id).collection("leads")


def _score(lead: dict[str, Any]) -> int:
    """A toy score: company size and recent activity."""
    return min(100, int(lead.get("employees", 0)) // 10 + 5 * int(lead.get("visits", 0)))


#: The longest demo pause per chunk, whatever the client document says.
MAX_DELAY_SECONDS = 5.0


def _delay(value: Any) -> float:
    """The demo's pause per chunk (`demoDelaySeconds`, a number; anything else: none), capped."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return 0.0
    return min(float(value), MAX_DELAY_SECONDS)


def _pause(ctx: Any, seconds: float) -> None:
    """Sleep in short slices, so the run's budget or a cancel stops the pause at once."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and not ctx.should_stop():
        time.sleep(min(0.1, end - time.monotonic()))


def score_leads(ctx: Any) -> dict[str, Any]:
    """Score leads in chunks, resuming after the last scored lead id."""
    settings = get_settings()
    call = store.call(settings)
    cursor = (ctx.checkpoint or {}).get("after")
    delay = _delay(ctx.client.get("demoDelaySeconds"))
    while True:
        if ctx.should_stop():
            return {"done": False}
        query = _leads(ctx).order_by("__name__").limit(CHUNK)
        if cursor:
            query = query.start_after({"__name__": _leads(ctx).document(cursor)})
        chunk = list(query.stream(**call))
        if not chunk:
            return {"done": True}
        batch = store.get_client(settings).batch()
        for snap in chunk:
            batch.update(snap.reference, {"score": _score(snap.to_dict() or {})})
        batch.commit(**store.commit_call(settings))
        cursor = chunk[-1].id
        ctx.count("leads_scored", len(chunk))
        ctx.save_checkpoint({"after": cursor})
        _pause(ctx, delay)


def summarize_leads(ctx: Any) -> dict[str, Any]:
    """Count hot leads (score >= 70) onto the client document."""
    settings = get_settings()
    hot = sum(
        1
        for snap in _leads(ctx).stream(**store.call(settings))
        if (snap.to_dict() or {}).get("score", 0) >= 70
    )
    client_ref = store.get_client(settings).collection(store.CLIENTS).document(ctx.client_id)
    client_ref.update({"hotLeads": hot}, **store.commit_call(settings))
    return {"done": True, "counts": {"hot_leads": hot}}
