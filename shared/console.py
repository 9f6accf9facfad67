"""The console: the page a browser gets from the status function, and the
`?clients=N[&after=ID]` listing its client grid reads.

The page holds no data, so it is served before the secret is checked; it asks for the secret
and reads everything else as JSON from the same URL, with the `X-Webhook-Secret` header.

The listing reads clients by id with a field mask and their operation states with one batched
read of the decision fields: never whole documents, so never a checkpoint.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Request, Response
from google.cloud import firestore

from shared import documents, store
from shared.config import Settings
from shared.errors import InvalidRequest, PipelineError
from shared.resume.pipeline import Pipeline, load_pipeline
from shared.resume.plan import (
    DECISION_FIELDS,
    EPOCH,
    NEVER,
    decide,
    failures_of,
)
from shared.runs import jsonable
from shared.validation import document_id

#: Query parameters that ask for JSON; a browser's GET with none of them gets the page.
JSON_PARAMS = ("runs", "clients", "check")
MAX_CLIENTS = 500
#: What the listing reads of a client document.
CLIENT_FIELDS = ["name", "active", "nextDueAt", "operations"]
#: What it reads of an operation state: what the engine decides on, and the last error.
STATE_FIELDS = list(dict.fromkeys([*DECISION_FIELDS, "error"]))
#: An operation's last error, as the grid shows it: one line, at most this long.
MAX_ERROR_CHARS = 300
#: States whose last error is worth showing (a success clears it).
FAILING = ("failed", "quarantined")


def wants_page(request: Request) -> bool:
    """A browser's GET: `Accept` prefers text/html, and no parameter asks for JSON."""
    if request.method != "GET" or any(p in request.args for p in JSON_PARAMS):
        return False
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    return best == "text/html"


def page() -> Response:
    """The console page, whatever the secret: it holds no data."""
    from shared.templates import console_page

    body, policy = console_page()
    response = Response(body, status=200, mimetype="text/html")
    response.headers.update(
        {
            "Content-Security-Policy": policy,
            "Cache-Control": "no-store",
            "Vary": "Accept",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
            "Cross-Origin-Opener-Policy": "same-origin",
        }
    )
    return response


def clients_params(args: Any) -> tuple[int, str | None]:
    """`?clients=N` (1 to 500) and the optional `after=ID`; anything else is 400."""
    values = args.getlist("clients")
    value = values[0] if len(values) == 1 else ""
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_CLIENTS:
        raise InvalidRequest(f"'clients' must be a whole number from 1 to {MAX_CLIENTS}")
    after = args.getlist("after")
    if len(after) > 1 or (after and not document_id(after[0])):
        raise InvalidRequest("'after' must be a client id")
    return int(value), (after[0] if after else None)


def list_clients(
    settings: Settings, client: firestore.Client, limit: int, after: str | None = None
) -> dict[str, Any]:
    """`{"clients": [...], "next": ID or null, "operations": [pipeline names]}`, by client id."""
    query = client.collection(store.CLIENTS)
    if settings.stream is not None:
        query = query.where(filter=firestore.FieldFilter("stream", "==", settings.stream))
    query = query.order_by("__name__").select(CLIENT_FIELDS).limit(limit + 1)
    if after is not None:
        query = query.start_after({"__name__": after})
    with store.translate_errors("listing clients"):
        snaps = list(query.stream(**store.call(settings)))
    more, snaps = len(snaps) > limit, snaps[:limit]
    try:
        pipeline: Pipeline | None = load_pipeline(settings.pipeline_path)
    except PipelineError as exc:
        pipeline, problem = None, str(exc)
    states, now = _states(settings, client, snaps, pipeline)
    body: dict[str, Any] = {
        "clients": [_client(s, pipeline, states, now) for s in snaps],
        "next": snaps[-1].id if more and snaps else None,
        "operations": list(pipeline.names) if pipeline else [],
    }
    if pipeline is None:
        body["pipelineError"] = problem
    return body


