"""The end of a run: its record and the lock's release in one commit, then its one report.

A run's result becomes its record (bounded to what Firestore stores), the report's claim rides
the release, a lost answer is read back rather than guessed, and a record the store refuses is
retried smaller, so the lock is never stranded over what the run has to say. What the report
shows beyond the run (the failing work, the last runs) is read while the lock is released.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from shared import store
from shared.config import FINISH_MARGIN_SECONDS, Settings
from shared.errors import ModuleLoadError, StoreRejected, StoreUnavailable
from shared.lock import Lease, Lock
from shared.log import get_logger
from shared.pings import RunPings, end_body, ping
from shared.resume.engine import RunResult, one_line, summarize
from shared.resume.plan import RunOptions
from shared.resume.results import bounded_summary, minimal_summary
from shared.runs import Runs, jsonable
from shared.warm import Known, next_history, strip_record

log = get_logger("runner")
NOT_SELECTED = "the client is inactive (or not in this stream or shard): nothing to run"


@dataclass(frozen=True)
class Outcome:
    """What a run came to, and how the trigger answers it over HTTP."""

    status: str
    http_status: int
    body: dict[str, Any]
    run_id: str | None = None
    report: dict[str, Any] | None = field(default=None, compare=False)
    #: What the engine counted (documents read, commits, writes per document): benchmarks.
    stats: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class Ended:
    """What the run phase hands to the end: the lock it holds and how the work went."""

    settings: Settings
    client: firestore.Client
    lock: Lock
    lease: Lease
    runs: Runs
    options: RunOptions
    deadline: float  # monotonic: the budget's end; the margin for finishing comes after it
    started: float
    pings: RunPings
    #: What this process knew of the lock when it took it warm (`warm.py`), else None.
    known: Known | None = None
    #: The report claims of earlier runs left unsettled (`unsent.settle_reports`), or None.
    pending: tuple[str, ...] | None = None
    #: The failing work, read as the run began when a report is sure to go out.
    early: FailingWork | None = None


def finish_run(
    end: Ended, result: RunResult | None, status: str, error: str | None, where: str | None
) -> Outcome:
    """Record the run's end and release the lock in one commit, then send its report.
    `status`, `error` and `where` say how the work went (`where`: which part failed)."""
    from shared.report import ReportInput, send_smart_resume_report, wanted  # lazy: cold start

    settings, client, lock, lease, runs = end.settings, end.client, end.lock, end.lease, end.runs
    options, deadline, started, pings = end.options, end.deadline, end.started, end.pings
    # The last runs, when this process knows them (a warm take): no query for the strip.
    before = end.known.history if end.known is not None else None
    run_id = lease.run_id
    if status == "abandoned" and not _still_ours(lock, lease):
        return _abandoned(run_id)
    if status == "abandoned":
        # The engine saw its lease as lost, yet the lock is still ours (a claim or renewal
        # refused for another reason): end the run properly, never strand the lock.
        status, where = "failed", "the lease"
        log.error("the run stopped as if its lease were lost, but the lock is still its own")
    # A heartbeat that flagged the lease lost (renewal refused, or the store silent for a
    # lease) does not by itself mean another run took over: the release below is
    # preconditioned on our lease, so it lands only if the lock is still ours.
    summary = bounded_summary(
        result.summary if result else summarize([], 0, time.monotonic() - started)
    )
    summary["durationSeconds"] = round(time.monotonic() - started, 3)
    results = result.results if result else []
    stats = getattr(result, "stats", None) or {}
    report_input = ReportInput(
        run_id=run_id,
        status=status,
        summary=summary,
        results=results,
        client_names=result.client_names if result else {},
        error=error,
        error_where=where,
        takeover=(
            {"runId": lease.previous_run_id, "ageSeconds": lease.previous_age_seconds}
            if lease.previous_run_id
            else None
        ),
        lock_name=settings.lock_name,
        started_at=lease.acquired_at,
        finished_at=dt.datetime.now(dt.UTC),
        problems=tuple(getattr(result, "problems", None) or ()),
    )
    # The report is claimed (or marked skipped) in the same commit that finishes the run and
    # releases the lock: one round trip instead of three, and never a second email.
    send = wanted(settings, report_input)
    # The finishing phase must fit the margin after the budget (the function's timeout is
    # budget + margin), also with a slow store: what can wait (result pages, the failing-work
    # listing) is dropped as the margin runs short; the release and the report never are.
    margin_end = deadline + FINISH_MARGIN_SECONDS
    # What the report shows beyond the run (the failing work, the last runs) is read while the
    # run is released: queries only when a report goes out.
    listing: FailingWork | None = None
    history: Future[tuple[dict[str, Any], ...] | None] | None = None
    if send and margin_end - time.monotonic() < FINISH_MARGIN_SECONDS / 2:
        log.warning("little time left to finish: the report goes without the failing work")
    elif send:
        # Read as the run began (EMAIL_ON=always), it stands if the run wrote nothing.
        listing = end.early if end.early is not None and _wrote_nothing(result) else None
        listing = listing or FailingWork(settings, client, options)
        history = _last_runs(settings, client) if before is None else None
    # Remembered with the release, for this process's next take of the lock (`warm.py`).
    vouch = getattr(result, "unchanged", ()) if result else ()
    memo = None
    if end.pending is not None:
        memo = Known(unsent={*end.pending, *([run_id] if send else [])})
    claim = {
        "status": "sending" if send else "skipped",
        "transport": settings.email_transport,
        "at": firestore.SERVER_TIMESTAMP,
        "error": None,
    }
    # The engine wrote what did not fit in memory to result pages as it went; the rest
    # (or all of a custom module's results) is split here.
    paged = getattr(result, "paged", 0) if result else 0
    lost = getattr(result, "omitted", 0) if result else 0
    inline, omitted = runs.store_results(
        run_id, results, until=margin_end - FINISH_MARGIN_SECONDS * 3 / 4
    )
    omitted += lost

    def finish(batch: Any, _: Any, inline: list[dict[str, Any]] = inline) -> None:
        runs.finish(
            batch,
            run_id,
            status=status,
            summary=summary,
            results=inline,
            total=len(results) + paged + lost,
            omitted=omitted,
            error=error,
            report=claim,
        )

    commit_errors: list[BaseException | None] = []

    def landed() -> bool:
        """Did the release commit land? Read back until the store answers: a guess either way
        would strand the lock or send a second report."""
        error = sys.exc_info()[1]  # called while handling the commit's error
        commit_errors.append(error)
        if not _may_have_landed(error):
            return False
        deadline = time.monotonic() + 2 * settings.rpc_timeout_seconds
        for wait in (0.0, 0.2, 0.5, 1.0, 2.0):
            if time.monotonic() + wait > deadline:
                break
            time.sleep(wait)
            try:
                record = runs.get(run_id, fields=["status"]) or {}
            except StoreUnavailable:
                continue
            return record.get("status") == status
        raise StoreUnavailable(
            "Firestore unavailable: could not read back whether the run's end was recorded"
        )

    release = partial(lock.release, lease, landed=landed, memo=memo, vouch=vouch)
    try:
        try:
            released = release(extra=finish)
        except StoreRejected as exc:
            # The record itself was refused (a value Firestore cannot store): never strand
            # the lock over it. Release again with the summary only, then with a bare record.
            log.error("the run record was refused (%s); releasing with the summary only", exc)
            omitted = len(results) + lost
            try:
                released = release(extra=lambda b, x: finish(b, x, []))
            except StoreRejected as again:
                log.error("the summary was refused too (%s); releasing with a bare record", again)
                summary = minimal_summary(summary)
                released = release(extra=lambda b, x: finish(b, x, []))
    except StoreUnavailable as exc:
        log.error("could not record the end of the run: %s", one_line(exc))
        error = error if status == "failed" and error else one_line(exc)
        body = {"status": "failed", "runId": run_id, "error": error}
        if any(_may_have_landed(e) for e in commit_errors):
            # The release may have landed with its report claim: then the next run sends the
            # report (it settles claims left `sending`). Sending here too could make two.
            log.error("the report is left to the next run: the end may have been recorded")
            return Outcome("failed", 500, body, run_id, None, stats)
        # The store was never reached: nothing was recorded, no claim exists, and the
        # operator must hear of the outage. The lock goes stale and is taken over.
        own = _strip_record(lease, report_input, "failed", summary)
        report_input = replace(
            _shown(report_input, listing, next_history(own, _resolved(before, history) or ())),
            status="failed",
            error=error,
            error_where="finishing the run",
        )
        report = send_smart_resume_report(settings, client, report_input, claimed=False)
        return Outcome("failed", 500, body, run_id, report, stats)
    if not released:
        return _abandoned(run_id)
    pings.end(run_id, status, summary, error)
    own = _strip_record(lease, report_input, status, summary)
    shown = _resolved(before, history)
    if memo is not None and shown is not None:
        memo.history = next_history(own, shown)
    report = claim
    if send:
        report_input = _shown(report_input, listing, next_history(own, shown or ()))
        report = send_smart_resume_report(
            settings,
            client,
            report_input,
            claimed=True,
            recorded=partial(memo.settled, run_id) if memo is not None else None,
        )
    log.info("run ended %s", status, fields={"summary": summary, "report": report.get("status")})
    if status == "failed":
        body = {"status": "failed", "runId": run_id, "error": error}
        return Outcome("failed", 500, body, run_id, report, stats)
    body = {"status": status, "runId": run_id, "summary": jsonable(summary)}
    if options.client_id and not summary.get("clients"):
        body["detail"] = NOT_SELECTED
    return Outcome(status, 200, body, run_id, report, stats)


def _last_runs(settings: Settings, client: firestore.Client) -> Future[Any]:
    """The last runs, for the report's strip, read in the background."""
    from shared.report import last_runs

    return store.background(lambda: last_runs(settings, client))


