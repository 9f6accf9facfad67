"""What an operator does to a lock that a run holds: ask it to cancel, release it (stale, or
with force), and close the client claims of the runs an unlock or a takeover displaced; and
the mark a run that failed before taking the lock leaves on it.

Each action is a conditional commit on what was just read, retried on a fresh read when a
heartbeat lands in between; a lost answer is settled by reading back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore
from google.cloud.firestore_v1.batch import WriteBatch

from shared import store
from shared.config import Settings
from shared.errors import LockHeld, SmartResumeError, StoreUnavailable
from shared.lock_state import LockState
from shared.log import get_logger

#: Writes added to a lock commit by its caller (the run record, the abandoned mark).
ExtraWrites = Callable[[WriteBatch, str | None], None]
log = get_logger("lock")
ATTEMPTS = 5


class NotRunning(SmartResumeError):
    """The action needs a live run and there is none."""


class OperatorActions:
    """Mixed into `Lock`, which provides these."""

    client: firestore.Client
    settings: Settings
    ref: firestore.DocumentReference
    fence_ref: firestore.DocumentReference

    def read(self) -> LockState:
        raise NotImplementedError

    def held(self, state: LockState) -> LockHeld:
        raise NotImplementedError

    def mark_outside(self, batch: Any, run_id: str) -> None:
        """Mark the lock with a run that failed before taking it (its record and report claim
        are in `batch`): every write to the lock document ends what a process remembers of
        it since its release (`release(memo=...)`), so the next take reads what this run left.
        A holder's next conditional write reads the lock again, as after a cancel request."""
        batch.update(self.ref, {"outsideRun": {"runId": run_id, "at": firestore.SERVER_TIMESTAMP}})

    def force_release(self, force: bool, extra: ExtraWrites | None = None) -> LockState:
        """Release on behalf of an operator: if stale, or always with `force`.

        Bumps the token (and the fence) so the run that held it can write nothing more, and
        adds that run to `revoke` (its claims are closed by `clear_revokes`, or by the next
        holder). A lost answer is settled by reading back. Returns the state before; raises
        `LockHeld` for a live lock without `force`.
        """
        for _ in range(ATTEMPTS):
            state = self.read()
            if not state.held:
                return state
            if state.live and not force:
                raise self.held(state)
            revoke = list(dict.fromkeys([*state.revoke, *([state.run_id] if state.run_id else [])]))
            batch = self.client.batch()
            batch.update(
                self.ref,
                {
                    "held": False,
                    "token": state.token + 1,
                    "releasedAt": firestore.SERVER_TIMESTAMP,
                    "cancelRequested": False,
                    "progress": {},
                    "revoke": revoke,
                },
                option=self.client.write_option(last_update_time=state.update_time),
            )
            batch.set(self.fence_ref, {"token": state.token + 1, "runId": None})
            if extra is not None:
                extra(batch, state.run_id)
            try:
                with store.translate_errors("releasing the lock"):
                    batch.commit(**store.commit_call(self.settings))
                return state
            except gexc.FailedPrecondition:
                continue  # a heartbeat landed in between; decide again on a fresh read
            except StoreUnavailable:
                after = self.read()  # the answer was lost: did it land?
                if not after.held and after.token == state.token + 1:
                    return state
                continue
        raise self.held(state)

    def clear_revokes(self, revoke: Any) -> int:
        """Close the claims of every run the lock still lists in `revoke` (the holder a
        takeover or unlock displaced), then take them off the list. `revoke(run_id)` closes
        one run's claims and returns how many; raises `StoreUnavailable` if it cannot."""
        state = self.read()
        closed = 0
        for run_id in state.revoke:
            closed += revoke(run_id)
        if state.revoke:
            try:
                with store.translate_errors("recording the revoke"):
                    self.ref.update(
                        {"revoke": []},
                        option=self.client.write_option(last_update_time=state.update_time),
                        **store.commit_call(self.settings),
                    )
            except (gexc.FailedPrecondition, gexc.NotFound, StoreUnavailable) as exc:
                # Taken meanwhile (the new holder has the list), or the answer was lost: the
                # claims are closed either way; a list left behind costs one empty query.
                log.warning("could not clear the revoke list: %s", exc)
        return closed

    def request_cancel(self) -> str | None:
        """Ask the live run to stop at its next check; raises `NotRunning` if none is live."""
        for _ in range(ATTEMPTS):
            state = self.read()
            if not state.live:
                raise NotRunning("no run is in progress")
            try:
                with store.translate_errors("requesting cancel"):
                    self.ref.update(
                        {"cancelRequested": True},
                        option=self.client.write_option(last_update_time=state.update_time),
                        **store.commit_call(self.settings),
                    )
                return state.run_id
            except gexc.FailedPrecondition:
                continue
        raise NotRunning("the lock kept changing; try again")
