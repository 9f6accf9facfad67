"""Firestore access: the client, collection names, and a bounded deadline on every call.

With the client's default retry an unreachable Firestore blocks for ~280 s before failing; every
call here passes `**store.call()` instead, so a dead store fails within the configured RPC
deadline and surfaces as `StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.cloud import firestore

from shared.config import Settings
from shared.errors import StoreRejected, StoreUnavailable

LOCKS = "locks"
CLIENTS = "clients"
OPERATIONS = "operations"
RUNS = "runs"
FENCE = "fence"  # subcollection of a lock document; see lock.py for why it exists
META = "meta"  # subcollection of a lock document: what the due-work selection remembers

_client_lock = threading.Lock()
T = TypeVar("T")


#: Errors after which the same request may succeed: contention (aborted), overload (resource
#: exhausted / too many requests), and a server that did not answer in time.
TRANSIENT = (
    gexc.Aborted,
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.InternalServerError,
    gexc.TooManyRequests,
)


def _transient(exc: Exception) -> bool:
    return isinstance(exc, TRANSIENT)


@functools.cache
def _retry(deadline: float) -> gretry.Retry:
    return gretry.Retry(
        predicate=_transient, initial=0.05, maximum=1.0, multiplier=2.0, timeout=deadline
    )


def call(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for a bounded Firestore call: `doc.get(**call(settings))`."""
    deadline = settings.rpc_timeout_seconds
    return {"timeout": deadline, "retry": _retry(deadline)}


def commit_call(settings: Settings) -> dict[str, Any]:
    """Like `call`, but a write is attempted once: a retried conditional commit could report
    a precondition failure for a write that in fact landed the first time."""
    return {"timeout": settings.rpc_timeout_seconds, "retry": None}


def retrying(settings: Settings, what: str, attempt: Callable[[], T]) -> T:
    """Run `attempt` (one write whose repetition is harmless: a blind set, a commit whose
    preconditions a landed first try would still satisfy) again after transient errors, with
    capped exponential backoff, for at most the RPC deadline; then fail as `StoreUnavailable`.

    Conditional commits that a landed first try would *break* must not come here: their
    callers read back instead (see `Lock.acquire` and `Lock.release`).
    """
    deadline = time.monotonic() + settings.rpc_timeout_seconds
    delay = 0.05
    while True:
        with translate_errors(what):
            try:
                return attempt()
            except TRANSIENT:
                if time.monotonic() + delay >= deadline:
                    raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 1.0)


def unchanged(snap: Any) -> Any:
    """A write that changes nothing and lands only if `snap`'s document is as it was read:
    riding another commit, it proves the document unchanged without reading it again."""
    from google.cloud.firestore_v1.types import common, write

    return write.Write(
        update={"name": snap.reference._document_path, "fields": {}},
        update_mask=common.DocumentMask(field_paths=[]),
        current_document=common.Precondition(update_time=snap.update_time),
    )


_pool: Any = None


def background(call: Callable[[], T]) -> Future[T]:
    """Start an independent read (the client is thread-safe) and go on: the caller collects it
    with `.result()` where it is needed, so its round trip overlaps others."""
    global _pool
    with _client_lock:
        if _pool is None:
            # Roomy: a read issued in the background may issue reads together itself.
            _pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="smart-resume-read")
    return _pool.submit(contextvars.copy_context().run, call)


def parallel(*calls: Callable[[], Any]) -> list[Any]:
    """Run independent reads at once: an idle tick pays one round trip for them, not one each.
    Errors are raised as the calls raise them."""
    futures = [background(call) for call in calls[:-1]]
    last = [calls[-1]()] if calls else []  # in this thread: one hop fewer
    return [future.result() for future in futures] + last


def read_then_commit(
    client: firestore.Client,
    settings: Settings,
    what: str,
    body: Callable[[firestore.Transaction], None],
) -> list[Any]:
    """One read-write transaction with a bounded deadline on every RPC.

    The library's own `Transaction` begins and commits with its default retry and timeout (an
    unreachable store blocks for minutes), so we drive the three RPCs ourselves: begin, the
    reads `body` makes with `transaction=`, and the commit of the writes it adds. Contention
    (`Aborted`) is retried within the RPC deadline; other errors roll back and raise.
    """
    api = client._firestore_api
    kwargs = {"metadata": client._rpc_metadata, "timeout": settings.rpc_timeout_seconds}
    database = client._database_string

    def attempt() -> list[Any]:
        tx = client.transaction()
        tx._id = api.begin_transaction(
            request={"database": database}, retry=None, **kwargs
        ).transaction
        try:
            body(tx)
            if not tx._write_pbs:
                return []
            response = api.commit(
                request={"database": database, "writes": tx._write_pbs, "transaction": tx._id},
                retry=None,
                **kwargs,
            )
        except BaseException:
            with contextlib.suppress(Exception):
                api.rollback(
                    request={"database": database, "transaction": tx._id}, retry=None, **kwargs
                )
            raise
        return list(response.write_results)

    return retrying(settings, what, attempt)


def active_clients(
    client: firestore.Client, stream: int | None, shard: int | None = None
) -> firestore.Query:
    """The active clients, of `stream` and of `shard` when given: where every query over the
    clients starts (due work, failing work, the oldest due client)."""
    query = client.collection(CLIENTS).where(filter=firestore.FieldFilter("active", "==", True))
    if stream is not None:
        query = query.where(filter=firestore.FieldFilter("stream", "==", stream))
    if shard is not None:
        query = query.where(filter=firestore.FieldFilter("shard", "==", shard))
    return query


@functools.cache
def _client(project: str | None, emulator_host: str | None) -> firestore.Client:
    # emulator_host is part of the key only so a test that moves the emulator gets a new client;
    # the library itself reads FIRESTORE_EMULATOR_HOST from the environment.
    del emulator_host
    return firestore.Client(project=project)


def get_client(settings: Settings) -> firestore.Client:
    """The process-wide client (a lazy global: a warm instance reuses its channel)."""
    with _client_lock:
        return _client(settings.project, settings.emulator_host)


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn transport failures into `StoreUnavailable` with a one-line message."""
    try:
        yield
    except (gexc.RetryError, *TRANSIENT) as exc:
        raise StoreUnavailable(f"Firestore unavailable while {what}: {_short(exc)}") from exc
    except gexc.GoogleAPICallError as exc:
        if isinstance(exc, gexc.FailedPrecondition | gexc.AlreadyExists | gexc.NotFound):
            raise
        if isinstance(exc, gexc.InvalidArgument):
            # The store is fine; this one write is not (e.g. over the 1 MiB document limit).
            raise StoreRejected(f"Firestore refused the write while {what}: {_short(exc)}") from exc
        raise StoreUnavailable(f"Firestore error while {what}: {_short(exc)}") from exc


def _short(exc: Exception) -> str:
    text = str(getattr(exc, "message", None) or exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
