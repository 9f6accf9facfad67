"""What the status function (and `python -m shared.resume status`) answers, and its actions."""

from __future__ import annotations

from typing import Any

from google.cloud import firestore

from shared import health
from shared.config import Settings, describe
from shared.heartbeat import PROGRESS_AT
from shared.lock import Lock, LockState
from shared.log import get_logger
from shared.quarantine import failing
from shared.runs import Runs, jsonable

log = get_logger("status")


def snapshot(
    settings: Settings, client: firestore.Client, runs: int | None = None
) -> dict[str, Any]:
    """The contract's status document; ages are measured on the server's clock.

    `health` comes first: the one word an operator (or an uptime check) needs. The lock, the
    newest runs and the failing work are each read once and serve the whole answer.
    """
    found = failing(settings, client, settings.stream)
    evidence = health.gather(
        settings, client, newest=runs or health.NEWEST, quarantined=found["quarantined"]
    )
    state = evidence.lock
    records = Runs(client, settings)
    progress = dict(state.progress) if state.held else None
    moved = progress.pop(PROGRESS_AT, None) if progress is not None else None
    body: dict[str, Any] = {
        "health": health.judge(settings, evidence),
        "lock": settings.lock_name,
        "running": state.live,
        "held": state.held,
        "runId": state.run_id,
        "startedAt": jsonable(state.acquired_at),
        "ageSeconds": state.age_seconds,
        "lastHeartbeatAt": jsonable(state.heartbeat_at),
        "heartbeatAgeSeconds": state.heartbeat_age_seconds,
        "stale": state.stale,
        "token": state.token,
        "cancelRequested": state.cancel_requested,
        "progress": jsonable(progress),
        "progressAgeSeconds": (round(health.progress_age(state) or 0.0, 3) if state.held else None),
        "lastProgressAt": jsonable(moved or state.acquired_at) if state.held else None,
        "owner": state.owner or None,
        "lastRun": jsonable(records.last_finished(evidence.newest)),
        "limits": describe(settings),
        "serverTime": jsonable(state.read_time),
    }
    if runs is not None:
        body["runs"] = jsonable(evidence.newest[:runs])
    body.update(found)
    return body


def cancel(settings: Settings, client: firestore.Client) -> str | None:
    """Ask the live run to stop; raises `lock.NotRunning` when none is live."""
    run_id = Lock(client, settings).request_cancel()
    log.warning("cancel requested for run %s", run_id)
    return run_id


def unlock(settings: Settings, client: firestore.Client, force: bool) -> dict[str, Any]:
    """Release a stale lock (or any, with force), marking the holder's run abandoned.

    Raises `LockHeld` for a live lock without force. Returns what happened.
    """
    runs = Runs(client, settings)
    how = "force-unlocked" if force else "released as stale"
    before: LockState = Lock(client, settings).force_release(
        force,
        extra=lambda batch, run_id: (
            runs.abandon(batch, run_id, f"lease lost: lock {how} by an operator")
            if run_id
            else None
        ),
    )
    if not before.held:
        return {"status": "not held", "changed": False}
    log.warning("lock %s %s (was run %s)", settings.lock_name, how, before.run_id)
    if before.run_id:
        from shared.fence import revoke

        revoke(client, settings, before.run_id)  # its in-flight clients land nothing more
    return {
        "status": "unlocked",
        "changed": True,
        "runId": before.run_id,
        "wasStale": before.stale,
        "token": before.token + 1,
    }
