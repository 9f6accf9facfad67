"""`python -m shared.resume`: each command, its exit code, and its --help."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

import pytest
from conftest import ROOT, seed_clients

from shared.lock import Lock
from shared.resume.cli import main

COMMANDS = ["run", "plan", "status", "cancel", "unlock", "seed-demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shared.resume", command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=60,
    )
    assert result.returncode == 0
    assert "usage:" in result.stdout


def test_usage_error_is_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2


def test_bad_configuration_is_exit_2(configure, capsys) -> None:
    configure(SMART_RESUME_LEASE_SECONDS="soon")
    assert main(["status"]) == 2
    assert "SMART_RESUME_LEASE_SECONDS" in capsys.readouterr().err


def test_seed_plan_run_status(db, capsys) -> None:
    """The demo end to end through the command line: seed, plan, run, run again."""
    assert main(["seed-demo", "--clients", "2", "--leads", "30"]) == 0
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "demo-01  score_leads" in out
    assert "never ran" in out
    assert main(["run"]) == 0
    assert "status: completed" in capsys.readouterr().out
    assert db.document("clients/demo-01").get().to_dict()["hotLeads"] >= 0
    assert main(["run", "--json"]) == 0
    assert '"clients": 0' in capsys.readouterr().out  # nothing due: nothing read
    assert main(["status"]) == 0
    assert "last run:" in capsys.readouterr().out


def test_unknown_operation_is_a_usage_error(capsys) -> None:
    assert main(["plan", "--operation", "nope"]) == 2
    assert "unknown operation" in capsys.readouterr().err


def test_locked_is_exit_3(db, settings, capsys) -> None:
    seed_clients(db, 1)
    Lock(db, settings).acquire("someone", {"host": "h"})
    assert main(["run"]) == 3
    assert main(["unlock"]) == 3
    assert main(["cancel"]) == 0
    assert main(["unlock", "--force"]) == 0
    assert main(["cancel"]) == 3


def test_partial_is_exit_4(db, configure, pipeline_file) -> None:
    pipeline_file('[[operation]]\nname = "w"\nkind = "python"\ntarget = "opfuncs:wait_for_stop"\n')
    configure(SMART_RESUME_TIME_BUDGET_SECONDS="0.3")
    seed_clients(db, 1)
    assert main(["run"]) == 4


def test_failed_is_exit_1(db, configure) -> None:
    configure(SMART_RESUME_MODULE="json")
    assert main(["run"]) == 1


SLOW_THEN_BOOM = """
[[operation]]
name = "slow"
kind = "python"
target = "opfuncs:ok"

