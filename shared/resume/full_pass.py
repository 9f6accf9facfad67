"""The full pass: every client document read, its due fields repaired and its problems named,
when the tick's own reads cannot be trusted to find all due work: the first tick, a pipeline or
shard-count change, an active client without a due time (added by hand), and at least every
SMART_RESUME_RECONCILE_HOURS. It keeps its place in `locks/{name}/meta/due`, so a pass longer
than a tick's share of the budget goes on next tick.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from shared import documents, store
from shared.errors import StoreUnavailable
from shared.resume.plan import client_fields
from shared.resume.shards import base_name

if TYPE_CHECKING:
    from shared.resume.due import Selection


#: What a client document that never had a problem holds: missing fields, read as these.
_EMPTY: dict[str, Any] = {"problems": [], "problemCount": 0}


def _same(stored: dict[str, Any], fields: dict[str, Any]) -> bool:
    return all(stored.get(k, _EMPTY.get(k)) == v for k, v in fields.items())


def record_ref(
    client: firestore.Client, lock_name: str, stream: int | None
) -> firestore.DocumentReference:
    """The full pass's record of a lock (and stream): `locks/{name}/meta/due`."""
    name = "due" if stream is None else f"due-stream-{stream}"
    return client.collection(store.LOCKS).document(lock_name).collection(store.META).document(name)


class Reconcile:
    """When a full pass is due, and the pass itself: every active client's due fields repaired,
    in transactions that read the lock's fence (so a run that lost its lock writes nothing)."""

    def __init__(self, selection: Selection, fence: Any) -> None:
        self.selection = selection
        self.fence = fence
        sel = selection
        # The number of shards is part of what due times depend on: a change reassigns.
        self.fingerprint = f"{sel.pipeline.fingerprint}/{sel.shards}"
        self.ref = record_ref(sel.client, sel.settings.lock_name, sel.options.stream)
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

    def known(self, vouched: dict[str, Any]) -> dict[str, Any] | None:
        """The pass's record as `read` gives it, when this run's take vouched for it (read by
        this process before, unchanged since: `Lease.vouched`); else None."""
        if self.shards_ref is not None or self.ref.path not in vouched:
            return None  # the shards' record is every shard's to write: it is read
        return {self.ref.path: vouched[self.ref.path]}

    def unchanged(self, found: dict[str, Any]) -> tuple[Any, ...]:
        """What this run read and did not write (no pass ran), for the next take to vouch
        for: the pass's record of a lock without shards."""
        snap = found.get(self.ref.path)
        return (snap,) if self.shards_ref is None and snap is not None and snap.exists else ()

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
