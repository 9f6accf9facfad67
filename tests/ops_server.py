"""A local HTTP server that plays the operations' services in tests (and the bench).

Each path is answered by a Python function `(payload) -> (status, body)` or
`(status, body, headers)`; every request is recorded with its headers and arrival time, so tests
can assert what the engine sent (checkpoints in order, run ids, idempotency keys) and when.
`RateLimited` wraps a handler in a service's own rate limit, counting every call over it;
`ServiceProcess` runs one in a process of its own (`python tests/ops_server.py --help`).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

Handler = Callable[[dict[str, Any]], tuple[Any, ...]]


@dataclass(frozen=True)
class Request:
    path: str
    payload: dict[str, Any]
    headers: dict[str, str]
    at: float  # time.monotonic() when it arrived


#: Linux's socket option for the kernel's receive time of each packet (not in `socket`).
SO_TIMESTAMPNS = 35


class _Server(ThreadingHTTPServer):
    """Asks the kernel to stamp what it receives (Linux), so arrival times are when a request
    reached the machine, not when a busy service got round to reading it: on a loaded machine
    that comes late enough to make calls look bunched up that were not."""

    def server_bind(self) -> None:
        super().server_bind()
        if sys.platform == "linux":
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


_current = threading.local()


def arrived() -> float:
    """In a handler: when its request arrived (time.monotonic())."""
    return getattr(_current, "arrived", None) or time.monotonic()


def _arrival(sock: socket.socket) -> float:
    """When the request's first bytes arrived, as time.monotonic() (peeked: nothing is read)."""
    mono, wall = time.monotonic(), time.time()
    try:
        _, ancillary, _, _ = sock.recvmsg(1, socket.CMSG_SPACE(16), socket.MSG_PEEK)
    except OSError:
        return mono
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return mono + (seconds + nanoseconds / 1e9 - wall)
    return mono


