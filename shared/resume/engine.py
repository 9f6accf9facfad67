"""The resume engine: the run's loop over the due clients, within the time budget.

Clients stream through: the selection reads a page of due clients, workers (`worker.py`) run
them, the next page is read when the queue runs low, so memory follows the page, not the
number of clients. A client's trouble stays in its worker; only the run's own failures (the
store, a bug) escape as exceptions, and `LeaseLost` stops everything at once without another
write.

Writes per client (`writes.py`): the claim (which also marks the first operation `running`),
at most one commit a second while it works (coalesced running marks, outcomes, checkpoints),
and the close, in a commit of its own, with the client's due fields.
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

from shared import documents, store
from shared.config import Settings
from shared.fence import Fence
from shared.heartbeat import Heartbeat
from shared.lock import Lease, Lock
from shared.log import get_logger
from shared.resume import limits
from shared.resume.due import Selection
from shared.resume.full_pass import Reconcile
from shared.resume.pipeline import Pipeline
from shared.resume.plan import ClientPlan, RunOptions
from shared.resume.results import ResultSink
from shared.resume.worker import Aborted, Stop, Worker, one_line, result

__all__ = ["RunContext", "RunResult", "one_line", "run_smart_resume", "summarize"]

log = get_logger("engine")


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
    problems: list[dict[str, Any]] = field(default_factory=list)  # met by this run
    #: Documents this run read and did not write: the next take may vouch for them.
    unchanged: tuple[Any, ...] = ()


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
    stop = Stop(run)
    sink = ResultSink(run.client, run.settings, run.run_id)
    names: dict[str, str] = {}  # for the report's rows: only while results stay in memory
    mutex = threading.Lock()
    failure: list[BaseException] = []
    problems: list[dict[str, Any]] = []  # of the clients this run met (for the report)
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
        worker = Worker(run, stop, fence, record)
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
                    problems.extend(p.listed() for p in plan.all_problems())
                except Aborted:
                    pass
                except BaseException as exc:
                    with mutex:
                        failure.append(exc)
                    stop.aborted.set()  # the other workers stop at their next check
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
    # `clients` counts the due clients selected; a stop (budget, cancel) before some of them
    # were read leaves those due for the next tick: `clientsNotReached`, so the counts add up
    # (clients = clientsReached + clientsNotReached; the outcomes count the reached ones'
    # client-operations).
    selected = max(total() or 0, count) if stopped_early else count
    summary = summarize([], selected, time.monotonic() - started)
    summary.update(sink.counts, impact=sink.impact)
    summary["clientsReached"] = count
    summary["clientsNotReached"] = selected - count
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
        problems=problems[: documents.MAX_LISTED_PROBLEMS],
    )


#: The share of a tick's time budget a full pass may take; due work gets the rest.
PASS_SHARE = 1 / 3


def _full_pass(
    run: RunContext, reconcile: Reconcile, cutoff: dt.datetime, found: Any, unstamped: int
) -> bool:
    """The full pass over every client document, when one is due or under way: at most
    `PASS_SHARE` of the budget per tick, then due work runs and the next tick goes on. Returns
    whether it ran (and so may have moved due times).

    With shards, each shard makes its own pass, reading every client and writing its own (a
    client's stored shard may be missing or stale, so it is computed from the id)."""
    why = reconcile.reason(cutoff, found, unstamped)
    if why is None:
        return False
    log.info("full pass over the clients: %s", why)
    until = run.started + run.settings.time_budget_seconds * PASS_SHARE
    seen, repaired = reconcile.run(
        cutoff, lambda: Stop(run).quiet() is not None, reason=why, until=until
    )
    place = "done" if reconcile.finished else "goes on next tick"
    log.info("full pass %s: %d active clients read, %d repaired", place, seen, repaired)
    run.heartbeat.set_progress(fullPass=place)
    return True


def run_smart_resume(run: RunContext) -> RunResult:
    """The resume module's entry point: select what is due, run it as it streams in."""
    selection = Selection(run.client, run.settings, run.pipeline, run.options)
    fence = Fence(run.client, run.settings, run.lease)
    cutoff = run.now()
    unchanged: tuple[Any, ...] = ()
    if run.options.client_id:
        pages = selection.one()
    else:
        # The tick's reads, issued together: whether a full pass is due (its record, and the
        # count of clients without a due time) and the first page of due clients, read ahead
        # for the usual tick without a pass (a pass may move due times: then it is read again).
        # After a warm take the pass's record may be known unchanged: not read again.
        reconcile = Reconcile(selection, fence)
        known = reconcile.known(getattr(run.lease, "vouched", None) or {})
        reads = [selection.count_unstamped, lambda: selection.first_due_page(cutoff)]
        found, unstamped, first = (
            [known, *store.parallel(*reads)]
            if known is not None
            else store.parallel(reconcile.read, *reads)
        )
        if _full_pass(run, reconcile, cutoff, found, unstamped):
            first = None
        else:
            unchanged = reconcile.unchanged(found)
        pages = selection.due_pages(cutoff, first)
    plans = selection.plans(pages, cutoff)
    if run.options.client_id:
        selection.due_total = 1
    result_ = execute(run, plans, fence, lambda: selection.due_total)
    result_.unchanged = unchanged
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
