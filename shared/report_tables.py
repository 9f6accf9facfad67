"""The report's two tables: a row per client-operation, most urgent first and cut to size, and
a bar per recent run of the lock. Kept apart from the words (`shared.report_message`) because
here every cell is bounded: a run of 100,000 clients must still make a readable email.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

MAX_ROWS = 500
MAX_CELL_ERROR_CHARS = 300
MAX_NAME_CHARS = 120
MAX_ID_CHARS = 200
#: Runs in the report's bar strip (this lock's newest, this one included).
HISTORY = 10
STRIP_MIN_PX, STRIP_MAX_PX = 4, 40
_ORDER = {"failed": 0, "deferred": 1, "processed": 2, None: 3, "skipped": 4}
_COLOURS = {"failed": "#b00020", "deferred": "#a15c00", "processed": "#1b6e20"}  # else grey
#: A run's colour by how it ended: the report's head (unless it needs attention), and its bar.
HEAD_COLOURS = {
    "completed": "#1b6e20",
    "partial": "#a15c00",
    "cancelled": "#555555",
    "failed": "#b00020",
    "abandoned": "#b00020",
}
_RUN_COLOURS = {**HEAD_COLOURS, "cancelled": "#777777", "running": "#1565c0"}


def truncate(text: Any, limit: int) -> str:
    """`text` cut to `limit` characters, saying how much was cut."""
    value = str(text)
    if len(value) <= limit:
        return value
    return f"{value[:limit]}… [truncated: {len(value)} characters in all]"


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def seconds(summary: Any, started: Any, finished: Any) -> float | None:
    """A run's duration: as its summary says, else from its start and end."""
    value = summary.get("durationSeconds") if isinstance(summary, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(started, dt.datetime) and isinstance(finished, dt.datetime):
        return max(0.0, (finished - started).total_seconds())
    return None


def span(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(round(float(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def label(name: str, client_id: str) -> str:
    """A client as people and tools know it: name and id (names need not be unique)."""
    short_id = truncate(client_id, MAX_ID_CHARS)
    if not name or name == client_id:
        return short_id
    return f"{truncate(name, MAX_NAME_CHARS)} ({short_id})"


# --- the clients' table -----------------------------------------------------------------------


def client_rows(
    results: Iterable[dict[str, Any]], client_names: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """One row per result, plus one per selected client that has none; most urgent first."""
    names = {cid: str(name) for cid, name in client_names.items()}

    def row(cid: str, result: dict[str, Any], reason: str) -> dict[str, Any]:
        return {
            "client": names.get(cid, cid),
            "clientId": cid,
            "operation": result.get("operation") or "",
            "outcome": result.get("outcome"),
            "reason": reason,
            "error": result.get("error") or "",
        }

    rows = [row(str(r.get("clientId")), r, _what_happened(r)) for r in results]
    seen = {r["clientId"] for r in rows}
    rows += [row(cid, {}, "no operation ran") for cid in names if cid not in seen]
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


def left_out(rows: list[dict[str, Any]]) -> str | None:
    if len(rows) <= MAX_ROWS:
        return None
    rest: dict[str, int] = {}
    for row in rows[MAX_ROWS:]:
        key = row["outcome"] or "not run"
        rest[key] = rest.get(key, 0) + 1
    parts = ", ".join(f"{n} {k}" for k, n in sorted(rest.items()))
    return f"{len(rows) - MAX_ROWS} more rows not shown ({parts}); the run record has them all."


def shown_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows shown (at most MAX_ROWS), cut to size; `line` is the plain-text one."""
    shown = []
    for row in rows[:MAX_ROWS]:
        cells = [
            label(row["client"], row["clientId"]),
            row["operation"] or "-",
            row["outcome"] or "not run",
            row["reason"] or "-",
        ]
        if row["error"]:
            cells.append(truncate(one_line(row["error"]), MAX_CELL_ERROR_CHARS))
        shown.append(
            {
                "line": " | ".join(one_line(c) for c in cells),
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


# --- the runs' strip --------------------------------------------------------------------------


def run_strip(
    history: Iterable[dict[str, Any]], run_id: str, status: str, took: float | None
) -> list[dict[str, Any]]:
    """The last runs (`history`, newest first), oldest first, as bars: height for the
    duration, colour for the outcome. This run is drawn as the report tells it (`status`,
    `took` seconds): its record may not say it all yet."""
    runs: list[dict[str, Any]] = []
    for record in reversed(list(history)[:HISTORY]):
        current = record.get("runId") == run_id
        runs.append(
            {
                "runId": str(record.get("runId")),
                "status": status if current else str(record.get("status") or "unknown"),
                "seconds": took
                if current
                else seconds(
                    record.get("summary"), record.get("startedAt"), record.get("finishedAt")
                ),
                "current": current,
            }
        )
    longest = max((r["seconds"] or 0.0 for r in runs), default=0.0) or 1.0
    for run in runs:
        share = (run["seconds"] or 0.0) / longest
        run["height"] = round(STRIP_MIN_PX + (STRIP_MAX_PX - STRIP_MIN_PX) * share)
        run["colour"] = _RUN_COLOURS.get(run["status"], "#999999")
        run["duration"] = span(run["seconds"])
        run["label"] = f"{run['runId']}: {run['status']}, {run['duration']}"
    return runs
