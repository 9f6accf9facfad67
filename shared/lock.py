"""The run lock: one Firestore document with a lease, a fencing token and stale takeover.

Every change is one conditional commit checked against what was just read (`create()` when the
document is absent, `last_update_time` preconditions otherwise). On the emulator, read-then-write
transactions contending on one document take ~2 s per abort round and sometimes elect nobody;
conditional commits decide among 20 contenders in ~0.1 s with exactly one winner.

Staleness is judged by the server's clock (the snapshot's `read_time`), never the local one.

Fencing: the lock document changes on every heartbeat, so it cannot serve as a precondition for
the engine's state writes. A second, small document (`locks/{name}/fence/current`) holds the
token and run id and changes only on acquire and unlock; runs read it (never write it) when they
claim a client, see `fence.py`.

Outcomes that are unknown (a deadline passed, the answer was lost) are settled by reading back:
an acquire that landed is kept and used, a release that landed is reported as landed.

What a contender or a read-back needs is kept in the document itself, never in the memory of
the one who wrote it: the holder's `leaseSeconds` and `maxRunSeconds` (staleness is judged by
the holder's settings, not the reader's), the run it took over (`tookOver`), and `revoke`, the
runs whose client claims must still be closed. A takeover or an unlock adds the old holder to
`revoke`; it leaves the list only once its claims are closed, so a lost answer or a failed
revoke is finished by whoever holds the lock next, before that run does any work.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from shared import store
from shared.config import Settings
from shared.errors import LeaseLost, LockHeld, StoreUnavailable
from shared.lock_actions import ATTEMPTS, ExtraWrites, OperatorActions
from shared.lock_actions import NotRunning as NotRunning  # where callers have found it
from shared.lock_state import LockState, lock_state
from shared.log import get_logger

log = get_logger("lock")


@dataclass(frozen=True)
class _Released:
    """What this process knows about a lock it released last: the update time and token it
    left, what its caller asked to remember (`memo`, opaque here) and the snapshots it
    vouched for (documents read and not written since, checked again by the next take)."""

    update_time: dt.datetime
    token: int
    memo: Any = None
    vouch: tuple[Any, ...] = ()


_released: dict[tuple[str, str], _Released] = {}
_released_mutex = threading.Lock()


def _remember_released(key: tuple[str, str], released: _Released) -> None:
    with _released_mutex:
        _released[key] = released


def _pop_released(key: tuple[str, str]) -> _Released | None:
    with _released_mutex:
        return _released.pop(key, None)


@dataclass
class Lease:
    """What a holder knows about the lock it took; passed to every fenced write."""

    run_id: str
    token: int
    acquired_at: dt.datetime
    previous_run_id: str | None = None
    previous_age_seconds: float | None = None
    lock_update_time: dt.datetime | None = None
    fence_update_time: dt.datetime | None = None
    cancel_requested: bool = False
    #: Runs whose client claims this holder must close before doing any work.
    revoke: list[str] = field(default_factory=list)
    #: Taken without a read because this process released the lock last and nothing wrote
    #: it since: what the release asked to remember (`release(memo=...)`), else None.
    memo: Any = None
    #: The documents vouched for at that release, by path: unchanged since they were read.
    vouched: dict[str, Any] = field(default_factory=dict)
    #: Someone else wrote the lock document while this lease held it (a cancel request, a
    #: run that failed before starting): its release is not remembered.
    outside_write: bool = False
    _mutex: threading.Lock = field(default_factory=threading.Lock, repr=False)


def owner_info(function: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "function": function}


class Lock(OperatorActions):
    """The lock document `locks/{name}` and its fence; all calls have bounded deadlines. The
    holder's protocol is here (take, renew, release); an operator's actions come with
    `OperatorActions`."""

    def __init__(self, client: firestore.Client, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.ref = client.collection(store.LOCKS).document(settings.lock_name)
        self.fence_ref = self.ref.collection(store.FENCE).document("current")
        self._key = (str(client.project), self.ref._document_path)

    # -- reading -----------------------------------------------------------------------------

    def read(self) -> LockState:
        with store.translate_errors("reading the lock"):
            snap = self.ref.get(**store.call(self.settings))
        return lock_state(snap, self.settings)

    # -- taking and giving back ----------------------------------------------------------------

    def acquire(
        self,
        run_id: str,
        owner: dict[str, Any],
        extra: ExtraWrites | None = None,
        read_with: tuple[Any, ...] = (),
    ) -> Lease:
        """Take the lock if absent, released or stale; `extra` adds writes to the same commit
        (the run record, the abandoned mark of a taken-over run), so they land together or not.
        A take that reads the lock reads the documents `read_with` in the same round trip, and
        its commit checks them unchanged: they come back as `Lease.vouched`.

        Raises `LockHeld` when a live run holds it or another acquirer won the race.
        """
        cached = _pop_released(self._key)
        if cached is not None:
            # This process released the lock last. If nothing has written it since (the
            # precondition checks exactly that), it is still free with the token we left:
            # take it without reading first, one round trip saved on every warm run.
            try:
                lease = self._take(
                    run_id,
                    owner,
                    extra,
                    cached.token + 1,
                    cached.update_time,
                    None,
                    None,
                    (),
                    cached.vouch,
                )
                lease.memo = cached.memo
                lease.vouched = {snap.reference.path: snap for snap in cached.vouch}
                return lease
            except (gexc.FailedPrecondition, gexc.NotFound, StoreUnavailable):
                pass  # someone wrote it since, or the answer was lost: decide on a fresh read
        for _ in range(ATTEMPTS):
            state, beside = self._read_with(read_with)
            if state.held and state.run_id == run_id:
                return self._lease_from(state)  # an earlier attempt of ours landed after all
            if state.live:
                raise self.held(state)
            previous = state.run_id if state.held else None
            try:
                lease = self._take(
                    run_id,
                    owner,
                    extra,
                    state.token + 1,
                    state.update_time if state.exists else None,
                    previous,
                    state.age_seconds if previous else None,
                    state.revoke,
                    beside,
                )
                lease.vouched = {snap.reference.path: snap for snap in beside}
                return lease
            except (gexc.AlreadyExists, gexc.FailedPrecondition) as exc:
                # Someone committed between our read and our write: they won, unless "someone"
                # is an earlier attempt of ours whose answer was lost.
                winner = self.read()
                if winner.held and winner.run_id == run_id:
                    return self._lease_from(winner)
                if winner.live:
                    raise self.held(winner) from exc
                # Still free: the write was not a rival's take (a run that failed before
                # starting marks the lock); decide again on this read.
            except StoreUnavailable:
                # The commit may or may not have landed: read back and decide on what is there.
                continue
        raise StoreUnavailable("could not settle whether the lock was taken")

    def _read_with(self, refs: tuple[Any, ...]) -> tuple[LockState, tuple[Any, ...]]:
        """The lock and, in the same round trip, the documents `refs` (those that exist)."""
        if not refs:
            return self.read(), ()
        with store.translate_errors("reading the lock"):
            found = list(self.client.get_all([self.ref, *refs], **store.call(self.settings)))
        mine = next(s for s in found if s.reference.path == self.ref.path)
        return lock_state(mine, self.settings), tuple(
            s for s in found if s is not mine and s.exists
        )

    def _lease_from(self, state: LockState) -> Lease:
        """The lease of a take whose answer was lost, rebuilt from the lock document: the run
        it took over and the claims still to revoke are recorded there, not only in memory."""
        log.warning("the lock was taken although the answer was lost; using it")
        return Lease(
            run_id=state.run_id or "",
            token=state.token,
            acquired_at=state.acquired_at or state.read_time or dt.datetime.now(dt.UTC),
            previous_run_id=state.took_over,
            previous_age_seconds=state.took_over_age,
            lock_update_time=state.update_time,
            revoke=list(state.revoke),
        )

    def _take(
        self,
        run_id: str,
        owner: dict[str, Any],
        extra: ExtraWrites | None,
        token: int,
        update_time: dt.datetime | None,
        previous: str | None,
        previous_age: float | None,
        pending: tuple[str, ...],
        vouch: tuple[Any, ...] = (),
    ) -> Lease:
        """One commit: the lock (created, or updated only if unchanged since `update_time`),
        the fence, the caller's writes, and a check that each `vouch` snapshot's document is
        unchanged (a precondition failure of any fails the take: the caller reads)."""
        revoke = list(dict.fromkeys([*pending, *([previous] if previous else [])]))
        data = {
            "runId": run_id,
            "held": True,
            "token": token,
            "acquiredAt": firestore.SERVER_TIMESTAMP,
            "heartbeatAt": firestore.SERVER_TIMESTAMP,
            "releasedAt": None,
            "cancelRequested": False,
            "progress": {},
            "owner": owner,
            "leaseSeconds": self.settings.lease_seconds,
            "maxRunSeconds": self.settings.max_run_seconds,
            "tookOver": {"runId": previous, "ageSeconds": previous_age} if previous else None,
            "revoke": revoke,
        }
        batch = self.client.batch()
        if update_time is not None:
            option = self.client.write_option(last_update_time=update_time)
            batch.update(self.ref, data, option=option)
        else:
            batch.create(self.ref, data)
        batch.set(self.fence_ref, {"token": token, "runId": run_id})
        if extra is not None:
            extra(batch, previous)
        batch._add_write_pbs([store.unchanged(snap) for snap in vouch])
        with store.translate_errors("taking the lock"):
            results = batch.commit(**store.commit_call(self.settings))
        return Lease(
            run_id=run_id,
            token=token,
            acquired_at=results[0].update_time,
            previous_run_id=previous,
            previous_age_seconds=previous_age,
            lock_update_time=results[0].update_time,
            fence_update_time=results[1].update_time,
            revoke=revoke,
        )

    def revoked(self, lease: Lease, run_ids: list[str]) -> None:
        """Record that the claims of `run_ids` are closed: they leave the lock's `revoke`.
        Best effort: a list left behind costs the next holder one empty query per id."""
        with lease._mutex:
            left = [r for r in lease.revoke if r not in run_ids]
            try:
                with store.translate_errors("recording the revoke"):
                    result = self.ref.update(
                        {"revoke": left},
                        option=self.client.write_option(last_update_time=lease.lock_update_time),
                        **store.commit_call(self.settings),
                    )
                lease.lock_update_time = result.update_time
                lease.revoke = left
            except (gexc.FailedPrecondition, gexc.NotFound, StoreUnavailable) as exc:
                log.warning("could not record the closed claims: %s", exc)

    def held(self, state: LockState) -> LockHeld:
        """The error for a live lock: its age, its heartbeat's age, and when it goes stale."""
        return state.held_error()

    def _owned(self, lease: Lease) -> LockState:
        """Re-read after a lost precondition; raise `LeaseLost` unless the lock is still ours."""
        state = self.read()
        if not (state.held and state.run_id == lease.run_id and state.token == lease.token):
            raise LeaseLost(f"run {lease.run_id} no longer holds lock {self.settings.lock_name}")
        return state

    def renew(self, lease: Lease, progress: dict[str, Any]) -> bool:
        """Move `heartbeatAt` forward and store progress while the lease is ours.

        Returns whether cancel was requested; raises `LeaseLost` when the lock was taken over,
        force-unlocked or deleted. The common case is one blind conditional commit; only when
        something else wrote the document (a cancel request, a takeover) do we read it.
        """
        with lease._mutex:
            for _ in range(ATTEMPTS):
                try:
                    with store.translate_errors("renewing the lease"):
                        result = self.ref.update(
                            {"heartbeatAt": firestore.SERVER_TIMESTAMP, "progress": progress},
                            option=self.client.write_option(
                                last_update_time=lease.lock_update_time
                            ),
                            **store.commit_call(self.settings),
                        )
                    lease.lock_update_time = result.update_time
                    return lease.cancel_requested
                except gexc.NotFound as exc:
                    raise LeaseLost("the lock document was deleted") from exc
                except gexc.FailedPrecondition:
                    state = self._owned(lease)
                    lease.outside_write = True
                    lease.lock_update_time = state.update_time
                    lease.cancel_requested = state.cancel_requested
            raise LeaseLost("could not renew the lease: the lock keeps changing")

    def release(
        self,
        lease: Lease,
        extra: ExtraWrites | None = None,
        landed: Callable[[], bool] | None = None,
        memo: Any = None,
        vouch: tuple[Any, ...] = (),
    ) -> bool:
        """Give the lock back if it is still ours; `extra` writes land in the same commit.
        `memo` comes back as `Lease.memo` on this process's next take, if that take proves
        nothing wrote the lock since (and nothing else wrote it while this lease held it);
        `vouch`, snapshots of documents this run read and did not write, come back as
        `Lease.vouched` if the same take proves them unchanged.

        `landed` tells, by reading back, whether a commit whose answer was lost in fact
        landed (the run record says so), so a lost answer is never reported as a failure.

        Returns False, writing nothing, when the lock is no longer ours (released already, taken
        over, force-unlocked, deleted): never an error that hides the run's result, and never a
        write over a newer holder.
        """
        unavailable: StoreUnavailable | None = None
        with lease._mutex:
            for attempt in range(ATTEMPTS):
                if unavailable is not None:
                    time.sleep(0.05 * 2**attempt)  # the store refused: give it a moment
                batch = self.client.batch()
                batch.update(
                    self.ref,
                    {
                        "held": False,
                        "releasedAt": firestore.SERVER_TIMESTAMP,
                        "cancelRequested": False,
                        "progress": {},
                    },
                    option=self.client.write_option(last_update_time=lease.lock_update_time),
                )
                if extra is not None:
                    extra(batch, lease.run_id)
                try:
                    with store.translate_errors("releasing the lock"):
                        results = batch.commit(**store.commit_call(self.settings))
                    # lock_update_time stays at the pre-release value, so a second release
                    # fails its precondition and finds the lock no longer ours.
                    if not lease.revoke and not lease.outside_write:
                        kept = tuple(snap for snap in vouch if snap.exists)
                        released = _Released(results[0].update_time, lease.token, memo, kept)
                        _remember_released(self._key, released)
                    return True
                except (gexc.FailedPrecondition, gexc.NotFound, StoreUnavailable) as exc:
                    if isinstance(exc, gexc.FailedPrecondition):
                        lease.outside_write = True
                    unavailable = exc if isinstance(exc, StoreUnavailable) else None
                    # Refused, or an unknown outcome: what is stored now decides.
                    if landed is not None and landed():
                        return True  # the commit landed; only its answer was lost
                    try:
                        state = self._owned(lease)
                    except LeaseLost:
                        return False
                    lease.lock_update_time = state.update_time
            if unavailable is not None:
                raise unavailable  # still ours, but the store would not take the release
            return False
