"""The operator scripts against real function processes, and every command of local_emulator.md."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def script(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, f"scripts/{name}", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def seed(clients: int, leads: int, delay: float) -> None:
    sizes = ["--clients", str(clients), "--leads", str(leads), "--delay", str(delay)]
    subprocess.run(
        [sys.executable, "-m", "shared.resume", "seed-demo", *sizes],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def functions(function_process):
    trigger = function_process("smart_resume", SMART_RESUME_HEARTBEAT_SECONDS="1")
    status = function_process("smart_resume_status")
    return trigger, status


def port_of(proc) -> str:
    return proc.url.rsplit(":", 1)[1]


class TestScriptsAgainstFunctions:
    def test_trigger_watch_and_e2e_check(self, functions) -> None:
        """Dry run, a one-operation check, a watched full run, then the fresh re-check."""
        trigger, status = functions
        t, s = port_of(trigger), port_of(status)
        seed(clients=2, leads=60, delay=0.4)

        plan = script("trigger.py", "--local", t, "--dry-run")
        assert plan.returncode == 0, plan.stdout + plan.stderr
        assert "status: planned" in plan.stdout and "demo-02" in plan.stdout

        first = script("e2e_check.py", "--local", t, "--status-local", s, "--expect", "processed")
        assert first.returncode == 0, first.stdout + first.stderr
        assert "e2e check passed" in first.stdout

        background = subprocess.Popen(
            [sys.executable, "scripts/trigger.py", "--local", t],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        watched = script("watch.py", "--local", s, "--interval", "0.2")
        out, _ = background.communicate(timeout=120)
        assert background.returncode == 0, out
        assert "status: completed" in out and "clients=2" in out
        assert watched.returncode == 0, watched.stdout + watched.stderr
        assert "heartbeat" in watched.stdout and " of 2) " in watched.stdout
        assert "ended completed" in watched.stdout

        fresh = script("e2e_check.py", "--local", t, "--status-local", s)
        assert fresh.returncode == 0, fresh.stdout
        wrong = script("e2e_check.py", "--local", t, "--expect", "processed")
        assert wrong.returncode == 1 and "FAIL" in wrong.stdout

    def test_unknown_client_fails_the_check(self, functions) -> None:
        """A client that does not exist is a clear failure, not a pass."""
        trigger, _ = functions
        done = script("e2e_check.py", "--local", port_of(trigger), "--client", "nobody")
        assert done.returncode == 1
        assert "seed it first" in done.stdout

    def test_watch_reports_the_last_run_when_idle(self, functions) -> None:
        """With nothing running, --once reports and exits 0."""
        _, status = functions
        done = script("watch.py", "--local", port_of(status), "--once")
        assert done.returncode == 0, done.stderr
        assert "no run has finished yet" in done.stdout

    def test_wrong_or_missing_secret(self, functions) -> None:
        """A wrong secret is a usage error (401); a missing one never reaches the function."""
        trigger, _ = functions
        wrong = script(
            "trigger.py", "--local", port_of(trigger), env={"SMART_RESUME_WEBHOOK_SECRET": "no"}
        )
        assert wrong.returncode == 2 and "unauthorized" in wrong.stdout
        missing = script(
            "trigger.py", "--local", port_of(trigger), env={"SMART_RESUME_WEBHOOK_SECRET": ""}
        )
        assert missing.returncode == 2 and "SMART_RESUME_WEBHOOK_SECRET" in missing.stderr


def test_unreachable_function_exits_1() -> None:
    """Nothing listening: exit 1 with a hint."""
    done = script("watch.py", "--local", str(free_port()))
    assert done.returncode == 1 and "is the function running" in done.stderr


def test_gcloud_flag_sends_the_identity_token(tmp_path: Path) -> None:
    """--gcloud adds Authorization: Bearer <token>; the secret is the first configured value."""
    seen: dict[str, str] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.update(self.headers.items())
            body = json.dumps({"status": "completed", "runId": "r1", "summary": {"clients": 0}})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fake = tmp_path / "gcloud"
    fake.write_text("#!/bin/sh\necho fake-identity-token\n")
    fake.chmod(0o755)
    try:
        done = script(
            "trigger.py",
            "--url",
            f"http://127.0.0.1:{server.server_port}",
            "--gcloud",
            env={"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"},
        )
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stdout + done.stderr
    assert seen["Authorization"] == "Bearer fake-identity-token"
    assert seen["X-Webhook-Secret"] == "test-secret-1-0123456"


# --- local_emulator.md, command by command -----------------------------------------------

FAKE_GCLOUD = """#!{python}
import os, subprocess, sys, datetime
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
if args[:2] == ["auth", "print-identity-token"]:
    print("fake-identity-token")
elif args[:2] == ["functions", "describe"]:
    print(os.environ["FAKE_TRIGGER_URL" if args[2] == "smart-resume" else "FAKE_STATUS_URL"])
