"""`make demo` end to end: scripts/demo.py starts its own emulator and functions, and stops them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_end_to_end() -> None:
    """The demo completes a run, shows the fresh skip, prints an existing report, cleans up."""
    scrub = ("SMART_RESUME_", "SENDGRID_", "AWS_", "FIRESTORE_", "GOOGLE_CLOUD_PROJECT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(scrub)}
    done = subprocess.run(
        [sys.executable, "scripts/demo.py", "--delay", "0.1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "status completed" in out
    assert re.search(r"clients\s+0\n\s+processed\s+0", out), out  # nothing due the 2nd time
    reports = re.findall(r"report \(outbox transport\): (\S+\.html)", out)
    assert reports and Path(reports[0]).exists(), out
    assert "Stopped the emulator and both functions" in out
    pids = re.findall(r"\.demo/(\w+)\.log", out)
    assert pids  # the logs are named; the processes themselves are gone:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    port = re.search(r"Firestore emulator on 127\.0\.0\.1:(\d+)", out)
    assert port and f"--port={port.group(1)}" not in ps.stdout


def test_the_export_line_holds_every_setting_the_functions_run_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--keep-running` prints an `export` line; a command line run in that shell must run
    with the functions' settings: heartbeat and lease included, every one of them."""
    import shlex

    import demo

    env = demo.demo_env("127.0.0.1:8123", tmp_path / "out box")
    demo.print_keep_running(
        env, {"smart_resume": "http://h:1", "smart_resume_status": "http://h:2"}
    )
    line = next(x for x in capsys.readouterr().out.splitlines() if "export " in x)
    exported = dict(w.split("=", 1) for w in shlex.split(line.strip())[1:])
    given = {
        k: v for k, v in env.items() if k.startswith(("SMART_RESUME_", "FIRESTORE_", "GOOGLE_"))
    }
    assert exported == given
    assert exported["SMART_RESUME_HEARTBEAT_SECONDS"] == "1"
    assert exported["SMART_RESUME_LEASE_SECONDS"] == "10"
    assert exported["SMART_RESUME_OUTBOX"] == str(tmp_path / "out box")
