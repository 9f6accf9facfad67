"""Structured logging: one JSON object per line for Cloud Logging, one readable line locally.

Context (`runId`, `clientId`, `operation`, `component`, trace) lives in a contextvar so every
line logged during a run carries it without threading it through every call. The formatters mask
every configured secret wherever it would appear, because a leaked webhook secret or API key in a
log sink is as bad as one in a response. A secret is masked in the values before they are encoded
(JSON escapes `"`, `\\` and control characters, `repr()` escapes quotes and backslashes, so the
encoded line no longer holds the secret as written) and, as a second net, in its escaped forms in
the finished line.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import string
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any

LOGGER_NAME = "smart_resume"
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "smart_resume_log_context", default=None
)
_secrets: tuple[str, ...] = ()
#: Every form a registered secret can take in a line, longest first.
_forms: tuple[str, ...] = ()
_secrets_lock = threading.Lock()

_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}
_CONTEXT_KEYS = ("runId", "clientId", "operation", "component")
TRACE_KEY = "logging.googleapis.com/trace"
MASK = "***"


def _encoded_forms(secret: str) -> set[str]:
    """The secret as written, and as JSON (either `ensure_ascii`) or `repr()` would escape it.

    A provider's error body may echo a key inside its own JSON, and a container logged with
    `%s` shows its strings through `repr()`; each form is masked like the secret itself.
    """
    forms = {
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
    }
    # repr() escapes a quote only when the whole string holds both kinds; cover that too.
    forms.add(secret.replace("\\", "\\\\").replace("'", "\\'"))
    return forms


def register_secrets(values: Iterable[str | None]) -> None:
    """Remember values that must be masked in every log line from now on."""
    global _secrets, _forms
    with _secrets_lock:
        merged = set(_secrets) | {v for v in values if v and len(v) >= 4}
        # Longest first, so a secret that contains another is masked whole.
        _secrets = tuple(sorted(merged, key=len, reverse=True))
        forms = set().union(*(_encoded_forms(s) for s in _secrets)) if _secrets else set()
        _forms = tuple(sorted(forms, key=len, reverse=True))


def mask(text: str) -> str:
    """Replace every registered secret in `text`, as written or escaped."""
    for form in _forms:
        if form in text:
            text = text.replace(form, MASK)
    return text


def _masked(value: Any) -> Any:
    """`value` with every string inside it masked, keys included, before anything encodes it.

    Other objects are left as they are: what they print as is masked in the finished line.
    """
    if isinstance(value, str):
        return mask(value)
    if type(value) is dict:
        return {_masked(k): _masked(v) for k, v in value.items()}
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(_masked(v) for v in value)
    return value


def _message(record: logging.LogRecord) -> str:
    """`record.getMessage()`, with the arguments masked before `%` formats them."""
    if record.args:
        args = record.args
        masked = tuple(_masked(a) for a in args) if isinstance(args, tuple) else _masked(args)
        try:
            return mask(str(record.msg) % masked)
        except (TypeError, ValueError, KeyError):
            pass  # a malformed call: let logging format it as it always would, then mask
    return mask(record.getMessage())


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add fields to every log line in this context (and threads started with its copy)."""
    added = {k: v for k, v in fields.items() if v is not None}
    token = _context.set({**current_context(), **added})
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict[str, Any]:
    return dict(_context.get() or {})


def trace_from_header(header: str | None, project: str | None) -> str | None:
    """Turn `X-Cloud-Trace-Context: TRACE/SPAN;o=1` into Cloud Logging's trace resource name."""
    if not header or not project:
        return None
    trace_id = header.split("/", 1)[0].strip().lower()
    if len(trace_id) != 32 or any(c not in string.hexdigits for c in trace_id):
        return None
    return f"projects/{project}/traces/{trace_id}"


class JsonFormatter(logging.Formatter):
    """Cloud Logging's structured format: `severity`, `message`, `time`, and the bound context."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, "DEFAULT"),
            "message": _message(record),
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
        }
        context = getattr(record, "context", None) or {}
        for key, value in context.items():
            entry[TRACE_KEY if key == "trace" else key] = value
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info and record.levelno >= logging.ERROR:
            entry["exception"] = self.formatException(record.exc_info)
        # Masked before encoding (escaping would hide a secret holding `"` or `\\`), then the
        # encoded line once more for anything assembled from pieces.
        return mask(json.dumps(_masked(entry), default=lambda o: mask(str(o)), ensure_ascii=False))


class TextFormatter(logging.Formatter):
    """One readable line for a terminal: time, severity, context, message, fields."""

    def format(self, record: logging.LogRecord) -> str:
        context = _masked(getattr(record, "context", None) or {})
        tags = " ".join(f"{k}={context[k]}" for k in _CONTEXT_KEYS if k in context)
        extra = _masked(getattr(record, "fields", None) or {})
        tail = " ".join(f"{k}={v}" for k, v in extra.items())
        when = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        line = f"{when} {record.levelname:<7} {tags + ' ' if tags else ''}{_message(record)}"
        if tail:
            line += f" ({tail})"
        if record.exc_info and record.levelno >= logging.ERROR:
            line += "\n" + self.formatException(record.exc_info)
        return mask(line)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.context = _context.get() or {}
        return True


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stdout` (or `sys.stderr`) is at the time: pytest swaps them."""

    def __init__(self) -> None:
        super().__init__()
        self.target = "stdout"

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return getattr(sys, self.target)

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure(log_format: str = "text", level: int = logging.INFO) -> None:
    """Install the handler once; calling again switches the format (tests do)."""
    handler = _handler()
    logging.getLogger(LOGGER_NAME).setLevel(level)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())


def _handler() -> _StdoutHandler:
    logger = logging.getLogger(LOGGER_NAME)
    logger.propagate = False
    handler = next((h for h in logger.handlers if isinstance(h, _StdoutHandler)), None)
    if handler is None:
        handler = _StdoutHandler()
        handler.addFilter(_ContextFilter())
        logger.addHandler(handler)
    return handler


@contextlib.contextmanager
def to_stderr() -> Iterator[None]:
    """Log to standard error for a while: the functions log to standard output (Cloud Logging
    reads it), the command line to standard error, so that its standard output holds only its
    answer (`--json` for machines). Restored after, for whoever calls the command in-process."""
    handler = _handler()
    before, handler.target = handler.target, "stderr"
    try:
        yield
    finally:
        handler.target = before


def get_logger(component: str) -> logging.LoggerAdapter[logging.Logger]:
    """A logger whose lines say which part of smart-resume wrote them."""
    if not logging.getLogger(LOGGER_NAME).handlers:
        configure()
    return _Adapter(logging.getLogger(f"{LOGGER_NAME}.{component}"), {"component": component})


class _Adapter(logging.LoggerAdapter[logging.Logger]):
    """Passes `fields={...}` through as structured fields and tags lines with the component."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        fields = kwargs.pop("fields", None)
        extra = kwargs.setdefault("extra", {})
        extra["fields"] = fields
        extra["component_name"] = self.extra["component"] if self.extra else None
        return msg, kwargs

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        msg, kwargs = self.process(msg, kwargs)
        with bind(component=kwargs["extra"].pop("component_name")):
            self.logger.log(level, msg, *args, **kwargs)
