"""Deciding: which client-operations run, which are skipped and why, and when each is due next.

Pure functions of stored states, so planning, the due-time written to `clients/{id}.nextDueAt`
and the dry run's plan can never disagree. Reading is in `due.py`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from shared import documents
from shared.documents import Problem
from shared.resume.pipeline import Operation, Pipeline

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: `nextDueAt` of a client whose remaining work is all quarantined: never, yet still a
#: timestamp, so the client still counts among those that have a due time.
NEVER = dt.datetime(9999, 1, 1, tzinfo=dt.UTC)
MAX_BACKOFF_SECONDS = 86400
#: What deciding reads of an operation state; never the checkpoint, loaded when a step starts.
DECISION_FIELDS = [
    "status",
    "startedAt",
    "finishedAt",
    "failures",
    "attempts",
    "quarantinedAt",
    "error",
    "heldUntil",
]
#: States whose step resumes from a saved checkpoint (loaded when the step starts).
RESUMES = ("partial", "failed", "running", "quarantined")
INVALID_OPERATIONS = "invalid operations field"


@dataclass(frozen=True)
class RunOptions:
    """What a trigger request (or the command line) narrowed the run to."""

    client_id: str | None = None
    operations: tuple[str, ...] | None = None
    dry_run: bool = False
    stream: int | None = None
    shard: int | None = None  # with SMART_RESUME_SHARDS > 1: only this shard's clients


@dataclass
class Step:
    operation: str
    decision: str  # "run" or "skip"
    reason: str
    state: dict[str, Any] | None = None
    blocks: bool = False  # a skip that holds back the client's later operations
    due_at: dt.datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"operation": self.operation, "decision": self.decision, "reason": self.reason}
        if self.due_at is not None and self.decision == "skip" and self.due_at < NEVER:
            out["dueAt"] = _iso(self.due_at)
        return out


@dataclass
class ClientPlan:
    client_id: str
    name: str
    data: dict[str, Any]
    steps: list[Step] = field(default_factory=list)
    unknown_operations: list[str] = field(default_factory=list)
    invalid_operations: bool = False
    #: Every operation this client has (not only those this run selected), in pipeline order,
    #: with its state: the next due time is computed over all of them.
    operations: list[str] = field(default_factory=list)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    stored_due: dt.datetime | None = None  # the client's `nextDueAt` as read
    shard: int | None = None  # stored on the client document when there are shards
    #: What could not be used in its documents: found now, stored before, and which
    #: (operation, field) pairs this run looked at (see `documents.merged`).
    problems: list[Problem] = field(default_factory=list)
    stored_problems: tuple[Problem, ...] = ()
    checked: set[tuple[str | None, str]] = field(default_factory=set)

    def all_problems(self) -> list[Problem]:
        return documents.merged(self.client_id, self.stored_problems, self.problems, self.checked)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "clientId": self.client_id,
            "name": self.name,
            "operations": [s.as_dict() for s in self.steps],
        }
        if self.unknown_operations:
            out["unknownOperations"] = self.unknown_operations
        if self.invalid_operations:
            out["invalidOperations"] = True
        if self.problems:
            out["problems"] = [p.problem for p in self.problems]
        return out


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _fmt(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "an unknown time"


def failures_of(state: dict[str, Any] | None) -> int:
    """Consecutive failures; states written before the field existed count one per failure."""
    if not state:
        return 0
    value = state.get("failures")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 1 if state.get("status") in ("failed", "quarantined") else 0


def backoff_seconds(op: Operation, failures: int) -> float:
    """After the k-th consecutive failure (k >= 2): retry_backoff_seconds * 2^(k-2), capped."""
    if failures < 2:
        return 0.0
    return min(op.retry_backoff_seconds * 2 ** min(failures - 2, 40), MAX_BACKOFF_SECONDS)


def _when(state: dict[str, Any]) -> dt.datetime:
    for key in ("finishedAt", "startedAt"):
        value = state.get(key)
        if isinstance(value, dt.datetime):
            return value
    return EPOCH


def due_at(state: dict[str, Any] | None, op: Operation) -> dt.datetime:
    """When this operation is next due, judged from its stored state alone."""
    if not state:
        return EPOCH
    status, when = state.get("status"), _when(state)
    if status == "success":
        return when + dt.timedelta(hours=op.fresh_hours)
    if status == "quarantined":
        return NEVER
    if status == "failed":
        return when + dt.timedelta(seconds=backoff_seconds(op, failures_of(state)))
    held = state.get("heldUntil")
    if status == "partial" and isinstance(held, dt.datetime):
        return max(when, held)  # the service asked to be left alone until then
    return when  # partial, cut off while running, unknown: due now


def decide(state: dict[str, Any] | None, op: Operation, now: dt.datetime) -> Step:
    """One operation's decision from its stored state."""
    name = op.name
    due = due_at(state, op)
    if not state:
        return Step(name, "run", "never ran", state, due_at=due)
    status = state.get("status")
    finished = state.get("finishedAt")
    resume = " from its checkpoint" if status in RESUMES else ""
    if status == "success":
        if now < due:
            reason = f"succeeded at {_fmt(finished)}, within {op.fresh_hours:g}h"
            return Step(name, "skip", reason, state, due_at=due)
        return Step(name, "run", f"stale success from {_fmt(finished)}", state, due_at=due)
    if status == "quarantined":
        since = state.get("quarantinedAt") or finished
        reason = (
            f"quarantined after {failures_of(state)} failures in a row (since {_fmt(since)}); "
            "release it with the retry action"
        )
        return Step(name, "skip", reason, state, blocks=True, due_at=due)
    if status == "failed":
        k = failures_of(state)
        if now < due:
            reason = f"backing off after {k} failures in a row; due at {_fmt(due)}"
            return Step(name, "skip", reason, state, blocks=True, due_at=due)
        if k >= 2:
            reason = f"failed {k} times in a row, last at {_fmt(finished)}; retrying{resume}"
        else:
            reason = f"failed at {_fmt(finished)}; retrying{resume}"
        return Step(name, "run", reason, state, due_at=due)
    if status == "partial":
        if now < due:
            reason = f"held back by the service (Retry-After) until {_fmt(due)}"
            return Step(name, "skip", reason, state, blocks=True, due_at=due)
        return Step(name, "run", "partial; resumes from its checkpoint", state, due_at=due)
    if status == "running":
        since = _fmt(state.get("startedAt"))
        return Step(name, "run", f"cut off while running since {since}; resumes", state, due_at=due)
    return Step(name, "run", f"unknown status {status!r}; running it", state, due_at=due)


