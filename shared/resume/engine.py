"""The resume engine: client by client, operation by operation, within the time budget.

A failed client-operation is an outcome, not an error: it blocks that client's later operations
and the run goes on. Only the engine's own failures (the store, a bug) escape as exceptions, and
`LeaseLost` stops everything at once without another write.

Clients stream through: the selection reads a page of due clients, workers run them, the next
page is read when the queue runs low, so memory follows the page, not the number of clients.

Writes per client: the claim (a transaction that also marks the first operation `running` and
carries the previous client's last outcome), then one commit per further operation (its
`running` mark with the previous operation's outcome), plus one per saved checkpoint. The
client's last outcome and its due fields ride in the worker's next claim, or its final flush.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from google.cloud import firestore

from shared.config import Settings
from shared.errors import LeaseLost, OperationFailed, StoreUnavailable
from shared.fence import Claim, ClientGone, Fence, Group
from shared.heartbeat import Heartbeat
from shared.lock import Lease, Lock
from shared.log import bind, get_logger, mask
from shared.resume import limits
from shared.resume.due import Reconcile, Selection, client_fields
from shared.resume.http_operation import run_http
from shared.resume.operations import Context, Outcome, run_python
from shared.resume.pipeline import Operation, Pipeline
from shared.resume.plan import RESUMES, ClientPlan, RunOptions, Step, failures_of, next_due
from shared.resume.results import ResultSink

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
    started: float = field(default_factory=time.monotonic)

    def now(self) -> dt.datetime:
        """The server's clock, as of the acquire, moved on by the local monotonic clock."""
        return self.lease.acquired_at + dt.timedelta(seconds=time.monotonic() - self.started)


@dataclass
class RunResult:
    status: str  # completed | partial | cancelled
    summary: dict[str, Any]
    results: list[dict[str, Any]]
    client_names: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # reads, commits: for benchmarks
    paged: int = 0  # results already written to runs/{runId}/results/{page}, not in `results`
    omitted: int = 0  # results that could not be stored at all


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

    def quiet(self) -> str | None:
        try:
            return self.reason()
        except (LeaseLost, _Aborted):
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


