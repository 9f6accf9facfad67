"""Helpers for the fault, security and hygiene tests: a raw misbehaving HTTP server, a snapshot
of every Firestore document, and retrying a trigger until the lock lets it in."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import requests

# One scripted answer of `FlakyServer`: "reset" (RST without a reply), "close" (close after
# reading the request), "hang" (never answer), or (status, content_type, body bytes).
Action = str | tuple[int, str, bytes]


class FlakyServer:
    """A raw TCP HTTP server that plays a script, one action per connection (the last repeats).

    `ops_server.OpsServer` always answers well-formed HTTP; this one can reset connections,
    hang, or send a body of any size, like a broken load balancer.
    """

    def __init__(self, script: list[Action]) -> None:
        self.script = list(script)
        self.requests = 0
        self._mutex = threading.Lock()
        self._closed = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/op"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _next(self) -> Action:
        with self._mutex:
            self.requests += 1
            return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                while len(rest) < length:
                    rest += conn.recv(65536)
            action = self._next()
            if action == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if action == "close":
                return
            if action == "hang":
                self._closed.wait(30)
                return
            status, content_type, body = action  # type: ignore[misc]
            header = (
                f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            with contextlib.suppress(OSError):  # the client may stop reading a huge body
                conn.sendall(header + body)

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self._thread.join(timeout=2)


def snapshot(db: Any) -> dict[str, tuple[dict[str, Any], Any]]:
    """Every document in the database: path -> (data, update_time)."""
    found: dict[str, tuple[dict[str, Any], Any]] = {}

    def walk(collection: Any) -> None:
        for ref in collection.list_documents():
            snap = ref.get()
            if snap.exists:
                found[ref.path] = (snap.to_dict(), snap.update_time)
            for sub in ref.collections():
                walk(sub)

    for collection in db.collections():
        walk(collection)
    return found


def post_until_admitted(
    post: Callable[[], requests.Response], timeout: float = 30, pause: float = 0.1
) -> tuple[requests.Response, float]:
    """POST until the answer is not 409 (the lock is live); returns it and the seconds waited."""
    started = time.monotonic()
    while True:
        response = post()
        if response.status_code != 409 or time.monotonic() - started > timeout:
            return response, time.monotonic() - started
        time.sleep(pause)


def wait_for(predicate: Callable[[], Any], timeout: float = 20, pause: float = 0.02) -> Any:
    """Poll until `predicate()` is truthy; returns its value or raises `TimeoutError`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(pause)
    raise TimeoutError("condition not met in time")