def _states(
    settings: Settings,
    client: firestore.Client,
    snaps: list[Any],
    pipeline: Pipeline | None,
) -> tuple[dict[tuple[str, str], dict[str, Any]], dt.datetime]:
    """The decision fields of every listed client's operations, in one batched read, and the
    server's time of the reads (what due times are judged against)."""
    now = next((s.read_time for s in snaps if s.read_time), None)
    if pipeline is None or not snaps:
        return {}, now or dt.datetime.now(dt.UTC)
    refs = [
        s.reference.collection(store.OPERATIONS).document(name)
        for s in snaps
        for name in _operations(documents.client(s.id, s.to_dict(), pipeline.names), pipeline)
    ]
    found: dict[tuple[str, str], dict[str, Any]] = {}
    if refs:
        with store.translate_errors("reading the clients' operation states"):
            for snap in client.get_all(refs, field_paths=STATE_FIELDS, **store.call(settings)):
                now = max(now, snap.read_time) if now and snap.read_time else now
                if snap.exists:
                    owner = snap.reference.parent.parent.id
                    found[(owner, snap.id)] = documents.state(owner, snap.id, snap.to_dict())[0]
    return found, now or dt.datetime.now(dt.UTC)


def _client(
    snap: Any,
    pipeline: Pipeline | None,
    states: dict[tuple[str, str], dict[str, Any]],
    now: dt.datetime,
) -> dict[str, Any]:
    doc = documents.client(snap.id, snap.to_dict(), pipeline.names if pipeline else ())
    out: dict[str, Any] = {
        "clientId": documents.text(snap.id),
        "name": doc.name,
        "active": doc.active,
        "nextDueAt": _due(doc.next_due),
        "operations": {},
    }
    if pipeline is None:
        return out
    names = _operations(doc, pipeline)
    if doc.operations_invalid:
        out["invalidOperations"] = True
    gate = EPOCH  # a failing operation holds back the ones after it, as the engine does
    for name in names:
        state = states.get((snap.id, name))
        shown = out["operations"][name] = {
            **_state_fields(state),
            "nextDueAt": None,
            "state": "inactive",
            "reason": "the client is inactive: not run until it is active",
        }
        if not doc.active:  # never run while inactive: neither new nor due
            continue
        op = pipeline.get(name)
        assert op is not None
        step = decide(state, op, now)
        own = step.due_at or EPOCH
        label = _label(state, step.decision, own, now)
        if step.decision == "run" and gate > now:
            label = "blocked"
        due = max(own, gate)
        if state and state.get("status") in ("failed", "quarantined"):
            gate = max(gate, own)
        shown.update(
            nextDueAt=_due(due) if due > EPOCH else None,
            state=label,
            reason="blocked by an earlier operation" if label == "blocked" else step.reason,
        )
    return out


def _operations(doc: documents.Client, pipeline: Pipeline) -> list[str]:
    """The client's operations in pipeline order (none when its `operations` is unusable)."""
    if doc.operations_invalid:
        return []
    return list(doc.operations) if doc.operations is not None else list(pipeline.names)


def _state_fields(state: dict[str, Any] | None) -> dict[str, Any]:
    """What a stored state says of itself: status, when it last finished, failures in a row,
    and, while it is failing, its last error (one line, bounded, secrets masked)."""
    state = state or {}
    status = state.get("status")
    return {
        "status": status,
        "finishedAt": jsonable(state.get("finishedAt")),
        "failures": failures_of(state),
        "error": last_error(state.get("error")) if status in FAILING else None,
    }


def last_error(error: Any) -> str | None:
    """An operation's stored error as the grid shows it (`documents.error_line`), if any."""
    if not isinstance(error, str) or not error.strip():
        return None
    return documents.error_line(error, MAX_ERROR_CHARS)


def _due(value: Any) -> str | None:
    """A due time as JSON; `NEVER` (only an operator's release makes it due) is null."""
    if not isinstance(value, dt.datetime) or value >= NEVER:
        return None
    return jsonable(value)  # type: ignore[no-any-return]


def _label(state: dict[str, Any] | None, decision: str, due: dt.datetime, now: dt.datetime) -> str:
    """One word for the grid: new, fresh, due, running, partial, backoff, retry, quarantined
    (and `blocked`, decided by the caller)."""
    if not state:
        return "new"
    status = state.get("status")
    if status == "quarantined":
        return "quarantined"
    if status == "failed":
        return "backoff" if decision == "skip" else "retry"
    if status == "success":
        return "fresh" if due > now else "due"
    if status in ("running", "partial"):
        return str(status)
    return "due"
