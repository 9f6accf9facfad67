"""Firestore access: the client, collection names, and a bounded deadline on every call.

With the client's default retry an unreachable Firestore blocks for ~280 s before failing; every
call here passes `**store.call()` instead, so a dead store fails within the configured RPC
deadline and surfaces as `StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

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

_client_lock = threading.Lock()


def _transient(exc: Exception) -> bool:
    return isinstance(
        exc,
        gexc.ServiceUnavailable
        | gexc.DeadlineExceeded
        | gexc.InternalServerError
        | gexc.TooManyRequests,
    )


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
    except (gexc.RetryError, gexc.ServiceUnavailable, gexc.DeadlineExceeded) as exc:
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
