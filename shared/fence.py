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
   claims before doing anything else (retried until done; the lock document keeps the run to
   revoke until then, so a lost answer or a failed attempt is finished by the next holder):
   the old run's next chained commit fails its precondition, it reads its claim back, finds it
   revoked, and stops with `LeaseLost`.

A precondition can also fail because the user's own application wrote the client document;
the claim read back is then still ours, and the commit is retried on the new update time.

A claim also respects runs of *other* locks (another shard layout, another stream): a client
whose open claim belongs to a live run of another lock is skipped (`ClientTrouble`), not the
run; a claim of a run that is no longer live is taken. Trouble with one client (deleted,
claimed elsewhere, a document that keeps changing) is that client's only: `ClientTrouble`.
`LeaseLost` means this run's own lock is gone, and nothing else.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from shared import store
from shared.config import Settings
from shared.errors import ClientGone, ClientTrouble, LeaseLost, StoreUnavailable
from shared.lock import Lease
from shared.lock_state import recorded_stale
from shared.log import get_logger

log = get_logger("fence")
_ATTEMPTS = 5
Write = tuple[firestore.DocumentReference, dict[str, Any]]
#: How long a takeover or unlock keeps trying to close the old run's claims.
REVOKE_SECONDS = 60.0


@dataclass
class Claim:
    """This run's hold on one client: where the chain of its commits stands."""

    client_id: str
    ref: firestore.DocumentReference
    update_time: dt.datetime


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

    def _count(self, paths: list[str], done: Claim | None = None) -> None:
        with self._count_mutex:
            self.commits += 1
            self.writes.update(paths)
            if done is not None:
                # The client is done: forget its documents, keeping the busiest one seen.
                client = done.ref.path
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
                "lock": self.settings.lock_name,
                "open": True,
                "at": firestore.SERVER_TIMESTAMP,
            }
        }

    def _check(self, tx: Any) -> None:
        snap = self.fence_ref.get(transaction=tx, **store.call(self.settings))
        self._ours(snap)

    def _ours(self, fence: Any) -> None:
        data = (fence.to_dict() or {}) if fence.exists else {}
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

    def claim(self, client_id: str, writes: list[Write] | None = None) -> Claim:
        """Claim `client_id`, with `writes` for it in the same commit. Raises `ClientGone`
        when the document no longer exists, `ClientTrouble` when a live run of another lock
        holds it, and `LeaseLost` once the lock is not ours."""
        ref = self.client.collection(store.CLIENTS).document(client_id)

        def body(tx: Any) -> None:
            fence, snap = self.client.get_all(
                [self.fence_ref, ref], transaction=tx, **store.call(self.settings)
            )
            if fence.reference.path != self.fence_ref.path:
                fence, snap = snap, fence
            self._ours(fence)
            if not snap.exists:
                raise ClientGone(client_id)
            self._respect(tx, client_id, (snap.to_dict() or {}).get("claim"))
            tx.update(ref, self._claim_fields())
            for state_ref, fields in writes or []:
                state_write(tx, state_ref, fields)

        try:
            results = store.read_then_commit(self.client, self.settings, "claiming", body)
        except gexc.NotFound as exc:  # deleted between the read and the commit
            raise ClientGone(client_id) from exc
        self._count([ref.path] + [r.path for r, _ in writes or []])
        return Claim(client_id, ref, results[0].update_time)

    def _respect(self, tx: Any, client_id: str, claim: Any) -> None:
        """Refuse a client that a live run of another lock holds open (a shard layout being
        replaced, another stream). Our own lock's earlier runs are over: we hold the lock."""
        if not isinstance(claim, dict) or claim.get("open") is not True:
            return
        other = claim.get("lock")
        if not isinstance(other, str) or not other or other == self.settings.lock_name:
            return
        lock_ref = self.client.collection(store.LOCKS).document(other)
        snap = lock_ref.get(transaction=tx, **store.call(self.settings))
        data = (snap.to_dict() or {}) if snap.exists else {}
        live = (
            data.get("held") is True
            and data.get("runId") == claim.get("runId")
            and not recorded_stale(data, snap.read_time, self.settings)
        )
        if live:
            raise ClientTrouble(
                client_id, f"run {claim.get('runId')} of lock {other} is working on it"
            )

    def commit(
        self,
        claim: Claim,
        writes: list[Write],
        client_fields: dict[str, Any] | Callable[[], dict[str, Any]] | None,
    ) -> None:
        """Commit one client's writes, fenced by its chain: the client document is updated
        (with `client_fields`, or a no-op that only checks the chain) on the update time of
        its previous commit. A callable `client_fields` is asked again after someone else
        wrote the client (an operator's retry, say), so it can read what changed."""
        for _ in range(_ATTEMPTS):
            fields = client_fields() if callable(client_fields) else client_fields
            batch = self.client.batch()
            for ref, values in writes:
                state_write(batch, ref, values)
            batch.update(
                claim.ref,
                fields or {"claim.token": self.lease.token},
                option=self.client.write_option(last_update_time=claim.update_time),
            )
            try:
                results = store.retrying(
                    self.settings,
                    "saving state",
                    lambda batch=batch: batch.commit(**store.commit_call(self.settings)),
                )
            except (gexc.FailedPrecondition, gexc.NotFound):
                self._revalidate(claim)  # raises unless the claim is still ours
                continue
            self._count(
                [r.path for r, _ in writes] + [claim.ref.path],
                claim if fields is not None else None,
            )
            claim.update_time = results[len(writes)].update_time
            return
        raise ClientTrouble(claim.client_id, "its document kept changing while the run saved")

    def _revalidate(self, claim: Claim) -> None:
        """After a refused precondition: continue on a claim that is still ours (someone else
        wrote the client document), stop on one that is not."""
        with store.translate_errors("checking a claim"):
            snap = claim.ref.get(field_paths=["claim"], **store.call(self.settings))
        if not snap.exists:
            raise ClientGone(claim.client_id)
        found = (snap.to_dict() or {}).get("claim")
        found = found if isinstance(found, dict) else {}
        if (
            found.get("runId") == self.lease.run_id
            and found.get("token") == self.lease.token
            and not found.get("revoked")
        ):
            claim.update_time = snap.update_time
            return
        other = found.get("lock")
        if isinstance(other, str) and other and other != self.settings.lock_name:
            raise ClientTrouble(
                claim.client_id, f"run {found.get('runId')} of lock {other} claimed it"
            )
        raise LeaseLost(
            f"run {self.lease.run_id} lost client {claim.client_id} "
            "(claim revoked after a takeover or unlock)"
        )


