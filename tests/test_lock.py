"""The lock: one winner, stale takeover on the server's clock, safe release, fencing."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import threading
import time

import pytest
from google.cloud import firestore

from shared.errors import LeaseLost, LockHeld
from shared.lock import Lock, NotRunning, owner_info

OWNER = {"host": "test", "pid": 1, "function": "test"}


@pytest.fixture
def lock(db, settings) -> Lock:
    return Lock(db, settings)


def _backdate(lock: Lock, **fields: dt.timedelta) -> None:
    """Move timestamps into the past (or future) as if written then."""
    now = dt.datetime.now(dt.UTC)
    lock.ref.update({name: now - delta for name, delta in fields.items()})


class TestAcquire:
    def test_first_acquire_takes_the_lock_with_the_contract_fields(self, lock: Lock) -> None:
        """A fresh lock document holds exactly the contract's fields."""
        lease = lock.acquire("run-1", OWNER)
        data = lock.ref.get().to_dict()
        assert data["held"] is True
        assert data["runId"] == "run-1"
        assert data["token"] == lease.token == 1
        assert data["cancelRequested"] is False
        assert data["progress"] == {}
        assert data["owner"] == OWNER
        assert data["acquiredAt"] == data["heartbeatAt"]
        assert lease.previous_run_id is None

    def test_second_acquire_fails_while_lease_is_fresh(self, lock: Lock) -> None:
        """A live lock is refused with the holder and its age."""
        lock.acquire("run-1", OWNER)
        with pytest.raises(LockHeld) as err:
            lock.acquire("run-2", OWNER)
        assert err.value.run_id == "run-1"
        assert 0 <= err.value.age_seconds < 5

    def test_released_lock_is_taken_with_the_next_token(self, lock: Lock) -> None:
        lease = lock.acquire("run-1", OWNER)
        assert lock.release(lease)
        lease2 = lock.acquire("run-2", OWNER)
        assert lease2.token == 2
        assert lease2.previous_run_id is None

    def test_stale_by_heartbeat_is_taken_over(self, lock: Lock, settings) -> None:
        """No heartbeat for longer than the lease: the next acquirer takes over."""
        lock.acquire("run-1", OWNER)
        _backdate(lock, heartbeatAt=dt.timedelta(seconds=settings.lease_seconds + 5))
        assert lock.read().stale
        lease = lock.acquire("run-2", OWNER)
        assert lease.token == 2
        assert lease.previous_run_id == "run-1"

    def test_stale_by_max_run_is_taken_over_despite_heartbeats(self, lock: Lock, settings) -> None:
        """Held past max-run: stale even with a fresh heartbeat."""
        lock.acquire("run-1", OWNER)
        _backdate(lock, acquiredAt=dt.timedelta(seconds=settings.max_run_seconds + 5))
        lease = lock.acquire("run-2", OWNER)
        assert lease.previous_run_id == "run-1"

    def test_server_clock_judges_a_future_heartbeat(self, lock: Lock, settings) -> None:
        """A heartbeat stamped in the future does not make a lock live forever: max-run still
        applies, and ages are measured against the server's read time."""
        lock.acquire("run-1", OWNER)
        _backdate(
            lock,
            heartbeatAt=dt.timedelta(hours=-5),
            acquiredAt=dt.timedelta(seconds=settings.max_run_seconds + 1),
        )
        state = lock.read()
        assert state.heartbeat_age_seconds < 0
        assert state.stale
        assert lock.acquire("run-2", OWNER).previous_run_id == "run-1"

    def test_ages_are_measured_from_the_snapshot_read_time(self, lock: Lock) -> None:
        """The age is the server's read time minus the stored timestamp, not the local clock."""
        lock.acquire("run-1", OWNER)
        _backdate(lock, acquiredAt=dt.timedelta(seconds=100))
        state = lock.read()
        assert state.age_seconds == round((state.read_time - state.acquired_at).total_seconds(), 3)


