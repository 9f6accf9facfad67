"""The report email: one per run, sent exactly once, and never failing the run.

`send_smart_resume_report` claims `runs/{runId}.report` with a conditional write before sending,
so a retried or duplicated finalisation never mails twice; then it builds the message
(`shared.report_message`), hands it to the configured transport (`shared.transports`) and
records how that went on the run. What the report says is imported here under its old names.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from shared import store, transports
from shared.config import Settings
from shared.documents import count
from shared.log import get_logger
from shared.report_message import MAX_ERROR_CHARS as MAX_ERROR_CHARS
from shared.report_message import MAX_PROBLEMS as MAX_PROBLEMS
from shared.report_message import ReportInput as ReportInput
from shared.report_message import _facts as _facts
from shared.report_message import build_message as build_message
from shared.report_tables import HEAD_COLOURS as _HEAD  # noqa: F401 (its old name)
from shared.report_tables import HISTORY as HISTORY
from shared.report_tables import MAX_ROWS as MAX_ROWS
from shared.report_tables import STRIP_MAX_PX as STRIP_MAX_PX
from shared.report_tables import one_line
from shared.transports import Message as Message

logger = get_logger("report")

CLAIM_ATTEMPTS = 5
#: What the strip draws of each run: no more is read.
STRIP_FIELDS = ["runId", "status", "startedAt", "finishedAt", "summary.durationSeconds"]
FAILURE_KINDS = frozenset({"failed", "partial", "abandoned"})


def _brief(exc: BaseException) -> str:
    return one_line(exc)[:300]


def last_runs(settings: Settings, client: firestore.Client) -> tuple[dict[str, Any], ...] | None:
    """This lock's newest runs for the bar strip (the fields it draws); None if unreadable."""
    from shared.runs import Runs

    try:
        return tuple(Runs(client, settings).recent(HISTORY, STRIP_FIELDS))
    except Exception as exc:
        logger.warning("could not read the last runs for the report: %s", _brief(exc))
        return None


def report_history(settings: Settings, client: firestore.Client) -> tuple[dict[str, Any], ...]:
    """`last_runs`, or none if unreadable."""
    return last_runs(settings, client) or ()


def wanted(settings: Settings, report: ReportInput) -> bool:
    """Whether this report goes out under SMART_RESUME_EMAIL_ON: `always`; `failure` (failed,
    partial, abandoned, a stale takeover); `activity` (a run that processed, failed or
    deferred something, took over a stale lock, or ended other than completed), so that an
    idle tick every 15 minutes does not mail 96 times a day."""
    if settings.email_on == "always":
        return True
    if report.status in FAILURE_KINDS or report.takeover or report.module_error:
        return True
    if settings.email_on == "activity":
        did = any(count(report.summary, k) for k in ("processed", "failed", "deferred"))
        return did or report.status != "completed"
    return False


def _claim(
    settings: Settings, client: firestore.Client, run_id: str
) -> tuple[bool, dict[str, Any] | None]:
    """(True, None) when this caller owns the report; (False, existing) when someone else does.

    A conditional commit on the document's update time rather than a transaction: read-then-
    write transactions retry slowly under contention, and one precondition says it all here.
    """
    ref = client.collection(store.RUNS).document(run_id)
    claim = {"report": {"status": "sending", "at": firestore.SERVER_TIMESTAMP}}
    for _ in range(CLAIM_ATTEMPTS):
        snap = ref.get(**store.call(settings))
        try:
            if not snap.exists:
                ref.create({"runId": run_id, **claim}, **store.commit_call(settings))
                return True, None
            existing = (snap.to_dict() or {}).get("report")
            if existing:
                return False, existing
            option = client.write_option(last_update_time=snap.update_time)
            ref.update(claim, option=option, **store.commit_call(settings))
            return True, None
        except (gexc.FailedPrecondition, gexc.AlreadyExists, gexc.Aborted):
            # The run changed since we read it: maybe a rival claim, maybe the engine. Look again.
            continue
    snap = ref.get(**store.call(settings))
    return False, (snap.to_dict() or {}).get("report") if snap.exists else None


def _record(
    settings: Settings, client: firestore.Client, run_id: str, record: dict[str, Any]
) -> bool:
    """Record how the report went on its run; returns whether that landed."""
    ref = client.collection(store.RUNS).document(run_id)
    try:
        store.retrying(  # a blind update: repeating it after a lost answer is harmless
            settings,
            "recording the report",
            lambda: ref.update(
                {"report": {**record, "at": firestore.SERVER_TIMESTAMP}},
                **store.commit_call(settings),
            ),
        )
    except Exception as exc:
        logger.error(
            "could not record the report on the run",
            fields={"error": _brief(exc), "reportStatus": record["status"]},
        )
        return False
    return True


def _result(transport: str, status: str, error: str | None = None) -> dict[str, Any]:
    return {"status": status, "transport": transport, "error": error}


def _crash(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_brief(exc)}"


def _deliver(settings: Settings, client: firestore.Client, report: ReportInput) -> dict[str, Any]:
    """Build and send the message if it is wanted; how that went, as recorded on the run."""
    transport = settings.email_transport
    fields: dict[str, Any] = {"runId": report.run_id}
    if not wanted(settings, report):
        logger.info(
            f"report skipped (SMART_RESUME_EMAIL_ON={settings.email_on})",
            fields={**fields, "runStatus": report.status},
        )
        return _result(transport, "skipped")
    try:
        if not report.history:
            report = replace(report, history=report_history(settings, client))
        message = build_message(report)
        transports.send(settings, message)
    except transports.DeliveryError as exc:
        logger.error(
            "report delivery failed",
            fields={**fields, "transport": transport, "status": exc.status, "detail": exc.detail},
        )
        return _result(transport, "failed", str(exc))
    except Exception as exc:
        logger.exception("report could not be built or sent", fields=fields)
        return _result(transport, "failed", _crash(exc))
    logger.info(
        "report sent", fields={**fields, "transport": transport, "subject": message.subject}
    )
    return _result(transport, "sent")


def send_smart_resume_report(
    settings: Settings,
    client: firestore.Client,
    report: ReportInput,
    *,
    claimed: bool = False,
    recorded: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Claim, build, deliver and record the run's one report; never raises. `recorded` is
    called once how it went is recorded on the run (its claim settled).

    Returns the recorded `report` map (or the existing one when another caller already owns it).
    When Firestore is unreachable the report is still sent: an email about a store outage is
    worth the small risk of a duplicate.
    """
    transport = settings.email_transport
    try:
        if not claimed:
            try:
                with store.translate_errors("claiming the report"):
                    mine, existing = _claim(settings, client, report.run_id)
            except Exception as exc:
                logger.error(
                    "could not claim the report; sending anyway",
                    fields={"runId": report.run_id, "error": _brief(exc)},
                )
                mine, existing = True, None
            if not mine:
                logger.info(
                    "report already claimed by another caller; not sending",
                    fields={"runId": report.run_id},
                )
                return dict(existing or {"status": "sending", "transport": transport})
        record = _deliver(settings, client, report)
        if _record(settings, client, report.run_id, record) and recorded is not None:
            recorded()
        return {**record, "at": dt.datetime.now(dt.UTC)}
    except Exception as exc:  # the last line of defence: a report never fails the run
        logger.exception("report step failed", fields={"runId": report.run_id})
        return {**_result(transport, "failed", _crash(exc)), "at": dt.datetime.now(dt.UTC)}