[[operation]]
name = "flaky"
kind = "python"
target = "opfuncs:boom"
"""


def test_progress_lines_when_not_a_terminal(db, configure, pipeline_file, capsys) -> None:
    """Without a terminal, `run` prints a plain progress line every --progress-every seconds
    to standard error: clients done of due, failures so far, where it is; standard output
    keeps the answer alone."""
    import opfuncs

    pipeline_file(SLOW_THEN_BOOM)
    configure(SMART_RESUME_CONCURRENCY="1")
    ids = seed_clients(db, 4)
    opfuncs.BEHAVIOUR.update(delay=0.2, fail_for={ids[0]})
    code = main(["run", "--json", "--progress", "auto", "--progress-every", "0.1"])
    out, err = capsys.readouterr()
    assert code == 5  # completed, with one failed client-operation
    assert json.loads(out)["summary"]["failed"] == 1  # stdout: the answer only, no log lines
    lines = [line for line in err.splitlines() if line.startswith("progress: ")]
    pattern = r"progress: 0:00:\d\d (\d) of 4 clients done, (\d) operations? failed(; at .*)?"
    found = [re.fullmatch(pattern, line) for line in lines]
    # Until the due query's first page is read, the total is not known yet.
    before = [line for line, m in zip(lines, found, strict=True) if m is None]
    assert all(re.fullmatch(r"progress: 0:00:\d\d selecting the due clients", b) for b in before)
    assert any(found), err
    done = [int(m.group(1)) for m in found if m]
    assert done == sorted(done) and done[-1] >= 2
    assert any(
        m and m.group(2) == "1" and re.search(r"at c0000\d (slow|flaky)", m.group(3) or "")
        for m in found
    )
    assert "run started" in err  # log lines go to standard error too
    from shared.log import get_logger

    get_logger("test").info("after the command")  # and back to standard output after it
    assert "after the command" in capsys.readouterr().out


def test_progress_off_prints_nothing_but_the_answer(db, configure, pipeline_file, capsys) -> None:
    import opfuncs

    pipeline_file(SLOW_THEN_BOOM)
    seed_clients(db, 2)
    opfuncs.BEHAVIOUR.update(delay=0.2, fail_for=set())
    assert main(["run", "--progress", "off", "--progress-every", "0.1"]) == 0
    out, err = capsys.readouterr()
    assert "status: completed" in out
    assert "progress:" not in err


@pytest.mark.parametrize("every", ["0", "-1", "nan", "inf", "1e-6", "1e12"])
def test_bad_progress_interval_is_a_usage_error(every, capsys) -> None:
    assert main(["run", "--progress-every", every]) == 2
    assert "--progress-every must be from 0.1 to 86400 seconds" in capsys.readouterr().err


class _BreakingTerminal(io.StringIO):
    """A terminal whose writes fail with EPIPE after the first few (the reader went away)."""

    def __init__(self, good_writes: int) -> None:
        super().__init__()
        self.left = good_writes

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.left -= 1
        if self.left < 0:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


@pytest.mark.parametrize("mode", ["bar", "lines"])
def test_a_broken_terminal_never_breaks_the_run(db, configure, pipeline_file, monkeypatch, mode):
    """The display's writes fail mid-run: the run still completes, is recorded and released,
    and the command returns (a tqdm lock once stayed held and hung every log line)."""
    import threading

    import opfuncs

    pipeline_file(SLOW_THEN_BOOM.replace("opfuncs:boom", "opfuncs:ok"))
    configure(SMART_RESUME_CONCURRENCY="1")
    seed_clients(db, 3)
    opfuncs.BEHAVIOUR.update(delay=0.3)
    terminal = _BreakingTerminal(good_writes=3)
    monkeypatch.setattr(sys, "stderr", terminal)
    box: dict = {}
    args = ["run", "--progress", mode, "--progress-every", "0.1"]
    worker = threading.Thread(target=lambda: box.update(code=main(args)), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the command hung on a broken terminal"
    assert box["code"] == 0
    assert sys.stderr is terminal  # put back as it was
    runs = [r.to_dict()["status"] for r in db.collection("runs").stream()]
    assert runs == ["completed"]
    assert db.document("locks/smart-resume").get().to_dict()["held"] is False


def test_progress_bar_on_a_terminal(db, tmp_path) -> None:
    """On a terminal (a real pseudo-terminal here), `run` draws a live tqdm bar: clients done
    of due, then the answer."""
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text(SLOW_THEN_BOOM.replace("opfuncs:boom", "opfuncs:ok"))
    seed_clients(db, 3)
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        "SMART_RESUME_PIPELINE": str(pipeline),
    }
    main_fd, child_fd = pty.openpty()
    # A terminal of 30 rows and 120 columns, as a real one reports.
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.resume", "run"],
        cwd=ROOT,
        env=env,
        stdin=child_fd,
        stdout=child_fd,
        stderr=child_fd,
    )
    os.close(child_fd)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main_fd)
    assert proc.wait(timeout=60) == 0
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert "3/3 clients |" in screen, screen
    assert "status: completed" in screen
    assert "progress: " not in screen  # a bar, not lines


def test_the_functions_never_import_the_progress_bar() -> None:
    """tqdm is for the command line: importing either function and the run path leaves it
    out, so cold starts do not pay for it."""
    code = (
        "import sys; sys.path[:0] = ['functions/smart_resume', '.'];"
        "import main, shared.runner, shared.resume.engine, shared.resume.cli;"
        "assert 'tqdm' not in sys.modules, 'tqdm imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_status_shows_clients_done_and_failed_during_a_run(db, configure, pipeline_file, capsys):
    """The counts the progress bar shows are on the lock too: `status` prints them mid-run."""
    import threading

    import opfuncs

    pipeline_file(
        '[[operation]]\nname = "first"\nkind = "python"\ntarget = "opfuncs:boom"\n'
        '[[operation]]\nname = "second"\nkind = "python"\ntarget = "opfuncs:gate"\n'
    )
    configure(SMART_RESUME_CONCURRENCY="1", SMART_RESUME_HEARTBEAT_SECONDS="0.2")
    seed_clients(db, 2)
    opfuncs.BEHAVIOUR.update(
        fail_for={"c00000"}, entered=threading.Event(), release=threading.Event()
    )
    worker = threading.Thread(target=main, args=(["run", "--progress", "off"],))
    worker.start()
    try:
        assert opfuncs.BEHAVIOUR["entered"].wait(10)  # c00000 failed; c00001 waits in `second`
        deadline = time.monotonic() + 10
        wanted = {"clientId": "c00001", "operation": "second", "clientsDone": 1, "failed": 1}
        while True:  # a beat stores the progress: wait for the one after `second` started
            progress = (db.document("locks/smart-resume").get().to_dict() or {}).get("progress")
            if wanted.items() <= (progress or {}).items():
                break
            assert time.monotonic() < deadline, f"the heartbeat never stored {wanted}"
            time.sleep(0.05)
        capsys.readouterr()
        assert main(["status"]) == 0
        out = capsys.readouterr().out
    finally:
        opfuncs.BEHAVIOUR["release"].set()
        worker.join(30)
    assert "at client c00001 (2 of 2), operation second" in out
    assert "clients done: 1, client-operations failed so far: 1" in out


def test_cancel_and_retry_print_text_or_json(db, settings, capsys) -> None:
    """Every command answers in words by default and in JSON with --json."""
    seed_clients(db, 1)
    assert main(["cancel"]) == 3
    assert capsys.readouterr().out == "nothing is running\n"
    assert main(["cancel", "--json"]) == 3
    assert json.loads(capsys.readouterr().out) == {"status": "not running"}
    Lock(db, settings).acquire("someone", {"host": "h"})
    assert main(["cancel", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"status": "cancel requested", "runId": "someone"}
    assert main(["retry", "c00000"]) == 0
    assert "nothing to release: no operation of c00000 is failing" in capsys.readouterr().out
    assert main(["retry", "c00000", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer == {"status": "released", "clientId": "c00000", "operations": []}


class TestUserMistakes:
    """A user's mistake is one line on standard error, never a traceback."""

    def test_plan_with_a_module_that_cannot_load_is_one_line(self, db, configure, capsys):
        """`plan` fails the way `run` does when SMART_RESUME_MODULE cannot be imported
        (it raised `KeyError: 'plan'` before)."""
        configure(SMART_RESUME_MODULE="mymod.nope")
        assert main(["plan"]) == 1
        captured = capsys.readouterr()
        assert captured.err.strip().splitlines() == [
            "error: cannot import mymod.nope: ModuleNotFoundError: No module named 'mymod'"
        ]
        assert captured.out == ""
        assert main(["plan", "--json"]) == 1
        assert json.loads(capsys.readouterr().out)["status"] == "failed"

    def test_plan_for_an_unknown_client_is_a_usage_error(self, db, capsys) -> None:
        """`plan --client` with an id that names no client says so."""
        seed_clients(db, 1)
        assert main(["plan", "--client", "nope-1"]) == 2
        assert capsys.readouterr().err.strip() == "error: unknown client nope-1"

    def test_an_unknown_setting_is_warned_about_with_the_closest_name(self, configure, capsys):
        """`SMART_RESUME_CONCURENCY=4` is not silently ignored: the closest known name is
        given on standard error, and the command still runs."""
        configure(SMART_RESUME_CONCURENCY="4")
        assert main(["status"]) == 0
        captured = capsys.readouterr()
        assert (
            "warning: SMART_RESUME_CONCURENCY is not a smart-resume setting and is ignored; "
            "did you mean SMART_RESUME_CONCURRENCY?"
        ) in captured.err
        assert "CONCURENCY" not in captured.out


@pytest.mark.parametrize("command", [["plan"], ["status", "--runs", "5"]])
def test_a_closed_pipe_is_quiet(db, command) -> None:
    """`plan | head` and `status | head`: the reader has gone before the answer is written;
    no BrokenPipeError, no traceback, and the command's own exit code."""
    seed_clients(db, 300)
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.resume", *command],
        cwd=ROOT,
        env=os.environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # like `head` that has read its lines and left
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert "Exception ignored" not in err, err


def test_a_closed_pipe_keeps_the_runs_exit_code(db, configure) -> None:
    """A run whose answer finds no reader still exits with the run's own code (1: failed)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.resume", "run"],
        cwd=ROOT,
        env={**os.environ, "SMART_RESUME_MODULE": "json"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
