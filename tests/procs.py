"""Real `functions-framework` processes on loopback, for tests that need separate processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS_FRAMEWORK = Path(sys.executable).parent / "functions-framework"
TARGETS = ("smart_resume", "smart_resume_status")


class FunctionProcess:
    """`functions-framework --source functions/<target>/main.py --target <target>` on a port
    (or another `source` that defines the target, such as a test's wrapper of it)."""

    def __init__(
        self,
        target: str,
        port: int,
        env: dict[str, str],
        log_path: Path,
        source: str | None = None,
    ) -> None:
        assert target in TARGETS
        self.target = target
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(FUNCTIONS_FRAMEWORK),
                f"--source={source or f'functions/{target}/main.py'}",
                f"--target={target}",
                "--host=127.0.0.1",
                f"--port={port}",
            ],
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONPATH": str(ROOT / "tests")},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.target} exited; log: {self.log_path.read_text()[-2000:]}"
                )
            try:
                requests.get(self.url, timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.target} did not start; log: {self.log_path.read_text()[-2000:]}")

    def post(self, body: object = None, secret: str | None = "test-secret-1-0123456", **kw):
        headers = kw.pop("headers", {})
        if secret is not None:
            headers["X-Webhook-Secret"] = secret
        return requests.post(self.url, json=body, headers=headers, timeout=kw.pop("timeout", 60))

    def get(self, path: str = "", secret: str | None = "test-secret-1-0123456", **kw):
        headers = {"X-Webhook-Secret": secret} if secret is not None else {}
        return requests.get(self.url + path, headers=headers, timeout=kw.pop("timeout", 30))

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
