"""Selecting the work of a tick: the clients whose `nextDueAt` has passed, and nothing else.

A tick reads the due clients oldest first, a page at a time, with their operation states
(decision fields only), so its cost follows the work that is due and its memory one page. With
nothing due it reads a handful of documents whatever the number of clients.

`nextDueAt` is written by the engine with each client's states. What the engine did not write
is caught by a full pass over the active clients (which repairs every `nextDueAt`): it runs when
the pipeline's timing changed (its fingerprint), when the number of active clients changed (one
cheap aggregation query per tick), and at least every SMART_RESUME_RECONCILE_HOURS. A change
that leaves the count the same (a client added while another is deactivated, or a client's own
`operations` list edited) waits for that periodic pass.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from shared import documents, store
from shared.config import Settings
from shared.errors import StoreUnavailable
from shared.resume.pipeline import Pipeline
from shared.resume.plan import (
    DECISION_FIELDS,
    EPOCH,
    ClientPlan,
    RunOptions,
    failing,
    next_due,
    plan_client,
)
from shared.resume.shards import base_name, shard_of

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
        query = self.client.collection(store.CLIENTS).where(
            filter=firestore.FieldFilter("active", "==", True)
        )
        if self.options.stream is not None:
            query = query.where(filter=firestore.FieldFilter("stream", "==", self.options.stream))
        if own_shard and self.shard is not None:
            query = query.where(filter=firestore.FieldFilter("shard", "==", self.shard))
        return query

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


def client_fields(
    plan: ClientPlan, pipeline: Pipeline, now: dt.datetime, stamp_shard: bool = False
) -> dict[str, Any]:
    """What the client document says about its work: when it is next due and what is failing.

    Only the full pass stamps `shard` (`stamp_shard`): a run of an older shard layout, still
    finishing while the new one starts, must not write its own layout's shard back."""
    failures = failing(plan, pipeline)
    fields: dict[str, Any] = {
        "nextDueAt": next_due(plan, pipeline, now),
        "failing": failures,
        "failingCount": len(failures),
        "quarantinedCount": sum(1 for f in failures.values() if f["state"] == "quarantined"),
        **documents.problem_fields(plan.all_problems()),
    }
    if stamp_shard and plan.shard is not None:
        fields["shard"] = plan.shard
    return fields


#: What a client document that never had a problem holds: missing fields, read as these.
_EMPTY: dict[str, Any] = {"problems": [], "problemCount": 0}


def _same(stored: dict[str, Any], fields: dict[str, Any]) -> bool:
    return all(stored.get(k, _EMPTY.get(k)) == v for k, v in fields.items())


