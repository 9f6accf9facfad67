"""One client's state writes during a run: claimed first, coalesced, kept until they land.

Firestore sustains about one write per second per document. An operation that checkpoints
fast, or a client whose operations finish in milliseconds, would write its state and client
documents many times a second, so writes are staged here and committed:

- at once for the claim (before any work: the claim is what fences the client);
- otherwise at most once per `SPACING` seconds for this client (a checkpoint saved meanwhile
  replaces the staged one: the next call still resumes from exactly the last one saved);
- always when the client closes, with its due fields, in a commit of its own.

So a document takes at most one write per second sustained, two in any one second (a spaced
commit and the close). Staged writes of one document are merged field by field (later values
win), which keeps "each field replaced whole". A commit that fails keeps what it carried
staged, so a finished outcome is never dropped by a later failure: the close tries again.

A kill loses at most the last second of one client's writes: its operations resume from the
checkpoint saved before that, as after any crash (chunks are delivered at least once).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.cloud import firestore

from shared.errors import ClientTrouble, StoreRejected
from shared.fence import Claim, Fence
from shared.log import get_logger

log = get_logger("writes")
SPACING = 1.0


@dataclass
class Staged:
    ref: firestore.DocumentReference
    fields: dict[str, Any]
    #: What to write instead if the store refuses these fields (an outcome's minimal form).
    fallback: dict[str, Any] | None = None


@dataclass
class ClientWrites:
    """The writes of one client in one run; used by one worker thread at a time."""

    fence: Fence
    client_id: str
    claim: Claim | None = None
    staged: dict[str, Staged] = field(default_factory=dict)
    last_commit: float = float("-inf")

    def stage(
        self,
        ref: firestore.DocumentReference,
        fields: dict[str, Any],
        fallback: dict[str, Any] | None = None,
    ) -> None:
        found = self.staged.get(ref.path)
        if found is None:
            self.staged[ref.path] = Staged(ref, dict(fields), fallback)
            return
        found.fields.update(fields)
        if fallback is not None:
            found.fallback = fallback

    def open(self) -> None:
        """Claim the client with nothing else (to repair its due fields or record problems)."""
        if self.claim is None:
            self.commit()

    def soon(self) -> None:
        """Commit what is staged if this client's last commit is at least `SPACING` old."""
        if self.staged and time.monotonic() - self.last_commit >= SPACING:
            self.commit()

    def commit(self, client_fields: Any = None) -> None:
        """Claim the client (the first time) or commit on its chain; `client_fields` closes
        it. Raises `ClientTrouble`, `LeaseLost`, `StoreUnavailable`; whatever was staged stays
        staged after a failure."""
        writes = [(s.ref, s.fields) for s in self.staged.values()]
        if self.claim is None:
            try:
                self.claim = self.fence.claim(self.client_id, writes)
            except StoreRejected as exc:
                raise ClientTrouble(self.client_id, f"the store refused its claim: {exc}") from exc
        else:
            try:
                self.fence.commit(self.claim, writes, client_fields)
            except StoreRejected as exc:
                self._refused(exc, client_fields)
        self.staged = {}
        self.last_commit = time.monotonic()

    def _refused(self, exc: StoreRejected, client_fields: Any) -> None:
        """The store refused these writes (a reserved name, too many index entries, a value
        it cannot hold): write each outcome's minimal form instead, naming the refusal, so the
        operation is not run again on every tick for a write that can never land."""
        assert self.claim is not None
        reason = f"the store refused this operation's state: {exc}"[:500]
        log.error("%s", reason)
        writes = [
            (s.ref, {**s.fallback, "error": reason})
            for s in self.staged.values()
            if s.fallback is not None
        ]
        minimal = None
        if client_fields is not None:
            full = client_fields() if callable(client_fields) else client_fields
            minimal = {k: v for k, v in full.items() if k in ("nextDueAt", "claim.open")}
        try:
            self.fence.commit(self.claim, writes, minimal)
        except StoreRejected as again:
            raise ClientTrouble(self.client_id, f"the store refused its writes: {again}") from exc

    def close(self, client_fields: Callable[[], dict[str, Any]]) -> None:
        """The client is done: everything staged and its due fields (`client_fields()`, asked
        again if someone else wrote the client meanwhile), in one commit."""
        if self.claim is None:
            if not self.staged:
                return
            self.commit()
        self.commit(lambda: {**client_fields(), "claim.open": False})
        self.claim = None