class OpsServer:
    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.log: list[Request] = []
        self.lock = threading.Lock()
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                self.arrived = _arrival(self.request)
                super().setup()

            def do_POST(self) -> None:
                arrived = _current.arrived = self.arrived
                length = int(self.headers.get("Content-Length") or 0)
                payload = json.loads(self.rfile.read(length) or b"{}")
                with outer.lock:
                    outer.requests.append((self.path, payload))
                    outer.log.append(Request(self.path, payload, dict(self.headers), arrived))
                handler = outer.routes.get(self.path)
                if handler is None:
                    status, body, headers = 404, {"error": "no such route"}, {}
                else:
                    status, body, *rest = handler(payload)
                    headers = rest[0] if rest else {}
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for name, value in headers.items():
                    self.send_header(name, str(value))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def route(self, path: str, handler: Handler) -> str:
        self.routes[path] = handler
        return self.url + path

    def calls(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [p for route, p in self.requests if route == path]

    def received(self, path: str) -> list[Request]:
        """Every request to `path`, with headers and arrival time, in arrival order."""
        with self.lock:
            return [r for r in self.log if r.path == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class RateLimited:
    """A service's own limits around `inner`: a call that makes more than `per_second` calls
    arrive within one second (any second: the window slides) is a violation, answered 429 with
    `Retry-After`; `in_flight_max` is the most calls it was ever serving at once.

    Arrival times come from the kernel, so threads may handle them out of order: they are kept
    sorted, and every window that holds the new arrival is checked."""

    def __init__(self, per_second: int, inner: Handler, retry_after: str = "1") -> None:
        self.per_second = per_second
        self.inner = inner
        self.retry_after = retry_after
        self.arrivals: list[float] = []
        self.violations = 0
        self.rejected = 0
        self.in_flight = self.in_flight_max = 0
        self._recent: list[float] = []  # sorted; the last two seconds or so
        self._mutex = threading.Lock()

    def __call__(self, payload: dict[str, Any]) -> tuple[Any, ...]:
        now = arrived()
        with self._mutex:
            self.arrivals.append(now)
            if self._recent and self._recent[0] < self._recent[-1] - 3.0:
                del self._recent[: bisect.bisect_left(self._recent, self._recent[-1] - 2.0)]
            bisect.insort(self._recent, now)
            if self._over(bisect.bisect_left(self._recent, now)):
                self.violations += 1
                self.rejected += 1
                return 429, {"error": "rate limited"}, {"Retry-After": self.retry_after}
            self.in_flight += 1
            self.in_flight_max = max(self.in_flight_max, self.in_flight)
        try:
            return self.inner(payload)
        finally:
            with self._mutex:
                self.in_flight -= 1

    def _over(self, i: int) -> bool:
        """Whether a run of per_second + 1 arrivals around index `i` spans under a second."""
        n, times = self.per_second, self._recent
        return any(
            times[j + n] - times[j] < 1.0 for j in range(max(0, i - n), i + 1) if j + n < len(times)
        )

    def rate(self) -> float:
        """Calls per second from the first arrival to the last."""
        with self._mutex:
            if len(self.arrivals) < 2:
                return 0.0
            return (len(self.arrivals) - 1) / (self.arrivals[-1] - self.arrivals[0])


def paging(pages: int, delay: float = 0.0) -> Handler:
    """A service that works `pages` pages per client-operation, checkpointing after each."""

    def handle(payload: dict[str, Any]) -> tuple[int, Any]:
        page = ((payload.get("checkpoint") or {}).get("page") or 0) + 1
        if delay:
            time.sleep(delay)
        return 200, {"done": page >= pages, "checkpoint": {"page": page}, "counts": {"pages": 1}}

    return handle


class ServiceProcess:
    """A `RateLimited` paging service at `url + "/work"`, in a process of its own.

    Its own process, like a real service: in the tests' process it would share the interpreter
    lock with the engine's workers, and the arrival times it measures would carry their
    scheduling delays rather than the engine's pacing.
    """

    def __init__(
        self,
        per_second: int,
        pages: int,
        *,
        delay: float = 0.0,
        retry_after: str = "1",
        cold: str | None = None,
    ) -> None:
        command = [sys.executable, __file__, "--per-second", str(per_second)]
        command += ["--pages", str(pages), "--delay", str(delay), "--retry-after", retry_after]
        command += ["--cold", cold] if cold is not None else []
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            self.close()
            raise RuntimeError("the service process did not start")

    def stats(self) -> dict[str, Any]:
        """`violations`, `rejected`, `inFlightMax`, `arrivals` and `requests` (each with
        `payload`, `headers` and `at`, time.monotonic(): one clock for every process)."""
        answer = requests.post(self.url + "/stats", json={}, timeout=10)
        answer.raise_for_status()
        return answer.json()  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=ServiceProcess.__doc__.splitlines()[0])
    parser.add_argument("--per-second", type=int, required=True, help="the service's own limit")
    parser.add_argument("--pages", type=int, default=1, help="pages per client-operation")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per page")
    parser.add_argument("--retry-after", default="1", help="Retry-After of a 429 over the limit")
    parser.add_argument("--cold", help="answer the very first call 429 with this Retry-After")
    args = parser.parse_args()
    server = OpsServer()
    limited = RateLimited(args.per_second, paging(args.pages, args.delay), args.retry_after)
    first = threading.Lock()
    cold = [args.cold]

    def work(payload: dict[str, Any]) -> tuple[Any, ...]:
        with first:
            warming, cold[0] = cold[0], None
        if warming is not None:
            limited.arrivals.append(arrived())
            return 429, {"error": "warming up"}, {"Retry-After": warming}
        return limited(payload)

    def stats(payload: dict[str, Any]) -> tuple[int, Any]:
        with server.lock:
            log = [asdict(r) for r in server.log if r.path == "/work"]
        return 200, {
            "violations": limited.violations,
            "rejected": limited.rejected,
            "inFlightMax": limited.in_flight_max,
            "arrivals": list(limited.arrivals),
            "requests": log,
        }

    server.route("/work", work)
    server.route("/stats", stats)
    print(server.url, flush=True)
    sys.stdin.read()  # until the parent closes it, or dies


if __name__ == "__main__":
    main()
