"""The heartbeat: a daemon thread that logs "still running" and renews the lease every interval.

It exposes `lost` and `cancel_requested` flags that the engine polls between steps. One failed
beat (a Firestore blip) is logged and retried at the next beat; renewal refused, or failing for
longer than the lease, flags the lease lost, since by then another trigger may rightly take over.
"""

from __future__ import annotations

import contextvars
import threading
import time
from types import TracebackType
from typing import Any

from shared.errors import LeaseLost, StoreUnavailable
from shared.lock import Lease, Lock
from shared.log import get_logger

log = get_logger("heartbeat")


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
        self._started = time.monotonic()
        self._last_renewed = time.monotonic()

    def set_progress(self, **progress: Any) -> None:
        """Record where the run is; the next beat stores it on the lock for the status function."""
        with self._progress_mutex:
            self._progress = {**self._progress, **progress}

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
        self._thread.start()
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
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.lock.settings.rpc_timeout_seconds + 1)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()
            if self.lost.is_set():
                return

    def beat(self) -> None:
        """One heartbeat: renew, then log. Public so tests and the engine can force one."""
        progress = self.progress
        try:
            if self.lock.renew(self.lease, progress):
                self.cancel_requested.set()
            self._last_renewed = time.monotonic()
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
