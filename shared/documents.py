"""Documents read from the store, turned into values of the right type plus their problems.

Any field of any document may have been written by hand, by another tool or by an older
version: a string where a boolean belongs, a 5,000-entry map, a megabyte of name. Everything
the engine, the status, the console and the report read from a client, an operation state, a
lock or a run record passes through here first, so none of them ever meets a wrong type: a bad
value is dropped (read as missing) and named as a *problem* of that document, which the status
lists and the report shows. Strings and containers taken into answers are bounded here too.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shared.log import mask

#: A name, an id or a short text taken from a document into an answer, a page or a report.
MAX_TEXT = 200
#: Problems kept per client document, and listed by the status.
MAX_CLIENT_PROBLEMS = 10
MAX_LISTED_PROBLEMS = 100
#: Unknown operation names quoted in one problem (the rest are counted).
MAX_NAMED = 5
STATUSES = ("success", "failed", "partial", "running", "quarantined")
SUMMARY_COUNTS = ("clients", "processed", "skipped", "failed", "deferred")
#: Problems found only when a step loads its whole state (never at planning time).
LOAD_FIELDS = ("counts", "checkpoint")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def type_name(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return "timestamp"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "map",
        bytes: "bytes",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def text(value: Any, limit: int = MAX_TEXT) -> str:
    """One line of at most `limit` characters (a longer one is cut and ends with `…`)."""
    value = " ".join(str(value).split()) if not isinstance(value, str) else value
    if len(value) > limit or "\n" in value or "\r" in value:
        value = " ".join(value[: limit * 2].split())
    return value if len(value) <= limit else value[: limit - 1] + "…"


def error_line(value: Any, limit: int) -> str:
    """An error as people see it: one line, every known secret masked (before it is cut, so
    no part of one shows), at most `limit` characters."""
    line = mask(" ".join(str(value).split()))
    return line if len(line) <= limit else line[: limit - 1] + "…"


def named(items: list[str], most: int) -> str:
    """The first `most` of `items`, and how many more there are."""
    more = len(items) - most
    return ", ".join(items[:most]) + (f" and {more} more" if more > 0 else "")


def count(summary: dict[str, Any] | None, key: str) -> int:
    """One count of a run summary: 0 when it is missing or not a number."""
    try:
        return int((summary or {}).get(key) or 0)
    except (TypeError, ValueError):
        return 0


def counts(summary: dict[str, Any] | None, keys: Iterable[str] = SUMMARY_COUNTS) -> str:
    """`3 clients, 2 processed, 1 skipped, 0 failed, 0 deferred` from a run summary."""
    return ", ".join(f"{count(summary, k)} {k}" for k in keys)


def bounded(value: Any, items: int = 20, chars: int = MAX_TEXT, depth: int = 3) -> Any:
    """A copy of `value` fit to be returned: strings cut, maps and lists shortened, nesting
    flattened below `depth`. Timestamps and numbers pass as they are."""
    if isinstance(value, str):
        return text(value, chars)
    if value is None or isinstance(value, bool | int | float | dt.datetime):
        return value
    if depth <= 0:
        return f"<{type_name(value)}>"
    if isinstance(value, dict):
        return {
            text(k, chars): bounded(v, items, chars, depth - 1)
            for k, v in list(value.items())[:items]
        }
    if isinstance(value, list | tuple):
        return [bounded(v, items, chars, depth - 1) for v in list(value)[:items]]
    return f"<{type_name(value)}>"


def timestamp(value: Any) -> dt.datetime | None:
    return value if isinstance(value, dt.datetime) else None


@dataclass(frozen=True)
class Problem:
    """Something in one document the engine could not use, in words an operator can act on."""

    client_id: str
    operation: str | None
    field: str
    problem: str

    def stored(self) -> dict[str, Any]:
        """As kept on the client document (`clients/{id}.problems`)."""
        return {"operation": self.operation, "field": self.field, "problem": self.problem}

    def listed(self) -> dict[str, Any]:
        """As the status lists it (contract: clientId, operation, problem)."""
        return {"clientId": text(self.client_id), **self.stored()}


def _wrong(field: str, value: Any, want: str, effect: str) -> str:
    return f"'{field}' is {type_name(value)}, not {want}: {effect}"


# -- clients -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    """A client document as the engine may use it."""

    id: str
    name: str
    active: bool  # True only when the field is the boolean true
    stream: int | None
    #: The operations it asks for (pipeline order is the pipeline's), or None for all of them.
    operations: tuple[str, ...] | None
    operations_invalid: bool
    unknown_operations: tuple[str, ...]
    next_due: dt.datetime | None
    problems: tuple[Problem, ...]
    #: The problems stored on the document by an earlier pass or run.
    stored_problems: tuple[Problem, ...]
    #: The document without the engine's own fields: what a `python` operation sees.
    data: dict[str, Any]


#: Fields the engine writes on a client document (never handed to an operation).
ENGINE_FIELDS = (
    "claim",
    "nextDueAt",
    "failing",
    "failingCount",
    "quarantinedCount",
    "shard",
    "problems",
    "problemCount",
)


def client(client_id: str, data: dict[str, Any] | None, names: Iterable[str]) -> Client:
    """Read a client document (`data`, as stored) against the pipeline's operation `names`."""
    data = data if isinstance(data, dict) else {}
    known = list(names)
    problems: list[Problem] = []

    def problem(field: str, words: str) -> None:
        problems.append(Problem(client_id, None, field, words))

    active = data.get("active")
    if "active" in data and not isinstance(active, bool):
        problem("active", _wrong("active", active, "a boolean", "the client never runs"))
    name = data.get("name")
    if "name" in data and not isinstance(name, str):
        problem("name", _wrong("name", name, "a string", "shown by its id"))
    stream = data.get("stream")
    if stream is not None and not is_int(stream):
        problem("stream", _wrong("stream", stream, "an integer", "no stream selects it"))
        stream = None
    selected = data.get("operations")
    operations: tuple[str, ...] | None = None
    invalid = False
    unknown: tuple[str, ...] = ()
    if selected is not None:
        if not isinstance(selected, list) or not all(isinstance(n, str) for n in selected):
            invalid = True
            problem(
                "operations",
                _wrong(
                    "operations", selected, "a list of operation names", "none of them runs"
                ).replace(" is list,", " is a list with other values,"),
            )
        else:
            operations = tuple(n for n in known if n in selected)
            unknown = tuple(dict.fromkeys(n for n in selected if n not in known))
            if unknown:
                quoted = named([repr(text(n, 40)) for n in unknown], MAX_NAMED)
                effect = "they are ignored" if operations else "nothing runs for this client"
                problem(
                    "operations",
                    f"'operations' names {len(unknown)} operation(s) the pipeline lacks "
                    f"({quoted}): {effect}",
                )
    return Client(
        id=client_id,
        name=text(name) if isinstance(name, str) and name else text(client_id),
        active=active is True,
        stream=stream,
        operations=operations,
        operations_invalid=invalid,
        unknown_operations=tuple(text(n) for n in unknown[:MAX_NAMED]),
        next_due=timestamp(data.get("nextDueAt")),
        problems=tuple(problems),
        stored_problems=stored_problems(client_id, data),
        data={k: v for k, v in data.items() if k not in ENGINE_FIELDS},
    )


