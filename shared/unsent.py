"""Reports that earlier runs left `sending`: their instance died between claiming the report
and recording how it went. The next run sends each one, or marks it `lost` with a reason, so
no run record keeps `sending` past the next run.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from shared import store
from shared.config import Settings
from shared.log import get_logger
from shared.resume.engine import one_line
from shared.runs import FINISHED, SUMMARY_FIELDS, Runs

log = get_logger("runner")
#: Reports left `sending` by earlier runs that one run settles (the query's limit).
SETTLE_LIMIT = 10
#: A report left `sending` for longer than this is marked `lost` instead of sent: too late to
#: be news, and more likely than not to have gone out before its sender died.
LOST_AFTER_SECONDS = 24 * 3600


def settle_reports(
    settings: Settings,
    client: firestore.Client,
    runs: Runs,
    run_id: str,
    grace: float,
    known: tuple[str, ...] | None = None,
) -> tuple[str, ...] | None:
    """Send, or mark `lost` with a reason, the reports that earlier runs of this lock left
    `sending`: their instance died between claiming the report and recording how it went.

    A claim younger than `grace` (the longest a send can take: `sending_grace`) may still be in
    flight from its own run (it sends after releasing the lock) and is left alone. `known`:
    the claims this process knows are unsettled (`warm.Known`), when nothing else can have
    claimed one since; else they are searched for. Returns the claims left unsettled, or None
    when that is not known (the search failed or came back full). Never raises: the run goes
    on whatever happens here.
    """
    try:
        left = runs.reports_sending(SETTLE_LIMIT) if known is None else _read(runs, known)
    except Exception as exc:
        log.warning("could not look for unsent reports: %s", one_line(exc))
        return known
    pending = []
    for snap, record in left:
        if snap.id == run_id:
            continue
        try:
            if _settle_report(settings, client, run_id, snap, record, grace):
                pending.append(snap.id)
        except Exception as exc:
            log.warning("could not settle the report of run %s: %s", snap.id, one_line(exc))
            pending.append(snap.id)
    if known is None and len(left) >= SETTLE_LIMIT:
        return None  # more may be waiting: the next run searches again
    return tuple(pending)


def _read(runs: Runs, ids: tuple[str, ...]) -> list[tuple[Any, dict[str, Any]]]:
    """The runs `ids` whose report is still `sending`, as `Runs.reports_sending` gives them."""
    if not ids:
        return []
    found = runs.get_many(ids, [*SUMMARY_FIELDS, "results"])
    return [
        (snap, data)
        for snap, data in found
        if (data.get("report") or {}).get("status") == "sending"
    ]


def sending_grace(settings: Settings) -> float:
    """Seconds a report may rightly stay `sending`: every attempt of a provider's send (three,
    each up to a connect and a read timeout) with their backoff, and a margin."""
    return 6 * settings.email_timeout_seconds + 30


def _settle_report(  # type: ignore[no-untyped-def]
    settings: Settings,
    client: firestore.Client,
    run_id: str,
    snap,
    record: dict[str, Any],
    grace: float,
) -> bool:
    """Settle one report left `sending`; returns whether it is still unsettled (too young)."""
    from shared.report import ReportInput, send_smart_resume_report

    claim = record.get("report") or {}
    at = claim.get("at")
    age = (snap.read_time - at).total_seconds() if isinstance(at, dt.datetime) else None
    if age is not None and age < grace:
        return True  # its own run may still be sending it
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
        return False  # it changed since we looked: whoever changed it owns it
    if lost:
        log.warning("report of run %s marked lost: %s", snap.id, lost)
        return False
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
    return False
