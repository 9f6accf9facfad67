"""Running an `http` operation: POST until the service says done.

Each call passes the operation's `Gate` (`limits.py`) first, so its rate, concurrency and
`Retry-After` limits hold across all workers and no call outlives the run. 429, 5xx and
connection problems are retried with capped, jittered backoff; a `Retry-After` on 429 or 503
holds back every call of the operation. Each checkpoint the service returns is saved (a fenced
write) before the next call, and every attempt at one chunk carries the same `Idempotency-Key`.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from shared.errors import OperationFailed
from shared.log import get_logger, register_secrets
from shared.resume.limits import HELD_PAST_BUDGET, STOPPING, Gate, retry_after, stamped_session
from shared.resume.operations import OperationIO, Outcome, idempotency_key, validate_counts
from shared.resume.pipeline import Operation

log = get_logger("operations")
MAX_RESPONSE_BYTES = 1 << 20  # an operations service answers with a small JSON document
READ_CHUNK = 64 * 1024
MAX_BACKOFF_SECONDS = 30.0
#: Answers whose `Retry-After` holds back every call of the operation.
HOLD_STATUSES = (429, 503)
_session_factory: Callable[[], requests.Session] = stamped_session


class _Transient(Exception):
    """An answer worth retrying: 429, 5xx, or a connection problem."""

    def __init__(self, message: str, wait: float | None = None) -> None:
        super().__init__(message)
        self.wait = wait  # from Retry-After (429 and 503 only); None: the normal backoff


@dataclass(frozen=True)
class _NotNow:
    """The call was not made, or not retried: the operation is deferred with its checkpoint."""

    reason: str


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
            headers = {
                "Idempotency-Key": idempotency_key(body["clientId"], op.name, io.checkpoint),
                "X-Smart-Resume-Run": str(body["runId"]),
            }
            payload = {**body, "checkpoint": io.checkpoint}
            answer = _call_with_retries(session, op, payload, headers, io.gate)
            if isinstance(answer, _NotNow):
                return Outcome(done=False, reason=answer.reason)
            done, checkpoint, counts = _parse_answer(answer)
            for name, n in counts.items():
                io.count(name, n)
            if done:
                return Outcome(done=True)
            if checkpoint is not None:
                io.save_checkpoint(checkpoint)
    finally:
        session.close()


def shown(url: str | None) -> str:
    """A URL as it may be stored, logged or mailed: no user info, every query value masked
    (an operation URL may carry `user:password@` or `?api_key=`)."""
    if not url:
        return str(url)
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return "<an unparsable url>"
    query = "&".join(f"{k}=***" if v else k for k, v in urllib.parse.parse_qsl(parts.query, True))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def extra_headers(op: Operation) -> dict[str, str]:
    """The operation's own headers, `env:NAME` values read now; a missing variable fails the
    operation with its name (never a value)."""
    out = {}
    for name, value in op.headers:
        if value.startswith("env:"):
            variable = value[4:]
            found = os.environ.get(variable)
            if not found:
                raise OperationFailed(
                    f"header {name} reads the environment variable {variable}, which is not set"
                )
            register_secrets([found])  # a credential: masked wherever it might be logged
            value = found
        out[name] = value
    return out


def _backoff(op: Operation, attempt: int) -> float:
    """Exponential from `retry_initial_seconds`, at most 30 s, plus up to one initial of jitter."""
    initial = op.retry_initial_seconds
    return min(MAX_BACKOFF_SECONDS, initial * 2 ** (attempt - 1)) + random.uniform(0, initial)


def _call_with_retries(
    session: requests.Session,
    op: Operation,
    payload: dict[str, Any],
    headers: dict[str, str],
    gate: Gate,
) -> Any:
    """One chunk: the call, retried on transient failures within the budget; `_NotNow` when
    the run stops or a `Retry-After` reaches past the budget."""
    attempts = op.retries + 1
    attempt = 0
    while True:
        attempt += 1
        refused = gate.enter()
        if refused is not None:
            return _NotNow(refused)
        try:
            return _post(session, op, payload, headers, gate)
        except _Transient as exc:
            failure = exc
        finally:
            gate.leave()
        if gate.stop():
            return _NotNow(STOPPING)
        if failure.wait is not None and not gate.hold(failure.wait):
            log.warning(
                "%s; Retry-After %.0f s is past the time budget: deferred, resumes from its "
                "checkpoint",
                failure,
                failure.wait,
                fields={"attempt": attempt, "waitSeconds": round(failure.wait, 3)},
            )
            return _NotNow(HELD_PAST_BUDGET)
        if attempt >= attempts:
            raise OperationFailed(f"{failure} (after {attempts} attempts)")
        wait = failure.wait if failure.wait is not None else _backoff(op, attempt)
        why = f"{failure}" + (
            " (Retry-After: every call of this operation waits)" if failure.wait is not None else ""
        )
        log.warning(
            "retrying: attempt %d of %d in %.2f s, because %s",
            attempt + 1,
            attempts,
            wait,
            why,
            fields={"attempt": attempt + 1, "attempts": attempts, "waitSeconds": round(wait, 3)},
        )
        gate.note_retry()
        # A Retry-After hold is waited out in `enter`, together with every other worker.
        if failure.wait is None and not gate.sleep(wait):
            return _NotNow(STOPPING)


def _post(
    session: requests.Session,
    op: Operation,
    payload: dict[str, Any],
    headers: dict[str, str],
    gate: Gate,
) -> Any:
    assert op.url is not None
    timeout = gate.budget.timeout(op.timeout_seconds)
    cut = " (cut to the run's remaining time)" if timeout < op.timeout_seconds else ""
    ends = time.monotonic() + timeout
    try:
        with gate.sending():
            response = session.post(
                op.url,
                json=payload,
                headers={**headers, **extra_headers(op)},
                timeout=timeout,
                stream=True,
                allow_redirects=False,  # never re-send the client's body to another place
            )
    except requests.Timeout:
        raise _Transient(f"no answer from {shown(op.url)} within {timeout:.3g}s{cut}") from None
    except requests.ConnectionError as exc:
        raise _Transient(f"cannot reach {shown(op.url)}: {type(exc).__name__}") from None
    with response:
        status = response.status_code
        if status == 429 or status >= 500:
            wait = retry_after(response.headers.get("Retry-After"))
            if status not in HOLD_STATUSES:
                wait = None
            raise _Transient(f"{shown(op.url)} answered {status}", wait)
        if 300 <= status < 400:
            where = urllib.parse.urlsplit(response.headers.get("Location") or "").hostname
            raise OperationFailed(
                f"{shown(op.url)} answered {status}, a redirect"
                + (f" to {where}" if where else "")
                + ": redirects are not followed (set the operation's url to the final one)"
            )
        if not 200 <= status < 300:
            raise OperationFailed(f"{shown(op.url)} answered {status}: {_snippet(response)}")
        raw = _read(response, op, ends, f"{timeout:.3g}s{cut}")
    if len(raw) > MAX_RESPONSE_BYTES:
        raise OperationFailed(f"{shown(op.url)} answered more than {MAX_RESPONSE_BYTES} bytes")
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        if "json" in response.headers.get("Content-Type", ""):
            raise OperationFailed(f"{shown(op.url)} answered malformed JSON") from None
        return {}  # a plain-text 2xx means done


def _read(response: requests.Response, op: Operation, ends: float, within: str) -> bytes:
    """The body, up to one byte over the limit, within the call's timeout as a whole (a
    service trickling bytes does not stretch it)."""
    parts: list[bytes] = []
    size = 0
    try:
        while size <= MAX_RESPONSE_BYTES:
            chunk = response.raw.read(
                min(READ_CHUNK, MAX_RESPONSE_BYTES + 1 - size), decode_content=True
            )
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
            if time.monotonic() > ends:
                raise _Transient(f"no complete answer from {shown(op.url)} within {within}")
    except (requests.RequestException, OSError) as exc:
        raise _Transient(f"reading the answer of {shown(op.url)} failed: {exc}") from None
    return b"".join(parts)


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
