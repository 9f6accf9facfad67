"""Polite calls: one shared limiter per run and operation, on the run's clock.

Every worker of a run asks the same `Limiter` before it starts a call of an operation, so
`max_per_second`, `max_concurrent` and a service's `Retry-After` hold across all of them, not
per worker. A `Gate` is one client-operation's way through it: the shared limiter, the run's
`Budget` (no call starts after the time budget, none runs past the moment the run must be
finishing) and the run's stop check, which every wait asks at least every `SLICE_SECONDS`, so a
cancel or a lost lease ends a wait at once.

The limiters of a run are created on its first call, keyed by run id (`for_run`), so the engine
passes nothing new around; `finish(run_id)` drops them and returns the per-operation counts the
run summary carries as `calls`. `stamped_session()` is the HTTP session whose requests tell the
limiter when they actually went out, so calls are paced on the wire, not when they were let go.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import email.utils
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3 import connection, connectionpool

from shared.config import FINISH_MARGIN_SECONDS

#: Added to every rate window. Calls are spaced from when their requests went out (`sent`),
#: but a service counts arrivals, which the network delivers a little earlier or later than
#: that; this keeps a jittered arrival inside its limit, for 2% of the allowed rate.
GUARD_SECONDS = 0.02
#: The longest a wait goes without asking the run's stop check.
SLICE_SECONDS = 0.1
#: Runs whose limiters are kept at once (a run that raised never calls `finish`).
KEEP_RUNS = 8
#: The longest `Retry-After` taken as written: anything longer is past any time budget anyway.
MAX_RETRY_AFTER_SECONDS = 86400.0

#: Why a call may not start (`Gate.enter` answers None when it may).
STOPPING = "stopping"
OUT_OF_TIME = "time budget"
HELD_PAST_BUDGET = "Retry-After past the time budget"


class Limiter:
    """One operation's limits within one run, shared by every worker (thread-safe).

    `max_per_second` r: calls start evenly spaced, max(1, 1/r) seconds plus `GUARD_SECONDS`
    divided by max(1, floor(r)) apart (counted from when the last one's request went out, when
    `sent` is told), so no one-second window holds more than r of them (nor, below one per
    second, any window of 1/r seconds more than one), bursts included: eight workers cannot
    start eight at once. `max_concurrent` n: at most n calls in flight. A hold (`Retry-After`):
    no call starts before it ends.
    """

    def __init__(self, max_per_second: float | None, max_concurrent: int | None) -> None:
        self.max_concurrent = max_concurrent
        self._interval = 0.0
        if max_per_second:
            window = max(1.0, 1.0 / max_per_second) + GUARD_SECONDS
            self._interval = window / max(1, math.floor(max_per_second))
        self._next_start = 0.0
        self._active = 0
        self._held_until = 0.0
        #: When the hold ends by the wall clock (a `Retry-After` past the budget makes the
        #: operation due then, not on the next tick).
        self.held_until_wall: dt.datetime | None = None
        self._cond = threading.Condition()
        self.calls = self.retried = self.throttled = 0

    def _next_chance(self, now: float) -> float | None:
        """None when a call may start now; else when to look again (inf: when a call ends)."""
        if self._held_until > now:
            return self._held_until
        if self.max_concurrent is not None and self._active >= self.max_concurrent:
            return math.inf
        if self._next_start > now:
            return self._next_start
        return None

    def acquire(
        self, deadline: float, stop: Callable[[], bool], waiting: Callable[[], None] | None = None
    ) -> str | None:
        """Wait until a call may start and take its slot (None), or say why it may not.
        `waiting()` is called while a `Retry-After` holds the calls back: waiting out a
        service's request is progress, not a stuck run."""
        waited = False
        with self._cond:
            while True:
                if stop():
                    return STOPPING
                now = time.monotonic()
                if now >= deadline:
                    return OUT_OF_TIME
                chance = self._next_chance(now)
                if chance is None:
                    break
                if self._held_until >= deadline:
                    return HELD_PAST_BUDGET
                if waiting is not None and self._held_until > now:
                    waiting()
                if math.isfinite(chance) and chance >= deadline:
                    return OUT_OF_TIME  # the next free slot opens after the budget
                waited = True
                self._cond.wait(min(chance - now, SLICE_SECONDS))
            self._next_start = now + self._interval
            self._active += 1
            self.calls += 1
            self.throttled += waited
        return None

    def sent(self, at: float) -> None:
        """A call's request went out at `at`: the next starts a full interval after that, so a
        worker slow to send (the interpreter lock, a busy machine) cannot bunch calls up."""
        with self._cond:
            if self._interval:
                self._next_start = max(self._next_start, at + self._interval)

    def release(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def hold(self, until: float, wall: dt.datetime | None = None) -> None:
        """No call of this operation starts before `until` (monotonic), for every worker;
        `wall` is when the service asked to be left alone until, by the wall clock."""
        with self._cond:
            if wall is not None and (self.held_until_wall is None or wall > self.held_until_wall):
                self.held_until_wall = wall
            if until > self._held_until:
                self._held_until = until
                self._cond.notify_all()

    def note_retry(self) -> None:
        with self._cond:
            self.retried += 1

    def counts(self) -> dict[str, int]:
        with self._cond:
            return {"calls": self.calls, "retried": self.retried, "throttled": self.throttled}


class Registry:
    """The limiters of one run, one per operation, created on first use."""

    def __init__(self, shards: int = 1) -> None:
        self._limiters: dict[str, Limiter] = {}
        self._mutex = threading.Lock()
        self.shards = max(1, shards)

    def limiter(self, op: Any) -> Limiter:
        """The operation's limiter. With N shards running at once, each takes 1/N of the
        operation's limits, so together they hold them (`max_concurrent` rounds down, never
        below one call in flight)."""
        with self._mutex:
            limiter = self._limiters.get(op.name)
            if limiter is None:
                rate = getattr(op, "max_per_second", None)
                concurrent = getattr(op, "max_concurrent", None)
                limiter = self._limiters[op.name] = Limiter(
                    rate / self.shards if rate else rate,
                    max(1, concurrent // self.shards) if concurrent else concurrent,
                )
            return limiter

    def summary(self) -> dict[str, dict[str, int]]:
        """`{operation: {"calls", "retried", "throttled"}}` for every operation called."""
        with self._mutex:
            limiters = dict(self._limiters)
        return {name: lim.counts() for name, lim in sorted(limiters.items()) if lim.calls}


_runs: collections.OrderedDict[str, Registry] = collections.OrderedDict()
_runs_mutex = threading.Lock()


def for_run(run_id: str, shards: int = 1) -> Registry:
    """The run's registry, created on its first call; only the newest `KEEP_RUNS` are kept."""
    with _runs_mutex:
        registry = _runs.get(run_id)
        if registry is None:
            registry = _runs[run_id] = Registry(shards)
            while len(_runs) > KEEP_RUNS:
                _runs.popitem(last=False)
        return registry


def finish(run_id: str) -> dict[str, dict[str, int]]:
    """Drop the run's limiters and return its per-operation call counts (the summary's `calls`)."""
    with _runs_mutex:
        registry = _runs.pop(run_id, None)
    return registry.summary() if registry is not None else {}


@dataclass(frozen=True, slots=True)
class Budget:
    """The run's clock for calls (monotonic times)."""

    deadline: float  # no call starts after this: the time budget
    end: float  # no call runs past this, so the run can finish before its max run

    @classmethod
    def of(cls, deadline: float, budget_seconds: float, max_run_seconds: float) -> Budget:
        """From the run's deadline and settings: calls end `FINISH_MARGIN_SECONDS` before the
        max run (or half-way from the budget to it, when those are closer), leaving the run
        time to record its outcomes, release the lock and send its report."""
        started = deadline - budget_seconds
        margin = min(float(FINISH_MARGIN_SECONDS), max(0.0, max_run_seconds - budget_seconds) / 2)
        return cls(deadline, max(deadline, started + max_run_seconds - margin))

    def timeout(self, wanted: float) -> float:
        """A call's timeout: `wanted`, cut to the time left before `end`."""
        return max(0.001, min(wanted, self.end - time.monotonic()))


class Gate:
    """One client-operation's way through its operation's shared limiter, on the run's clock."""

    def __init__(
        self,
        limiter: Limiter,
        budget: Budget,
        stop: Callable[[], bool],
        waiting: Callable[[], None] | None = None,
    ) -> None:
        self.limiter = limiter
        self.budget = budget
        self.stop = stop
        self.waiting = waiting

    def enter(self) -> str | None:
        """Wait for a slot: None once the call may start (then `leave` after it), else why not."""
        return self.limiter.acquire(self.budget.deadline, self.stop, self.waiting)

    def leave(self) -> None:
        self.limiter.release()

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        """Around an HTTP call through `stamped_session()`: its request going out is reported."""
        _wire.report = lambda: self.limiter.sent(time.monotonic())
        try:
            yield
        finally:
            _wire.report = None

    def hold(self, seconds: float) -> bool:
        """Hold back every call of the operation for `seconds`; False (and the hold reaches
        past the budget, so every worker defers) when that ends after the time budget."""
        until = time.monotonic() + seconds
        wall = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
        self.limiter.hold(min(until, self.budget.deadline), wall)
        return until < self.budget.deadline

    def sleep(self, seconds: float) -> bool:
        """Wait `seconds` (a retry's backoff); False if the run must stop first or the wait
        would end after the time budget."""
        until = time.monotonic() + seconds
        if until >= self.budget.deadline:
            return False
        while not self.stop():
            left = until - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, SLICE_SECONDS))
        return False

    def note_retry(self) -> None:
        self.limiter.note_retry()


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delay-seconds or an HTTP date).

    A broken or hostile value is capped: negative or past means 0, above a day means a day
    (past any budget: the caller defers), and garbage means None (use the normal backoff).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = _http_date(text, time.time() if now is None else now)
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def _http_date(text: str, now: float) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp() - now


# -- when an http call starts: as its request goes out ----------------------------------------

_wire = threading.local()


class _Stamped(connection.HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        super().request(*args, **kwargs)
        report, _wire.report = getattr(_wire, "report", None), None
        if report is not None:
            report()


class _StampedTLS(_Stamped, connection.HTTPSConnection):
    pass


class _Pool(connectionpool.HTTPConnectionPool):
    ConnectionCls = _Stamped


class _PoolTLS(connectionpool.HTTPSConnectionPool):
    ConnectionCls = _StampedTLS


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _PoolTLS}


def stamped_session() -> requests.Session:
    """A session whose requests, sent within `Gate.sending()`, tell the limiter when they went
    out (through a proxy they do not: the limiter then paces from when the call was let go)."""
    session = requests.Session()
    session.mount("http://", _Adapter())
    session.mount("https://", _Adapter())
    return session
