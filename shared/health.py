"""Is smart-resume healthy? One judgement, in plain words, for people and uptime checks.

Silence is the failure a run report cannot tell: the run that never happened (a paused
Scheduler job, a broken deploy, a rotated secret) or the one that hangs while still
heartbeating. `judge` looks at the lock (is a run live, and has its progress moved lately?),
this lock's newest runs (how did the last one end, and when did one last end well?) and the
quarantined work, all timed by the server's clock (the lock read's `read_time`):

- `stuck`: a live run whose progress has not moved for `SMART_RESUME_STUCK_SECONDS`, or a
  lock whose holder has gone silent (stale, not yet taken over);
- `overdue`: `SMART_RESUME_EXPECTED_EVERY_SECONDS` is set and no run ended completed, partial
  or cancelled within it plus `SMART_RESUME_GRACE_SECONDS` (never while the very first run is
  still running);
- `behind`: the longest-waiting due client has waited more than `SMART_RESUME_BEHIND_SECONDS`;
- `failing`: the newest finished run ended failed or abandoned, or work is quarantined;
- `running`: a live run that makes progress;
- `ok`: none of these;
- `unknown`: no run recorded and none running (alone, whatever else is set).

The first that applies in that order is the state; `reasons` names every one that applies.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from google.cloud import firestore

from shared.config import Settings
from shared.documents import error_line, named
from shared.heartbeat import PROGRESS_AT
from shared.lock import Lock, LockState
from shared.runs import FINISHED, SUCCEEDED, Runs, jsonable

#: Precedence, first wins.
ORDER = ("stuck", "overdue", "behind", "failing", "running", "ok")
#: What an uptime check accepts (200); anything else answers 503.
HEALTHY = ("ok", "running")
FAILED_ENDS = ("failed", "abandoned")
#: Runs read to judge: the newest this many (plus the same-second slack `Runs` reads).
NEWEST = 10
MAX_NAMED = 3
MAX_ERROR_CHARS = 200


@dataclass(frozen=True)
class Evidence:
    """What the judgement rests on; `status.snapshot` gathers it once for its whole answer."""

    lock: LockState
    #: This lock's newest runs, newest first (summary fields only).
    newest: list[dict[str, Any]]
    #: The newest run that ended completed, partial or cancelled, if any.
    last_success: dict[str, Any] | None
    #: `quarantine.failing()["quarantined"]`.
    quarantined: list[dict[str, Any]]
    #: `quarantine.problems()`: data an operator must fix; named, never a failure by itself.
    problems: list[dict[str, Any]] = field(default_factory=list)
    #: When the longest-waiting due client became due (None: nothing is due).
    oldest_due: dt.datetime | None = None


def gather(
    settings: Settings,
    client: firestore.Client,
    newest: int = NEWEST,
    quarantined: list[dict[str, Any]] | None = None,
    problems: list[dict[str, Any]] | None = None,
    shard: tuple[int, int] | None = None,
) -> Evidence:
    """Read what `judge` needs: the lock, the newest runs, the last success (usually among
    them), and the quarantined work unless the caller has it already."""
    from shared.quarantine import failing
    from shared.quarantine import problems as listed_problems

    lock = Lock(client, settings).read()
    runs = Runs(client, settings)
    recent = runs.recent(max(newest, NEWEST))
    last_success = runs.last_ended(SUCCEEDED, recent, complete=len(recent) < max(newest, NEWEST))
    if quarantined is None:
        quarantined = failing(settings, client, settings.stream, shard)["quarantined"]
    if problems is None:
        problems = listed_problems(settings, client)
    return Evidence(
        lock, recent, last_success, quarantined, problems, oldest_due(settings, client, shard)
    )


#: Due times before this say "never ran" (1970), not since when a client has waited.
KNOWN_SINCE = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def oldest_due(
    settings: Settings, client: firestore.Client, shard: tuple[int, int] | None = None
) -> dt.datetime | None:
    """The `nextDueAt` of the longest-waiting due client (one small query, served by the due
    query's own index)."""
    from shared import store

    now = dt.datetime.now(dt.UTC)
    query = (
        store.active_clients(client, settings.stream, shard[0] if shard else None)
        .where(filter=firestore.FieldFilter("nextDueAt", "<=", now))
        .where(filter=firestore.FieldFilter("nextDueAt", ">=", KNOWN_SINCE))
        .order_by("nextDueAt")
        .select(["nextDueAt"])
        .limit(1)
    )
    with store.translate_errors("finding the oldest due client"):
        snaps = list(query.stream(**store.call(settings)))
    due = (snaps[0].to_dict() or {}).get("nextDueAt") if snaps else None
    return due if isinstance(due, dt.datetime) else None


def _age(now: dt.datetime | None, then: Any) -> float | None:
    if now is None or not isinstance(then, dt.datetime):
        return None
    return max(0.0, (now - then).total_seconds())


def _where(progress: dict[str, Any]) -> str:
    parts = []
    if progress.get("clientId"):
        parts.append(f"client {progress['clientId']}")
    if progress.get("operation"):
        parts.append(f"operation {progress['operation']}")
    return "at " + ", ".join(parts) if parts else "before its first client"


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def progress_age(lock: LockState) -> float | None:
    """Seconds since a live run's progress last moved (its start, if it never moved)."""
    moved = lock.progress.get(PROGRESS_AT)
    return _age(lock.read_time, moved if isinstance(moved, dt.datetime) else lock.acquired_at)


def judge(settings: Settings, evidence: Evidence) -> dict[str, Any]:
    """The contract's `health` object: `state`, `reasons`, `lastSuccessAt`,
    `expectedEverySeconds`."""
    lock = evidence.lock
    now = lock.read_time
    expected = settings.expected_every_seconds
    success = evidence.last_success or {}
    success_at = success.get("finishedAt") or success.get("startedAt")
    body: dict[str, Any] = {
        "state": "ok",
        "reasons": [],
        "lastSuccessAt": jsonable(success_at) if isinstance(success_at, dt.datetime) else None,
        "expectedEverySeconds": expected,
    }
    if not evidence.newest and not lock.held:
        body.update(state="unknown", reasons=["no run has been recorded yet"])
        return body

    found: dict[str, list[str]] = {}
    if lock.held and lock.stale:
        silent = lock.heartbeat_age_seconds
        found["stuck"] = [
            f"the run {lock.run_id} holding the lock has gone silent"
            + (f" (no heartbeat for {_seconds(silent)})" if silent is not None else "")
            + ": the next trigger takes it over, or unlock it"
        ]
    if lock.live:
        age = progress_age(lock)
        where = _where(lock.progress)
        if age is not None and age >= settings.stuck_seconds:
            found["stuck"] = [
                f"run {lock.run_id} has made no progress for {_seconds(age)} ({where}) although "
                f"it still heartbeats (stuck after {settings.stuck_seconds:g} s)"
            ]
        else:
            moved = f", progress {_seconds(age)} ago" if age is not None else ""
            found["running"] = [
                f"run {lock.run_id} is running for {_seconds(lock.age_seconds or 0.0)}, "
                f"{where}{moved}"
            ]

    ended = any(r.get("status") in FINISHED for r in evidence.newest)
    if expected is not None and not (lock.live and not ended):  # the first run is running
        window = expected + settings.grace_seconds
        since = _age(now, success_at)
        if since is None or since > window:
            how_long = "yet" if since is None else f"for {_seconds(since)}"
            found["overdue"] = [
                f"no run has ended completed, partial or cancelled {how_long} "
                f"(expected every {expected:g} s, grace {settings.grace_seconds:g} s)"
            ]

    waited = _age(now, evidence.oldest_due)
    if waited is not None and waited > settings.behind_seconds:
        found["behind"] = [
            f"the longest-waiting due client has waited {_seconds(waited)} "
            f"(behind after {settings.behind_seconds:g} s): the runs do not keep up; "
            "raise the time budget, the concurrency or the shards"
        ]

    failing: list[str] = []
    last = next((r for r in evidence.newest if r.get("status") in FINISHED), None)
    if last is not None and last.get("status") in FAILED_ENDS:
        error = f": {error_line(last['error'], MAX_ERROR_CHARS)}" if last.get("error") else ""
        failing.append(f"the last run {last.get('runId')} ended {last.get('status')}{error}")
    if evidence.quarantined:
        count = len(evidence.quarantined)
        names = named(
            [f"{q.get('clientId')}/{q.get('operation')}" for q in evidence.quarantined], MAX_NAMED
        )
        failing.append(
            f"{count} client-operation{'s are' if count != 1 else ' is'} quarantined ({names}): "
            "release with the retry action once the cause is fixed"
        )
    if failing:
        found["failing"] = failing

    if not found:
        if last is not None:
            ended = _age(now, last.get("finishedAt"))
            when = f" {_seconds(ended)} ago" if ended is not None else ""
            found["ok"] = [f"the last run {last.get('runId')} ended {last.get('status')}{when}"]
        else:
            found["ok"] = ["nothing is failing"]
    state = next(s for s in ORDER if s in found)
    reasons = [r for s in ORDER for r in found.get(s, [])]
    if evidence.problems:
        clients = len({p.get("clientId") for p in evidence.problems})
        reasons.append(
            f"{clients} client document{'s have' if clients != 1 else ' has'} data the engine "
            "cannot use (see problems): fix or delete the fields named there"
        )
    body.update(state=state, reasons=reasons)
    return body


def healthy(settings: Settings, health: dict[str, Any]) -> bool:
    """What `?check=health` answers 200 for: ok or running, or unknown while no expected
    interval is set (a deployment that was never meant to be watched for lateness)."""
    state = health["state"]
    return state in HEALTHY or (state == "unknown" and settings.expected_every_seconds is None)


def check(settings: Settings, client: firestore.Client) -> tuple[dict[str, Any], int]:
    """`GET ?check=health`: the health object and 200 or 503."""
    health = judge(settings, gather(settings, client))
    return health, 200 if healthy(settings, health) else 503
