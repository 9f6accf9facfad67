"""Running one client-operation: what both kinds share, and the in-process `python` call.

Both kinds report through the same small interface (`OperationIO`): save a checkpoint (a fenced
write, made before the next call so a crash resumes from it), count things, ask whether to stop,
and pass through the operation's `Gate` (`limits.py`) before every call. The `http` call loop is
in `http_operation.py`.

Chunks are delivered at least once: a crash between a chunk's work and its saved checkpoint
repeats that chunk. Every call of a chunk carries the same `Idempotency-Key` (derived from the
client, the operation and the checkpoint sent, so also after a crash), for the service to
deduplicate on; `python` operations get the same key as `ctx.idempotency_key`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.errors import OperationFailed
from shared.resume.limits import Gate
from shared.resume.pipeline import Operation


class OperationIO(Protocol):
    checkpoint: dict[str, Any] | None
    gate: Gate

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...
    def count(self, name: str, n: int = 1) -> None: ...
    def should_stop(self) -> bool: ...


@dataclass
class Outcome:
    done: bool
    counts: dict[str, int] = field(default_factory=dict)
    #: Why a not-done operation stopped, when it was not the run's stop (a hold past the budget).
    reason: str | None = None


def idempotency_key(client_id: str, operation: str, checkpoint: dict[str, Any] | None) -> str:
    """The same for every attempt at one chunk (client, operation, checkpoint sent), in any run;
    different for the next chunk. sha256 hex of their canonical JSON."""
    text = json.dumps(
        [client_id, operation, checkpoint],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=_canonical,
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(value: Any) -> str:
    """A checkpoint value JSON has no form for; a time as Firestore gives it back (UTC)."""
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        return aware.astimezone(dt.UTC).isoformat()
    return str(value)


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
    """What a `python` operation receives as `ctx` (docs/reference.md, "The pipeline file")."""

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

    @property
    def idempotency_key(self) -> str:
        """The key an `http` call of the current chunk would carry: it changes with each saved
        checkpoint and is the same again when a crashed chunk is repeated."""
        return idempotency_key(self.client_id, self.operation, self._io.checkpoint)

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not isinstance(checkpoint, dict):
            raise TypeError("a checkpoint must be a dict")
        self._io.save_checkpoint(checkpoint)

    def should_stop(self) -> bool:
        return self._io.should_stop()

    def count(self, name: str, n: int = 1) -> None:
        self._io.count(name, n)


def run_python(op: Operation, ctx: Context) -> Outcome:
    """Call the function once, through the operation's gate like an `http` call."""
    gate = ctx._io.gate
    refused = gate.enter()
    if refused is not None:
        return Outcome(done=False, reason=refused)
    try:
        answer = op.function()(ctx)
    finally:
        gate.leave()
    if answer is None:
        return Outcome(done=True)
    if not isinstance(answer, dict):
        raise OperationFailed(f"returned {type(answer).__name__}, expected None or a dict")
    done = answer.get("done", True)
    if not isinstance(done, bool):
        raise OperationFailed(f"'done' must be true or false, got {done!r}"[:200])
    return Outcome(done=done, counts=validate_counts(answer.get("counts")))
