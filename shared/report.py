"""The report email: one per run, built for a reader with ten seconds, and never failing the run.

`send_smart_resume_report` claims `runs/{runId}.report` with a conditional write before sending,
so a retried or duplicated finalisation never mails twice; then it builds the message, hands it
to the configured transport (`shared.transports`) and records how that went on the run.

Here the report's content is decided (what to say, in which order, how much); the wording's
layout lives in `shared/templates/report.txt.j2` and `report.html.j2` (autoescaped).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from shared import store, transports
from shared.config import Settings
from shared.log import get_logger
from shared.transports import Message

logger = get_logger("report")

MAX_ROWS = 500
MAX_ERROR_CHARS = 500
MAX_CELL_ERROR_CHARS = 300
MAX_NAME_CHARS = 120
MAX_ID_CHARS = 200
MAX_PROBLEMS = 100
MAX_PROBLEM_CHARS = 300
#: How the engine says, in a failed result's reason, that this failure quarantined it.
QUARANTINED_NOW = "; quarantined after "
#: The head's colour of a run that needs attention, whatever its status.
ATTENTION = "#a15c00"
CLAIM_ATTEMPTS = 5
#: Runs in the report's bar strip (this lock's newest, this one included).
HISTORY = 10
#: What the strip draws of each run: no more is read.
STRIP_FIELDS = ["runId", "status", "startedAt", "finishedAt", "summary.durationSeconds"]
STRIP_MIN_PX, STRIP_MAX_PX = 4, 40
MAX_CALL_OPERATIONS = 50
_CALL_KEYS = ("calls", "retried", "throttled")
FAILURE_KINDS = frozenset({"failed", "partial", "abandoned"})
_ORDER = {"failed": 0, "deferred": 1, "processed": 2, None: 3, "skipped": 4}
_COLOURS = {
    "failed": "#b00020",
    "deferred": "#a15c00",
    "processed": "#1b6e20",
    "skipped": "#666666",
    None: "#666666",
}
_HEAD = {
    "completed": "#1b6e20",
    "partial": "#a15c00",
    "cancelled": "#555555",
    "failed": "#b00020",
    "abandoned": "#b00020",
}


@dataclass(frozen=True)
class ReportInput:
    """What a finished (or failed) run hands to the report."""

    run_id: str
    status: str
    summary: dict[str, Any]
    results: list[dict[str, Any]]
    client_names: dict[str, str]
    error: str | None = None
    error_where: str | None = None
    takeover: dict[str, Any] | None = None
    module_error: bool = False
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    lock_name: str | None = None
    #: Client-operations not run until an operator releases them, and those backing off.
    quarantined: tuple[dict[str, Any], ...] = ()
    backed_off: tuple[dict[str, Any], ...] = ()
    #: This lock's newest run records, newest first (summary fields): the bar strip. Read by
    #: `send_smart_resume_report` when not given.
    history: tuple[dict[str, Any], ...] = ()
    #: Client documents and states the engine could not use:
    #: `{"clientId", "operation" (or None), "problem"}` (at most `MAX_PROBLEMS` are shown).
    problems: tuple[dict[str, Any], ...] = ()


# --- building -------------------------------------------------------------------------------


def truncate(text: Any, limit: int) -> str:
    """`text` cut to `limit` characters, saying how much was cut."""
    value = str(text)
    if len(value) <= limit:
        return value
    return f"{value[:limit]}… [truncated: {len(value)} characters in all]"


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _seconds(summary: Any, started: Any, finished: Any) -> float | None:
    value = summary.get("durationSeconds") if isinstance(summary, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(started, dt.datetime) and isinstance(finished, dt.datetime):
        return max(0.0, (finished - started).total_seconds())
    return None


def _duration(report: ReportInput) -> str:
    return _span(_seconds(report.summary, report.started_at, report.finished_at))


def _span(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(round(float(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _count(report: ReportInput, key: str) -> int:
    try:
        return int(report.summary.get(key) or 0)
    except (TypeError, ValueError):
        return 0


def _takeover_note(report: ReportInput) -> str | None:
    if not report.takeover:
        return None
    age = report.takeover.get("ageSeconds")
    age_text = f", silent for {float(age):.0f} s" if isinstance(age, int | float) else ""
    return f"took over stale run {report.takeover.get('runId')}{age_text}"


def build_subject(report: ReportInput) -> str:
    """Outcome, counts and run id in one line."""
    tag = f"[run {report.run_id}]"
    takeover = _takeover_note(report)
    suffix = f" ({takeover.split(',')[0]})" if takeover else ""
    if report.status in ("failed", "abandoned"):
        what = report.error or ("lease lost" if report.status == "abandoned" else "unknown error")
        if report.module_error:
            what = f"resume module did not load: {what}"
        short = truncate(_one_line(what), 80)
        return f"smart-resume {report.status.upper()}: {short}{suffix} {tag}"
    counts = ", ".join(
        f"{_count(report, k)} {k}"
        for k in ("processed", "skipped", "failed", "deferred")
        if k != "deferred" or _count(report, k) or report.status == "partial"
    )
    attention = ", NEEDS ATTENTION" if _attention(report) else ""
    return f"smart-resume {report.status}{attention}: {counts}{suffix} {tag}"


def _quarantined_now(report: ReportInput) -> list[str]:
    """`client / operation` of each client-operation this run quarantined."""
    found = [
        f"{r.get('clientId')} / {r.get('operation')}"
        for r in report.results
        if r.get("outcome") == "failed" and QUARANTINED_NOW in str(r.get("reason") or "")
    ]
    for q in report.quarantined:  # also those beyond the results the run record holds
        since = _when(q.get("since"))
        if since and report.started_at and since >= report.started_at:
            name = f"{q.get('clientId')} / {q.get('operation')}"
            found += [] if name in found else [name]
    return found


def _when(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _attention(report: ReportInput) -> list[str]:
    """Why a run that did not fail still needs someone to look: what it quarantined, and the
    client documents it could not use. Empty when nothing does."""
    reasons = []
    now = _quarantined_now(report)
    if now:
        named = ", ".join(now[:5]) + (f" and {len(now) - 5} more" if len(now) > 5 else "")
        reasons.append(f"this run quarantined {len(now)} client-operation(s): {named}")
    if report.problems:
        count = len(report.problems)
        reasons.append(f"{count} client document(s) or state(s) cannot be used (see Problems)")
    return reasons


def _headline(report: ReportInput) -> str:
    attention = _attention(report)
    outcome = _outcome_line(report)
    if not attention:
        return outcome
    return f"{outcome} Needs attention: {'; '.join(attention)}."


def _outcome_line(report: ReportInput) -> str:
    failed, deferred = _count(report, "failed"), _count(report, "deferred")
    if report.module_error:
        return "The resume module failed to load; no client work ran."
    if report.status == "failed":
        where = f" while {report.error_where}" if report.error_where else ""
        return f"The run failed{where}; work already saved resumes next run."
    if report.status == "abandoned":
        return "The run lost its lock (taken over as stale, or force-unlocked) and stopped."
    if report.status == "partial":
        return (
            f"The time budget ran out: {deferred} client-operation(s) deferred; "
            "they resume where they stopped at the next run."
        )
    if report.status == "cancelled":
        return f"Cancelled by an operator: {deferred} client-operation(s) not done."
    if failed:
        return f"Completed, but {failed} client-operation(s) failed (see the errors below)."
    return "Completed: everything due was done."


def _hints(report: ReportInput) -> list[str]:
    hints = [
        "Status: GET the smart_resume_status function (header X-Webhook-Secret), "
        "or run `python -m shared.resume status`.",
        f"Full record: Firestore runs/{report.run_id}.",
    ]
    if report.module_error:
        hints.append("Fix the module named by SMART_RESUME_MODULE and redeploy.")
    if report.status in ("failed", "abandoned") or report.takeover:
        hints.append(
            'A stuck lock: POST {"action": "unlock"} to smart_resume_status '
            '(add "force": true only if the run is surely dead), '
            "or `python -m shared.resume unlock`."
        )
    if report.status == "partial":
        hints.append(
            "Nothing to do unless this repeats; then raise the time budget or split streams."
        )
    return hints


def _rows(report: ReportInput) -> list[dict[str, Any]]:
    """One row per result, plus one per selected client that has none; most urgent first."""
    names = {cid: str(name) for cid, name in report.client_names.items()}
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for result in report.results:
        cid = str(result.get("clientId"))
        seen.add(cid)
        rows.append(
            {
                "client": names.get(cid, cid),
                "clientId": cid,
                "operation": result.get("operation") or "",
                "outcome": result.get("outcome"),
                "reason": _what_happened(result),
                "error": result.get("error") or "",
            }
        )
    for cid, name in names.items():
        if cid not in seen:
            rows.append(
                {
                    "client": name,
                    "clientId": cid,
                    "operation": "",
                    "outcome": None,
                    "reason": "no operation ran",
                    "error": "",
                }
            )
    order = {cid: i for i, cid in enumerate(names)}
    rows.sort(key=lambda r: (_ORDER.get(r["outcome"], 3), order.get(r["clientId"], len(order))))
    return rows


def _what_happened(result: dict[str, Any]) -> str:
    """The reason column: for work that ran, what came of it, then why it was due (the
    engine's reason is why it ran: a processed row must not read just "never ran")."""
    reason = str(result.get("reason") or "")
    due = f" (due: {reason})" if reason else ""
    if result.get("outcome") == "processed":
        counts = result.get("counts")
        done = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())[:10]) if counts else ""
        return f"done{', ' + done if done else ''}{due}"
    if result.get("outcome") == "failed" and reason:
        return f"due: {reason}"
    return reason