class TestContention:
    def test_exactly_one_winner_among_20_threads_repeated(self, lock: Lock, db, settings) -> None:
        """20 threads acquire at once, 50 times: one winner each time, the rest LockHeld."""
        for trial in range(50):
            started = time.monotonic()
            outcomes = _contend(
                20, lambda i, trial=trial: Lock(db, settings).acquire(f"t{trial}-{i}", OWNER)
            )
            assert time.monotonic() - started < 30
            assert outcomes.count("won") == 1, outcomes
            assert outcomes.count("held") == 19, outcomes
            lock.ref.delete()
            lock.fence_ref.delete()

    def test_exactly_one_winner_among_8_processes(self, lock: Lock, emulator) -> None:
        """Separate processes, each with its own client: one winner, 10 times over."""
        ctx = multiprocessing.get_context("spawn")
        for trial in range(10):
            with ctx.Pool(8) as pool:
                args = [
                    (emulator.host, os.environ["GOOGLE_CLOUD_PROJECT"], f"p{trial}-{i}")
                    for i in range(8)
                ]
                outcomes = pool.map(_acquire_in_process, args)
            assert outcomes.count("won") == 1, outcomes
            assert outcomes.count("held") == 7, outcomes
            lock.ref.delete()


def _contend(n: int, attempt) -> list[str]:
    """Run `attempt(i)` in n threads released together; collect won/held/error per thread."""
    barrier = threading.Barrier(n)
    outcomes: list[str] = []
    mutex = threading.Lock()

    def one(i: int) -> None:
        barrier.wait()
        try:
            attempt(i)
            result = "won"
        except LockHeld:
            result = "held"
        except Exception as exc:  # anything else is a defect
            result = f"error {exc!r}"
        with mutex:
            outcomes.append(result)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def _acquire_in_process(args: tuple[str, str, str]) -> str:
    host, project, run_id = args
    os.environ["FIRESTORE_EMULATOR_HOST"] = host
    os.environ["GOOGLE_CLOUD_PROJECT"] = project
    from shared.config import load_settings

    settings = load_settings()
    lock = Lock(firestore.Client(project=project), settings)
    time.sleep(max(0.0, 0.5 - (time.time() % 0.5)))  # start together on the next half second
    try:
        lock.acquire(run_id, owner_info("test"))
        return "won"
    except LockHeld:
        return "held"


class TestRelease:
    def test_holder_releases(self, lock: Lock) -> None:
        lease = lock.acquire("run-1", OWNER)
        assert lock.release(lease) is True
        data = lock.ref.get().to_dict()
        assert data["held"] is False
        assert data["releasedAt"] is not None
        assert data["token"] == 1  # a run releasing its own lock leaves the token as is

    def test_releasing_twice_is_a_no_op(self, lock: Lock) -> None:
        lease = lock.acquire("run-1", OWNER)
        assert lock.release(lease) is True
        before = lock.ref.get().update_time
        assert lock.release(lease) is False
        assert lock.ref.get().update_time == before

    def test_release_after_takeover_leaves_new_holder_untouched(self, lock: Lock, settings) -> None:
        """The zombie's release never clears a newer run's lock."""
        old = lock.acquire("run-1", OWNER)
        _backdate(lock, heartbeatAt=dt.timedelta(seconds=settings.lease_seconds + 5))
        lock.acquire("run-2", OWNER)
        assert lock.release(old) is False
        data = lock.ref.get().to_dict()
        assert data["held"] is True
        assert data["runId"] == "run-2"

    def test_release_with_document_deleted(self, lock: Lock) -> None:
        lease = lock.acquire("run-1", OWNER)
        lock.ref.delete()
        assert lock.release(lease) is False
        assert not lock.ref.get().exists

    def test_release_after_cancel_request_still_releases(self, lock: Lock) -> None:
        """Another writer (a cancel request) changing the document does not block release."""
        lease = lock.acquire("run-1", OWNER)
        lock.request_cancel()
        assert lock.release(lease) is True
        assert lock.ref.get().to_dict()["held"] is False


