"""Seeding the state a tick finds, written directly: clients with `nextDueAt`, their operation
states, and the record of the last full pass.

Letting the engine build that state (a first tick runs a full pass over every client) would
make each size cost a full pass before the tick that is measured; writing it directly takes a
few seconds at 10,000 clients. The record of the full pass is written at the path and with the
fingerprint the engine itself uses (`Reconcile.ref`, `Reconcile.fingerprint`), and
`full_pass_at` lets a benchmark check that the measured tick did not run one after all.
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from typing import Any

Write = tuple[Any, dict[str, Any]]


def client_id(i: int) -> str:
    return f"c{i:05d}"


def commit_all(client: Any, writes: list[Write]) -> None:
    """500 writes per commit, 4 commits in flight."""

    def commit(chunk: list[Write]) -> None:
        batch = client.batch()
        for ref, data in chunk:
            batch.set(ref, data)
        batch.commit()

    chunks = [writes[i : i + 500] for i in range(0, len(writes), 500)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(commit, chunks))


def _state(finished: dt.datetime) -> dict[str, Any]:
    return {
        "status": "success",
        "runId": "seed",
        "startedAt": finished,
        "finishedAt": finished,
        "checkpoint": None,
        "counts": {"items": 1},
        "error": None,
        "attempts": 1,
        "failures": 0,
    }


def seed(client: Any, pipeline: Any, stop: int, *, due: bool, start: int = 0) -> None:
    """Active clients `start`..`stop-1`, each with a success state for every operation.

    `due`: the successes are three days old and `nextDueAt` has passed (every operation runs);
    else they are fresh and `nextDueAt` is a day ahead (nothing runs).
    """
    now = dt.datetime.now(dt.UTC)
    finished = now - dt.timedelta(days=3) if due else now
    next_due = now - dt.timedelta(hours=1) if due else now + dt.timedelta(hours=23)
    col = client.collection("clients")
    writes: list[Write] = []
    for i in range(start, stop):
        ref = col.document(client_id(i))
        writes.append(
            (
                ref,
                {
                    "name": f"Client {client_id(i)}",
                    "active": True,
                    "nextDueAt": next_due,
                    "failing": {},
                    "failingCount": 0,
                    "quarantinedCount": 0,
                },
            )
        )
        writes += [
            (ref.collection("operations").document(n), _state(finished)) for n in pipeline.names
        ]
    commit_all(client, writes)


def _reconcile(client: Any, settings: Any, pipeline: Any) -> Any:
    """The engine's own `Reconcile`: where it records a full pass, and what it records."""
    from shared.resume.due import Reconcile, Selection
    from shared.resume.plan import RunOptions

    return Reconcile(Selection(client, settings, pipeline, RunOptions()), fence=None)


def record_full_pass(client: Any, settings: Any, pipeline: Any, active: int) -> dt.datetime:
    """Write the record a completed full pass leaves, so the next tick runs none."""
    reconcile = _reconcile(client, settings, pipeline)
    at = dt.datetime.now(dt.UTC).replace(microsecond=0)
    reconcile.ref.set(
        {
            "fingerprint": getattr(reconcile, "fingerprint", pipeline.fingerprint),
            "activeCount": active,
            "reconciledAt": at,
            "lockName": settings.lock_name,
            "stream": None,
            "shard": getattr(reconcile.selection, "shard", None),
        }
    )
    return at


def full_pass_at(client: Any, settings: Any, pipeline: Any) -> dt.datetime | None:
    """When the last full pass was recorded (changes if a tick ran one)."""
    snap = _reconcile(client, settings, pipeline).ref.get()
    return (snap.to_dict() or {}).get("reconciledAt") if snap.exists else None


def make_due(client: Any, ids: list[str], drop: str | None = None) -> None:
    """Move these clients' `nextDueAt` into the past; with `drop`, delete that state of each
    (so the operation never ran and runs on the next tick)."""
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    col = client.collection("clients")

    def commit(chunk: list[str]) -> None:
        batch = client.batch()
        for cid in chunk:
            batch.update(col.document(cid), {"nextDueAt": past})
            if drop is not None:
                batch.delete(col.document(cid).collection("operations").document(drop))
        batch.commit()

    chunks = [ids[i : i + 250] for i in range(0, len(ids), 250)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(commit, chunks))