def _label(name: str, client_id: str) -> str:
    """A client as people and tools know it: name and id (names need not be unique)."""
    short_id = truncate(client_id, MAX_ID_CHARS)
    if not name or name == client_id:
        return short_id
    return f"{truncate(name, MAX_NAME_CHARS)} ({short_id})"


def _left_out(rows: list[dict[str, Any]]) -> str | None:
    if len(rows) <= MAX_ROWS:
        return None
    rest: dict[str, int] = {}
    for row in rows[MAX_ROWS:]:
        key = row["outcome"] or "not run"
        rest[key] = rest.get(key, 0) + 1
    parts = ", ".join(f"{n} {k}" for k, n in sorted(rest.items()))
    return f"{len(rows) - MAX_ROWS} more rows not shown ({parts}); the run record has them all."


def _impact(report: ReportInput) -> list[tuple[str, Any]]:
    impact = report.summary.get("impact") or {}
    return sorted(impact.items()) if isinstance(impact, dict) else []


def _calls(report: ReportInput) -> str | None:
    """Per operation: calls made, how many were retries, how many waited for its limits."""
    calls = report.summary.get("calls")
    if not isinstance(calls, dict):
        return None
    parts = []
    for name, c in sorted(calls.items())[:MAX_CALL_OPERATIONS]:
        if isinstance(c, dict):
            n = {k: c.get(k) if isinstance(c.get(k), int) else 0 for k in _CALL_KEYS}
            parts.append(
                f"{name}: {n['calls']} calls, {n['retried']} retried, {n['throttled']} throttled"
            )
    return "; ".join(parts) or None


