"""`make demo`: the whole job on this machine, from nothing to a report, then tidy up.

Starts the Firestore emulator and both functions (each in its own process group), seeds the
demo clients, triggers a run over HTTP with the webhook secret while watching the status
function, prints the summary and the report's path, triggers again to show that nothing is due (so
nothing is read), prints the plan and how to open the console (the status function's page for a
browser), and stops everything it started, also on Ctrl-C or an error; `--keep-running` leaves
it all up instead. Needs gcloud (with the Firestore emulator), Java and this repository's .venv.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _client
import firestore_emulator
from firestore_emulator import free_port

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".demo"
PROJECT = "smart-resume-demo"
SECRET = "demo-secret-0123456789"
FUNCTIONS = ("smart_resume", "smart_resume_status")
SCRUB = ("SMART_RESUME_", "SENDGRID_", "AWS_", "K_SERVICE", "GCLOUD_PROJECT")


class DemoError(Exception):
    """A step failed; the message says which and where its log is."""


def emulator_command(port: int) -> list[str]:
    try:
        return firestore_emulator.command(port)
    except firestore_emulator.ToolMissing as exc:
        raise DemoError(str(exc)) from None


def functions_framework() -> str:
    local = Path(sys.executable).parent / "functions-framework"
    found = str(local) if local.exists() else shutil.which("functions-framework")
    if not found:
        raise DemoError("functions-framework is not installed: run `make install` first")
    return found


class Services:
    """The processes the demo started, each in its own group, stopped together."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        STATE.mkdir(exist_ok=True)
        log_path = STATE / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append((name, proc, log_path))

    def check(self) -> None:
        for name, proc, log_path in self.procs:
            if proc.poll() is not None:
                raise DemoError(f"{name} exited with {proc.returncode}; see {log_path}")

    def wait_http(self, url: str, ready: Any, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            with contextlib.suppress(requests.RequestException):
                if ready(requests.get(url, timeout=1)):
                    return
            time.sleep(0.1)
        raise DemoError(f"{what} did not answer within {timeout:.0f}s; see {STATE}/")

    def stop(self) -> None:
        for _, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for _, proc, _ in reversed(self.procs):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.procs.clear()


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def demo_settings(emulator_host: str, outbox: Path) -> dict[str, str]:
    """Every setting the demo's functions run with: what `--keep-running` exports too, so
    that a command line run in that shell behaves as the functions do."""
    return {
        "FIRESTORE_EMULATOR_HOST": emulator_host,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "SMART_RESUME_WEBHOOK_SECRET": SECRET,
        "SMART_RESUME_EMAIL_TRANSPORT": "outbox",
        "SMART_RESUME_OUTBOX": str(outbox),
        "SMART_RESUME_HEARTBEAT_SECONDS": "1",
        "SMART_RESUME_LEASE_SECONDS": "10",
        "SMART_RESUME_LOG_FORMAT": "text",
    }


def demo_env(emulator_host: str, outbox: Path) -> dict[str, str]:
    """The caller's environment without any smart-resume settings, plus the demo's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUB)}
    env.update(demo_settings(emulator_host, outbox))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def export_line(env: dict[str, str]) -> str:
    """`export ...` of every demo setting in `env` (shell-quoted)."""
    names = demo_settings("", Path())
    return "export " + " ".join(f"{k}={shlex.quote(env[k])}" for k in names if k in env)


def cli(env: dict[str, str], *args: str) -> str:
    """`python -m shared.resume ARGS` with the demo's environment; its output."""
    done = subprocess.run(
        [sys.executable, "-m", "shared.resume", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        raise DemoError(
            f"python -m shared.resume {' '.join(args)} exited {done.returncode}:\n"
            f"{done.stdout}{done.stderr}"
        )
    return done.stdout


def watch_run(
    trigger: _client.Endpoint, status: _client.Endpoint, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """Trigger in a thread (it answers when the run ends) and print the status meanwhile."""
    answer: dict[str, Any] = {}

    def call() -> None:
        try:
            answer["result"] = trigger.call("POST", body, timeout=600)
        except _client.Unreachable as exc:
            answer["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    last = ""
    while thread.is_alive():
        code, snap = status.call("GET")
        if code == 200 and snap.get("running"):
            line = _client.progress_line(snap)
            # The line holds the run's age and heartbeat age, so this prints about twice a
            # second while running, and nothing twice.
            if line != last:
                print(f"  {line}", flush=True)
                last = line
        thread.join(timeout=0.5)
    if "error" in answer:
        raise DemoError(str(answer["error"]))
    return answer["result"]  # type: ignore[no-any-return]


def print_summary(http_status: int, body: dict[str, Any]) -> None:
    print(f"  HTTP {http_status}: status {body.get('status')}, run {body.get('runId')}")
    summary = body.get("summary") or {}
    for key in ("clients", "processed", "skipped", "failed", "deferred"):
        if key in summary:
            print(f"    {key:<10} {summary[key]}")
    print(f"    {'impact':<10} {_client.impact_text(summary.get('impact')) or '-'}")
    if "durationSeconds" in summary:
        print(f"    {'duration':<10} {summary['durationSeconds']}s")
    if body.get("error"):
        print(f"    error: {body['error']}")


def run_demo(args: argparse.Namespace, services: Services) -> int:
    outbox = ROOT / "outbox"
    ports = {
        "emulator": free_port(),
        "smart_resume": args.port or free_port(),
        "smart_resume_status": (args.port + 1) if args.port else free_port(),
    }
    emulator_host = f"127.0.0.1:{ports['emulator']}"

    step(f"Starting the Firestore emulator on {emulator_host}")
    services.start("firestore-emulator", emulator_command(ports["emulator"]), dict(os.environ))
    services.wait_http(
        f"http://{emulator_host}/", lambda r: r.text.strip() == "Ok", "the Firestore emulator"
    )
    env = demo_env(emulator_host, outbox)

    step("Starting both functions with functions-framework (from the repository root)")
    ff = functions_framework()
    urls = {}
    for name in FUNCTIONS:
        port = ports[name]
        command = [ff, "--source", f"functions/{name}/main.py", "--target", name]
        services.start(name, [*command, "--host", "127.0.0.1", "--port", str(port)], env)
        urls[name] = f"http://127.0.0.1:{port}"
        print(f"  {name:<20} {urls[name]}   (log: .demo/{name}.log)")
    for name in FUNCTIONS:
        services.wait_http(urls[name], lambda r: True, name)

    step(f"Seeding the demo data: python -m shared.resume seed-demo --delay {args.delay:g}")
    print("  " + cli(env, "seed-demo", "--delay", str(args.delay)).strip())

    headers = {"X-Webhook-Secret": SECRET}
    trigger = _client.Endpoint(urls["smart_resume"], headers)
    status = _client.Endpoint(urls["smart_resume_status"], headers)

    step("Triggering a run (POST with X-Webhook-Secret) and watching the status function")
    http_status, first = watch_run(trigger, status, {})
    print_summary(http_status, first)
    if first.get("status") != "completed":
        raise DemoError(f"the first run ended {first.get('status')}; see .demo/smart_resume.log")
    report = outbox / f"{first['runId']}.html"
    print(f"  report (outbox transport): {report}")
    if not report.exists():
        raise DemoError(f"the report {report} was not written; see .demo/smart_resume.log")

    step("Triggering again: everything succeeded within fresh_hours, so nothing is due or read")
    http_status, second = watch_run(trigger, status, {})
    print_summary(http_status, second)
    summary = second.get("summary") or {}
    if second.get("status") != "completed" or summary.get("processed"):
        raise DemoError(f"the second run found work although nothing was due: {second}")

    step("What the next run would do: python -m shared.resume plan")
    print("  " + cli(env, "plan").strip().replace("\n", "\n  "))

    step("Status: python -m shared.resume status")
    print("  " + cli(env, "status").strip().replace("\n", "\n  "))

    print(f"\nDone. Open the report: {report}")
    if args.keep_running:
        print_keep_running(env, urls)
        try:
            while True:
                services.check()
                time.sleep(1)
        except KeyboardInterrupt:
            print("\nstopping")
    else:
        print(
            "The console (runs, progress, clients, in a browser): `.venv/bin/python "
            "scripts/demo.py --keep-running` keeps everything up and prints its URL"
        )
    return 0


def print_keep_running(env: dict[str, str], urls: dict[str, str]) -> None:
    trigger_port = urls["smart_resume"].rsplit(":", 1)[1]
    status_port = urls["smart_resume_status"].rsplit(":", 1)[1]
    print(f"\nThe console: open {urls['smart_resume_status']}/ in a browser (secret {SECRET}).")
    print("The services keep running (Ctrl-C stops them). In another shell:")
    print("  " + export_line(env))
    print(f"  .venv/bin/python scripts/trigger.py --local {trigger_port}")
    print(f"  .venv/bin/python scripts/watch.py --local {status_port}")
    print(
        f"  .venv/bin/python scripts/e2e_check.py --local {trigger_port} "
        f"--status-local {status_port}"
    )
    print("  .venv/bin/python -m shared.resume status")
    header = '-H "X-Webhook-Secret: $SMART_RESUME_WEBHOOK_SECRET"'
    print(f"  curl -sS {header} {urls['smart_resume_status']}")
    print("See local_emulator.md for more.")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo.py",
        description="The main job locally: emulator, both functions, demo data, a real run, the "
        "report; then everything it started is stopped.",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the services up afterwards and print how to use them (Ctrl-C stops them)",
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=0.3,
        metavar="S",
        help="demo seconds per chunk of leads, so the run can be watched (0.3)",
    )
    parser.add_argument(
        "--port",
        type=int,
        metavar="P",
        help="trigger on port P and status on P+1 (default: free ports)",
    )
    args = parser.parse_args()
    os.chdir(ROOT)
    services = Services()
    # SIGTERM (e.g. from a test's timeout) ends the demo like Ctrl-C, through the cleanup.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run_demo(args, services)
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    except _client.Unreachable as exc:
        print(f"\ndemo failed: {exc}; see {STATE}/", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        stopping = bool(services.procs)
        services.stop()
        if stopping:
            print("Stopped the emulator and both functions.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
