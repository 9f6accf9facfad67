"""What the status function (and `python -m shared.resume status`) answers, and its actions."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from google.cloud import firestore

from shared import health
from shared.config import Settings, describe
from shared.errors import LockHeld
from shared.heartbeat import PROGRESS_AT
from shared.lock import Lock, LockState, NotRunning
from shared.log import get_logger
from shared.quarantine import failing, problems
from shared.resume.shards import lock_name as shard_lock_name
from shared.runs import Runs, jsonable

log = get_logger("status")


#: Which health is worse, for the answer over all shards.
WORST_FIRST = ("stuck", "overdue", "behind", "failing", "unknown", "running", "ok")


def for_shard(settings: Settings, shard: int) -> Settings:
    """Shard k's settings: its own lock (and so its own run records)."""
    return replace(settings, lock_name=shard_lock_name(settings.lock_name, shard))


def shards_of(settings: Settings, shard: int | None) -> list[int] | None:
    """The shards an answer or action covers; None without sharding."""
    if settings.shards <= 1:
        return None
    return [shard] if shard is not None else list(range(settings.shards))


def snapshot(
    settings: Settings,
    client: firestore.Client,
    runs: int | None = None,
    shard: int | None = None,
) -> dict[str, Any]:
    """The status document. With shards: one shard's (`shard`), or all of them: `shards`
    lists each, `health` is the worst of theirs and the rest is the worst shard's."""
    found = problems(settings, client)
    chosen = shards_of(settings, shard)
    if chosen is None:
        return _snapshot(settings, client, runs, found)
    bodies = [
        {**_snapshot(for_shard(settings, k), client, runs, found, (k, settings.shards)), "shard": k}
        for k in chosen
    ]
    if shard is not None:
        return bodies[0]
    worst = min(bodies, key=lambda b: WORST_FIRST.index(b["health"]["state"]))
    reasons = [f"shard {b['shard']}: {r}" for b in bodies for r in b["health"]["reasons"]]
    return {
        **worst,
        "health": {**worst["health"], "reasons": reasons},
        "running": any(b["running"] for b in bodies),
        "shards": [
            {
                "shard": b["shard"],
                "running": b["running"],
                "runId": b["runId"],
                "progress": b["progress"],
                "heartbeatAgeSeconds": b["heartbeatAgeSeconds"],
                "health": b["health"],
                "lastRun": b["lastRun"],
            }
            for b in bodies
        ],
    }


def _snapshot(
    settings: Settings,
    client: firestore.Client,
    runs: int | None,
    found_problems: list[dict[str, Any]],
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The contract's status document; ages are measured on the server's clock.

    `health` comes first: the one word an operator (or an uptime check) needs. The lock, the
    newest runs and the failing work are each read once and serve the whole answer.
    """
    found = failing(settings, client, settings.stream, shard)
    evidence = health.gather(
        settings,
        client,
        newest=runs or health.NEWEST,
        quarantined=found["quarantined"],
        problems=found_problems,
        shard=shard,
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
        # Only a held lock has a heartbeat worth an age: an idle system's last beat is not a
        # silence to alert on.
        "lastHeartbeatAt": jsonable(state.heartbeat_at) if state.held else None,
        "heartbeatAgeSeconds": state.heartbeat_age_seconds if state.held else None,
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
    body["problems"] = found_problems
    return body


def cancel(settings: Settings, client: firestore.Client, shard: int | None = None) -> str | None:
    """Ask the live run to stop (with shards: that shard's, or every shard's live run; the
    run ids joined by commas); raises `lock.NotRunning` when none is live."""
    chosen = shards_of(settings, shard)
    if chosen is None:
        run_id = Lock(client, settings).request_cancel()
        log.warning("cancel requested for run %s", run_id)
        return run_id
    cancelled = []
    for k in chosen:
        try:
            cancelled.append(cancel(for_shard(settings, k), client) or "")
        except NotRunning:
            continue
    if not cancelled:
        raise NotRunning("no run is in progress")
    return ",".join(cancelled)


def unlock_all(
    settings: Settings, client: firestore.Client, force: bool, shard: int | None = None
) -> dict[str, Any]:
    """`unlock` for one shard or all of them (raises `LockHeld` if any live lock without
    force is left held; the others are still released)."""
    chosen = shards_of(settings, shard)
    if chosen is None:
        return unlock(settings, client, force)
    done: list[dict[str, Any]] = []
    held: LockHeld | None = None
    for k in chosen:
        try:
            done.append({"shard": k, **unlock(for_shard(settings, k), client, force)})
        except LockHeld as exc:
            held = held or exc
    if held is not None:
        raise held
    if shard is not None:
        return done[0]
    return {
        "status": "unlocked" if any(d["changed"] for d in done) else "not held",
        "changed": any(d["changed"] for d in done),
        "shards": done,
    }


def unlock(settings: Settings, client: firestore.Client, force: bool) -> dict[str, Any]:
    """Release a stale lock (or any, with force), marking the holder's run abandoned, and
    close that run's client claims before answering.

    Raises `LockHeld` for a live lock without force, `StoreUnavailable` when the claims could
    not all be closed (the lock keeps the run in `revoke`: retrying the unlock, or the next
    run, finishes it). Returns what happened.
    """
    from shared.fence import revoke

    runs = Runs(client, settings)
    how = "force-unlocked" if force else "released as stale"
    lock = Lock(client, settings)
    before: LockState = lock.force_release(
        force,
        extra=lambda batch, run_id: (
            runs.abandon(batch, run_id, f"lease lost: lock {how} by an operator")
            if run_id
            else None
        ),
    )
    if not before.held:
        # Nothing held; a revoke an earlier unlock could not finish is finished now.
        closed = lock.clear_revokes(lambda run_id: revoke(client, settings, run_id))
        out: dict[str, Any] = {"status": "not held", "changed": False}
        if closed:
            out["revokedClaims"] = closed
        return out
    log.warning("lock %s %s (was run %s)", settings.lock_name, how, before.run_id)
    closed = lock.clear_revokes(lambda run_id: revoke(client, settings, run_id))
    return {
        "status": "unlocked",
        "changed": True,
        "runId": before.run_id,
        "wasStale": before.stale,
        "token": before.token + 1,
        "revokedClaims": closed,
    }
