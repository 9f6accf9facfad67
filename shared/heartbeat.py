"""The heartbeat: a daemon thread that logs "still running" and renews the lease every interval.

It exposes `lost` and `cancel_requested` flags that the engine polls between steps. One failed
beat (a Firestore blip) is logged and retried at the next beat; renewal refused, or failing for
longer than the lease, flags the lease lost, since by then another trigger may rightly take over.

Progress is not the heartbeat: a worker stuck on a socket still beats. So the beat also records
when progress last *moved* (another client or operation through `set_progress`, or a saved
checkpoint through `touch`), as `progress.progressAt` on the lock, on the server's clock: the
beat after a move writes a server timestamp, and later beats carry that value over. Moves before
the first beat count as the run's start (`acquiredAt`), so a run that never moves again stores
no `progressAt` at all; its progress dates from when it took the lock.
"""

from __future__ import annotations

import contextvars
import threading
import time
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from google.cloud import firestore

from shared import store
from shared.errors import LeaseLost, StoreUnavailable
from shared.lock import Lease, Lock
from shared.log import get_logger

log = get_logger("heartbeat")
#: The key, inside the lock's `progress` map, of when progress last moved (server time).
PROGRESS_AT = "progressAt"
#: What identifies a position: a change in any of these is progress.
_POSITION = ("clientId", "clientIndex", "operation")


class Heartbeat:
    """Context manager: `with Heartbeat(lock, lease, settings) as hb: ... hb.set_progress(...)`."""

    def __init__(self, lock: Lock, lease: Lease, interval: float, lease_seconds: float) -> None:
        self.lock = lock
        self.lease = lease
        self.interval = interval
        self.lease_seconds = lease_seconds
        self.lost = threading.Event()
        self.cancel_requested = threading.Event()
        self.beats = 0
        self._progress: dict[str, Any] = {}
        self._progress_mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._starting: Future[None] | None = None
        self._started = time.monotonic()
        self._last_renewed = time.monotonic()
        self._moves = 0  # how often progress moved; a beat stamps progressAt when it changed
        self._stamped_moves = 0
        self._progress_at: Any = None  # the stored progressAt (server time), once there is one
        self._first_beat = True

    def set_progress(self, **progress: Any) -> None:
        """Record where the run is; the next beat stores it on the lock for the status function.

        A new client or operation is progress: it moves `progressAt` (see `touch`)."""
        progress.pop(PROGRESS_AT, None)
        with self._progress_mutex:
            merged = {**self._progress, **progress}
            if any(merged.get(k) != self._progress.get(k) for k in _POSITION):
                self._moves += 1
            self._progress = merged

    def touch(self) -> None:
        """Mark progress without changing client or operation (a checkpoint was saved): cheap,
        nothing is written until the next beat."""
        with self._progress_mutex:
            self._moves += 1

    @property
    def progress(self) -> dict[str, Any]:
        with self._progress_mutex:
            return dict(self._progress)

    def __enter__(self) -> Heartbeat:
        self._started = self._last_renewed = time.monotonic()
        context = contextvars.copy_context()  # keep runId etc. on the beat's log lines
        self._thread = threading.Thread(
            target=context.run, args=(self._loop,), name="smart-resume-heartbeat", daemon=True
        )
        # Started from the pool: `start()` waits until the new thread runs, which on a busy
        # interpreter can take milliseconds the run need not wait (the first beat is due in
        # `interval` seconds).
        self._starting = store.background(self._thread.start)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop promptly; the thread never outlives the run (and never renews after release)."""
        self._stop.set()
        if self._thread is None or self._thread is threading.current_thread():
            return
        if self._starting is not None:
            self._starting.result()  # a thread not yet started cannot be joined
        self._thread.join(timeout=self.lock.settings.rpc_timeout_seconds + 1)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()
            if self.lost.is_set():
                return

    def _stamped(self, progress: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """The progress to store, with `progressAt`; and the move count it stamps, if new."""
        with self._progress_mutex:
            moves = self._moves
        if self._first_beat:
            # Moves so far happened between taking the lock and now: they date from the start.
            self._first_beat = False
            self._stamped_moves = moves
        if moves != self._stamped_moves:
            return {**progress, PROGRESS_AT: firestore.SERVER_TIMESTAMP}, moves
        if self._progress_at is not None:
            return {**progress, PROGRESS_AT: self._progress_at}, None
        return progress, None

    def beat(self) -> None:
        """One heartbeat: renew, then log. Public so tests and the engine can force one."""
        progress = self.progress
        stored, moves = self._stamped(progress)
        try:
            if self.lock.renew(self.lease, stored):
                self.cancel_requested.set()
            self._last_renewed = time.monotonic()
            if moves is not None:
                # The server timestamp of a write is its commit time: the lease's update time.
                self._progress_at = self.lease.lock_update_time
                self._stamped_moves = moves
        except LeaseLost as exc:
            self.lost.set()
            log.error("lease lost: %s", exc)
            return
        except StoreUnavailable as exc:
            silent_for = time.monotonic() - self._last_renewed
            if silent_for >= self.lease_seconds:
                self.lost.set()
                log.error("lease lost: no renewal for %.0fs (%s)", silent_for, exc)
            else:
                log.warning("heartbeat could not renew the lease, retrying next beat: %s", exc)
            return
        except Exception as exc:  # never let the thread die silently
            log.exception("heartbeat failed unexpectedly: %s", exc)
            return
        self.beats += 1
        elapsed = time.monotonic() - self._started
        log.info(
            "still running: %.1f min, client %s, operation %s",
            elapsed / 60,
            progress.get("clientId", "-"),
            progress.get("operation", "-"),
            fields={"elapsedSeconds": round(elapsed, 1), "progress": progress},
        )
