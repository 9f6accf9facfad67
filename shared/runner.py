"""One run, start to finish: lock, heartbeat, the resume module in-process, release, report.

The trigger function and `python -m shared.resume run` both call `start_run`, so a run from
the command line is exactly as safe as one from Cloud Scheduler. Every exit path releases the
lock it took (or, having lost it, writes nothing more) and sends at most one report.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from shared import store
from shared.config import FINISH_MARGIN_SECONDS, Settings
from shared.errors import (
    LeaseLost,
    LockHeld,
    ModuleLoadError,
    PipelineError,
    StoreRejected,
    StoreUnavailable,
)
from shared.heartbeat import Heartbeat
from shared.lock import Lease, Lock, owner_info
from shared.log import bind, get_logger
from shared.pings import RunPings, end_body, ping
from shared.resume.engine import RunContext, RunResult, one_line, summarize
from shared.resume.pipeline import Pipeline, load_pipeline
from shared.resume.plan import RunOptions
from shared.resume.results import bounded_summary, minimal_summary
from shared.resume.shards import lock_name as shard_lock_name
from shared.runs import FINISHED, Runs, jsonable, new_run_id

log = get_logger("runner")
EntryPoint = Callable[[RunContext], RunResult]
#: Entered with the run's heartbeat while the lock is held (the command line's progress view).
Watch = Callable[[Heartbeat], contextlib.AbstractContextManager[Any]]
NOT_SELECTED = "the client is inactive (or not in this stream or shard): nothing to run"
#: Reports left `sending` by earlier runs that one run settles (the query's limit).
SETTLE_LIMIT = 10
#: A report left `sending` for longer than this is marked `lost` instead of sent: too late to
#: be news, and more likely than not to have gone out before its sender died.
LOST_AFTER_SECONDS = 24 * 3600


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


_runs_mutex = threading.Lock()
_runs_in_progress = 0


@contextlib.contextmanager
def _in_progress() -> Iterator[None]:
    global _runs_in_progress
    with _runs_mutex:
        _runs_in_progress += 1
    try:
        yield
    finally:
        with _runs_mutex:
            _runs_in_progress -= 1


def load_entry_point(settings: Settings) -> EntryPoint:
    """Import the resume module and return its `run_smart_resume`.

    With SMART_RESUME_RELOAD_MODULE=1 the module (and its submodules) are imported afresh, so an
    operation being developed is picked up by a warm instance without a restart.
    """
    name = settings.module
    try:
        with _runs_mutex:
            # The trigger takes concurrent requests (a second one gets 409 or a dry run's
            # plan): never swap the modules out from under a run in progress in this process.
            if settings.reload_module and _runs_in_progress == 0:
                for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                    del sys.modules[loaded]
                importlib.invalidate_caches()
            module = importlib.import_module(name)
    except Exception as exc:
        raise ModuleLoadError(
            f"cannot import {name}: {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    entry = getattr(module, "run_smart_resume", None)
    if not callable(entry):
        raise ModuleLoadError(f"module {name} does not export a callable run_smart_resume")
    return entry  # type: ignore[no-any-return]


def plan_run(
    settings: Settings, client: firestore.Client, options: RunOptions, pipeline: Pipeline
) -> Outcome:
    """A dry run: every selected active client's plan (due or not, with when it is due), with
    no lock taken and nothing written."""
    import datetime as dt

    from shared.resume.due import Selection

    try:
        load_entry_point(settings)  # a dry run fails the way the run would
    except ModuleLoadError as exc:
        body = {"status": "failed", "error": one_line(exc)}
        return Outcome("failed", 500, body)
    missing = _unknown_client(settings, client, options)
    if missing is not None:
        return missing
    selection = Selection(client, settings, pipeline, options)
    pages = selection.one() if options.client_id else selection.all_pages()
    plans = selection.plans(pages, dt.datetime.now(dt.UTC))
    body: dict[str, Any] = {"status": "planned", "plan": [p.as_dict() for p in plans]}
    if options.client_id and not body["plan"]:
        body["detail"] = NOT_SELECTED
    return Outcome("planned", 200, body)


def _unknown_client(
    settings: Settings, client: firestore.Client, options: RunOptions
) -> Outcome | None:
    """404 for a `clientId` that names no client (its id is never echoed back)."""
    if not options.client_id:
        return None
    from shared import store

    ref = client.collection(store.CLIENTS).document(options.client_id)
    with store.translate_errors("reading the client"):
        snap = ref.get(field_paths=["active"], **store.call(settings))
    if not snap.exists:
        return Outcome("not found", 404, {"status": "not found", "error": "unknown client"})
    return None


def start_run(
    settings: Settings,
    client: firestore.Client,
    options: RunOptions,
    *,
    trigger: dict[str, Any],
    schedule_time: str | None = None,
    function: str = "smart_resume",
    pipeline: Pipeline | None = None,
    watch: Watch | None = None,
) -> Outcome:
    """Run once if the lock is free. Store trouble before the run starts raises
    `StoreUnavailable` (the caller answers 503); everything after is an `Outcome`.

    `watch(heartbeat)`, a context manager, is entered for the time the run holds the lock:
    the command line's progress display reads the heartbeat's progress through it."""
    if options.shard is not None:
        # Shard k is a run of its own: its lock, its run records, its report.
        settings = replace(settings, lock_name=shard_lock_name(settings.lock_name, options.shard))
    runs = Runs(client, settings)
    lock = Lock(client, settings)
    missing = _unknown_client(settings, client, options)
    if missing is not None:
        return missing
    if schedule_time:
        earlier = runs.for_schedule(schedule_time, trigger.get("job"))
        if earlier:
            body = {"status": "duplicate", "runId": earlier.get("runId")}
            return Outcome("duplicate", 200, body, earlier.get("runId"))
    run_id = new_run_id()
    stream = options.stream if options.stream is not None else settings.stream
    options = replace(options, stream=stream)
    with bind(runId=run_id):
        try:
            entry = load_entry_point(settings)
            pipeline = pipeline or load_pipeline(settings.pipeline_path)
        except (ModuleLoadError, PipelineError) as exc:
            return _failed_before_start(settings, client, runs, run_id, exc, trigger, schedule_time)
        try:
            lease = lock.acquire(
                run_id,
                owner_info(function),
                extra=lambda batch, previous: runs.start(
                    batch,
                    run_id,
                    trigger=trigger,
                    schedule_time=schedule_time,
                    stream=stream,
                    previous_run_id=previous,
                ),
            )
        except LockHeld as held:
            body = {
                "status": "locked",
                "runId": held.run_id,
                "ageSeconds": held.age_seconds,
                "heartbeatAgeSeconds": held.heartbeat_age_seconds,
                "staleInSeconds": held.stale_in_seconds,
            }
            return Outcome("locked", 409, body, held.run_id)
        deadline = time.monotonic() + settings.time_budget_seconds
        if lease.previous_run_id:
            log.warning(
                "took over stale lock from run %s (held %.0fs)",
                lease.previous_run_id,
                lease.previous_age_seconds or 0,
            )
        log.info("run started", fields={"token": lease.token, "lock": settings.lock_name})
        with _in_progress():
            return _run_locked(
                settings, client, lock, lease, runs, entry, pipeline, options, deadline, watch
            )


@contextlib.contextmanager
def _watching(watch: Watch | None, heartbeat: Heartbeat) -> Iterator[None]:
    """`watch(heartbeat)`, whose own failures (a progress display's terminal gone) are logged
    and dropped: they must never fail, record or strand a run."""
    view: contextlib.AbstractContextManager[Any] | None = None
    if watch is not None:
        try:
            view = watch(heartbeat)
            view.__enter__()
        except Exception as exc:
            log.warning("progress display failed to start: %s", one_line(exc))
            view = None
    try:
        yield
    finally:
        if view is not None:
            try:
                view.__exit__(None, None, None)
            except Exception as exc:
                log.warning("progress display failed: %s", one_line(exc))


def _run_locked(
    settings, client, lock, lease, runs, entry, pipeline, options, deadline, watch
) -> Outcome:  # type: ignore[no-untyped-def]
    from shared.report import ReportInput, send_smart_resume_report, wanted  # lazy: cold start

    run_id = lease.run_id
    started = time.monotonic()
    result: RunResult | None = None
    error: str | None = None
    where: str | None = None
    pings = RunPings(settings)
    settling: Future[None] | None = None
    with (
        Heartbeat(lock, lease, settings.heartbeat_seconds, settings.lease_seconds) as hb,
        _watching(watch, hb),
    ):
        # In the background: the run does not wait for the dead man's switch to answer.
        pings.start(run_id, lease.token, lease.previous_run_id, lease.previous_age_seconds)
        try:
            # No work, not even settling old reports, before the runs this lock displaced
            # can write nothing more.
            _fence_off(settings, client, lock, lease)
        except StoreUnavailable as exc:
            status, error, where = "failed", one_line(exc), "fencing off the previous run"
            log.error("run failed: %s", error)
        else:
            # Beside the run's own work: its query overlaps the run's first reads.
            settling = store.background(lambda: _settle_reports(settings, client, runs, run_id))
        try:
            if error is not None:
                raise _NotStarted
            result = entry(
                RunContext(
                    settings=settings,
                    client=client,
                    lock=lock,
                    lease=lease,
                    heartbeat=hb,
                    pipeline=pipeline,
                    options=options,
                    deadline=deadline,
                    run_id=run_id,
                )
            )
            status = result.status
        except _NotStarted:
            pass
        except LeaseLost as exc:
            status, error, where = "abandoned", one_line(exc), "the lease"
        except Exception as exc:
            status, error, where = "failed", one_line(exc), "resume module"
            log.exception("run failed: %s", error)
        if settling is not None:
            settling.result()  # never raises; the lock is still held while reports settle
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
    listing: Future[dict[str, Any]] | None = None
    history: Future[Any] | None = None
    if send and margin_end - time.monotonic() < FINISH_MARGIN_SECONDS / 2:
        log.warning("little time left to finish: the report goes without the failing work")
    elif send:
        listing, history = _report_reads(settings, client, options)
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

    try:
        try:
            released = lock.release(lease, extra=finish, landed=landed)
        except StoreRejected as exc:
            # The record itself was refused (a value Firestore cannot store): never strand
            # the lock over it. Release again with the summary only, then with a bare record.
            log.error("the run record was refused (%s); releasing with the summary only", exc)
            omitted = len(results) + lost
            try:
                released = lock.release(lease, extra=lambda b, x: finish(b, x, []), landed=landed)
            except StoreRejected as again:
                log.error("the summary was refused too (%s); releasing with a bare record", again)
                summary = minimal_summary(summary)
                released = lock.release(lease, extra=lambda b, x: finish(b, x, []), landed=landed)
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
        report_input = replace(
            _shown(report_input, listing, history),
            status="failed",
            error=error,
            error_where="finishing the run",
        )
        report = send_smart_resume_report(settings, client, report_input, claimed=False)
        return Outcome("failed", 500, body, run_id, report, stats)
    if not released:
        return _abandoned(run_id)
    pings.end(run_id, status, summary, error)
    report = claim
    if send:
        report_input = _shown(report_input, listing, history)
        report = send_smart_resume_report(settings, client, report_input, claimed=True)
    log.info("run ended %s", status, fields={"summary": summary, "report": report.get("status")})
    if status == "failed":
        body = {"status": "failed", "runId": run_id, "error": error}
        return Outcome("failed", 500, body, run_id, report, stats)
    body = {"status": status, "runId": run_id, "summary": jsonable(summary)}
    if options.client_id and not summary.get("clients"):
        body["detail"] = NOT_SELECTED
    return Outcome(status, 200, body, run_id, report, stats)


def _report_reads(
    settings: Settings, client: firestore.Client, options: RunOptions
) -> tuple[Future[dict[str, Any]], Future[Any]]:
    """The failing work and the last runs, for the report, read in the background."""
    from shared.report import report_history

    return (
        store.background(lambda: _failing_work(settings, client, options)),
        store.background(lambda: report_history(settings, client)),
    )


def _shown(report: Any, listing: Future[Any] | None, history: Future[Any] | None) -> Any:
    """The report with what was read for it while the run was released."""
    extra = listing.result() if listing is not None else {}
    return replace(report, **extra, history=history.result() if history is not None else ())


def _failing_work(
    settings: Settings, client: firestore.Client, options: RunOptions
) -> dict[str, Any]:
    """The quarantined and backed-off work, and the problems in documents, that the report
    names (small queries, issued together)."""
    from shared.quarantine import failing, problems

    shard = (options.shard, settings.shards) if options.shard is not None else None
    try:
        found, listed = store.parallel(
            lambda: failing(settings, client, options.stream, shard),
            lambda: problems(settings, client),
        )
    except Exception as exc:  # the report goes without it
        log.warning("could not list failing work for the report: %s", one_line(exc))
        return {}
    return {
        "quarantined": tuple(found["quarantined"]),
        "backed_off": tuple(found["backedOff"]),
        "problems": tuple(listed),
    }


class _NotStarted(Exception):
    """The run could not fence off the runs it displaced: it does no work."""


def _fence_off(settings: Settings, client: firestore.Client, lock: Lock, lease: Lease) -> None:
    """Close the open client claims of every run this lock displaced (the stale holder taken
    over, a force-unlocked run, or one an earlier holder could not finish revoking), so none of
    them lands a write after this run starts. Retried inside `revoke`; raises
    `StoreUnavailable` when it cannot finish (the lock keeps the list for the next holder)."""
    from shared.fence import revoke

    if not lease.revoke:
        return
    done = []
    for previous in list(lease.revoke):
        closed = revoke(client, settings, previous)
        done.append(previous)
        if closed:
            log.warning("revoked %d client claims of run %s", closed, previous)
    lock.revoked(lease, done)


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


def _settle_reports(settings: Settings, client: firestore.Client, runs: Runs, run_id: str) -> None:
    """Send, or mark `lost` with a reason, the reports that earlier runs of this lock left
    `sending`: their instance died between claiming the report and recording how it went.

    A claim younger than the longest a send can take (`sending_grace`) may still be in flight
    from its own run (it sends after releasing the lock) and is left alone. Never raises: the
    run goes on whatever happens here.
    """
    try:
        left = runs.reports_sending(SETTLE_LIMIT)
    except Exception as exc:
        log.warning("could not look for unsent reports: %s", one_line(exc))
        return
    for snap, record in left:
        if snap.id == run_id:
            continue
        try:
            _settle_report(settings, client, run_id, snap, record)
        except Exception as exc:
            log.warning("could not settle the report of run %s: %s", snap.id, one_line(exc))


def sending_grace(settings: Settings) -> float:
    """Seconds a report may rightly stay `sending`: every attempt of a provider's send (three,
    each up to a connect and a read timeout) with their backoff, and a margin."""
    return 6 * settings.email_timeout_seconds + 30


def _settle_report(  # type: ignore[no-untyped-def]
    settings: Settings, client: firestore.Client, run_id: str, snap, record: dict[str, Any]
) -> None:
    from shared.report import ReportInput, send_smart_resume_report

    claim = record.get("report") or {}
    at = claim.get("at")
    age = (snap.read_time - at).total_seconds() if isinstance(at, dt.datetime) else None
    if age is not None and age < sending_grace(settings):
        return
    lost = None
    if record.get("status") not in FINISHED:
        lost = "its run never finished"
    elif claim.get("settledBy"):
        lost = f"run {claim['settledBy']} tried to send it again and stopped before recording it"
    elif age is not None and age > LOST_AFTER_SECONDS:
        lost = f"left unsent for {age / 3600:.0f} h by an instance that stopped: too late to send"
    elif age is None:
        lost = "left unsent by an instance that stopped, at an unknown time"
    ref = client.collection(store.RUNS).document(snap.id)
    mark = {
        "status": "lost" if lost else "sending",
        "transport": claim.get("transport") if lost else settings.email_transport,
        "at": firestore.SERVER_TIMESTAMP,
        "error": lost,
        "settledBy": run_id,
    }
    try:
        with store.translate_errors("settling a report"):
            ref.update(
                {"report": mark},
                option=client.write_option(last_update_time=snap.update_time),
                **store.commit_call(settings),
            )
    except (gexc.FailedPrecondition, gexc.NotFound):
        return  # it changed since we looked: whoever changed it owns it
    if lost:
        log.warning("report of run %s marked lost: %s", snap.id, lost)
        return
    log.warning("report of run %s was left sending by a stopped instance; sending it", snap.id)
    took_over = record.get("tookOver")
    started, finished = record.get("startedAt"), record.get("finishedAt")
    send_smart_resume_report(
        settings,
        client,
        ReportInput(
            run_id=str(record.get("runId") or snap.id),
            status=str(record.get("status")),
            summary=record.get("summary") or {},
            results=[r for r in record.get("results") or [] if isinstance(r, dict)],
            client_names={},
            error=record.get("error"),
            takeover={"runId": took_over, "ageSeconds": None} if took_over else None,
            started_at=started if isinstance(started, dt.datetime) else None,
            finished_at=finished if isinstance(finished, dt.datetime) else None,
            lock_name=settings.lock_name,
        ),
        claimed=True,
    )


def _abandoned(run_id: str) -> Outcome:
    log.error("lease lost: stopped without writing anything more")
    body = {"status": "abandoned", "runId": run_id, "error": "lease lost"}
    return Outcome("abandoned", 500, body, run_id)


def _failed_before_start(
    settings: Settings,
    client: firestore.Client,
    runs: Runs,
    run_id: str,
    exc: Exception,
    trigger: dict[str, Any],
    schedule_time: str | None,
) -> Outcome:
    """The module or pipeline would not load: record a failed run, report it, take no lock."""
    from shared.report import ReportInput, send_smart_resume_report

    error = one_line(exc)
    where = "loading the resume module" if isinstance(exc, ModuleLoadError) else "the pipeline"
    log.error("run failed before starting: %s", error)
    runs.record_failed(run_id, trigger=trigger, schedule_time=schedule_time, error=error)
    ping(settings, "fail", end_body(run_id, "failed", {}, error))
    report = send_smart_resume_report(
        settings,
        client,
        ReportInput(
            run_id=run_id,
            status="failed",
            summary=summarize([], 0, 0.0),
            results=[],
            client_names={},
            error=error,
            error_where=where,
            module_error=isinstance(exc, ModuleLoadError),
            lock_name=settings.lock_name,
        ),
    )
    body = {"status": "failed", "runId": run_id, "error": error}
    return Outcome("failed", 500, body, run_id, report)
