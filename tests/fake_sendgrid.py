"""A local stand-in for SendGrid's `POST /v3/mail/send`, for the real client to talk to.

It records every request, answers from a configurable status sequence (the last one repeats),
and can be told to never answer, like a silent load balancer, or to answer only after `delay`
seconds, like a provider that accepted the message but whose answer came too late.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ERROR_BODIES = {
    400: "The to array is required for all personalization objects",
    401: "The provided authorization grant is invalid, expired, or revoked",
    403: "The from address does not match a verified Sender Identity.",
    429: "too many requests",
    500: "internal error",
}


@dataclass
class Recorded:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class FakeSendGrid:
    """A threaded HTTP server on 127.0.0.1; use as a context manager."""

    def __init__(
        self, statuses: list[int] | None = None, *, silent: bool = False, delay: float = 0
    ) -> None:
        self.statuses = list(statuses or [202])
        self.silent = silent
        self.delay = delay
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeSendGrid:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def _next_status(self) -> int:
        with self._lock:
            return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with fake._lock:
                    fake.requests.append(
                        Recorded("POST", self.path, dict(self.headers), json.loads(raw or b"{}"))
                    )
                if fake.silent:
                    fake._release.wait(30)
                    return
                if self.path != "/v3/mail/send":
                    self._answer(404, {"errors": [{"message": "not found"}]})
                    return
                status = fake._next_status()
                if fake.delay:
                    fake._release.wait(fake.delay)
                if status < 300:
                    self._answer(status, None)
                else:
                    message = ERROR_BODIES.get(status, "error")
                    self._answer(status, {"errors": [{"message": message, "field": None}]})

            def _answer(self, status: int, body: dict[str, Any] | None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up waiting (a `delay` past its timeout)

        return Handler
