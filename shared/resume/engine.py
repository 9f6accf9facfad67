"""The resume engine: client by client, operation by operation, within the time budget.

A failed client-operation is an outcome, not an error: it blocks that client's later operations
and the run goes on. Only the engine's own failures (the store, a bug) escape as exceptions, and
`LeaseLost` stops everything at once without another write.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from google.cloud import firestore

from shared import store
from shared.config import Settings
from shared.errors import LeaseLost, OperationFailed, StoreUnavailable
from shared.heartbeat import Heartbeat
from shared.lock import Lease, Lock
from shared.log import bind, get_logger, mask
from shared.resume.operations import Context, Outcome, run_http, run_python
from shared.resume.pipeline import Operation, Pipeline
from shared.resume.plan import ClientPlan, Planner, RunOptions, Step

log = get_logger("engine")
MAX_ERROR = 500


@dataclass
class RunContext:
    """Everything `run_smart_resume` needs; the trigger and the command line build it."""

    settings: Settings
    client: firestore.Client
    lock: Lock
    lease: Lease
    heartbeat: Heartbeat
    pipeline: Pipeline
    options: RunOptions
    deadline: float  # time.monotonic() after which no new work starts
    run_id: str


@dataclass
class RunResult:
    status: str  # completed | partial | cancelled
    summary: dict[str, Any]
    results: list[dict[str, Any]]
    client_names: dict[str, str] = field(default_factory=dict)


def one_line(exc: BaseException | str) -> str:
    """An error as stored, mailed and answered: one line, bounded, secrets masked (an
    operation may quote a key in its exception)."""
    text = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    text = mask(" ".join(text.split()))
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 1] + "…"


class _Aborted(Exception):
    """Another worker hit a fatal error; this one stops without writing more."""


class _Stop:
    """Why new work must not start: budget, cancel, or a lost lease (which raises)."""

    def __init__(self, run: RunContext) -> None:
        self.run = run
        self.aborted = threading.Event()

    def reason(self) -> str | None:
        hb = self.run.heartbeat
        if hb.lost.is_set():
            raise LeaseLost(f"run {self.run.run_id} lost its lease")
        if self.aborted.is_set():
            raise _Aborted
        if hb.cancel_requested.is_set():
            return "cancelled"
        if time.monotonic() >= self.run.deadline:
            return "time budget"
        return None


class _Worker:
    """Runs one client's steps in order, writing each state through the fence."""

    def __init__(self, run: RunContext, stop: _Stop, record: Callable[[dict[str, Any]], None]):
        self.run = run
        self.stop = stop
        self.record = record
        self.pending: list[tuple[firestore.DocumentReference, dict[str, Any]]] = []

    def ref(self, client_id: str, operation: str) -> firestore.DocumentReference:
        return (
            self.run.client.collection(store.CLIENTS)
            .document(client_id)
            .collection(store.OPERATIONS)
            .document(operation)
        )

    def write(
        self, client_id: str, operation: str, fields: dict[str, Any], *, defer: bool = False
    ) -> None:
        """A fenced state write. An operation's outcome is deferred and rides in the commit of
        the client's next write (the next operation's `running` mark), saving a round trip per
        operation; `flush` commits what is left when the client is done."""
        self.pending.append((self.ref(client_id, operation), fields))
        if not defer:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        writes, self.pending = self.pending, []

        def add(batch: Any) -> None:
            for ref, fields in writes:
                batch.set(ref, fields, merge=True)

        try:
            self.run.lock.fenced_commit(self.run.lease, add)
        except (LeaseLost, StoreUnavailable):
            raise
        except Exception:
            # Only the newest write can be at fault (the others were valid states); keep them
            # for the next commit so an earlier outcome is not lost with it.
            self.pending = writes[:-1]
            raise

    def client(self, index: int, count: int, plan: ClientPlan) -> None:
        self.pending = []
        try:
            self._client(index, count, plan)
        except LeaseLost:
            raise  # a run that lost its lease writes nothing more
        except BaseException:
            # Record the outcomes already reached before giving up on this client.
            with contextlib.suppress(Exception):
                self.flush()
            raise
        self.flush()

    def _client(self, index: int, count: int, plan: ClientPlan) -> None:
        blocked_by: str | None = None
        with bind(clientId=plan.client_id):
            for step in plan.steps:
                if step.decision == "skip":
                    self.result(plan, step, "skipped", step.reason)
                    continue
                if blocked_by is not None:
                    self.result(plan, step, "skipped", f"blocked: {blocked_by} failed")
                    continue
                why = self.stop.reason()
                if why is not None:
                    self.result(plan, step, "deferred", f"{why}: not started")
                    continue
                self.run.heartbeat.set_progress(
                    clientId=plan.client_id,
                    clientIndex=index,
                    clientCount=count,
                    operation=step.operation,
                )
                if not self.step(plan, step):
                    blocked_by = step.operation

    def result(
        self,
        plan: ClientPlan,
        step: Step,
        outcome: str,
        reason: str,
        counts: dict[str, int] | None = None,
        error: str | None = None,
    ) -> None:
        self.record(
            {
                "clientId": plan.client_id,
                "operation": step.operation,
                "outcome": outcome,
                "reason": reason,
                "counts": counts or {},
                "error": error,
            }
        )

    def step(self, plan: ClientPlan, step: Step) -> bool:
        """Run one operation; False if it failed (so the client's later steps are blocked)."""
        op = self.run.pipeline.get(step.operation)
        assert op is not None
        state = step.state or {}
        # Partial, cut off (still "running" after a crash) or failed: all resume from the last
        # saved checkpoint. Only success clears it.
        resuming = state.get("status") != "success" and isinstance(state.get("checkpoint"), dict)
        io = _IO(self, plan.client_id, op.name, state.get("checkpoint") if resuming else None)
        if resuming:
            io.counts = dict(state.get("counts") or {})
        base_counts = dict(io.counts)
        self.write(
            plan.client_id,
            op.name,
            {
                "status": "running",
                "runId": self.run.run_id,
                "startedAt": firestore.SERVER_TIMESTAMP,
                "finishedAt": None,
                "checkpoint": io.checkpoint,
                "counts": io.counts,
                "error": None,
                "attempts": firestore.Increment(1),
            },
        )
        with bind(operation=op.name):
            try:
                outcome = self.execute(op, plan, io)
            except (LeaseLost, StoreUnavailable, _Aborted):
                raise
            except Exception as exc:
                error = one_line(exc)
                if not isinstance(exc, OperationFailed):
                    error = f"{type(exc).__name__}: {error}"
                log.warning("operation failed: %s", error)
                self.write(
                    plan.client_id,
                    op.name,
                    {
                        "status": "failed",
                        "finishedAt": firestore.SERVER_TIMESTAMP,
                        "error": error,
                        "counts": io.counts,
                    },
                    defer=True,
                )
                self.result(
                    plan, step, "failed", step.reason, _delta(io.counts, base_counts), error
                )
                return False
        run_counts = _delta(io.counts, base_counts)
        if outcome.done:
            self.write(
                plan.client_id,
                op.name,
                {
                    "status": "success",
                    "finishedAt": firestore.SERVER_TIMESTAMP,
                    "checkpoint": None,
                    "counts": io.counts,
                    "error": None,
                },
                defer=True,
            )
            self.result(plan, step, "processed", step.reason, run_counts)
            return True
        why = self.stop.reason() or "operation reported not done"
        self.write(
            plan.client_id,
            op.name,
            {
                "status": "partial",
                "finishedAt": firestore.SERVER_TIMESTAMP,
                "checkpoint": io.checkpoint,
                "counts": io.counts,
            },
            defer=True,
        )
        self.result(plan, step, "deferred", f"{why}: resumes from its checkpoint", run_counts)
        return True

    def execute(self, op: Operation, plan: ClientPlan, io: _IO) -> Outcome:
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


