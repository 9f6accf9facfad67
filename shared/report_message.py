"""What the report email says: built for a reader with ten seconds.

Here the report's content is decided (what to say, in which order, how much); the tables are
`shared.report_tables`, the wording's layout `shared/templates/report.txt.j2` and
`report.html.j2` (autoescaped), and sending it once `shared.report`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shared import report_tables as tables
from shared.documents import count, counts, named
from shared.report_tables import one_line, span, truncate
from shared.transports import Message

MAX_ERROR_CHARS = 500
MAX_PROBLEMS = 100
MAX_PROBLEM_CHARS = 300
#: How the engine says, in a failed result's reason, that this failure quarantined it.
QUARANTINED_NOW = "; quarantined after "
#: The head's colour of a run that needs attention, whatever its status.
ATTENTION = "#a15c00"
MAX_CALL_OPERATIONS = 50
_CALL_KEYS = ("calls", "retried", "throttled")


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


def _took(report: ReportInput) -> float | None:
    return tables.seconds(report.summary, report.started_at, report.finished_at)


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
        short = truncate(one_line(what), 80)
        return f"smart-resume {report.status.upper()}: {short}{suffix} {tag}"
    summary, keys = report.summary, ("processed", "skipped", "failed", "deferred")
    shown = [k for k in keys if k != "deferred" or count(summary, k) or report.status == "partial"]
    attention = ", NEEDS ATTENTION" if _attention(report) else ""
    return f"smart-resume {report.status}{attention}: {counts(summary, shown)}{suffix} {tag}"


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
        reasons.append(f"this run quarantined {len(now)} client-operation(s): {named(now, 5)}")
    if report.problems:
        n = len(report.problems)
        reasons.append(f"{n} client document(s) or state(s) cannot be used (see Problems)")
    return reasons


def _headline(report: ReportInput, attention: list[str]) -> str:
    outcome = _outcome_line(report)
    return f"{outcome} Needs attention: {'; '.join(attention)}." if attention else outcome


def _outcome_line(report: ReportInput) -> str:
    failed, deferred = count(report.summary, "failed"), count(report.summary, "deferred")
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
    facts.append(("Duration", span(_took(report))))
    if report.lock_name:
        facts.append(("Lock", report.lock_name))
    facts.append(("Summary", counts(report.summary)))
    impact = report.summary.get("impact")
    pairs = sorted(impact.items()) if isinstance(impact, dict) else []
    facts.append(("Impact", ", ".join(f"{k}={v}" for k, v in pairs) or "none"))
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
            f"{tables.label(row['client'], row['clientId'])} / {row['operation']}: "
            f"{truncate(row['error'], MAX_ERROR_CHARS)}"
        )
    if len(failed) > 20:
        errors.append(f"... and {len(failed) - 20} more failed client-operations (see the table).")
    return errors


def _problems(report: ReportInput) -> list[str]:
    """One line per client document or state the engine could not use (bounded)."""
    lines = []
    for p in report.problems[:MAX_PROBLEMS]:
        where = truncate(one_line(p.get("clientId")), tables.MAX_ID_CHARS)
        if p.get("operation"):
            where += f" / {truncate(one_line(p.get('operation')), tables.MAX_NAME_CHARS)}"
        lines.append(f"{where}: {truncate(one_line(p.get('problem')), MAX_PROBLEM_CHARS)}")
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


def build_message(report: ReportInput) -> Message:
    """Render the subject, plain text and HTML of a report (templates, loaded on first use)."""
    from shared import templates

    rows = tables.client_rows(report.results, report.client_names)
    facts = _facts(report)
    strip = tables.run_strip(report.history, report.run_id, report.status, _took(report))
    attention = _attention(report)
    context = {
        "subject": build_subject(report),
        "run_id": report.run_id,
        "status": report.status,
        "head": ATTENTION
        if attention and report.status not in ("failed", "abandoned")
        else tables.HEAD_COLOURS.get(report.status, "#333333"),
        "attention": bool(attention),
        "headline": _headline(report, attention),
        "problems": _problems(report),
        "facts": facts,
        "width": max(len(k) for k, _ in facts),
        "errors": _errors(report, rows),
        "failing": _failing(report)[: tables.MAX_ROWS],
        "strip": strip,
        "longest": span(max((r["seconds"] or 0.0 for r in strip), default=0.0)),
        "rows": tables.shown_rows(rows),
        "note": tables.left_out(rows),
        "hints": _hints(report),
        "one_line": one_line,
    }
    return Message(
        subject=context["subject"],
        text=templates.render("report.txt.j2", **context),
        html=templates.render("report.html.j2", **context),
        run_id=report.run_id,
    )