def _facts(report: ReportInput) -> list[tuple[str, str]]:
    def when(value: dt.datetime | None) -> str:
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "unknown"

    facts = [("Outcome", report.status), ("Run", report.run_id)]
    facts += [("Started", when(report.started_at)), ("Finished", when(report.finished_at))]
    facts.append(("Duration", _duration(report)))
    if report.lock_name:
        facts.append(("Lock", report.lock_name))
    counts = ", ".join(
        f"{_count(report, k)} {k}"
        for k in ("clients", "processed", "skipped", "failed", "deferred")
    )
    facts.append(("Summary", counts))
    impact = _impact(report)
    facts.append(("Impact", ", ".join(f"{k}={v}" for k, v in impact) if impact else "none"))
    calls = _calls(report)
    if calls:
        facts.append(("Calls", calls))
    takeover = _takeover_note(report)
    if takeover:
        facts.append(("Takeover", f"this run {takeover}; that run is marked abandoned"))
    return facts


def _errors(report: ReportInput, rows: Iterable[dict[str, Any]]) -> list[str]:
    errors = []
    if report.error:
        where = f" ({report.error_where})" if report.error_where else ""
        errors.append(f"Run{where}: {truncate(report.error, MAX_ERROR_CHARS)}")
    failed = [r for r in rows if r["error"]]
    for row in failed[:20]:
        errors.append(
            f"{_label(row['client'], row['clientId'])} / {row['operation']}: "
            f"{truncate(row['error'], MAX_ERROR_CHARS)}"
        )
    if len(failed) > 20:
        errors.append(f"... and {len(failed) - 20} more failed client-operations (see the table).")
    return errors