class _IO:
    """The checkpoint, counts and stop signal of one client-operation."""

    def __init__(
        self, worker: _Worker, client_id: str, operation: str, checkpoint: dict[str, Any] | None
    ) -> None:
        self.worker = worker
        self.client_id = client_id
        self.operation = operation
        self.checkpoint = checkpoint
        self.counts: dict[str, int] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.worker.write(
            self.client_id, self.operation, {"checkpoint": checkpoint, "counts": self.counts}
        )
        self.checkpoint = checkpoint

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + int(n)

    def should_stop(self) -> bool:
        # Operations only learn "stop"; the engine re-checks and raises after they return.
        try:
            return self.worker.stop.reason() is not None
        except (LeaseLost, _Aborted):
            return True


def _delta(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}


def summarize(results: list[dict[str, Any]], clients: int, duration: float) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "clients": clients,
        "processed": 0,
        "skipped": 0,
        "failed": 0,
        "deferred": 0,
        "durationSeconds": round(duration, 3),
        "impact": {},
    }
    for r in results:
        summary[r["outcome"]] += 1
        for name, n in (r.get("counts") or {}).items():
            summary["impact"][name] = summary["impact"].get(name, 0) + n
    return summary


def execute(run: RunContext, plans: list[ClientPlan]) -> RunResult:
    """Run the plan; raises `LeaseLost` (stop at once) or store errors (the run failed)."""
    started = time.monotonic()
    stop = _Stop(run)
    results_by_client: dict[int, list[dict[str, Any]]] = {}
    mutex = threading.Lock()
    failure: list[BaseException] = []

    def work(index: int, plan: ClientPlan) -> None:
        collected: list[dict[str, Any]] = []
        try:
            if not failure:
                _Worker(run, stop, collected.append).client(index, len(plans), plan)
        except _Aborted:
            pass
        except BaseException as exc:
            with mutex:
                failure.append(exc)
            stop.aborted.set()  # the other workers stop at their next check
            raise
        finally:
            with mutex:
                results_by_client[index] = collected

    if run.settings.concurrency == 1:
        for index, plan in enumerate(plans):
            work(index, plan)
    else:
        with ThreadPoolExecutor(run.settings.concurrency, "smart-resume-worker") as pool:
            futures = [
                pool.submit(contextvars.copy_context().run, work, i, p) for i, p in enumerate(plans)
            ]
            for future in futures:
                future.exception()
        if failure:
            raise failure[0]
    results = [r for i in range(len(plans)) for r in results_by_client.get(i, [])]
    summary = summarize(results, len(plans), time.monotonic() - started)
    status = "completed"
    if summary["deferred"]:
        deferred = [r["reason"] for r in results if r["outcome"] == "deferred"]
        status = "cancelled" if any(d.startswith("cancelled") for d in deferred) else "partial"
    elif run.heartbeat.cancel_requested.is_set():
        status = "cancelled"
    return RunResult(
        status=status,
        summary=summary,
        results=results,
        client_names={p.client_id: p.name for p in plans},
    )


def run_smart_resume(run: RunContext) -> RunResult:
    """The resume module's entry point: plan, then execute, holding no state between runs."""
    planner = Planner(run.client, run.settings, run.pipeline)
    plans = planner.plan(run.options)
    log.info(
        "planned %d clients, %d operations to run",
        len(plans),
        sum(1 for p in plans for s in p.steps if s.decision == "run"),
    )
    result = execute(run, plans)
    for plan in plans:
        for name in plan.unknown_operations:
            result.results.append(
                {
                    "clientId": plan.client_id,
                    "operation": name,
                    "outcome": "skipped",
                    "reason": "unknown operation: not in the pipeline",
                    "counts": {},
                    "error": None,
                }
            )
            result.summary["skipped"] += 1
    return result
