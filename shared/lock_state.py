"""The lock document, read: a typed `LockState` with ages on the server's clock.

Every field is checked (the document is untrusted input like any other): a wrong type reads as
missing, the holder's own limits decide staleness, and the progress map keeps only the fields a
run writes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from shared import documents
from shared.config import Settings
from shared.errors import LockHeld


@dataclass(frozen=True)
class LockState:
    """A read of the lock document, with ages measured on the server's clock."""

    exists: bool
    held: bool
    run_id: str | None
    token: int
    stale: bool
    read_time: dt.datetime | None
    acquired_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    released_at: dt.datetime | None
    age_seconds: float | None
    heartbeat_age_seconds: float | None
    cancel_requested: bool
    progress: dict[str, Any]
    owner: dict[str, Any]
    update_time: dt.datetime | None = None
    lease_seconds: float = 0.0  # as the holder recorded it (else this reader's setting)
    max_run_seconds: float = 0.0
    took_over: str | None = None
    took_over_age: float | None = None
    revoke: tuple[str, ...] = ()

    @property
    def live(self) -> bool:
        return self.held and not self.stale

    def held_error(self) -> LockHeld:
        """`LockHeld` for this live lock, saying when it goes stale unless renewed (so a
        caller knows whether to wait or to look)."""
        stale_in = None
        if self.heartbeat_age_seconds is not None and self.age_seconds is not None:
            stale_in = max(
                0.0,
                min(
                    self.lease_seconds - self.heartbeat_age_seconds,
                    self.max_run_seconds - self.age_seconds,
                ),
            )
        return LockHeld(
            self.run_id,
            self.age_seconds or 0.0,
            self.heartbeat_age_seconds,
            round(stale_in, 3) if stale_in is not None else None,
        )


def _positive(value: Any, default: float) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1e9
    return float(value) if ok else default


def recorded_limits(data: dict[str, Any], settings: Settings) -> tuple[float, float]:
    """The lease and max-run seconds the holder wrote into the lock (this reader's settings
    for a lock written before they were recorded, or with a value of the wrong type)."""
    return (
        _positive(data.get("leaseSeconds"), settings.lease_seconds),
        _positive(data.get("maxRunSeconds"), settings.max_run_seconds),
    )


def recorded_stale(data: dict[str, Any], now: dt.datetime | None, settings: Settings) -> bool:
    """Whether a held lock (its document's `data`, read at `now` by the server's clock) is
    stale by the limits its holder recorded."""
    lease, max_run = recorded_limits(data, settings)
    beat_age = _seconds(now, data.get("heartbeatAt"))
    age = _seconds(now, data.get("acquiredAt"))
    return beat_age is None or beat_age > lease or age is None or age > max_run


def _ids(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(dict.fromkeys(v for v in value if isinstance(v, str) and v))[:20]


#: Progress fields a run writes (anything else in the map is not ours and not shown).
PROGRESS_FIELDS = {
    "clientId": str,
    "clientIndex": int,
    "clientCount": int,
    "operation": str,
    "clientsDone": int,
    "failed": int,
    "fullPass": str,
}


def _progress(value: Any) -> dict[str, Any]:
    """The lock's progress map with only the fields a run writes, of their types, bounded."""
    if not isinstance(value, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value_type in PROGRESS_FIELDS.items():
        v = value.get(key)
        if value_type is int and documents.is_int(v):
            out[key] = v
        elif value_type is str and isinstance(v, str):
            out[key] = documents.text(v)
    for key, v in value.items():
        if key not in PROGRESS_FIELDS and isinstance(v, dt.datetime):
            out[key] = v  # the heartbeat's own progress stamp
    return out


def _seconds(later: dt.datetime | None, earlier: Any) -> float | None:
    if later is None or not isinstance(earlier, dt.datetime):
        return None
    return round((later - earlier).total_seconds(), 3)


def lock_state(snap: Any, settings: Settings) -> LockState:
    """The lock document as read (`snap`), typed, with ages on the server's clock."""
    data = (snap.to_dict() or {}) if snap.exists else {}
    now = snap.read_time
    acquired, beat = data.get("acquiredAt"), data.get("heartbeatAt")
    age, beat_age = _seconds(now, acquired), _seconds(now, beat)
    held = data.get("held") is True
    lease_seconds, max_run = recorded_limits(data, settings)
    stale = held and recorded_stale(data, now, settings)
    token = data.get("token")
    run_id = data.get("runId")
    took = data.get("tookOver") if isinstance(data.get("tookOver"), dict) else {}
    took_age = took.get("ageSeconds")
    return LockState(
        exists=bool(snap.exists),
        held=held,
        run_id=documents.text(run_id) if isinstance(run_id, str) else None,
        token=token if documents.is_int(token) else 0,
        stale=stale,
        read_time=now,
        acquired_at=acquired if isinstance(acquired, dt.datetime) else None,
        heartbeat_at=beat if isinstance(beat, dt.datetime) else None,
        released_at=documents.timestamp(data.get("releasedAt")),
        age_seconds=age,
        heartbeat_age_seconds=beat_age,
        cancel_requested=data.get("cancelRequested") is True,
        progress=_progress(data.get("progress")),
        owner=documents.bounded(data["owner"], items=5)
        if isinstance(data.get("owner"), dict)
        else {},
        update_time=snap.update_time if snap.exists else None,
        lease_seconds=lease_seconds,
        max_run_seconds=max_run,
        took_over=took.get("runId") if isinstance(took.get("runId"), str) else None,
        took_over_age=float(took_age) if isinstance(took_age, int | float) else None,
        revoke=_ids(data.get("revoke")),
    )
