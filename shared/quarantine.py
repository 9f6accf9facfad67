"""Failing work an operator should see and may release: backed-off and quarantined operations.

The engine keeps a small summary on each client document (`failing`, `failingCount`,
`quarantinedCount`), so listing them is one query on the clients that have any, not a read of
every operation state.
"""

from __future__ import annotations

from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from shared import store
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


def failing(
    settings: Settings, client: firestore.Client, stream: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """`{"quarantined": [...], "backedOff": [...]}`, each entry naming client and operation."""
    query = (
        client.collection(store.CLIENTS)
        .where(filter=firestore.FieldFilter("failingCount", ">", 0))
        .select(["failing", "stream", "active"])
        .limit(LIST_LIMIT)
    )
    with store.translate_errors("listing failing clients"):
        snaps = list(query.stream(**store.call(settings)))
    quarantined: list[dict[str, Any]] = []
    backed_off: list[dict[str, Any]] = []
    for snap in snaps:
        data = snap.to_dict() or {}
        if stream is not None and data.get("stream") != stream:
            continue
        for operation, entry in sorted((data.get("failing") or {}).items()):
            if not isinstance(entry, dict):
                continue
            item = {"clientId": snap.id, "operation": operation, "failures": entry.get("failures")}
            if entry.get("state") == "quarantined":
                quarantined.append({**item, "since": jsonable(entry.get("since"))})
            else:
                backed_off.append({**item, "dueAt": jsonable(entry.get("dueAt"))})
    return {"quarantined": quarantined, "backedOff": backed_off}


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
        left = {k: v for k, v in (data.get("failing") or {}).items() if k not in released}
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
