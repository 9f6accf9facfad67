"""Fencing without a hot document: a run claims each client, then chains that client's writes.

Every state write must land only while its run holds the lock. Writing one shared document with
every state change (the previous design's fence) exceeds Firestore's guidance of about one
sustained write per second per document as soon as a run is busy, so instead:

1. **Claim.** Before working on a client, a small transaction reads the lock's fence document
   (`locks/{name}/fence/current`, written only on acquire and unlock) and writes
   `clients/{id}.claim = {runId, token, open}`. The fence is only read, never written, and the
   transaction lets the claim land only under the current token.
2. **Chain.** Every later commit for that client also updates the client document,
   preconditioned on the update time the previous commit returned. An update that changes
   nothing keeps the update time (Firestore's documented behaviour), so the chain costs no
   change per commit.
3. **Revoke.** Whoever takes the lock over, or force-unlocks it, closes the old run's open
   claims: the old run's next chained commit fails its precondition, it reads its claim back,
   finds it no longer its own, and stops with `LeaseLost`.

A precondition can also fail because the user's own application wrote the client document;
the claim read back is then still ours, and the commit is retried on the new update time.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from shared import store
from shared.config import Settings
from shared.errors import LeaseLost, SmartResumeError
from shared.lock import Lease
from shared.log import get_logger

log = get_logger("fence")
_ATTEMPTS = 5
Write = tuple[firestore.DocumentReference, dict[str, Any]]


class ClientGone(SmartResumeError):
    """The client document was deleted while the run worked on it."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        super().__init__(f"client {client_id} was deleted during the run")


@dataclass
class Claim:
    """This run's hold on one client: where the chain of its commits stands."""

    client_id: str
    ref: firestore.DocumentReference
    update_time: dt.datetime
    data: dict[str, Any] = field(default_factory=dict)  # the client document at claim time


@dataclass
class Group:
    """One client's writes in a commit: state documents, then the client document itself
    (`client_fields`, or None for an update that only checks the chain)."""

    claim: Claim
    writes: list[Write] = field(default_factory=list)
    client_fields: dict[str, Any] | None = None


def state_write(batch: Any, ref: firestore.DocumentReference, fields: dict[str, Any]) -> None:
    """Set exactly `fields`, each replaced whole: a nested map (a checkpoint, counts) never keeps
    keys of an older value, as `merge=True` would."""
    batch.set(ref, fields, merge=list(fields))