def stored_problems(client_id: str, data: dict[str, Any]) -> tuple[Problem, ...]:
    """The problems an earlier pass or run stored on the document (each entry checked)."""
    found = data.get("problems")
    if not isinstance(found, list):
        return ()
    out = []
    for entry in found[:MAX_CLIENT_PROBLEMS]:
        if not isinstance(entry, dict) or not isinstance(entry.get("problem"), str):
            continue
        operation, field = entry.get("operation"), entry.get("field")
        operation = text(operation) if isinstance(operation, str) else None
        field = text(field) if isinstance(field, str) else ""
        out.append(Problem(client_id, operation, field, text(entry["problem"], 300)))
    return tuple(out)


def merged(
    client_id: str,
    stored: Iterable[Problem],
    found: Iterable[Problem],
    checked: Iterable[tuple[str | None, str]],
) -> list[Problem]:
    """The client's problems after a look at some of its fields: what was `checked` now is
    replaced by what was `found`; what was not looked at this time keeps what was stored."""
    looked = set(checked)
    kept = [p for p in stored if (p.operation, p.field) not in looked]
    return list(dict.fromkeys([*found, *kept]))[:MAX_CLIENT_PROBLEMS]


def problem_fields(problems: list[Problem]) -> dict[str, Any]:
    """The client-document fields that keep its problems (what the status lists)."""
    return {"problems": [p.stored() for p in problems], "problemCount": len(problems)}


#: The client-level fields `client()` checks.
CLIENT_FIELDS = ("active", "name", "stream", "operations")


# -- operation states --------------------------------------------------------------------------


