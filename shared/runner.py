"""One run: take the lock, fence off the runs it displaced, run the resume module in-process
under the heartbeat, then hand over to `finish.py` (record, release, report).

The trigger function and `python -m shared.resume run` both call `start_run`, so a run from
the command line is exactly as safe as one from Cloud Scheduler. Every exit path releases the
lock it took (or, having lost it, writes nothing more) and sends at most one report.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import replace
from functools import partial
from typing import Any

from google.cloud import firestore

from shared import store
from shared.config import Settings
from shared.errors import LeaseLost, LockHeld, ModuleLoadError, PipelineError, StoreUnavailable
from shared.finish import (
    NOT_SELECTED,
    Ended,
    FailingWork,
    Outcome,
    failed_before_start,
    finish_run,
)
from shared.heartbeat import Heartbeat
from shared.lock import Lease, Lock, owner_info
from shared.log import bind, get_logger
from shared.pings import RunPings
from shared.resume.engine import RunContext, RunResult, one_line
from shared.resume.full_pass import record_ref
from shared.resume.pipeline import Pipeline, load_pipeline
from shared.resume.plan import RunOptions
from shared.resume.shards import lock_name as shard_lock_name
from shared.runs import Runs, new_run_id
from shared.unsent import sending_grace, settle_reports
from shared.warm import Known

__all__ = ["Outcome", "load_entry_point", "plan_run", "sending_grace", "start_run"]

log = get_logger("runner")
EntryPoint = Callable[[RunContext], RunResult]
#: Entered with the run's heartbeat while the lock is held (the command line's progress view).
Watch = Callable[[Heartbeat], contextlib.AbstractContextManager[Any]]


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
            return failed_before_start(settings, client, runs, run_id, exc, trigger, schedule_time)
        # A take that reads the lock reads the due-work record with it (not with shards:
        # their shared record is read by the engine), and its commit checks it unchanged.
        due_record = (
            ()
            if options.client_id or settings.shards > 1
            else (record_ref(client, settings.lock_name, stream),)
        )
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
                read_with=due_record,
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
    run_id = lease.run_id
    started = time.monotonic()
    result: RunResult | None = None
    error: str | None = None
    where: str | None = None
    pings = RunPings(settings)
    settling: Future[tuple[str, ...] | None] | None = None
    known = lease.memo if isinstance(lease.memo, Known) else None
    early: FailingWork | None = None
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
            # Beside the run's own work: its reads overlap the run's first reads. After a
            # warm take the unsettled claims are known (`warm.py`): none is searched for.
            grace = sending_grace(settings)
            claims = known.claims() if known is not None else None
            settling = store.background(
                partial(settle_reports, settings, client, runs, run_id, grace, claims)
            )
            if settings.email_on == "always":
                # The report is sure to go out: what it lists is read beside the run's first
                # reads, and read again at the end only if the run wrote anything.
                early = FailingWork(settings, client, options)
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
        # Never raises; the lock is still held while reports settle.
        pending = settling.result() if settling is not None else None
    end = Ended(
        settings,
        client,
        lock,
        lease,
        runs,
        options,
        deadline,
        started,
        pings,
        known,
        pending,
        early,
    )
    return finish_run(end, result, status, error, where)


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