def _problems(report: ReportInput) -> list[str]:
    """One line per client document or state the engine could not use (bounded)."""
    lines = []
    for p in report.problems[:MAX_PROBLEMS]:
        where = truncate(_one_line(p.get("clientId")), MAX_ID_CHARS)
        if p.get("operation"):
            where += f" / {truncate(_one_line(p.get('operation')), MAX_NAME_CHARS)}"
        lines.append(f"{where}: {truncate(_one_line(p.get('problem')), MAX_PROBLEM_CHARS)}")
    if len(report.problems) > MAX_PROBLEMS:
        lines.append(f"... and {len(report.problems) - MAX_PROBLEMS} more")
    return lines


def _failing(report: ReportInput) -> list[str]:
    """One line per quarantined, then per backed-off client-operation."""
    lines = [
        f"QUARANTINED {q['clientId']} / {q['operation']}: {q.get('failures')} failures in a row "
        f"since {q.get('since')}; release with the retry action"
        for q in report.quarantined
    ]
    lines += [
        f"backing off {b['clientId']} / {b['operation']}: {b.get('failures')} failures in a row, "
        f"due at {b.get('dueAt')}"
        for b in report.backed_off
    ]
    return lines


_RUN_COLOURS = {**_HEAD, "cancelled": "#777777", "running": "#1565c0"}


def _strip(report: ReportInput) -> list[dict[str, Any]]:
    """The last runs, oldest first, as bars: height for the duration, colour for the outcome.
    This run is drawn as the report tells it (its record may not say it all yet)."""
    runs: list[dict[str, Any]] = []
    for record in reversed(report.history[:HISTORY]):
        current = record.get("runId") == report.run_id
        status = report.status if current else str(record.get("status") or "unknown")
        seconds = (
            _seconds(report.summary, report.started_at, report.finished_at)
            if current
            else _seconds(record.get("summary"), record.get("startedAt"), record.get("finishedAt"))
        )
        runs.append(
            {
                "runId": str(record.get("runId")),
                "status": status,
                "seconds": seconds,
                "current": current,
            }
        )
    longest = max((r["seconds"] or 0.0 for r in runs), default=0.0) or 1.0
    for run in runs:
        share = (run["seconds"] or 0.0) / longest
        run["height"] = round(STRIP_MIN_PX + (STRIP_MAX_PX - STRIP_MIN_PX) * share)
        run["colour"] = _RUN_COLOURS.get(run["status"], "#999999")
        run["duration"] = _span(run["seconds"])
        run["label"] = f"{run['runId']}: {run['status']}, {run['duration']}"
    return runs


