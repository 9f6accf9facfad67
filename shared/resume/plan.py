"""Planning: which client-operations to run, skip or resume, and in which order. Reads only.

Clients are read in pages and their operation states with one batched `get_all` per page, so
the cost is a handful of round trips per 500 clients rather than one per document.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from google.cloud import firestore

from shared import store
from shared.config import Settings
from shared.resume.pipeline import Pipeline

PAGE_SIZE = 500
_NEVER = dt.datetime.min.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class RunOptions:
    """What a trigger request (or the command line) narrowed the run to."""

    client_id: str | None = None
    operations: tuple[str, ...] | None = None
    dry_run: bool = False
    stream: int | None = None


@dataclass
class Step:
    operation: str
    decision: str  # "run" or "skip"
    reason: str
    state: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"operation": self.operation, "decision": self.decision, "reason": self.reason}


@dataclass
class ClientPlan:
    client_id: str
    name: str
    data: dict[str, Any]
    steps: list[Step] = field(default_factory=list)
    unknown_operations: list[str] = field(default_factory=list)

    @property
    def priority(self) -> dt.datetime:
        """When this client's pending work last ran: never-run first, then oldest."""
        stamps = [_last_touched(s.state) for s in self.steps if s.decision == "run"]
        return min(stamps) if stamps else dt.datetime.max.replace(tzinfo=dt.UTC)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "clientId": self.client_id,
            "name": self.name,
            "operations": [s.as_dict() for s in self.steps],
        }
        if self.unknown_operations:
            out["unknownOperations"] = self.unknown_operations
        return out


def _last_touched(state: dict[str, Any] | None) -> dt.datetime:
    if not state:
        return _NEVER
    for key in ("finishedAt", "startedAt"):
        value = state.get(key)
        if isinstance(value, dt.datetime):
            return value
    return _NEVER


def _fmt(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "an unknown time"


def decide(state: dict[str, Any] | None, now: dt.datetime, fresh_hours: float) -> Step:
    """One operation's decision from its stored state (the operation name is filled in later)."""
    if not state:
        return Step("", "run", "never ran", state)
    status = state.get("status")
    finished = state.get("finishedAt")
    if status == "success":
        if isinstance(finished, dt.datetime) and now - finished < dt.timedelta(hours=fresh_hours):
            return Step("", "skip", f"succeeded at {_fmt(finished)}, within {fresh_hours:g}h")
        return Step("", "run", f"stale success from {_fmt(finished)}", state)
    if status == "failed":
        resume = " from its checkpoint" if isinstance(state.get("checkpoint"), dict) else ""
        return Step("", "run", f"failed at {_fmt(finished)}; retrying{resume}", state)
    if status == "partial":
        return Step("", "run", "partial; resumes from its checkpoint", state)
    if status == "running":
        since = _fmt(state.get("startedAt"))
        return Step("", "run", f"cut off while running since {since}; resumes", state)
    return Step("", "run", f"unknown status {status!r}; running it", state)


class Planner:
    """Reads clients and their operation states and decides, without writing anything."""

    def __init__(self, client: firestore.Client, settings: Settings, pipeline: Pipeline) -> None:
        self.client = client
        self.settings = settings
        self.pipeline = pipeline
        self.reads = 0  # round trips issued, for tests and benchmarks

    def clients(self, options: RunOptions) -> Iterator[list[firestore.DocumentSnapshot]]:
        """Active clients matching the filters, a page at a time."""
        call = store.call(self.settings)
        if options.client_id:
            with store.translate_errors("reading the client"):
                snap = self.client.collection(store.CLIENTS).document(options.client_id).get(**call)
            self.reads += 1
            data = snap.to_dict() if snap.exists else None
            stream = options.stream
            if (
                data
                and data.get("active") is True
                and (stream is None or data.get("stream") == stream)
            ):
                yield [snap]
            return
        query = self.client.collection(store.CLIENTS).where(
            filter=firestore.FieldFilter("active", "==", True)
        )
        if options.stream is not None:
            query = query.where(filter=firestore.FieldFilter("stream", "==", options.stream))
        query = query.order_by("__name__").limit(PAGE_SIZE)
        last = None
        while True:
            page_query = query.start_after(last) if last is not None else query
            with store.translate_errors("listing clients"):
                page = list(page_query.stream(**call))
            self.reads += 1
            if page:
                yield page
            if len(page) < PAGE_SIZE:
                return
            last = page[-1]

    def plan(self, options: RunOptions, now: dt.datetime | None = None) -> list[ClientPlan]:
        """Every selected client's steps, oldest work first."""
        plans: list[ClientPlan] = []
        wanted = set(options.operations) if options.operations else None
        for page in self.clients(options):
            plans.extend(self._plan_page(page, wanted, now))
        plans.sort(key=lambda p: (p.priority, p.client_id))
        return plans

    def _plan_page(
        self,
        page: list[firestore.DocumentSnapshot],
        wanted: set[str] | None,
        now: dt.datetime | None,
    ) -> list[ClientPlan]:
        plans: list[ClientPlan] = []
        refs = []
        for snap in page:
            data = snap.to_dict() or {}
            plan = ClientPlan(snap.id, str(data.get("name") or snap.id), data)
            selected = data.get("operations")
            names = list(self.pipeline.names)
            if isinstance(selected, list):
                plan.unknown_operations = [str(n) for n in selected if n not in names]
                names = [n for n in names if n in selected]
            if wanted is not None:
                names = [n for n in names if n in wanted]
            plan.steps = [Step(n, "run", "") for n in names]
            refs.extend(self._state_ref(snap.id, n) for n in names)
            plans.append(plan)
        states: dict[str, dict[str, Any]] = {}
        read_time = None
        if refs:
            with store.translate_errors("reading operation states"):
                for snap in self.client.get_all(refs, **store.call(self.settings)):
                    read_time = read_time or snap.read_time
                    if snap.exists:
                        states[snap.reference.path] = snap.to_dict()
            self.reads += 1
        clock = now or read_time or dt.datetime.now(dt.UTC)
        for plan in plans:
            for step in plan.steps:
                state = states.get(self._state_ref(plan.client_id, step.operation).path)
                decided = decide(state, clock, self.pipeline.fresh_hours)
                step.decision, step.reason, step.state = decided.decision, decided.reason, state
        return plans

    def _state_ref(self, client_id: str, operation: str) -> firestore.DocumentReference:
        return (
            self.client.collection(store.CLIENTS)
            .document(client_id)
            .collection(store.OPERATIONS)
            .document(operation)
        )