def state(
    client_id: str, operation: str, data: dict[str, Any] | None
) -> tuple[dict[str, Any], list[Problem]]:
    """An operation state with every field of the wrong type dropped (read as missing), and
    the problems that names. Fields that are absent are fine: older versions wrote fewer."""
    if not isinstance(data, dict):
        return {}, []
    clean: dict[str, Any] = {}
    problems: list[Problem] = []

    def problem(field: str, words: str) -> None:
        problems.append(Problem(client_id, operation, field, words))

    for key, value in data.items():
        if key == "status":
            if isinstance(value, str) and value in STATUSES:
                clean[key] = value
            else:
                shown = repr(text(value, 40)) if isinstance(value, str) else type_name(value)
                problem(key, f"'status' is {shown}, not one of {', '.join(STATUSES)}: it runs")
        elif key in ("startedAt", "finishedAt", "quarantinedAt", "heldUntil"):
            if value is None or isinstance(value, dt.datetime):
                clean[key] = value
            else:
                problem(key, _wrong(key, value, "a timestamp", "read as missing"))
        elif key in ("failures", "attempts"):
            if is_int(value) and value >= 0:
                clean[key] = value
            else:
                problem(key, _wrong(key, value, "a count", "read as missing"))
        elif key == "counts":
            if not isinstance(value, dict):
                if value is not None:
                    problem(key, _wrong(key, value, "a map of numbers", "counting starts again"))
                continue
            good = {k: v for k, v in value.items() if isinstance(k, str) and is_int(v)}
            if len(good) != len(value):
                bad = [text(k, 40) for k in value if k not in good][:MAX_NAMED]
                problem(
                    key,
                    f"'counts' holds {len(value) - len(good)} value(s) that are not whole "
                    f"numbers ({', '.join(bad)}): they are dropped",
                )
            clean[key] = good
        elif key == "checkpoint":
            if value is None or isinstance(value, dict):
                clean[key] = value
            else:
                skipped = "the operation is skipped until the state is fixed or deleted"
                problem(key, _wrong(key, value, "a map", skipped))
                clean["badCheckpoint"] = True
        elif key == "error":
            clean[key] = text(value, 500) if isinstance(value, str) else None
        else:
            clean[key] = value
    return clean, problems


# -- failing work on a client document ---------------------------------------------------------


def failing_entries(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The client document's `failing` map, only the entries the engine could have written."""
    found = data.get("failing")
    if not isinstance(found, dict):
        return []
    out = []
    for operation, entry in sorted(found.items(), key=lambda kv: str(kv[0]))[:50]:
        if not isinstance(entry, dict) or entry.get("state") not in ("quarantined", "backoff"):
            continue
        failures = entry.get("failures")
        if not is_int(failures) or failures < 1:
            continue
        error = entry.get("error")
        kept = {
            "state": entry["state"],
            "failures": failures,
            "since": timestamp(entry.get("since")),
            "dueAt": timestamp(entry.get("dueAt")),
            "error": text(error, 300) if isinstance(error, str) else None,
        }
        out.append((text(operation), kept))
    return out


# -- run records -------------------------------------------------------------------------------

RUN_TEXT_FIELDS = ("runId", "status", "lockName", "scheduleTime", "error", "tookOver")


def run_record(data: dict[str, Any] | None) -> dict[str, Any]:
    """A run record as status and health read it: texts cut, maps bounded, types checked."""
    data = data if isinstance(data, dict) else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in RUN_TEXT_FIELDS:
            out[key] = text(value, 500) if isinstance(value, str) else None
        elif key in ("startedAt", "finishedAt"):
            out[key] = timestamp(value)
        elif key == "stream":
            out[key] = value if is_int(value) else None
        elif key == "summary":
            out[key] = _summary(value)
        elif key in ("trigger", "report"):
            out[key] = bounded(value, items=10) if isinstance(value, dict) else None
        elif key == "results":
            rows = value if isinstance(value, list) else []
            out[key] = [bounded(r, items=10, chars=500) for r in rows if isinstance(r, dict)]
        else:
            out[key] = bounded(value, items=10)
    return out


def _summary(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {}
    out: dict[str, Any] = {}
    for key, v in list(value.items())[:40]:
        if not isinstance(key, str):
            continue
        if key == "impact":
            impact = list(v.items())[:50] if isinstance(v, dict) else []
            out[key] = {text(k): n for k, n in impact if is_int(n)}
        elif is_int(v) or isinstance(v, float):
            out[text(key)] = v
        else:
            out[text(key)] = bounded(v, items=20)
    return out
