"""`python -m shared.resume`: each command, its exit code, and its --help."""

from __future__ import annotations

import os
import subprocess
import sys

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
