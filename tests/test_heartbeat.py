"""The heartbeat keeps the lease fresh, logs each beat, flags cancel and loss, and stops."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from shared.heartbeat import Heartbeat
from shared.lock import Lock

OWNER = {"host": "t", "pid": 1, "function": "t"}


@pytest.fixture
def fast(configure):
    return configure(SMART_RESUME_HEARTBEAT_SECONDS="0.1", SMART_RESUME_LEASE_SECONDS="0.5")


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_keeps_the_lock_fresh_across_several_leases(db, fast) -> None:
    """Held for 3 lease lengths with beats: never stale, and no one can take it."""
    lock = Lock(db, fast)
    lease = lock.acquire("run-1", OWNER)
    with Heartbeat(lock, lease, fast.heartbeat_seconds, fast.lease_seconds) as hb:
        hb.set_progress(clientId="c1", operation="score")
        for _ in range(6):
            time.sleep(0.25)
            assert not lock.read().stale
        assert not hb.lost.is_set()
    assert hb.beats >= 8
    assert lock.read().progress == {"clientId": "c1", "operation": "score"}


def test_logs_one_beat_per_interval(db, fast, capsys) -> None:
    lock = Lock(db, fast)
    lease = lock.acquire("run-1", OWNER)
    with Heartbeat(lock, lease, fast.heartbeat_seconds, fast.lease_seconds) as hb:
        assert _wait_for(lambda: hb.beats >= 3)
    lines = [line for line in capsys.readouterr().out.splitlines() if "still running" in line]
    assert len(lines) >= 3


def test_stops_on_exception(db, fast) -> None:
    """An exception inside the block stops the thread; nothing renews afterwards."""
    lock = Lock(db, fast)
    lease = lock.acquire("run-1", OWNER)
    with pytest.raises(RuntimeError), Heartbeat(lock, lease, 0.1, 0.5) as hb:
        raise RuntimeError("boom")
    assert not hb._thread.is_alive()
    after = lock.ref.get().update_time
    time.sleep(0.3)
    assert lock.ref.get().update_time == after


def test_flags_cancel(db, fast) -> None:
    lock = Lock(db, fast)
    lease = lock.acquire("run-1", OWNER)
    with Heartbeat(lock, lease, 0.1, 0.5) as hb:
        lock.request_cancel()
        assert _wait_for(hb.cancel_requested.is_set)


def test_flags_lost_after_takeover(db, fast) -> None:
    """Once another run takes over, the next beat flags the lease lost and stops renewing."""
    lock = Lock(db, fast)
    lease = lock.acquire("run-1", OWNER)
    with Heartbeat(lock, lease, 0.1, 0.5) as hb:
        lock.ref.update({"heartbeatAt": dt.datetime.now(dt.UTC) - dt.timedelta(seconds=60)})
        lock.acquire("run-2", OWNER)
        assert _wait_for(hb.lost.is_set)
    assert lock.read().run_id == "run-2"


def test_flags_lost_after_force_unlock(db, fast) -> None:
    lock = Lock(db, fast)
    lease = lock.acquire("run-1", OWNER)
    with Heartbeat(lock, lease, 0.1, 0.5) as hb:
        lock.force_release(force=True)
        assert _wait_for(hb.lost.is_set)