def _view_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows shown (at most MAX_ROWS), cut to size; `line` is the plain-text one."""
    shown = []
    for row in rows[:MAX_ROWS]:
        cells = [
            _label(row["client"], row["clientId"]),
            row["operation"] or "-",
            row["outcome"] or "not run",
            row["reason"] or "-",
        ]
        if row["error"]:
            cells.append(truncate(_one_line(row["error"]), MAX_CELL_ERROR_CHARS))
        shown.append(
            {
                "line": " | ".join(_one_line(c) for c in cells),
                "client": cells[0],
                "name": truncate(row["client"], MAX_NAME_CHARS),
                "clientId": truncate(row["clientId"], MAX_ID_CHARS),
                "operation": cells[1],
                "outcome": cells[2],
                "reason": cells[3],
                "error": truncate(row["error"], MAX_CELL_ERROR_CHARS),
                "colour": _COLOURS.get(row["outcome"], "#666666"),
            }
        )
    return shown


def build_message(report: ReportInput) -> Message:
    """Render the subject, plain text and HTML of a report (templates, loaded on first use)."""
    from shared import templates

    rows = _rows(report)
    facts = _facts(report)
    strip = _strip(report)
    context = {
        "subject": build_subject(report),
        "run_id": report.run_id,
        "status": report.status,
        "head": ATTENTION
        if _attention(report) and report.status not in ("failed", "abandoned")
        else _HEAD.get(report.status, "#333333"),
        "attention": bool(_attention(report)),
        "headline": _headline(report),
        "problems": _problems(report),
        "facts": facts,
        "width": max(len(k) for k, _ in facts),
        "errors": _errors(report, rows),
        "failing": _failing(report)[:MAX_ROWS],
        "strip": strip,
        "longest": _span(max((r["seconds"] or 0.0 for r in strip), default=0.0)),
        "rows": _view_rows(rows),
        "note": _left_out(rows),
        "hints": _hints(report),
        "one_line": _one_line,
    }
    return Message(
        subject=context["subject"],
        text=templates.render("report.txt.j2", **context),
        html=templates.render("report.html.j2", **context),
        run_id=report.run_id,
    )


def report_history(settings: Settings, client: firestore.Client) -> tuple[dict[str, Any], ...]:
    """This lock's newest runs for the bar strip (summary fields only); none if unreadable."""
    from shared.runs import Runs

    try:
        return tuple(Runs(client, settings).recent(HISTORY, STRIP_FIELDS))
    except Exception as exc:
        logger.warning("could not read the last runs for the report: %s", _one_line(exc)[:300])
        return ()


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
        did = any(_count(report, k) for k in ("processed", "failed", "deferred"))
        return did or report.status != "completed"
    return False


# --- claiming, sending, recording -----------------------------------------------------------


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
) -> None:
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
            fields={"error": _one_line(exc)[:300], "reportStatus": record["status"]},
        )


def send_smart_resume_report(
    settings: Settings,
    client: firestore.Client,
    report: ReportInput,
    *,
    claimed: bool = False,
) -> dict[str, Any]:
    """Claim, build, deliver and record the run's one report; never raises.

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
                    fields={"runId": report.run_id, "error": _one_line(exc)[:300]},
                )
                mine, existing = True, None
            if not mine:
                logger.info(
                    "report already claimed by another caller; not sending",
                    fields={"runId": report.run_id},
                )
                return dict(existing or {"status": "sending", "transport": transport})

        record: dict[str, Any]
        if not wanted(settings, report):
            record = {"status": "skipped", "transport": transport, "error": None}
            logger.info(
                f"report skipped (SMART_RESUME_EMAIL_ON={settings.email_on})",
                fields={"runId": report.run_id, "runStatus": report.status},
            )
        else:
            try:
                if not report.history:
                    report = replace(report, history=report_history(settings, client))
                message = build_message(report)
                transports.send(settings, message)
                record = {"status": "sent", "transport": transport, "error": None}
                logger.info(
                    "report sent",
                    fields={
                        "runId": report.run_id,
                        "transport": transport,
                        "subject": message.subject,
                    },
                )
            except transports.DeliveryError as exc:
                record = {"status": "failed", "transport": transport, "error": str(exc)}
                logger.error(
                    "report delivery failed",
                    fields={
                        "runId": report.run_id,
                        "transport": transport,
                        "status": exc.status,
                        "detail": exc.detail,
                    },
                )
            except Exception as exc:
                record = {
                    "status": "failed",
                    "transport": transport,
                    "error": f"{type(exc).__name__}: {_one_line(exc)[:300]}",
                }
                logger.exception(
                    "report could not be built or sent", fields={"runId": report.run_id}
                )
        _record(settings, client, report.run_id, record)
        return {**record, "at": dt.datetime.now(dt.UTC)}
    except Exception as exc:  # the last line of defence: a report never fails the run
        logger.exception("report step failed", fields={"runId": report.run_id})
        return {
            "status": "failed",
            "transport": transport,
            "error": f"{type(exc).__name__}: {_one_line(exc)[:300]}",
            "at": dt.datetime.now(dt.UTC),
        }