class TestRenewAndFencing:
    def test_renew_moves_heartbeat_and_stores_progress(self, lock: Lock) -> None:
        lease = lock.acquire("run-1", OWNER)
        first = lock.ref.get().to_dict()["heartbeatAt"]
        time.sleep(0.01)
        assert lock.renew(lease, {"clientId": "c1"}) is False
        data = lock.ref.get().to_dict()
        assert data["heartbeatAt"] > first
        assert data["progress"] == {"clientId": "c1"}

    def test_renew_reports_cancel(self, lock: Lock) -> None:
        lease = lock.acquire("run-1", OWNER)
        assert lock.request_cancel() == "run-1"
        assert lock.renew(lease, {}) is True

    def test_renew_after_takeover_reports_lost(self, lock: Lock, settings) -> None:
        old = lock.acquire("run-1", OWNER)
        _backdate(lock, heartbeatAt=dt.timedelta(seconds=settings.lease_seconds + 5))
        lock.acquire("run-2", OWNER)
        with pytest.raises(LeaseLost):
            lock.renew(old, {})
        assert lock.ref.get().to_dict()["runId"] == "run-2"

    def test_fenced_write_lands_while_lease_is_current(self, lock: Lock, db, settings) -> None:
        from shared.fence import Fence

        lease = lock.acquire("run-1", OWNER)
        lock.renew(lease, {})  # heartbeats do not disturb the fence
        db.document("clients/c1").set({"name": "c1", "active": True})
        doc = db.document("clients/c1/operations/a")
        fence = Fence(db, settings, lease)
        claim = fence.claim("c1", [(doc, {"v": 1})])
        assert claim is not None and doc.get().to_dict() == {"v": 1}
        fence.commit(claim, [(doc, {"v": 2})], None)
        assert doc.get().to_dict() == {"v": 2}

    def test_fenced_write_refused_after_takeover(self, lock: Lock, db, settings) -> None:
        """A stale token's claim is refused, and a claim taken before the takeover is revoked
        by it: nothing of the old run lands."""
        from shared.fence import Fence, revoke

        old = lock.acquire("run-1", OWNER)
        for cid in ("c1", "c2"):
            db.document(f"clients/{cid}").set({"name": cid, "active": True})
        fence = Fence(db, settings, old)
        claim = fence.claim("c1")
        _backdate(lock, heartbeatAt=dt.timedelta(seconds=settings.lease_seconds + 5))
        lock.acquire("run-2", OWNER)
        assert revoke(db, settings, "run-1") == 1
        doc = db.document("clients/c1/operations/a")
        with pytest.raises(LeaseLost):
            fence.commit(claim, [(doc, {"v": 1})], None)
        with pytest.raises(LeaseLost):
            fence.claim("c2", [(db.document("clients/c2/operations/a"), {"v": 1})])
        assert not doc.get().exists
        assert not db.document("clients/c2/operations/a").get().exists

    def test_fenced_write_refused_after_force_unlock(self, lock: Lock, db, settings) -> None:
        from shared.fence import Fence

        old = lock.acquire("run-1", OWNER)
        lock.force_release(force=True)
        db.document("clients/c1").set({"name": "c1", "active": True})
        doc = db.document("clients/c1/operations/a")
        with pytest.raises(LeaseLost):
            Fence(db, settings, old).claim("c1", [(doc, {"v": 1})])
        assert not doc.get().exists


class TestAdmin:
    def test_unlock_refuses_a_live_lock_without_force(self, lock: Lock) -> None:
        lock.acquire("run-1", OWNER)
        with pytest.raises(LockHeld):
            lock.force_release(force=False)
        assert lock.ref.get().to_dict()["held"] is True

    def test_unlock_releases_a_stale_lock_and_bumps_the_token(self, lock: Lock, settings) -> None:
        lock.acquire("run-1", OWNER)
        _backdate(lock, heartbeatAt=dt.timedelta(seconds=settings.lease_seconds + 5))
        before = lock.force_release(force=False)
        assert before.run_id == "run-1"
        data = lock.ref.get().to_dict()
        assert (data["held"], data["token"]) == (False, 2)

    def test_unlock_of_a_free_lock_changes_nothing(self, lock: Lock) -> None:
        lease = lock.acquire("run-1", OWNER)
        lock.release(lease)
        before = lock.ref.get().update_time
        assert lock.force_release(force=True).held is False
        assert lock.ref.get().update_time == before

    def test_cancel_needs_a_live_run(self, lock: Lock) -> None:
        with pytest.raises(NotRunning):
            lock.request_cancel()


