"""Running one client-operation: the `http` call loop and the in-process `python` call.

Both report through the same small interface (`OperationIO`): save a checkpoint (a fenced write,
made before the next call so a crash resumes from it), count things, and ask whether to stop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import requests

from shared.errors import OperationFailed
from shared.resume.pipeline import Operation

MAX_RESPONSE_BYTES = 1 << 20  # an operations service answers with a small JSON document
_session_factory: Callable[[], requests.Session] = requests.Session


class OperationIO(Protocol):
    checkpoint: dict[str, Any] | None

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...
    def count(self, name: str, n: int = 1) -> None: ...
    def should_stop(self) -> bool: ...


@dataclass
class Outcome:
    done: bool
    counts: dict[str, int] = field(default_factory=dict)


class _Transient(Exception):
    """An answer worth retrying: 429, 5xx, or a connection problem."""


def run_http(op: Operation, io: OperationIO, body: dict[str, Any]) -> Outcome:
    """POST until the service says done, saving each checkpoint before the next call."""
    session = _session_factory()
    calls = 0
    try:
        while True:
            if io.should_stop():
                return Outcome(done=False)
            if calls >= op.max_calls:
                raise OperationFailed(
                    f"max_calls ({op.max_calls}) reached before the service said done"
                )
            calls += 1
            answer = _call_with_retries(session, op, {**body, "checkpoint": io.checkpoint}, io)
            if answer is None:  # stopped while waiting to retry
                return Outcome(done=False)
            done, checkpoint, counts = _parse_answer(answer)
            for name, n in counts.items():
                io.count(name, n)
            if done:
                return Outcome(done=True)
            if checkpoint is not None:
                io.save_checkpoint(checkpoint)
    finally:
        session.close()


def _call_with_retries(
    session: requests.Session, op: Operation, payload: dict[str, Any], io: OperationIO
) -> Any:
    # Imported here, not at module level: it costs cold start and most runs never retry.
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

    retrying = Retrying(
        stop=stop_after_attempt(op.retries + 1),
        wait=wait_exponential_jitter(
            multiplier=op.retry_initial_seconds, max=30, jitter=op.retry_initial_seconds
        ),
        retry=retry_if_exception(lambda e: isinstance(e, _Transient) and not io.should_stop()),
        reraise=True,
    )
    try:
        return retrying(_post, session, op, payload)
    except _Transient as exc:
        if io.should_stop():
            return None
        raise OperationFailed(f"{exc} (after {op.retries + 1} attempts)") from None


def _post(session: requests.Session, op: Operation, payload: dict[str, Any]) -> Any:
    assert op.url is not None
    try:
        response = session.post(op.url, json=payload, timeout=op.timeout_seconds, stream=True)
    except requests.Timeout:
        raise _Transient(f"no answer from {op.url} within {op.timeout_seconds:g}s") from None
    except requests.ConnectionError as exc:
        raise _Transient(f"cannot reach {op.url}: {type(exc).__name__}") from None
    with response:
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Transient(f"{op.url} answered {status}")
        if not 200 <= status < 300:
            raise OperationFailed(f"{op.url} answered {status}: {_snippet(response)}")
        try:
            raw = response.raw.read(MAX_RESPONSE_BYTES + 1, decode_content=True)
        except (requests.RequestException, OSError) as exc:
            raise _Transient(f"reading the answer of {op.url} failed: {exc}") from None
    if len(raw) > MAX_RESPONSE_BYTES:
        raise OperationFailed(f"{op.url} answered more than {MAX_RESPONSE_BYTES} bytes")
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        if "json" in response.headers.get("Content-Type", ""):
            raise OperationFailed(f"{op.url} answered malformed JSON") from None
        return {}  # a plain-text 2xx means done


def _snippet(response: requests.Response) -> str:
    try:
        text = response.raw.read(300, decode_content=True).decode("utf-8", "replace")
    except Exception:
        return ""
    return " ".join(text.split())[:200]


def _parse_answer(answer: Any) -> tuple[bool, dict[str, Any] | None, dict[str, int]]:
    if not isinstance(answer, dict):
        raise OperationFailed(f"the answer is JSON but not an object: {type(answer).__name__}")
    done = answer.get("done", True)
    if not isinstance(done, bool):
        raise OperationFailed(f"'done' must be true or false, got {done!r}"[:200])
    checkpoint = answer.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, dict):
        raise OperationFailed("'checkpoint' must be an object")
    return done, checkpoint, validate_counts(answer.get("counts"))


def validate_counts(counts: Any) -> dict[str, int]:
    if counts is None:
        return {}
    if not isinstance(counts, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in counts.items()
    ):
        raise OperationFailed("'counts' must map names to whole numbers")
    return counts


class Context:
    """What a `python` operation receives as `ctx` (CONTRACT section 5)."""

    def __init__(
        self,
        *,
        client_id: str,
        client: dict[str, Any],
        run_id: str,
        operation: str,
        io: OperationIO,
    ) -> None:
        self.client_id = client_id
        self.client = client
        self.run_id = run_id
        self.operation = operation
        self._io = io

    @property
    def checkpoint(self) -> dict[str, Any] | None:
        return self._io.checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not isinstance(checkpoint, dict):
            raise TypeError("a checkpoint must be a dict")
        self._io.save_checkpoint(checkpoint)

    def should_stop(self) -> bool:
        return self._io.should_stop()

    def count(self, name: str, n: int = 1) -> None:
        self._io.count(name, n)


def run_python(op: Operation, ctx: Context) -> Outcome:
    answer = op.function()(ctx)
    if answer is None:
        return Outcome(done=True)
    if not isinstance(answer, dict):
        raise OperationFailed(f"returned {type(answer).__name__}, expected None or a dict")
    done = answer.get("done", True)
    if not isinstance(done, bool):
        raise OperationFailed(f"'done' must be true or false, got {done!r}"[:200])
    return Outcome(done=done, counts=validate_counts(answer.get("counts")))