elif args[:2] == ["secrets", "versions"]:
    print(os.environ["FAKE_SECRET"] + ",previous-secret")
elif args[:3] == ["scheduler", "jobs", "run"]:
    # What the job does: POST to the trigger with the secret header, without waiting.
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    subprocess.Popen(
        ["curl", "-sS", "-o", os.devnull, "-X", "POST",
         "-H", "X-Webhook-Secret: " + os.environ["FAKE_SECRET"],
         "-H", "X-CloudScheduler-ScheduleTime: " + when, os.environ["FAKE_TRIGGER_URL"]],
        start_new_session=True,
    )
else:
    sys.exit("fake gcloud: unexpected " + " ".join(args))
"""


def doc_commands(path: Path) -> list[tuple[str, str]]:
    """(section, command) for every line of every bash block, continuation lines joined."""
    section, commands, block = "", [], False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:]
        if line.startswith("```"):
            block = line.strip() == "```bash" and not block
            continue
        if block and line.strip() and not line.lstrip().startswith("#"):
            commands.append((section, line.strip()))
    return commands


def run_env(env: dict[str, str], line: str, overrides: dict[str, str]) -> dict[str, str]:
    """The environment after an `export` line, evaluated by bash as a user's shell would."""
    done = subprocess.run(
        ["bash", "-c", f"{line} && env -0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        check=True,
        timeout=30,
    )
    pairs = (item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
    return {**dict(pairs), **overrides}


@pytest.mark.slow
def test_local_emulator_md_commands(tmp_path: Path) -> None:
    """Every command of local_emulator.md runs, in order, and exits as the page says."""
    ports = {"8085": str(free_port()), "8080": str(free_port()), "8081": str(free_port())}
    trigger_url = f"http://127.0.0.1:{ports['8080']}"
    status_url = f"http://127.0.0.1:{ports['8081']}"
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    (fake_bin / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (fake_bin / "gcloud").chmod(0o755)
    scrub = ("SMART_RESUME_", "SENDGRID_", "AWS_", "FIRESTORE_", "GOOGLE_CLOUD_PROJECT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(scrub)}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    overrides = {"SMART_RESUME_OUTBOX": str(tmp_path / "outbox")}
    env.update(overrides)
    background: list[subprocess.Popen[bytes]] = []
    outputs: list[str] = []

    def status_running() -> bool:
        import requests

        headers = {"X-Webhook-Secret": env["SMART_RESUME_WEBHOOK_SECRET"]}
        with contextlib.suppress(requests.RequestException):
            return bool(requests.get(status_url, headers=headers, timeout=5).json()["running"])
        return False

    commands = doc_commands(ROOT / "local_emulator.md")
    assert len(commands) >= 25
    try:
        for section, original in commands:
            line = re.sub(r"\b(8085|8080|8081)\b", lambda m: ports[m.group(1)], original)
            command, _, comment = line.partition("   # ")
            expected = int(m.group(1)) if (m := re.search(r"exits (\d+)", comment)) else 0
            if section == "The deployed pair" and "FAKE_GCLOUD_LOG" not in env:
                env.update(
                    PATH=f"{fake_bin}{os.pathsep}{env['PATH']}",
                    FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.log"),
                    FAKE_TRIGGER_URL=trigger_url,
                    FAKE_STATUS_URL=status_url,
                    FAKE_SECRET=env["SMART_RESUME_WEBHOOK_SECRET"],
                )
            if command.startswith("make "):
                continue  # checked by test_docs; `make install` already ran to get here
            if command.startswith("kill "):
                continue  # the jobs are stopped below, by process group
            if command.startswith("export "):
                env = run_env(env, command, overrides)
                continue
            if command.endswith("&"):
                log = open(tmp_path / f"background-{len(background)}.log", "wb")  # noqa: SIM115
                background.append(
                    subprocess.Popen(
                        ["bash", "-c", command.rstrip("& ")],
                        cwd=ROOT,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
                continue
            if '"action": "cancel"' in command:
                deadline = time.monotonic() + 30
                while not status_running() and time.monotonic() < deadline:
                    time.sleep(0.2)
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            outputs.append(f"$ {command}\n{done.stdout}{done.stderr}")
            assert done.returncode == expected, "\n".join(outputs[-3:])
    finally:
        for proc in background:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    text = "\n".join(outputs)
    assert '"status":"cancelled"' in (tmp_path / "background-3.log").read_text().replace(" ", "")
    assert "status: completed" in text
    assert list((tmp_path / "outbox").glob("*.html"))
    calls = (tmp_path / "gcloud.log").read_text()
    assert "scheduler jobs run smart-resume" in calls
    assert "auth print-identity-token" in calls
    assert shlex.split(calls.splitlines()[0])[:2] == ["functions", "describe"]