def revoke(client: firestore.Client, settings: Settings, run_id: str) -> int:
    """Close every open claim of `run_id`, so that run (a zombie now) lands no further write.

    Called right after the commit that took its lock over or force-unlocked it, and retried
    (transient errors, lost races) for up to `REVOKE_SECONDS`; raises `StoreUnavailable` if it
    could not finish. Each close is preconditioned on what was read, so a claim written
    meanwhile is read again rather than overwritten. Returns how many claims were closed.
    """
    query = (
        client.collection(store.CLIENTS)
        .where(filter=firestore.FieldFilter("claim.runId", "==", run_id))
        .where(filter=firestore.FieldFilter("claim.open", "==", True))
        .select(["claim"])
        .limit(400)
    )
    closed = 0
    deadline = time.monotonic() + REVOKE_SECONDS
    delay = 0.05
    while True:
        try:
            with store.translate_errors("reading the claims to revoke"):
                snaps = list(query.stream(**store.call(settings)))
            if not snaps:
                return closed
            closed += _close(client, settings, snaps)
            delay = 0.05
        except StoreUnavailable:
            if time.monotonic() + delay >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        if time.monotonic() >= deadline:
            raise StoreUnavailable(f"still finding open claims of run {run_id}")


def _close(client: firestore.Client, settings: Settings, snaps: list[Any]) -> int:
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
        return len(snaps)
    except (gexc.FailedPrecondition, gexc.NotFound):
        pass
    closed = 0
    for snap in snaps:  # one moved under us: close them one by one; the query reads again
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
    return closed
