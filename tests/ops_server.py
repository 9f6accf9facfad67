"""A local HTTP server that plays the operations' services in tests.

Each path is answered by a Python function `(payload) -> (status, body)`; every request is
recorded, so tests can assert what the engine sent (checkpoints in order, run ids).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Handler = Callable[[dict[str, Any]], tuple[int, Any]]


class OpsServer:
    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                payload = json.loads(self.rfile.read(length) or b"{}")
                with outer.lock:
                    outer.requests.append((self.path, payload))
                handler = outer.routes.get(self.path)
                if handler is None:
                    status, body = 404, {"error": "no such route"}
                else:
                    status, body = handler(payload)
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
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

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
