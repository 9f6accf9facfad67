"""A Firestore client that misbehaves on purpose, by seed: the emulator stays real.

`FaultyApi` wraps the client's own API object (every RPC of the library goes through it:
reads, queries, transactions and commits). By the seeded plan it makes a commit's answer get
lost after the commit landed (the caller sees `DeadlineExceeded`), aborts a commit before it is
sent, delays it, or cuts the "process" off from the store altogether (`partitioned`), the way a
killed instance that comes back looks to everyone else.

Every commit that landed is logged with the run that made it (from the log context) and the
paths it wrote, so the invariants can check who wrote what, when, by the store's own clock.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from shared.log import _context


@dataclass
class Landed:
    """One commit the store applied."""

    at: Any  # commit time (the store's clock)
    run_id: str | None
    paths: list[str]
    token: int | None = None  # the lock token a lock-taking commit wrote


@dataclass
class Faults:
    """Probabilities per commit, and the switch that cuts the process off."""

    lose: float = 0.0
    abort: float = 0.0
    delay: float = 0.0  # probability of a delay of up to `max_delay` seconds
    max_delay: float = 0.3
    partitioned: threading.Event = field(default_factory=threading.Event)
    #: Decides for one commit by the paths it writes: "lose", "abort", "unavailable" or None
    #: (then the probabilities decide). For tests that target one commit.
    decide: Callable[[list[str]], str | None] | None = None
    injected: dict[str, int] = field(
        default_factory=lambda: {"lost": 0, "aborted": 0, "delayed": 0, "partitioned": 0}
    )


def _path(name: str) -> str:
    return name.split("/documents/", 1)[-1]


class FaultyApi:
    def __init__(self, real: Any, faults: Faults, rng: random.Random, log: list[Landed]):
        self._real = real
        self._faults = faults
        self._rng = rng
        self._log = log
        self._mutex = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._faults.partitioned.is_set():
                with self._mutex:
                    self._faults.injected["partitioned"] += 1
                raise gexc.ServiceUnavailable("partitioned by the fault harness")
            return attr(*args, **kwargs)

        return call

    def _roll(self, p: float) -> bool:
        with self._mutex:
            return p > 0 and self._rng.random() < p

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        faults = self._faults
        if faults.partitioned.is_set():
            with self._mutex:
                faults.injected["partitioned"] += 1
            raise gexc.ServiceUnavailable("partitioned by the fault harness")
        request = kwargs.get("request") or (args[0] if args else {})
        writes = request.get("writes", []) if isinstance(request, dict) else request.writes
        paths = [_path(w.update.name or w.delete) for w in writes]
        action = faults.decide(paths) if faults.decide is not None else None
        if action == "unavailable":
            raise gexc.ServiceUnavailable("unavailable by the fault harness")
        if action == "abort" or (action is None and self._roll(faults.abort)):
            with self._mutex:
                faults.injected["aborted"] += 1
            raise gexc.Aborted("aborted by the fault harness")
        if self._roll(faults.delay):
            with self._mutex:
                faults.injected["delayed"] += 1
                pause = self._rng.uniform(0, faults.max_delay)
            time.sleep(pause)
        response = self._real.commit(*args, **kwargs)
        token = None
        for write in writes:
            fields = write.update.fields if write.update.name else {}
            if "held" in fields and "token" in fields and fields["held"].boolean_value:
                token = int(fields["token"].integer_value)
        context = _context.get() or {}
        with self._mutex:
            self._log.append(Landed(response.commit_time, context.get("runId"), paths, token))
        if action == "lose" or (action is None and self._roll(faults.lose)):
            with self._mutex:
                faults.injected["lost"] += 1
            raise gexc.DeadlineExceeded("answer lost by the fault harness (the commit landed)")
        return response


def faulty_client(project: str, faults: Faults, seed: int, log: list[Landed]) -> firestore.Client:
    """A new client (its own channel: one "process") whose RPCs pass through `FaultyApi`."""
    client = firestore.Client(project=project)
    real = client._firestore_api
    client._firestore_api_internal = FaultyApi(real, faults, random.Random(seed), log)
    return client
