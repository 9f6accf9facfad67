"""One worker: runs clients one after another, each client's operations in pipeline order.

A failed client-operation is an outcome, not an error: it blocks that client's later
operations and the worker goes on. Trouble with one client (deleted, claimed by a live run of
another lock, a write the store refuses, a document of the wrong shape) is that client's only:
its remaining operations are skipped with the reason, and the next client starts clean. Only
the run's own trouble escapes: `LeaseLost` (stop at once, write nothing more), the store
being unreachable, a bug.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from google.cloud import firestore

from shared import documents, store
from shared.errors import ClientTrouble, LeaseLost, OperationFailed, StoreUnavailable
from shared.log import bind, get_logger
from shared.resume import limits
from shared.resume.handle import IO
from shared.resume.http_operation import run_http
from shared.resume.operations import Context, Outcome, run_python
from shared.resume.pipeline import Operation
from shared.resume.plan import (
    DECISION_FIELDS,
    RESUMES,
    ClientPlan,
    Step,
    client_fields,
    failures_of,
    next_due,
)
from shared.resume.writes import ClientWrites

if TYPE_CHECKING:
    from shared.fence import Fence
    from shared.resume.engine import RunContext

log = get_logger("engine")
MAX_ERROR = 500


def one_line(exc: BaseException | str) -> str:
    """An error as stored, mailed and answered: one line, bounded, secrets masked (an
    operation may quote a key in its exception)."""
    text = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    return documents.error_line(text, MAX_ERROR)


class Aborted(Exception):
    """Another worker hit a fatal error; this one stops starting work."""


class Stop:
    """Why new work must not start: budget, cancel, or a lost lease (which raises)."""

    def __init__(self, run: RunContext) -> None:
        self.run = run
        self.aborted = threading.Event()

    def reason(self) -> str | None:
        hb = self.run.heartbeat
        if hb.lost.is_set():
            raise LeaseLost(f"run {self.run.run_id} lost its lease")
        if self.aborted.is_set():
            raise Aborted
        if hb.cancel_requested.is_set():
            return "cancelled"
        if time.monotonic() >= self.run.deadline:
            return "time budget"
        return None

    def quiet(self) -> str | None:
        try:
            return self.reason()
        except (LeaseLost, Aborted):
            return "stopping"


def result(
    plan: ClientPlan,
    operation: str,
    outcome: str,
    reason: str,
    counts: dict[str, int] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    return {
        "clientId": plan.client_id,
        "operation": operation,
        "outcome": outcome,
        "reason": reason,
        "counts": counts or {},
        "error": error,
    }


class Worker:
    """Runs clients one after another; one per thread."""

    def __init__(
        self, run: RunContext, stop: Stop, fence: Fence, record: Callable[[dict[str, Any]], None]
    ):
        self.run = run
        self.stop = stop
        self.fence = fence
        self._record = record
        self.recorded: set[str] = set()  # the current client's operations with a result
        self.ran: set[str] = set()  # the current client's operations this run executed

    def record(self, entry: dict[str, Any]) -> None:
        self.recorded.add(entry["operation"])
        self._record(entry)

    def ref(self, plan: ClientPlan, operation: str) -> firestore.DocumentReference:
        return self.fence.client.document(f"clients/{plan.client_id}/operations/{operation}")

    def client(self, index: int, total: int, plan: ClientPlan) -> None:
        self.recorded, self.ran = set(), set()
        writes = ClientWrites(self.fence, plan.client_id)
        with bind(clientId=plan.client_id):
            try:
                self._steps(index, total, plan, writes)
                self._close(plan, writes)
            except ClientTrouble as exc:
                log.warning("client skipped: %s", exc.reason)
                for step in plan.steps:
                    if step.operation not in self.recorded:
                        self.record(result(plan, step.operation, "skipped", exc.reason))
            except (LeaseLost, KeyboardInterrupt):
                raise  # a run that lost its lease writes nothing more
            except BaseException:
                # Keep the outcomes already reached: a last try to save them, then stop.
                try:
                    self._close(plan, writes)
                except Exception as exc:
                    log.warning("could not save the client's last outcomes: %s", one_line(exc))
                raise

    def _close(self, plan: ClientPlan, writes: ClientWrites) -> None:
        """Save what is staged and the client's due fields; a client that had nothing to run
        is claimed only to repair a wrong due time or to record a change in its problems."""
        now = self.run.now()
        if writes.claim is None and not writes.staged:
            stale_due = (
                not plan.invalid_operations
                and plan.stored_due is not None
                and plan.stored_due <= now
                and next_due(plan, self.run.pipeline, now) > now
            )
            changed = [p.stored() for p in plan.all_problems()] != [
                p.stored() for p in plan.stored_problems
            ]
            if not (stale_due or changed):
                return
            writes.open()
        first = [True]

        def fields() -> dict[str, Any]:
            # Asked again when someone wrote the client meanwhile (an operator's retry): the
            # states of operations this run did not run are read afresh, so a release made
            # during the run is not undone by the run's plan-time view.
            if not first[0]:
                self._refresh(plan)
            first[0] = False
            return client_fields(plan, self.run.pipeline, self.run.now())

        if any(s.get("status") in ("failed", "quarantined") for s in plan.states.values()):
            self._refresh(plan)
            first[0] = False
        writes.close(fields)

    def _refresh(self, plan: ClientPlan) -> None:
        """Read again the decision fields of the client's operations this run did not run."""
        names = [n for n in plan.operations if n not in self.ran]
        if not names:
            return
        refs = [self.ref(plan, n) for n in names]
        with store.translate_errors("reading the client's states again"):
            found = self.fence.client.get_all(
                refs, field_paths=DECISION_FIELDS, **store.call(self.run.settings)
            )
            fresh = {s.id: s.to_dict() for s in found if s.exists}
        for name in names:
            if name in fresh:
                plan.states[name] = documents.state(plan.client_id, name, fresh[name])[0]
            else:
                plan.states.pop(name, None)

    def _steps(self, index: int, total: int, plan: ClientPlan, writes: ClientWrites) -> None:
        if plan.invalid_operations or plan.unknown_operations:
            problem = next(p.problem for p in plan.problems if p.field == "operations")
            log.warning("%s", problem)  # one line, however many names
        for name in plan.unknown_operations:  # at most documents.MAX_NAMED
            self.record(result(plan, name, "skipped", "unknown operation: not in the pipeline"))
        blocked_by: str | None = None
        for step in plan.steps:
            if step.decision == "skip":
                self.record(result(plan, step.operation, "skipped", step.reason))
                if step.blocks and blocked_by is None:
                    blocked_by = f"{step.operation} is {step.reason.split(' ', 1)[0]}"
                continue
            if blocked_by is not None:
                self.record(result(plan, step.operation, "skipped", f"blocked: {blocked_by}"))
                continue
            why = self.stop.reason()
            if why is not None:
                self.record(result(plan, step.operation, "deferred", f"{why}: not started"))
                continue
            self.run.heartbeat.set_progress(
                clientId=plan.client_id,
                clientIndex=index,
                clientCount=total,
                operation=step.operation,
            )
            if not self.step(plan, step, writes):
                blocked_by = f"{step.operation} failed"

    def _load(self, plan: ClientPlan, step: Step) -> dict[str, Any]:
        """The whole state (checkpoint included) of a step that resumes, read through
        `documents.state`; its load-time problems join the client's."""
        plan.checked |= {(step.operation, f) for f in documents.LOAD_FIELDS}
        if (step.state or {}).get("status") not in RESUMES:
            return {}
        with store.translate_errors("loading a checkpoint"):
            snap = self.ref(plan, step.operation).get(**store.call(self.run.settings))
        if not snap.exists:
            return {}
        clean, problems = documents.state(plan.client_id, step.operation, snap.to_dict())
        plan.problems += [p for p in problems if p.field in documents.LOAD_FIELDS]
        return clean

    def step(self, plan: ClientPlan, step: Step, writes: ClientWrites) -> bool:
        """Run one operation; False if it failed (so the client's later steps are blocked)."""
        op = self.run.pipeline.get(step.operation)
        assert op is not None
        state = step.state or {}
        full = self._load(plan, step)
        if full.get("badCheckpoint"):
            reason = (
                "not run: its stored checkpoint is not a map; fix or delete "
                f"clients/{plan.client_id}/operations/{op.name}"
            )
            self.record(result(plan, op.name, "skipped", reason))
            return False
        ref = self.ref(plan, op.name)
        self.ran.add(op.name)
        writes.stage(
            ref,
            {
                "status": "running",
                "runId": self.run.run_id,
                "startedAt": firestore.SERVER_TIMESTAMP,
                "finishedAt": None,
                "error": None,
                "attempts": (state.get("attempts") or 0) + 1,
            },
        )
        if writes.claim is None:
            writes.commit()  # the claim: nothing runs before the client is ours
        else:
            writes.soon()
        # Partial, cut off (still "running" after a crash) or failed: all resume from the last
        # saved checkpoint. Only success clears it.
        checkpoint = full.get("checkpoint")
        io = IO(self, plan, op.name, checkpoint, writes)
        if checkpoint is not None:
            io.counts = dict(full.get("counts") or {})
        base_counts = dict(io.counts)
        failures = failures_of(state) + 1
        fallback = {"status": "failed", "finishedAt": firestore.SERVER_TIMESTAMP}
        fallback["failures"] = failures
        now = self.run.now
        with bind(operation=op.name):
            try:
                outcome = self.execute(op, plan, io)
            except (LeaseLost, StoreUnavailable, Aborted, ClientTrouble):
                raise
            except Exception as exc:
                error = one_line(exc)
                if not isinstance(exc, OperationFailed):
                    error = f"{type(exc).__name__}: {error}"
                log.warning("operation failed: %s", error)
                quarantined = 0 < op.quarantine_after <= failures
                fields: dict[str, Any] = {
                    "status": "quarantined" if quarantined else "failed",
                    "finishedAt": firestore.SERVER_TIMESTAMP,
                    "error": error,
                    "counts": io.counts,
                    "failures": failures,
                }
                if io.saved:  # a coalesced checkpoint is never lost with the failure
                    fields["checkpoint"] = io.checkpoint
                if quarantined:
                    fields["quarantinedAt"] = firestore.SERVER_TIMESTAMP
                    log.error("quarantined after %d failures in a row", failures)
                writes.stage(ref, fields, fallback)
                plan.states[op.name] = {
                    "status": fields["status"],
                    "finishedAt": now(),
                    "failures": failures,
                    "error": error,
                    **({"quarantinedAt": now()} if quarantined else {}),
                }
                reason = step.reason + (
                    f"; quarantined after {failures} failures in a row" if quarantined else ""
                )
                counts = _delta(io.counts, base_counts)
                self.record(result(plan, op.name, "failed", reason, counts, error))
                return False
        run_counts = _delta(io.counts, base_counts)
        if outcome.done:
            writes.stage(
                ref,
                {
                    "status": "success",
                    "finishedAt": firestore.SERVER_TIMESTAMP,
                    "checkpoint": None,
                    "counts": io.counts,
                    "error": None,
                    "failures": 0,
                    "quarantinedAt": None,
                },
                fallback,
            )
            plan.states[op.name] = {"status": "success", "finishedAt": now(), "failures": 0}
            self.record(result(plan, op.name, "processed", step.reason, run_counts))
            return True
        why = self.stop.quiet() or outcome.reason or "operation reported not done"
        held = (
            io.gate.limiter.held_until_wall if outcome.reason == limits.HELD_PAST_BUDGET else None
        )
        writes.stage(
            ref,
            {
                "status": "partial",
                "finishedAt": firestore.SERVER_TIMESTAMP,
                "checkpoint": io.checkpoint,
                "counts": io.counts,
                "heldUntil": held,  # the service's Retry-After: due then, not next tick
            },
            fallback,
        )
        plan.states[op.name] = {
            **state,
            "status": "partial",
            "finishedAt": now(),
            "heldUntil": held,
        }
        reason = f"{why}: resumes from its checkpoint" + (
            f" at {held.strftime('%Y-%m-%d %H:%M:%S UTC')}" if held else ""
        )
        self.record(result(plan, op.name, "deferred", reason, run_counts))
        return True

    def execute(self, op: Operation, plan: ClientPlan, io: IO) -> Outcome:
        if op.kind == "http":
            body = {"clientId": plan.client_id, "operation": op.name, "runId": self.run.run_id}
            return run_http(op, io, body)
        ctx = Context(
            client_id=plan.client_id,
            client=plan.data,
            run_id=self.run.run_id,
            operation=op.name,
            io=io,
        )
        outcome = run_python(op, ctx)
        for name, n in outcome.counts.items():
            io.count(name, n)
        return outcome


def _delta(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}
