"""Failing work an operator should see and may release: backed-off and quarantined operations.

The engine keeps a small summary on each client document (`failing`, `failingCount`,
`quarantinedCount`), so listing them is one query on the clients that have any, not a read of
every operation state.
"""

from __future__ import annotations

from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from shared import documents, store
from shared.config import Settings
from shared.errors import InvalidRequest, SmartResumeError, StoreUnavailable
from shared.log import get_logger
from shared.resume.pipeline import Pipeline
from shared.resume.plan import DECISION_FIELDS, failures_of
from shared.runs import jsonable

log = get_logger("quarantine")
LIST_LIMIT = 500
_ATTEMPTS = 5


class UnknownClient(SmartResumeError):
    """No client document has this id."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        super().__init__("unknown client")


def _listing(
    client: firestore.Client, settings: Settings, field: str, stream: int | None
) -> firestore.Query:
    """Active clients (of `stream`) whose `field` count is at least 1: a value the engine never
    writes (0.5, a string) is never matched, so hand-written documents cannot crowd out the
    real ones."""
    return (
        store.active_clients(client, stream)
        .where(filter=firestore.FieldFilter(field, ">=", 1))
        .order_by(field, direction=firestore.Query.DESCENDING)
        .select(["failing"])
        .limit(LIST_LIMIT)
    )


def failing(
    settings: Settings,
    client: firestore.Client,
    stream: int | None = None,
    shard: tuple[int, int] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """`{"quarantined": [...], "backedOff": [...]}`, each entry naming client and operation:
    the active clients of `stream` (and of `shard`, as (k, N)); when the listing comes back
    full the quarantined are read apart, so no number of backed-off clients hides one."""
    from shared.resume.shards import shard_of

    def listing(field: str) -> list[Any]:
        with store.translate_errors("listing failing clients"):
            return list(_listing(client, settings, field, stream).stream(**store.call(settings)))

    # Quarantined work counts as failing too: one query lists it all, unless it comes back
    # full; then the quarantined are read apart, so no number of backed-off clients hides one.
    found = listing("failingCount")
    seen = {snap.id: snap for snap in found}
    if len(found) >= LIST_LIMIT:
        seen = {snap.id: snap for snap in listing("quarantinedCount")} | seen
    quarantined: list[dict[str, Any]] = []
    backed_off: list[dict[str, Any]] = []
    for client_id in sorted(seen):
        if shard is not None and shard_of(client_id, shard[1]) != shard[0]:
            continue
        for operation, entry in documents.failing_entries(seen[client_id].to_dict() or {}):
            item = {
                "clientId": documents.text(client_id),
                "operation": operation,
                "failures": entry["failures"],
            }
            if entry["error"]:
                item["error"] = entry["error"]
            if entry["state"] == "quarantined":
                quarantined.append({**item, "since": jsonable(entry["since"])})
            else:
                backed_off.append({**item, "dueAt": jsonable(entry["dueAt"])})
    return {"quarantined": quarantined[:LIST_LIMIT], "backedOff": backed_off[:LIST_LIMIT]}


def problems(settings: Settings, client: firestore.Client) -> list[dict[str, Any]]:
    """The problems recorded on client documents (contract: at most 100), by client id."""
    query = (
        client.collection(store.CLIENTS)
        .where(filter=firestore.FieldFilter("problemCount", ">=", 1))
        .order_by("problemCount", direction=firestore.Query.DESCENDING)
        .select(["problems"])
        .limit(documents.MAX_LISTED_PROBLEMS)
    )
    with store.translate_errors("listing problems"):
        snaps = sorted(query.stream(**store.call(settings)), key=lambda s: s.id)
    out = [
        p.listed()
        for snap in snaps
        for p in documents.stored_problems(snap.id, snap.to_dict() or {})
    ]
    return out[: documents.MAX_LISTED_PROBLEMS]


def release(
    settings: Settings,
    client: firestore.Client,
    pipeline: Pipeline,
    client_id: str,
    operation: str | None = None,
) -> dict[str, Any]:
    """Release a client's quarantined or backed-off operations (or just `operation`): failures
    back to 0, due on the next tick. Raises `UnknownClient` and `InvalidRequest`."""
    if operation is not None and operation not in pipeline.names:
        raise InvalidRequest(
            f"'operation' is not in the pipeline; known: {', '.join(pipeline.names)}"
        )
    client_ref = client.collection(store.CLIENTS).document(client_id)
    names = [operation] if operation else list(pipeline.names)
    refs = [client_ref.collection(store.OPERATIONS).document(n) for n in names]
    for _ in range(_ATTEMPTS):
        with store.translate_errors("reading the client to release"):
            snap = client_ref.get(**store.call(settings))
            if not snap.exists:
                raise UnknownClient(client_id)
            states = {
                s.id: s
                for s in client.get_all(refs, field_paths=DECISION_FIELDS, **store.call(settings))
                if s.exists
            }
        released = [
            n
            for n in names
            if n in states
            and (states[n].to_dict() or {}).get("status") in ("failed", "quarantined")
            and failures_of(states[n].to_dict()) > 0
        ]
        if not released:
            return {"status": "released", "clientId": client_id, "operations": []}
        batch = client.batch()
        for name in released:
            batch.update(
                states[name].reference,
                {"status": "failed", "failures": 0, "quarantinedAt": None},
                option=client.write_option(last_update_time=states[name].update_time),
            )
        data = snap.to_dict() or {}
        stored = data.get("failing") if isinstance(data.get("failing"), dict) else {}
        left = {k: v for k, v in stored.items() if k not in released}
        batch.update(
            client_ref,
            {
                "nextDueAt": firestore.SERVER_TIMESTAMP,
                "failing": left,
                "failingCount": len(left),
                "quarantinedCount": sum(
                    1
                    for v in left.values()
                    if isinstance(v, dict) and v.get("state") == "quarantined"
                ),
            },
            option=client.write_option(last_update_time=snap.update_time),
        )
        try:
            with store.translate_errors("releasing operations"):
                batch.commit(**store.commit_call(settings))
        except (gexc.FailedPrecondition, gexc.NotFound):
            continue  # a run or the user wrote meanwhile: decide again on fresh reads
        log.warning("released %s of client %s", ", ".join(released), client_id)
        return {"status": "released", "clientId": client_id, "operations": released}
    raise StoreUnavailable("the client kept changing while releasing it; try again")