class Reconcile:
    """When a full pass is due, and the pass itself: every active client's due fields repaired,
    in transactions that read the lock's fence (so a run that lost its lock writes nothing)."""

    def __init__(self, selection: Selection, fence: Any) -> None:
        self.selection = selection
        self.fence = fence
        sel = selection
        name = "due" if sel.options.stream is None else f"due-stream-{sel.options.stream}"
        # The number of shards is part of what due times depend on: a change reassigns.
        self.fingerprint = f"{sel.pipeline.fingerprint}/{sel.shards}"
        self.ref = (
            sel.client.collection(store.LOCKS)
            .document(sel.settings.lock_name)
            .collection(store.META)
            .document(name)
        )
        self.meta: dict[str, Any] = {}
        self.cursor: str | None = None  # the last client id the running pass went through
        self.finished = False
        # With shards, one document for all of them counts the changes of their number
        # (`epoch`): N -> M -> N within a day leaves a shard's last pass, made under N,
        # looking current although the M shards restamped its clients meanwhile.
        self.shards_ref = (
            sel.client.collection(store.LOCKS)
            .document(base_name(sel.settings.lock_name, sel.shard))
            .collection(store.META)
            .document("shards")  # one for every stream: they share the clients' `shard`
            if sel.shard is not None
            else None
        )
        self.epoch: int | None = None

    def read(self) -> dict[str, Any]:
        """The pass's record (and the shards' change count), by path, for `reason`."""
        sel = self.selection
        refs = [self.ref] + ([self.shards_ref] if self.shards_ref is not None else [])
        with store.translate_errors("reading the due-work state"):
            found = {
                s.reference.path: s for s in sel.client.get_all(refs, **store.call(sel.settings))
            }
        sel.reads.add(len(refs))
        return found

    def reason(
        self, now: dt.datetime, found: dict[str, Any] | None = None, unstamped: int | None = None
    ) -> str | None:
        """Why a full pass must run (or go on) on this tick, or None. `found` (from `read`) and
        `unstamped` (from `count_unstamped`) when the caller read them ahead, together."""
        sel = self.selection
        found = self.read() if found is None else found
        snap = found[self.ref.path]
        meta = (snap.to_dict() or {}) if snap.exists else None
        if self.shards_ref is not None:
            self.epoch = self._shard_epoch(found[self.shards_ref.path])
        self.meta = meta or {}
        running = self.meta.get("pass")
        if (
            isinstance(running, dict)
            and running.get("fingerprint") == self.fingerprint
            and running.get("shardsEpoch") == self.epoch
        ):
            self.cursor = running.get("cursor") if isinstance(running.get("cursor"), str) else None
            return f"continuing the full pass ({running.get('reason')})"
        self.cursor = None
        if not meta:
            return "first tick of due-work selection"
        if meta.get("fingerprint") != self.fingerprint:
            return "the pipeline's operations or timing, or the number of shards, changed"
        if meta.get("shardsEpoch") != self.epoch:
            return "the number of shards changed since the last full pass"
        unstamped = sel.count_unstamped() if unstamped is None else unstamped
        if unstamped:
            return f"{unstamped} active client(s) without a due time (new, or written by hand)"
        at = meta.get("reconciledAt")
        hours = sel.settings.reconcile_hours
        if not isinstance(at, dt.datetime) or now - at >= dt.timedelta(hours=hours):
            return f"no full pass for {hours:g}h"
        return None

    def _shard_epoch(self, snap: Any) -> int:
        """The shards' change count, moved on by whichever shard first sees a new number.

        A conditional write: of two shards that see the change on the same tick, one moves
        the count on and the other reads it back, so it moves by one per change."""
        sel = self.selection
        assert self.shards_ref is not None
        for _ in range(3):
            data = (snap.to_dict() or {}) if snap.exists else {}
            epoch = data.get("epoch") if isinstance(data.get("epoch"), int) else 0
            if snap.exists and data.get("count") == sel.shards:
                return epoch
            change = {
                "count": sel.shards,
                "epoch": epoch + 1,
                "changedAt": firestore.SERVER_TIMESTAMP,
            }
            try:
                with store.translate_errors("recording the number of shards"):
                    if snap.exists:
                        option = sel.client.write_option(last_update_time=snap.update_time)
                        self.shards_ref.update(change, option=option, **store.call(sel.settings))
                    else:
                        self.shards_ref.create(change, **store.call(sel.settings))
                return epoch + 1
            except (gexc.FailedPrecondition, gexc.AlreadyExists):
                with store.translate_errors("reading the number of shards"):
                    snap = self.shards_ref.get(**store.call(sel.settings))
                sel.reads.add(1)
        raise StoreUnavailable("the number of shards kept changing under this run")

    def run(
        self, now: dt.datetime, should_stop: Any, reason: str = "", until: float | None = None
    ) -> tuple[int, int]:
        """Repair every active client's due fields, and record the problems of every client
        document (active or not), from where the last tick stopped; returns (clients read,
        repaired). At `until` (monotonic) it saves where it is and returns, so due work gets
        the rest of the budget; the next tick goes on from there."""
        sel = self.selection
        seen = repaired = 0
        started = self.meta.get("pass") if self.cursor is not None else None
        state = {
            "reason": (started or {}).get("reason") or reason,
            "startedAt": (started or {}).get("startedAt") or now,
            "fingerprint": self.fingerprint,
            "shardsEpoch": self.epoch,
            "seen": int((started or {}).get("seen") or 0),
        }
        for page in sel.all_pages(active_only=False, after=self.cursor):
            if should_stop() or (until is not None and time.monotonic() >= until):
                self._save({**state, "cursor": self.cursor})
                self.finished = False
                return seen, repaired
            changes = []
            active = [s for s in page if (s.to_dict() or {}).get("active") is True]
            for plan in sel.plan_page(active, now):
                seen += 1
                fields = client_fields(plan, sel.pipeline, now, stamp_shard=True)
                snap = next(s for s in active if s.id == plan.client_id)
                if not _same(snap.to_dict() or {}, fields):
                    changes.append((snap.reference, fields))
            for snap in page:
                data = snap.to_dict() or {}
                if data.get("active") is True:
                    continue
                doc = documents.client(snap.id, data, sel.pipeline.names)
                checked = [(None, f) for f in documents.CLIENT_FIELDS]
                problems = documents.merged(snap.id, doc.stored_problems, doc.problems, checked)
                fields = documents.problem_fields(problems)
                if not _same(data, fields):
                    changes.append((snap.reference, fields))
            if changes:
                self._write(changes)
                repaired += len(changes)
            self.cursor = sel.last_read
            state["seen"] += len(page)
        meta = {
            "fingerprint": self.fingerprint,
            "reconciledAt": now,
            "lockName": sel.settings.lock_name,
            "stream": sel.options.stream,
            "shard": sel.shard,
            "shardsEpoch": self.epoch,
            "pass": None,
            "lastPass": {**state, "endedAt": now, "clients": state["seen"]},
        }
        self.fence.transaction("recording the full pass", lambda tx: tx.set(self.ref, meta))
        self.finished = True
        return seen, repaired

    def _save(self, state: dict[str, Any]) -> None:
        """Where the pass stopped (one write per tick that stops it), for the next tick."""
        update = {"pass": state}
        self.fence.transaction(
            "saving the full pass's place", lambda tx: tx.set(self.ref, update, merge=True)
        )

    def _write(self, changes: list[tuple[firestore.DocumentReference, dict[str, Any]]]) -> None:
        def body(tx: Any) -> None:
            refs = [ref for ref, _ in changes]
            found = self.selection.client.get_all(
                refs,
                field_paths=["active", "claim"],
                transaction=tx,
                **store.call(self.selection.settings),
            )
            writable = set()
            for snap in found:
                claim = (snap.to_dict() or {}).get("claim") if snap.exists else None
                if isinstance(claim, dict) and claim.get("open") is True:
                    continue  # a run is working on it: its close writes these fields
                if snap.exists:  # a client deleted meanwhile is not written back
                    writable.add(snap.reference.path)
            for ref, fields in changes:
                if ref.path in writable:
                    tx.update(ref, fields)

        self.fence.transaction("repairing due times", body)
