"""What a Firestore client really sends and receives, counted at the gRPC stub.

The engine counts its own reads and commits (`Outcome.stats`); this counts the same things one
layer down, for every caller in the process (lock, heartbeat, run record, report included), so
a benchmark can check the engine's figures and add what the engine does not see. Reads are
counted as Firestore bills them: each document a query or batch get returns, a query that
returns nothing costs one, an aggregation one per 1,000 entries counted. Documents a batch get
asks for that do not exist are counted apart (`missing`).
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_STREAMS = ("batch_get_documents", "run_query", "run_aggregation_query")
_WRITES = ("commit", "batch_write")


def _pb(message: Any) -> Any:
    """The raw protobuf behind a proto-plus message (or the message itself)."""
    return type(message).pb(message) if hasattr(type(message), "pb") else message


def write_path(write: Any) -> str:
    """`collection/doc/...` of one `Write`, whatever its kind."""
    pb = _pb(write)
    kind = pb.WhichOneof("operation")
    name = pb.update.name if kind == "update" else pb.delete if kind == "delete" else ""
    if kind == "transform":
        name = pb.transform.document
    return name.split("/documents/", 1)[-1]


def _origin() -> str:
    """`module.function` of the innermost frame in the project's own code (shared/,
    functions/) on the current stack."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if path.endswith("/shared/store.py") or frame.name.startswith("<"):
            continue  # generic helpers, comprehensions and lambdas: name what holds them
        for root in ("/shared/", "/functions/"):
            if root in path and "site-packages" not in path:
                module = path.split(root, 1)[1].removesuffix(".py").replace("/", ".")
                return f"{root.strip('/')}.{module}.{frame.name}"
    return "?"


class Wire:
    """Counts round trips, billed document reads and writes per document of one client
    (writes of commits that succeeded; a refused commit is a round trip, not a write)."""

    def __init__(self, client: Any) -> None:
        self.mutex = threading.Lock()
        self.round_trips: Counter[str] = Counter()
        #: (RPC name, writes it carries) in the order the calls were issued
        self.sequence: list[tuple[str, int]] = []
        #: With `trace` set: for each RPC, the innermost project function that issued it.
        self.trace = False
        self.origins: list[str] = []
        #: With `trace` set: (RPC, origin, seconds) of each call, once it has ended.
        self.calls: list[tuple[str, str, float]] = []
        #: With `trace` set: (start, end) perf_counter of each call, in the order they ended.
        self.spans: list[tuple[float, float]] = []
        self.seconds: defaultdict[str, float] = defaultdict(float)  # per RPC, summed
        #: Seconds each RPC waits before it is sent: a network's round trip, which the
        #: emulator on loopback does not have.
        self.latency = 0.0
        self.write_times: dict[str, list[float]] = {}  # path -> perf_counter of each write
        self.writes: Counter[str] = Counter()
        self.read = 0
        self.missing = 0
        self.commits = 0
        api = client._firestore_api
        for name in (*_STREAMS, *_WRITES, "begin_transaction", "rollback"):
            original = getattr(api, name, None)
            if original is not None and not getattr(original, "_bench_wire", False):
                setattr(api, name, self._wrap(name, original))

    def reset(self) -> None:
        with self.mutex:
            self.round_trips.clear()
            self.sequence.clear()
            self.origins.clear()
            self.calls.clear()
            self.spans.clear()
            self.seconds.clear()
            self.write_times.clear()
            self.writes.clear()
            self.read = self.missing = self.commits = 0

    @property
    def total_round_trips(self) -> int:
        return sum(self.round_trips.values())

    def waits(self) -> int:
        """How many round trips the caller waited for one after another (with `trace`): calls
        in flight together are one wait, so this is the run's fixed cost in round trips."""
        count, end = 0, float("-inf")
        for start, stop in sorted(self.spans):
            if start >= end:
                count += 1
            end = max(end, stop)
        return count

    def burst(self, window: float = 1.0) -> tuple[int, str]:
        """The most writes any one document took within `window` seconds, and which one."""
        best, where = 0, ""
        for path, times in self.write_times.items():
            ordered, first = sorted(times), 0
            for last, t in enumerate(ordered):
                while t - ordered[first] > window:
                    first += 1
                if last - first + 1 > best:
                    best, where = last - first + 1, path
        return best, where

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            paths: list[str] = []
            if name in _WRITES:
                request = kwargs.get("request") or (args[0] if args else {})
                writes = request.get("writes") if isinstance(request, dict) else request.writes
                paths = [write_path(w) for w in writes or []]
            origin = _origin() if self.trace else ""
            with self.mutex:
                self.round_trips[name] += 1
                self.sequence.append((name, len(paths)))
                if self.trace:
                    self.origins.append(origin)
            start = time.perf_counter()
            if self.latency:
                time.sleep(self.latency)
            try:
                result = original(*args, **kwargs)
            finally:
                if name not in _STREAMS:
                    self._ended(name, origin, start)
            if name in _WRITES:  # only a commit that succeeded wrote anything
                now = time.perf_counter()
                with self.mutex:
                    self.commits += 1
                    self.writes.update(paths)
                    for path in paths:
                        self.write_times.setdefault(path, []).append(now)
            if name in _STREAMS:
                return self._reading(name, result, start, origin)
            return result

        counted._bench_wire = True  # type: ignore[attr-defined]
        return counted

    def _ended(self, name: str, origin: str, start: float) -> None:
        end = time.perf_counter()
        with self.mutex:
            self.seconds[name] += end - start
            if origin:
                self.calls.append((name, origin, end - start))
                self.spans.append((start, end))

    def _reading(
        self, name: str, responses: Iterable[Any], start: float, origin: str
    ) -> Iterator[Any]:
        """Pass the response stream through, counting what it bills (and the time from the
        call to the last response, the consumer's own time included) once it ends."""
        read = missing = 0
        try:
            for response in responses:
                pb = _pb(response)
                if name == "batch_get_documents":
                    kind = pb.WhichOneof("result")
                    read += kind == "found"
                    missing += kind == "missing"
                elif name == "run_query":
                    read += pb.HasField("document")
                elif pb.HasField("result"):
                    for value in pb.result.aggregate_fields.values():
                        read += math.ceil(value.integer_value / 1000)
                yield response
        finally:
            self._ended(name, origin, start)
            with self.mutex:
                # A query or aggregation costs at least one read, even with no result.
                self.read += read if name == "batch_get_documents" else max(read, 1)
                self.missing += missing


_installed: dict[int, Wire] = {}


def wire(client: Any) -> Wire:
    """One counter per client, installed once (later calls return it)."""
    counter = _installed.get(id(client))
    if counter is None:
        counter = _installed[id(client)] = Wire(client)
    return counter