class _Worker:
    """Runs clients one after another; one per thread, so its carried group stays its own."""

    def __init__(
        self, run: RunContext, stop: _Stop, fence: Fence, record: Callable[[dict[str, Any]], None]
    ):
        self.run = run
        self.stop = stop
        self.fence = fence
        self.record = record
        self.carry: Group | None = None  # the previous client's last writes
        self.claim: Claim | None = None
        self.pending: list[tuple[firestore.DocumentReference, dict[str, Any]]] = []

    def ref(self, plan: ClientPlan, operation: str) -> firestore.DocumentReference:
        return self.fence.client.document(f"clients/{plan.client_id}/operations/{operation}")

    # -- writing ---------------------------------------------------------------------------

    def write(self, plan: ClientPlan, operation: str, fields: dict[str, Any]) -> None:
        """Commit `fields` now, with whatever outcome is pending (one round trip)."""
        self.pending.append((self.ref(plan, operation), fields))
        if self.claim is None:
            first, self.pending = self.pending, []
            self.claim = self.fence.claim(plan.client_id, first, self.carry)
            self.carry = None
            if self.claim is None:
                raise ClientGone(plan.client_id)
            return
        writes, self.pending = self.pending, []
        try:
            self.fence.commit([Group(self.claim, writes)])
        except (LeaseLost, StoreUnavailable, ClientGone):
            raise
        except Exception:
            # Only the newest write can be at fault (a checkpoint over 1 MiB, say): keep the
            # outcomes before it for the next commit, so they are not lost with it.
            self.pending = writes[:-1]
            raise

    def defer(self, plan: ClientPlan, operation: str, fields: dict[str, Any]) -> None:
        """An outcome: it rides in the next commit (the next `running` mark, or the claim of
        the worker's next client), saving a round trip per operation."""
        self.pending.append((self.ref(plan, operation), fields))

    def close(self, plan: ClientPlan) -> None:
        """The client is done: its last writes and due fields wait for the next claim."""
        if self.claim is None:
            return
        fields = client_fields(plan, self.run.pipeline, self.run.now())
        fields["claim.open"] = False
        self.carry = Group(self.claim, self.pending, fields)
        self.claim, self.pending = None, []

    def flush(self) -> None:
        if self.carry is not None:
            carry, self.carry = self.carry, None
            self.fence.commit([carry])

    # -- running ---------------------------------------------------------------------------

    def client(self, index: int, total: int, plan: ClientPlan) -> None:
        self.claim, self.pending = None, []
        with bind(clientId=plan.client_id):
            try:
                self._steps(index, total, plan)
            except ClientGone:
                log.warning("client document deleted during the run; its work stops")
                self.claim, self.pending = None, []
                return
            except (LeaseLost, _Aborted):
                self.claim = self.carry = None  # a run that lost its lease writes nothing more
                raise
            except BaseException:
                # Keep the outcomes already reached: they go out with the final flush.
                self.close(plan)
                raise
            if self.claim is None:
                self._repair(plan)
            self.close(plan)

    def _repair(self, plan: ClientPlan) -> None:
        """A client read as due that had nothing to run: if its stored due time is simply
        wrong (written by hand, or by an older version), correct it now rather than read the
        client on every tick until the next full pass."""
        now = self.run.now()
        if plan.invalid_operations or plan.stored_due is None or plan.stored_due > now:
            return
        if next_due(plan, self.run.pipeline, now) <= now:
            return
        self.claim = self.fence.claim(plan.client_id, [], self.carry)
        self.carry = None

    def _steps(self, index: int, total: int, plan: ClientPlan) -> None:
        if plan.invalid_operations:
            log.warning("'operations' is not a list of operation names: nothing run for it")
        for name in plan.unknown_operations:
            log.warning("lists an operation that is not in the pipeline: %s", name[:100])
            self.record(
                result(plan, name[:200], "skipped", "unknown operation: not in the pipeline")
            )
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
            if not self.step(plan, step):
                blocked_by = f"{step.operation} failed"

    def _load(self, plan: ClientPlan, step: Step) -> dict[str, Any]:
        """The whole state (checkpoint included) of a step that resumes; read when it starts."""
        state = step.state or {}
        if state.get("status") not in RESUMES:
            return {}
        from shared import store

        with store.translate_errors("loading a checkpoint"):
            snap = self.ref(plan, step.operation).get(**store.call(self.run.settings))
        return (snap.to_dict() or {}) if snap.exists else {}

    def step(self, plan: ClientPlan, step: Step) -> bool:
        """Run one operation; False if it failed (so the client's later steps are blocked)."""
        op = self.run.pipeline.get(step.operation)
        assert op is not None
        state = step.state or {}
        attempts = state.get("attempts")
        self.write(
            plan,
            op.name,
            {
                "status": "running",
                "runId": self.run.run_id,
                "startedAt": firestore.SERVER_TIMESTAMP,
                "finishedAt": None,
                "error": None,
                "attempts": (attempts if isinstance(attempts, int) else 0) + 1,
            },
        )
        # Partial, cut off (still "running" after a crash) or failed: all resume from the last
        # saved checkpoint. Only success clears it.
        full = self._load(plan, step)
        checkpoint = full.get("checkpoint") if isinstance(full.get("checkpoint"), dict) else None
        io = _IO(self, plan, op.name, checkpoint)
        if checkpoint is not None and isinstance(full.get("counts"), dict):
            io.counts = dict(full["counts"])
        base_counts = dict(io.counts)
        now = self.run.now
        with bind(operation=op.name):
            try:
                outcome = self.execute(op, plan, io)
            except (LeaseLost, StoreUnavailable, _Aborted, ClientGone):
                raise
            except Exception as exc:
                error = one_line(exc)
                if not isinstance(exc, OperationFailed):
                    error = f"{type(exc).__name__}: {error}"
                log.warning("operation failed: %s", error)
                failures = failures_of(state) + 1
                quarantined = 0 < op.quarantine_after <= failures
                fields: dict[str, Any] = {
                    "status": "quarantined" if quarantined else "failed",
                    "finishedAt": firestore.SERVER_TIMESTAMP,
                    "error": error,
                    "counts": io.counts,
                    "failures": failures,
                }
                if quarantined:
                    fields["quarantinedAt"] = firestore.SERVER_TIMESTAMP
                    log.error("quarantined after %d failures in a row", failures)
                self.defer(plan, op.name, fields)
                plan.states[op.name] = {
                    "status": fields["status"],
                    "finishedAt": now(),
                    "failures": failures,
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
            self.defer(
                plan,
                op.name,
                {
                    "status": "success",
                    "finishedAt": firestore.SERVER_TIMESTAMP,
                    "checkpoint": None,
                    "counts": io.counts,
                    "error": None,
                    "failures": 0,
                    "quarantinedAt": None,
                },
            )
            plan.states[op.name] = {"status": "success", "finishedAt": now(), "failures": 0}
            self.record(result(plan, op.name, "processed", step.reason, run_counts))
            return True
        why = self.stop.quiet() or "operation reported not done"
        self.defer(
            plan,
            op.name,
            {
                "status": "partial",
                "finishedAt": firestore.SERVER_TIMESTAMP,
                "checkpoint": io.checkpoint,
                "counts": io.counts,
            },
        )
        plan.states[op.name] = {**state, "status": "partial", "finishedAt": now()}
        reason = f"{why}: resumes from its checkpoint"
        self.record(result(plan, op.name, "deferred", reason, run_counts))
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
    """The checkpoint, counts and stop signal of one client-operation, and the gate its calls
    pass: the operation's limiter, shared by the run's workers, on the run's clock."""

    def __init__(
        self, worker: _Worker, plan: ClientPlan, operation: str, checkpoint: dict[str, Any] | None
    ) -> None:
        self.worker = worker
        self.plan = plan
        self.operation = operation
        self.checkpoint = checkpoint
        self.counts: dict[str, int] = {}
        run = worker.run
        self.gate = limits.Gate(
            limits.for_run(run.run_id).limiter(run.pipeline.get(operation)),
            limits.Budget.of(
                run.deadline, run.settings.time_budget_seconds, run.settings.max_run_seconds
            ),
            self.should_stop,
        )

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        fields = {"checkpoint": checkpoint, "counts": dict(self.counts)}
        self.worker.write(self.plan, self.operation, fields)
        self.checkpoint = checkpoint
        self.worker.run.heartbeat.touch()  # a saved checkpoint is progress: not stuck

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + int(n)

    def should_stop(self) -> bool:
        # Operations only learn "stop"; the engine re-checks and raises after they return.
        return self.worker.stop.quiet() is not None


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


def _not_started(plan: ClientPlan, why: str) -> list[dict[str, Any]]:
    return [
        result(plan, s.operation, "skipped", s.reason)
        if s.decision == "skip"
        else result(plan, s.operation, "deferred", f"{why}: not started")
        for s in plan.steps
    ]


def execute(
    run: RunContext,
    plans: Iterator[ClientPlan],
    fence: Fence,
    total: Callable[[], int | None] = lambda: None,
) -> RunResult:
    """Run the plans as they stream in; raises `LeaseLost` (stop at once) or store errors."""
    started = time.monotonic()
    stop = _Stop(run)
    sink = ResultSink(run.client, run.settings, run.run_id)
    names: dict[str, str] = {}  # for the report's rows: only while results stay in memory
    mutex = threading.Lock()
    failure: list[BaseException] = []
    work: queue.Queue[tuple[int, ClientPlan] | None] = queue.Queue(run.settings.concurrency * 2)
    count = 0
    done = 0  # clients whose work ended (the progress bar and the status function show it)
    heartbeat = run.heartbeat

    def record(entry: dict[str, Any]) -> None:
        sink.add(entry)
        if entry["outcome"] == "failed":
            with mutex:  # in order: a later count never overwritten by an earlier one
                heartbeat.set_progress(failed=sink.counts["failed"])

    def client_done() -> None:
        nonlocal done
        with mutex:
            done += 1
            heartbeat.set_progress(clientsDone=done)

    def worker_loop() -> None:
        worker = _Worker(run, stop, fence, record)
        try:
            while True:
                item = work.get()
                if item is None:
                    break
                if failure:
                    continue
                index, plan = item
                try:
                    worker.client(index, max(total() or 0, index + 1), plan)
                    client_done()
                except _Aborted:
                    pass
                except BaseException as exc:
                    with mutex:
                        failure.append(exc)
                    stop.aborted.set()  # the other workers stop at their next check
            if not failure or not isinstance(failure[0], LeaseLost):
                worker.flush()
        except BaseException as exc:
            with mutex:
                failure.append(exc)
            stop.aborted.set()

    threads = [
        threading.Thread(
            target=contextvars.copy_context().run,
            args=(worker_loop,),
            name=f"smart-resume-worker-{i}",
            daemon=True,
        )
        for i in range(run.settings.concurrency)
    ]
    for thread in threads:
        thread.start()
    stopped_early: str | None = None
    try:
        for plan in plans:
            if sink.inline_open:
                names[plan.client_id] = plan.name
            count += 1
            why = stop.quiet()
            if why is not None or failure:
                # Budget or cancel: the due clients not read yet stay due (oldest first next
                # tick); none of them is read just to be listed as not started.
                stopped_early = why or "stopping"
                for entry in _not_started(plan, stopped_early):
                    record(entry)
                break
            work.put((count - 1, plan))
    finally:
        for _ in threads:
            work.put(None)
        for thread in threads:
            thread.join()
    if failure:
        raise failure[0]
    sink.close()
    summary = summarize([], count, time.monotonic() - started)
    summary.update(sink.counts, impact=sink.impact)
    summary["calls"] = limits.finish(run.run_id)  # per operation: calls, retried, throttled
    # `cancelled` only when the cancel stopped something: a cancel that arrives as the last
    # operation finishes leaves a run that did everything, which is `completed`.
    status = "completed"
    if summary["deferred"] or stopped_early:
        cancelled = stopped_early == "cancelled" or sink.cancelled
        status = "cancelled" if cancelled else "partial"
    return RunResult(
        status=status,
        summary=summary,
        results=sink.inline,
        client_names=names,
        paged=sink.paged,
        omitted=sink.omitted,
    )


def run_smart_resume(run: RunContext) -> RunResult:
    """The resume module's entry point: select what is due, run it as it streams in."""
    selection = Selection(run.client, run.settings, run.pipeline, run.options)
    fence = Fence(run.client, run.settings, run.lease)
    cutoff = run.now()
    if run.options.client_id:
        pages = selection.one()
    else:
        reconcile = Reconcile(selection, fence)
        why = reconcile.reason(cutoff)
        if why is not None:
            log.info("full pass over the active clients: %s", why)
            seen, repaired = reconcile.run(cutoff, lambda: _Stop(run).quiet() is not None)
            log.info("full pass: %d active clients, %d due times repaired", seen, repaired)
        pages = selection.due_pages(cutoff)
    plans = selection.plans(pages, cutoff)
    if run.options.client_id:
        selection.due_total = 1
    result_ = execute(run, plans, fence, lambda: selection.due_total)
    result_.stats = {
        "documentsRead": selection.reads.documents,
        "readRoundTrips": selection.reads.round_trips,
        "commits": fence.commits,
        "writesByDocument": fence.writes_by_document(),
    }
    log.info(
        "ran %d clients: %d processed, %d failed, %d deferred",
        result_.summary["clients"],
        result_.summary["processed"],
        result_.summary["failed"],
        result_.summary["deferred"],
    )
    return result_