class TestWarmAcquire:
    def test_acquire_after_own_release_skips_the_read(self, lock: Lock, monkeypatch) -> None:
        """A warm instance that released the lock last takes it again in one commit."""
        lock.release(lock.acquire("run-1", OWNER))
        reads: list[int] = []
        real = Lock.read
        monkeypatch.setattr(Lock, "read", lambda self: reads.append(1) or real(self))
        lease = lock.acquire("run-2", OWNER)
        assert reads == []
        assert lease.token == 2
        assert lock.ref.get().to_dict()["runId"] == "run-2"

    def test_a_write_since_our_release_falls_back_to_reading(self, lock: Lock) -> None:
        """If anyone wrote the lock after our release, the cached view is not trusted."""
        lock.release(lock.acquire("run-1", OWNER))
        lock.ref.update({"token": 7})  # another instance took and released it meanwhile
        assert lock.acquire("run-2", OWNER).token == 8

    def test_a_live_holder_since_our_release_is_respected(self, lock: Lock, db, settings) -> None:
        lock.release(lock.acquire("run-1", OWNER))
        lock.ref.update({"held": True, "runId": "elsewhere", "token": 2})
        with pytest.raises(LockHeld) as err:
            lock.acquire("run-3", OWNER)
        assert err.value.run_id == "elsewhere"

    def test_what_the_release_remembered_comes_back_on_a_warm_take(self, lock: Lock) -> None:
        """`release(memo=...)` is handed to this process's next take, only if nothing wrote the
        lock since (the memo is what `warm.py` keeps: the last runs, unsettled claims)."""
        memo = object()
        lock.release(lock.acquire("run-1", OWNER), memo=memo)
        assert lock.acquire("run-2", OWNER).memo is memo
        lock.release(_lease(lock), memo=memo)
        lock.ref.update({"outsideRun": {"runId": "run-x"}})  # a run that failed to start
        lease = lock.acquire("run-3", OWNER)
        assert lease.memo is None and lease.token == 3

    def test_a_write_while_held_is_not_remembered(self, lock: Lock, db, settings) -> None:
        """A cancel request (any write but the holder's) while the lease held the lock: the
        release lands, but the next take reads the lock and what it was told to remember is
        dropped (what was written meanwhile may matter)."""
        lease = lock.acquire("run-1", OWNER)
        Lock(db, settings).request_cancel()
        assert lock.renew(lease, {}) is True  # the renewal reads the lock again
        assert lock.release(lease, memo=object())
        assert lock.acquire("run-2", OWNER).memo is None

    def test_a_mark_between_read_and_take_is_not_a_rival(self, lock: Lock, monkeypatch) -> None:
        """A run that failed to start marks the free lock between a contender's read and its
        take: the take's precondition fails, the lock is still free, and it is taken (no 409)."""
        lock.release(lock.acquire("run-1", OWNER))
        lock.ref.update({"token": 5})  # not this process's release: the next take reads
        real = Lock.read
        marked: list[int] = []

        def read_then_mark(self: Lock):  # type: ignore[no-untyped-def]
            state = real(self)
            if not marked:
                marked.append(1)
                self.ref.update({"outsideRun": {"runId": "run-x"}})
            return state

        monkeypatch.setattr(Lock, "read", read_then_mark)
        lease = lock.acquire("run-2", OWNER)
        assert lease.run_id == "run-2" and lease.token == 6


class TestReadWith:
    def test_documents_read_with_the_lock_are_checked_by_the_take(
        self, lock: Lock, db, monkeypatch
    ) -> None:
        """A document read in the lock's round trip that changes before the take commits
        fails the take's check: it is read again, and the lease vouches for what is there."""
        other = db.document("locks/smart-resume/meta/due")
        other.set({"v": 1})
        real = Lock._read_with
        changed: list[int] = []

        def read_then_change(self: Lock, refs):  # type: ignore[no-untyped-def]
            found = real(self, refs)
            if not changed:
                changed.append(1)
                other.set({"v": 2})
            return found

        monkeypatch.setattr(Lock, "_read_with", read_then_change)
        lease = lock.acquire("run-1", OWNER, read_with=(other,))
        assert lease.vouched[other.path].to_dict() == {"v": 2}
        assert lock.read().run_id == "run-1"


def _lease(lock: Lock):  # type: ignore[no-untyped-def]
    """The lease of the lock's current holder, rebuilt from the document."""
    return lock._lease_from(lock.read())