def _strip_record(lease: Lease, report: Any, status: str, summary: dict[str, Any]) -> Any:
    """This run as the report's strip draws it (and as reading its record would give)."""
    took = summary.get("durationSeconds")
    return strip_record(lease.run_id, status, lease.acquired_at, report.finished_at, took)


def _resolved(
    before: tuple[dict[str, Any], ...] | None, history: Future[Any] | None
) -> tuple[dict[str, Any], ...] | None:
    """The last runs as known or as read (None: neither)."""
    if before is not None:
        return before
    return history.result() if history is not None else None


def _shown(report: Any, listing: FailingWork | None, history: tuple[Any, ...] | None) -> Any:
    """The report with what was read for it."""
    extra = listing.result() if listing is not None else {}
    return replace(report, **extra, history=history or ())


class FailingWork:
    """The quarantined and backed-off work, and the problems in documents, that the report
    names: two small queries, in flight together from the moment this is made."""

    def __init__(self, settings: Settings, client: firestore.Client, options: RunOptions) -> None:
        from shared.quarantine import failing, problems

        shard = (options.shard, settings.shards) if options.shard is not None else None
        self._found = store.background(lambda: failing(settings, client, options.stream, shard))
        self._listed = store.background(lambda: problems(settings, client))

    def result(self) -> dict[str, Any]:
        """What was read, or nothing (the report goes without it) if it could not be."""
        try:
            found, listed = self._found.result(), self._listed.result()
        except Exception as exc:
            log.warning("could not list failing work for the report: %s", one_line(exc))
            return {}
        return {
            "quarantined": tuple(found["quarantined"]),
            "backed_off": tuple(found["backedOff"]),
            "problems": tuple(listed),
        }