def plan_client(
    doc: documents.Client,
    states: dict[str, dict[str, Any]],
    pipeline: Pipeline,
    wanted: set[str] | None,
    now: dt.datetime,
    state_problems: list[Problem] | None = None,
) -> ClientPlan:
    """A client's steps: the selected operations in order, each decided from its state
    (`states` already read through `documents.state`, their problems in `state_problems`)."""
    plan = ClientPlan(doc.id, doc.name, doc.data)
    plan.operations = list(doc.operations) if doc.operations is not None else []
    if doc.operations is None and not doc.operations_invalid:
        plan.operations = list(pipeline.names)
    plan.unknown_operations = list(doc.unknown_operations)
    plan.invalid_operations = doc.operations_invalid
    plan.states = {n: s for n, s in states.items() if n in plan.operations}
    plan.stored_due = doc.next_due
    plan.stored_problems = doc.stored_problems
    plan.problems = [*doc.problems, *(state_problems or [])]
    plan.checked = {(None, f) for f in documents.CLIENT_FIELDS} | {
        (n, f) for n in pipeline.names for f in DECISION_FIELDS
    }
    if plan.invalid_operations:
        names = [n for n in pipeline.names if wanted is None or n in wanted]
        plan.steps = [Step(n, "skip", INVALID_OPERATIONS) for n in names]
        return plan
    blocked_by: str | None = None
    for name in plan.operations:
        if wanted is not None and name not in wanted:
            continue
        op = pipeline.get(name)
        assert op is not None
        step = decide(plan.states.get(name), op, now)
        if blocked_by is not None and step.decision == "run":
            # Held back by an earlier operation that is quarantined or backing off: the plan
            # says so, as the run will (it used to say such a step would run).
            step = Step(name, "skip", f"blocked: {blocked_by}", step.state, due_at=step.due_at)
        elif step.decision == "skip" and step.blocks and blocked_by is None:
            blocked_by = f"{name} is {step.reason.split(' ', 1)[0]}"
        plan.steps.append(step)
    return plan


def next_due(plan: ClientPlan, pipeline: Pipeline, now: dt.datetime) -> dt.datetime:
    """The earliest moment one of the client's operations can run: an operation that failed or
    is quarantined holds back the ones after it until it is due itself."""
    if plan.invalid_operations:
        return now
    earliest, gate = NEVER, EPOCH
    for name in plan.operations:
        op = pipeline.get(name)
        assert op is not None
        state = plan.states.get(name)
        due = due_at(state, op)
        earliest = min(earliest, max(due, gate))
        held = state and state.get("status") == "partial" and state.get("heldUntil")
        if state and (state.get("status") in ("failed", "quarantined") or held):
            gate = max(gate, due)
    return earliest


def failing(plan: ClientPlan, pipeline: Pipeline) -> dict[str, dict[str, Any]]:
    """The client's operations that failed last time (backing off or quarantined), as stored
    on the client document so status can list them without reading every state."""
    out: dict[str, dict[str, Any]] = {}
    for name in plan.operations:
        state = plan.states.get(name) or {}
        k = failures_of(state)
        held = state.get("heldUntil")
        if state.get("status") == "partial" and isinstance(held, dt.datetime):
            # Waiting out a service's Retry-After: listed as backed off until then.
            out[name] = {"state": "backoff", "failures": max(k, 1), "since": _when(state)}
            out[name].update(dueAt=held, error="the service asked to wait (Retry-After)")
            continue
        if state.get("status") not in ("failed", "quarantined") or k < 1:
            continue
        op = pipeline.get(name)
        assert op is not None
        quarantined = state.get("status") == "quarantined"
        due = due_at(state, op)
        out[name] = {
            "state": "quarantined" if quarantined else "backoff",
            "failures": k,
            "since": (state.get("quarantinedAt") if quarantined else None) or _when(state),
            "dueAt": None if quarantined else due,
            "error": state.get("error") if isinstance(state.get("error"), str) else None,
        }
    return out


def client_fields(
    plan: ClientPlan, pipeline: Pipeline, now: dt.datetime, stamp_shard: bool = False
) -> dict[str, Any]:
    """What the client document says about its work: when it is next due and what is failing.

    Only the full pass stamps `shard` (`stamp_shard`): a run of an older shard layout, still
    finishing while the new one starts, must not write its own layout's shard back."""
    failures = failing(plan, pipeline)
    fields: dict[str, Any] = {
        "nextDueAt": next_due(plan, pipeline, now),
        "failing": failures,
        "failingCount": len(failures),
        "quarantinedCount": sum(1 for f in failures.values() if f["state"] == "quarantined"),
        **documents.problem_fields(plan.all_problems()),
    }
    if stamp_shard and plan.shard is not None:
        fields["shard"] = plan.shard
    return fields
