"""The pipeline file: which operations run, in which order, and how.

Loaded with `tomllib` and validated whole: every error names the file, the operation and the
field, so a typo is found at the first run (or by `python -m shared.resume plan`), not by a
client three hours in.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from shared.config import OWN_VARIABLES
from shared.errors import PipelineError

KINDS = ("http", "python")
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,99}$")
#: Timing settings a file may set for all operations and each operation may override.
TIMING = {
    # name: (type, default, low, high)
    "fresh_hours": (float, 24.0, 0.0, 1e6),
    "retry_backoff_seconds": (float, 900.0, 0.0, 86400.0),
    "quarantine_after": (int, 6, 0, 1000),
}
TOP_KEYS = {"operation", *TIMING}
#: Limits on the calls of one operation, held across every client and worker of a run
#: set per operation only.
LIMITS = ("max_per_second", "max_concurrent")
#: Numbers each operation may set, with the same (type, default, low, high) as `TIMING`.
NUMBERS = {
    "timeout_seconds": (float, 60.0, 0.0, 3600.0),
    "max_calls": (int, 100, 1, 1_000_000),
    "retries": (int, 3, 0, 20),
    "retry_initial_seconds": (float, 0.5, 0.0, 60.0),
}
OP_KEYS = {*TIMING, *LIMITS, *NUMBERS, "name", "kind", "url", "target", "headers"}


@dataclass(frozen=True, slots=True)
class Operation:
    """One step of the pipeline, as the file describes it."""

    name: str
    kind: str
    url: str | None = None
    target: str | None = None
    timeout_seconds: float = 60.0
    max_calls: int = 100
    retries: int = 3
    retry_initial_seconds: float = 0.5
    fresh_hours: float = 24.0
    retry_backoff_seconds: float = 900.0
    quarantine_after: int = 6
    max_per_second: float | None = None  # None: no rate limit
    max_concurrent: int | None = None  # None: as many as there are workers
    #: Extra request headers of an `http` operation: a literal value, or `env:NAME` (read from
    #: the environment at each run, so a secret never sits in the file).
    headers: tuple[tuple[str, str], ...] = ()

    def function(self) -> Callable[..., Any]:
        """Resolve a python operation's `module:function` (imported on use, not at load)."""
        assert self.target is not None
        module_name, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Pipeline:
    path: Path
    fresh_hours: float
    operations: tuple[Operation, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(op.name for op in self.operations)

    def get(self, name: str) -> Operation | None:
        return next((op for op in self.operations if op.name == name), None)

    @property
    def fingerprint(self) -> str:
        """What decides when work is due: the operations in order and their timing settings.
        When it changes, every client's `nextDueAt` is recomputed on the next tick."""
        timing = [
            [op.name, op.fresh_hours, op.retry_backoff_seconds, op.quarantine_after]
            for op in self.operations
        ]
        return hashlib.sha256(json.dumps(timing).encode()).hexdigest()[:16]


def shown(path: Path) -> str:
    """The file as errors name it: relative to the code, so an answer does not carry where the
    code lives on the server; a file configured outside it keeps the path it was given."""
    root = Path(__file__).resolve().parent.parent.parent
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def load_pipeline(path: Path) -> Pipeline:
    """Read and validate `path`; raise `PipelineError` listing every problem found."""
    name = shown(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{name}: pipeline file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(
            f"{name}: cannot read the pipeline file: {type(exc).__name__}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{name}: not valid TOML: {exc}") from None
    return parse_pipeline(raw, path)


def parse_pipeline(raw: dict[str, Any], path: Path) -> Pipeline:
    problems: list[str] = []
    for key in sorted(set(raw) - TOP_KEYS):
        if key in LIMITS:
            problems.append(f"{key} is set per operation, not for the whole file")
        else:
            problems.append(f"unknown top-level key {key!r}")
    defaults = _timing(raw, {k: v[1] for k, v in TIMING.items()}, problems.append)
    entries = raw.get("operation", [])
    if not isinstance(entries, list) or not entries:
        problems.append("at least one [[operation]] is required")
        entries = []
    operations: list[Operation] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        op = _parse_operation(entry, index, seen, problems, defaults)
        if op is not None:
            operations.append(op)
    if problems:
        raise PipelineError(f"{shown(path)}: " + "; ".join(problems))
    return Pipeline(path=path, fresh_hours=defaults["fresh_hours"], operations=tuple(operations))


def _timing(
    table: dict[str, Any], defaults: dict[str, Any], problem: Callable[[str], None]
) -> dict[str, Any]:
    """`fresh_hours` (> 0), `retry_backoff_seconds` (>= 0) and `quarantine_after` (whole,
    0 = never) from a table, falling back to `defaults`."""
    values = dict(defaults)
    for key, (kind_of, _, low, high) in TIMING.items():
        if key not in table:
            continue
        value = table[key]
        number = isinstance(value, int | float) if kind_of is float else isinstance(value, int)
        positive = key == "fresh_hours"
        if (
            isinstance(value, bool)
            or not number
            or not low <= value <= high
            or (positive and value <= 0)
        ):
            what = (
                "a positive number"
                if positive
                else ("a number" if kind_of is float else "a whole number")
            )
            problem(f"{key} must be {what} from {low:g} to {high:g}, got {value!r}")
            continue
        values[key] = kind_of(value)
    return values


def _parse_operation(
    entry: Any, index: int, seen: set[str], problems: list[str], defaults: dict[str, Any]
) -> Operation | None:
    if not isinstance(entry, dict):
        problems.append(f"operation #{index + 1} is not a table")
        return None
    name = entry.get("name")
    label = f"operation {name!r}" if isinstance(name, str) else f"operation #{index + 1}"
    before = len(problems)

    def bad(field: str, why: str) -> None:
        problems.append(f"{label}: field {field!r} {why}")

    if not isinstance(name, str) or not NAME.match(name):
        bad("name", "must be letters, digits, '_' or '-', starting with a letter")
    elif name in seen:
        bad("name", "is used twice")
    else:
        seen.add(name)
    for key in sorted(set(entry) - OP_KEYS):
        bad(key, "is unknown")
    kind = entry.get("kind")
    if kind not in KINDS:
        bad("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    values: dict[str, Any] = {}
    for key, (kind_of, default, low, high) in NUMBERS.items():
        value = entry.get(key, default)
        ok_type = isinstance(value, int | float) if kind_of is float else isinstance(value, int)
        if isinstance(value, bool) or not ok_type or not low <= value <= high:
            positive = "a positive" if key in ("timeout_seconds", "max_calls") else "a"
            bad(
                key,
                f"must be {positive} {'number' if kind_of is float else 'whole number'} "
                f"up to {high:g}, got {value!r}",
            )
        elif key in ("timeout_seconds", "max_calls") and value <= 0:
            bad(key, f"must be positive, got {value!r}")
        values[key] = value
    url = entry.get("url")
    target = entry.get("target")
    if kind == "http":
        if not _http_url(url):
            bad("url", f"must be an http(s) URL, got {url!r}")
        if target is not None:
            bad("target", "is only for python operations")
    elif kind == "python":
        if not isinstance(target, str) or not re.match(r"^[\w.]+:\w+$", target):
            bad("target", f"must be 'package.module:function', got {target!r}")
        else:
            _check_target(target, bad)
        if url is not None:
            bad("url", "is only for http operations")
    limits = _limits(entry, bad)
    headers = _headers(entry.get("headers"), kind, bad)
    timing = _timing(entry, defaults, lambda why: problems.append(f"{label}: {why}"))
    if len(problems) > before:
        return None
    numbers = {key: NUMBERS[key][0](value) for key, value in values.items()}
    return Operation(
        name=name, kind=kind, url=url, target=target, headers=headers, **timing, **numbers, **limits
    )


HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,100}$")
#: Headers the engine sets itself (or that would change how the request is framed).
RESERVED_HEADERS = {
    "idempotency-key",
    "x-smart-resume-run",
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
}


def _headers(value: Any, kind: Any, bad: Callable[[str, str], None]) -> tuple[tuple[str, str], ...]:
    """`headers = {"Authorization" = "env:NAME", "X-Team" = "leads"}` of an http operation."""
    if value is None:
        return ()
    if kind != "http":
        bad("headers", "is only for http operations")
        return ()
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        bad("headers", "must be a table of header names to strings")
        return ()
    out = []
    for name, text in value.items():
        if not HEADER_NAME.match(name) or name.lower() in RESERVED_HEADERS:
            bad("headers", f"cannot set the header {name[:60]!r}")
            continue
        if text.startswith("env:") and not ENV_NAME.match(text[4:]):
            bad("headers", f"{name}: 'env:' must be followed by a variable name")
            continue
        if text.startswith("env:") and OWN_VARIABLES.match(text[4:]):  # never sent out
            bad("headers", f"{name}: {text[4:]} is smart-resume's own, never sent to a service")
            continue
        if any(c in text for c in "\r\n\0"):
            bad("headers", f"{name}: a header value cannot hold a line break")
            continue
        out.append((name, text))
    return tuple(out)


def _limits(entry: dict[str, Any], bad: Callable[[str, str], None]) -> dict[str, Any]:
    """`max_per_second` (a number > 0) and `max_concurrent` (whole, >= 1); absent: no limit."""
    found: dict[str, Any] = {}
    rate = entry.get("max_per_second")
    if rate is not None:
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1e6:
            bad("max_per_second", f"must be a number greater than 0 (up to 1e6), got {rate!r}")
        else:
            found["max_per_second"] = float(rate)
    concurrent = entry.get("max_concurrent")
    if concurrent is not None:
        if (
            isinstance(concurrent, bool)
            or not isinstance(concurrent, int)
            or not 1 <= concurrent <= 10_000
        ):
            bad("max_concurrent", f"must be a whole number from 1 to 10000, got {concurrent!r}")
        else:
            found["max_concurrent"] = concurrent
    return found


def _http_url(url: Any) -> bool:
    if not isinstance(url, str):
        return False
    try:
        parsed = urlparse(url)
        _ = parsed.port  # raises ValueError for a port that is not a number in range
        return parsed.scheme in ("http", "https") and bool(parsed.hostname)
    except ValueError:  # urlparse rejects e.g. "http://["
        return False


def _check_target(target: str, bad: Callable[[str, str], None]) -> None:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is a pipeline error, not a crash
        bad("target", f"cannot import {module_name!r}: {type(exc).__name__}: {exc}")
        return
    if not callable(getattr(module, attr, None)):
        bad("target", f"{module_name!r} has no function {attr!r}")