def _wrote_nothing(result: RunResult | None) -> bool:
    """Whether the run wrote no client or state (an idle tick): what it read at its start
    about failing work and problems is still what there is."""
    stats = getattr(result, "stats", None) or {}
    return stats.get("commits") == 0 and not getattr(result, "problems", None)


def _may_have_landed(exc: BaseException | None) -> bool:
    """Whether a commit that failed with `exc` may still have been applied: only a store that
    was never reached (unavailable, refused connection) is known not to have applied it."""
    while exc is not None:
        if isinstance(exc, gexc.ServiceUnavailable):
            return False
        inner = getattr(exc, "cause", None)  # a RetryError's last attempt
        exc = inner if isinstance(inner, BaseException) else exc.__cause__ or exc.__context__
    return True


def _still_ours(lock: Lock, lease: Lease) -> bool:
    try:
        state = lock.read()
    except StoreUnavailable:
        return False
    return state.held and state.run_id == lease.run_id and state.token == lease.token


def _abandoned(run_id: str) -> Outcome:
    log.error("lease lost: stopped without writing anything more")
    body = {"status": "abandoned", "runId": run_id, "error": "lease lost"}
    return Outcome("abandoned", 500, body, run_id)


def failed_before_start(
    settings: Settings,
    client: firestore.Client,
    runs: Runs,
    run_id: str,
    exc: Exception,
    trigger: dict[str, Any],
    schedule_time: str | None,
) -> Outcome:
    """The module or pipeline would not load: record a failed run, report it, take no lock.
    The record, its report's claim and a mark on the lock land in one commit (`warm.py`)."""
    from shared.report import ReportInput, send_smart_resume_report, wanted

    error = one_line(exc)
    where = "loading the resume module" if isinstance(exc, ModuleLoadError) else "the pipeline"
    log.error("run failed before starting: %s", error)
    report_input = ReportInput(
        run_id=run_id,
        status="failed",
        summary=summarize([], 0, 0.0),
        results=[],
        client_names={},
        error=error,
        error_where=where,
        module_error=isinstance(exc, ModuleLoadError),
        lock_name=settings.lock_name,
    )
    send = wanted(settings, report_input)
    claim = {
        "status": "sending" if send else "skipped",
        "transport": settings.email_transport,
        "at": firestore.SERVER_TIMESTAMP,
        "error": None,
    }
    runs.record_failed(
        run_id,
        trigger=trigger,
        schedule_time=schedule_time,
        error=error,
        report=claim,
        also=lambda batch: Lock(client, settings).mark_outside(batch, run_id),
    )
    ping(settings, "fail", end_body(run_id, "failed", {}, error))
    report = claim
    if send:
        report = send_smart_resume_report(settings, client, report_input, claimed=True)
    body = {"status": "failed", "runId": run_id, "error": error}
    return Outcome("failed", 500, body, run_id, report)