class Fence:
    """Claims and chained commits for one run; counts its commits and writes for benchmarks."""

    def __init__(self, client: firestore.Client, settings: Settings, lease: Lease) -> None:
        self.client = client
        self.settings = settings
        self.lease = lease
        self.fence_ref = (
            client.collection(store.LOCKS)
            .document(settings.lock_name)
            .collection(store.FENCE)
            .document("current")
        )
        self.commits = 0
        #: Writes per document of the clients in flight, and the busiest document of those
        #: done: bounded by the number of workers, not by the number of clients.
        self.writes: Counter[str] = Counter()
        self.busiest: tuple[str, int] = ("", 0)
        self._count_mutex = threading.Lock()

    def _count(self, paths: list[str], done: list[Group] | None = None) -> None:
        with self._count_mutex:
            self.commits += 1
            self.writes.update(paths)
            for group in done or []:
                if group.client_fields is None:
                    continue  # the client is still in flight
                # The client is done: forget its documents, keeping the busiest one seen.
                client = group.claim.ref.path
                for path in [p for p in self.writes if p == client or p.startswith(client + "/")]:
                    n = self.writes.pop(path)
                    if n > self.busiest[1]:
                        self.busiest = (path, n)

    def writes_by_document(self) -> Counter[str]:
        """Writes of the documents still in flight, plus the busiest finished one."""
        with self._count_mutex:
            counts = Counter(self.writes)
            path, n = self.busiest
            if path:
                counts[path] = max(counts[path], n)
            return counts

    def _claim_fields(self) -> dict[str, Any]:
        return {
            "claim": {
                "runId": self.lease.run_id,
                "token": self.lease.token,
                "open": True,
                "at": firestore.SERVER_TIMESTAMP,
            }
        }

    def _check(self, tx: Any) -> None:
        snap = self.fence_ref.get(transaction=tx, **store.call(self.settings))
        data = snap.to_dict() if snap.exists else {}
        if data.get("token") != self.lease.token or data.get("runId") != self.lease.run_id:
            raise LeaseLost(f"run {self.lease.run_id} no longer holds the lock")

    def transaction(self, what: str, body: Any) -> list[Any]:
        """A transaction that commits only while this run holds the lock: it reads the fence
        first, then runs `body(tx)`."""

        def fenced(tx: Any) -> None:
            self._check(tx)
            body(tx)

        results = store.read_then_commit(self.client, self.settings, what, fenced)
        with self._count_mutex:
            self.commits += 1
        return results

    def claim(
        self, client_id: str, writes: list[Write] | None = None, carry: Group | None = None
    ) -> Claim | None:
        """Claim `client_id` (with `writes` for it, and the previous client's last `carry`
        group, in the same commit). None when the client document no longer exists (the
        carried group is still committed). Raises `LeaseLost` once the lock is not ours."""
        ref = self.client.collection(store.CLIENTS).document(client_id)
        for _ in range(_ATTEMPTS):
            found: dict[str, Any] = {}

            def body(tx: Any, found: dict[str, Any] = found) -> None:
                fence, snap = self.client.get_all(
                    [self.fence_ref, ref], transaction=tx, **store.call(self.settings)
                )
                if fence.reference.path != self.fence_ref.path:
                    fence, snap = snap, fence
                data = fence.to_dict() if fence.exists else {}
                if data.get("token") != self.lease.token or data.get("runId") != self.lease.run_id:
                    raise LeaseLost(f"run {self.lease.run_id} no longer holds the lock")
                if carry is not None:
                    self._add(tx, carry)
                if snap.exists:
                    found["data"] = snap.to_dict() or {}
                    tx.update(ref, self._claim_fields())
                    for state_ref, fields in writes or []:
                        state_write(tx, state_ref, fields)

            try:
                results = store.read_then_commit(self.client, self.settings, "claiming", body)
            except gexc.FailedPrecondition:
                if carry is None:  # only the carried group has a precondition
                    raise
                self._revalidate([carry])
                continue
            except gexc.NotFound as exc:
                raise ClientGone(carry.claim.client_id if carry else client_id) from exc
            paths = self._paths(carry) + (
                [ref.path] + [r.path for r, _ in writes or []] if "data" in found else []
            )
            self._count(paths, [carry] if carry is not None else None)
            offset = 0
            if carry is not None:
                carry.claim.update_time = results[len(carry.writes)].update_time
                offset = len(carry.writes) + 1
            if "data" not in found:
                return None
            return Claim(client_id, ref, results[offset].update_time, found["data"])
        raise LeaseLost("could not claim the client: its document keeps changing")

    def commit(self, groups: list[Group]) -> None:
        """Commit every group's writes, each client's fenced by its chain."""
        groups = [g for g in groups if g.writes or g.client_fields is not None]
        if not groups:
            return
        for _ in range(_ATTEMPTS):
            batch = self.client.batch()
            for group in groups:
                self._add(batch, group)
            try:
                results = store.retrying(
                    self.settings,
                    "saving state",
                    lambda batch=batch: batch.commit(**store.commit_call(self.settings)),
                )
            except gexc.FailedPrecondition:
                self._revalidate(groups)
                continue
            except gexc.NotFound:
                self._revalidate(groups)  # raises ClientGone for the deleted one
                continue
            self._count([p for g in groups for p in self._paths(g)], groups)
            index = 0
            for group in groups:
                index += len(group.writes)
                group.claim.update_time = results[index].update_time
                index += 1
            return
        raise LeaseLost("could not save state: a client document keeps changing")

    def _add(self, batch: Any, group: Group) -> None:
        for ref, fields in group.writes:
            state_write(batch, ref, fields)
        batch.update(
            group.claim.ref,
            group.client_fields or {"claim.token": self.lease.token},
            option=self.client.write_option(last_update_time=group.claim.update_time),
        )

    @staticmethod
    def _paths(group: Group | None) -> list[str]:
        if group is None:
            return []
        return [r.path for r, _ in group.writes] + [group.claim.ref.path]

    def _revalidate(self, groups: list[Group]) -> None:
        """After a refused precondition: continue on each claim that is still ours (someone
        else wrote the client document), stop on one that is not."""
        refs = [g.claim.ref for g in groups]
        with store.translate_errors("checking claims"):
            snaps = {
                s.reference.path: s
                for s in self.client.get_all(
                    refs, field_paths=["claim"], **store.call(self.settings)
                )
            }
        for group in groups:
            snap = snaps.get(group.claim.ref.path)
            if snap is None or not snap.exists:
                raise ClientGone(group.claim.client_id)
            claim = (snap.to_dict() or {}).get("claim") or {}
            ours = (
                claim.get("runId") == self.lease.run_id
                and claim.get("token") == self.lease.token
                and not claim.get("revoked")
            )
            if not ours:
                raise LeaseLost(
                    f"run {self.lease.run_id} lost client {group.claim.client_id} "
                    "(claim revoked after a takeover or unlock)"
                )
            group.claim.update_time = snap.update_time


def revoke(client: firestore.Client, settings: Settings, run_id: str) -> int:
    """Close every open claim of `run_id`, so that run (a zombie now) lands no further write.

    Called right after the commit that took its lock over or force-unlocked it. Each close is
    preconditioned on what was read, so a claim written meanwhile by a newer run is never
    touched; a lost race simply reads again. Returns how many claims were closed.
    """
    query = (
        client.collection(store.CLIENTS)
        .where(filter=firestore.FieldFilter("claim.runId", "==", run_id))
        .where(filter=firestore.FieldFilter("claim.open", "==", True))
        .select(["claim"])
        .limit(400)
    )
    closed = 0
    for _ in range(50):
        with store.translate_errors("reading the claims to revoke"):
            snaps = list(query.stream(**store.call(settings)))
        if not snaps:
            return closed
        batch = client.batch()
        for snap in snaps:
            batch.update(
                snap.reference,
                {"claim.open": False, "claim.revoked": True},
                option=client.write_option(last_update_time=snap.update_time),
            )
        try:
            with store.translate_errors("revoking claims"):
                batch.commit(**store.commit_call(settings))
            closed += len(snaps)
        except gexc.FailedPrecondition:
            for snap in snaps:  # one moved under us: close them one by one
                try:
                    with store.translate_errors("revoking a claim"):
                        snap.reference.update(
                            {"claim.open": False, "claim.revoked": True},
                            option=client.write_option(last_update_time=snap.update_time),
                            **store.commit_call(settings),
                        )
                    closed += 1
                except (gexc.FailedPrecondition, gexc.NotFound):
                    continue
    log.warning("still finding open claims of run %s after 50 rounds", run_id)
    return closed
