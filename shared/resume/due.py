"""Selecting the work of a tick: the clients whose `nextDueAt` has passed, and nothing else.

A tick reads the due clients oldest first, a page at a time, with their operation states
(decision fields only), so its cost follows the work that is due and its memory one page. With
nothing due it reads a handful of documents whatever the number of clients.

`nextDueAt` is written by the engine with each client's states; what it did not write (a client
added by hand, a pipeline change) is caught by the full pass (`full_pass.py`).
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from google.cloud import firestore

from shared import documents, store
from shared.config import Settings
from shared.resume.full_pass import Reconcile as Reconcile  # where callers found it
from shared.resume.pipeline import Pipeline
from shared.resume.plan import (
    DECISION_FIELDS,
    EPOCH,
    ClientPlan,
    RunOptions,
    plan_client,
)
from shared.resume.shards import shard_of

PAGE_SIZE = 200  # due clients per page: memory stays one page, round trips stay few
FULL_PAGE_SIZE = 500


@dataclass
class Reads:
    """Documents read (as billed: a query with no result costs one, a count one per 1,000
    entries) and round trips, for tests and benchmarks."""

    documents: int = 0
    round_trips: int = 0
    mutex: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, documents: int) -> None:
        with self.mutex:  # reads issued together add from several threads
            self.documents += max(documents, 1)
            self.round_trips += 1


class Selection:
    """Reads clients and their decision fields; writes nothing itself."""

    def __init__(
        self,
        client: firestore.Client,
        settings: Settings,
        pipeline: Pipeline,
        options: RunOptions,
    ) -> None:
        self.client = client
        self.settings = settings
        self.pipeline = pipeline
        self.options = options
        self.wanted = set(options.operations) if options.operations else None
        self.reads = Reads()
        # With shards, a run sees its own shard's clients only: `shard` is stored on each
        # client for the due query, and computed from the id where it may be missing.
        self.due_total: int | None = None  # known once the first due page is read
        self.last_read: str | None = None  # the last client id `all_pages` read
        self.shards = settings.shards
        self.shard = options.shard if settings.shards > 1 else None

    # -- queries ---------------------------------------------------------------------------

    def _active(self, own_shard: bool = False) -> firestore.Query:
        shard = self.shard if own_shard else None
        return store.active_clients(self.client, self.options.stream, shard)

    def mine(self, client_id: str) -> bool:
        return self.shard is None or shard_of(client_id, self.shards) == self.shard

    def count_unstamped(self) -> int:
        """Active clients without a due time (created with only `name` and `active`, or with a
        `nextDueAt` that is not a timestamp): two counts, of all and of those with one."""
        stamped = self._active().where(filter=firestore.FieldFilter("nextDueAt", ">=", EPOCH))

        def count(query: firestore.Query) -> int:
            return int(query.count().get(**store.call(self.settings))[0][0].value)

        with store.translate_errors("counting clients without a due time"):
            total, with_due = store.parallel(lambda: count(self._active()), lambda: count(stamped))
        self.reads.add(math.ceil(total / 1000))
        self.reads.add(math.ceil(with_due / 1000))
        return max(total - with_due, 0)

    def count_due(self, cutoff: dt.datetime) -> int:
        """How many clients are due: the progress bar's length (one read per 1,000)."""
        query = self._active(own_shard=True).where(
            filter=firestore.FieldFilter("nextDueAt", "<=", cutoff)
        )
        with store.translate_errors("counting due clients"):
            result = query.count().get(**store.call(self.settings))
        count = int(result[0][0].value)
        self.reads.add(math.ceil(count / 1000))
        return count

    def _read(self, query: firestore.Query) -> list[Any]:
        with store.translate_errors("listing clients"):
            page = list(query.stream(**store.call(self.settings)))
        self.reads.add(len(page))
        return page

    def _pages(
        self, query: firestore.Query, size: int, first: list[Any] | None = None
    ) -> Iterator[list[Any]]:
        """The query's results page by page; `first`, when given, is its first page, read."""
        query = query.limit(size)
        last = None
        while True:
            if first is not None:
                page, first = first, None
            else:
                page = self._read(query.start_after(last) if last is not None else query)
            if page:
                yield page
            if len(page) < size:
                return
            last = page[-1]

    def _due(self, cutoff: dt.datetime) -> firestore.Query:
        query = self._active(own_shard=True).where(
            filter=firestore.FieldFilter("nextDueAt", "<=", cutoff)
        )
        return query.order_by("nextDueAt")

    def first_due_page(self, cutoff: dt.datetime) -> list[Any]:
        """The first page of `due_pages`, read ahead (together with the tick's other reads)."""
        return self._read(self._due(cutoff).limit(PAGE_SIZE))

    def due_pages(self, cutoff: dt.datetime, first: list[Any] | None = None) -> Iterator[list[Any]]:
        """Active clients due at `cutoff`, longest waiting first (`first`: the first page,
        when `first_due_page` read it ahead)."""
        pages = self._pages(self._due(cutoff), PAGE_SIZE, first)
        for number, page in enumerate(pages):
            if number == 0:
                # The progress bar's length: a first page that is not full is all there is;
                # only a longer queue costs a count (one read per 1,000).
                self.due_total = len(page) if len(page) < PAGE_SIZE else self.count_due(cutoff)
            # A client whose stored shard is stale (N changed) is left to its owner's full pass.
            yield [snap for snap in page if self.mine(snap.id)]

    def all_pages(self, active_only: bool = True, after: str | None = None) -> Iterator[list[Any]]:
        """Every active client of this run's shard, by id (read whole: a client's stored shard
        may be missing or stale, so it is computed from the id). `active_only=False`: every
        client document of the stream, whatever its `active` says, page by page (possibly
        empty pages: the full pass keeps its place by the last id read)."""
        query = (self._active() if active_only else self._stream()).order_by("__name__")
        if after is not None:
            query = query.start_after({"__name__": after})
        for page in self._pages(query, FULL_PAGE_SIZE):
            own = [snap for snap in page if self.mine(snap.id)]
            if not active_only:
                self.last_read = page[-1].id
            if own or not active_only:
                yield own

    def _stream(self) -> firestore.Query:
        query: firestore.Query = self.client.collection(store.CLIENTS)  # type: ignore[assignment]
        if self.options.stream is not None:
            query = query.where(filter=firestore.FieldFilter("stream", "==", self.options.stream))
        return query

    def one(self) -> Iterator[list[Any]]:
        assert self.options.client_id
        ref = self.client.collection(store.CLIENTS).document(self.options.client_id)
        with store.translate_errors("reading the client"):
            snap = ref.get(**store.call(self.settings))
        self.reads.add(1)
        data = snap.to_dict() if snap.exists else None
        stream = self.options.stream
        if (
            data
            and data.get("active") is True
            and (stream is None or data.get("stream") == stream)
            and self.mine(snap.id)
        ):
            yield [snap]

    # -- planning ----------------------------------------------------------------------------

    def state_ref(self, client_id: str, operation: str) -> firestore.DocumentReference:
        return (
            self.client.collection(store.CLIENTS)
            .document(client_id)
            .collection(store.OPERATIONS)
            .document(operation)
        )

    def plan_page(self, page: list[Any], now: dt.datetime) -> list[ClientPlan]:
        """Plans for a page of client snapshots: one batched read of their decision fields.
        Every document is read through `documents`, so a wrong type is a problem of that
        client, never an exception here."""
        names = self.pipeline.names
        refs = [self.state_ref(snap.id, name) for snap in page for name in names]
        states: dict[str, dict[str, Any]] = {}
        if refs:
            with store.translate_errors("reading operation states"):
                found = self.client.get_all(
                    refs, field_paths=DECISION_FIELDS, **store.call(self.settings)
                )
                for snap in found:
                    if snap.exists:
                        states[snap.reference.path] = snap.to_dict() or {}
            self.reads.add(len(states))
        plans = []
        for snap in page:
            doc = documents.client(snap.id, snap.to_dict(), names)
            own: dict[str, dict[str, Any]] = {}
            problems: list[documents.Problem] = []
            for name in names:
                path = self.state_ref(snap.id, name).path
                if path in states:
                    own[name], found_problems = documents.state(snap.id, name, states[path])
                    problems += found_problems
            plan = plan_client(doc, own, self.pipeline, self.wanted, now, problems)
            plan.shard = shard_of(snap.id, self.shards) if self.shard is not None else None
            plans.append(plan)
        return plans

    def plans(self, pages: Iterator[list[Any]], now: dt.datetime) -> Iterator[ClientPlan]:
        for page in pages:
            yield from self.plan_page(page, now)
