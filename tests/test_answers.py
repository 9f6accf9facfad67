"""Clearer answers (issue: what a new user trips on): refusals named and logged, and a run
called `cancelled` only when the cancel stopped something."""

from __future__ import annotations

import json

import opfuncs
import pytest
from conftest import ROOT, seed_clients
from functions_framework import create_app

from shared.resume.plan import RunOptions
from shared.runner import start_run

SECRET = {"X-Webhook-Secret": "test-secret-1"}
PIPELINE = '[[operation]]\nname = "first"\nkind = "python"\ntarget = "opfuncs:ok"\n'


@pytest.fixture(autouse=True)
def _reset_ops():
    opfuncs.reset()
    yield
    opfuncs.reset()


@pytest.fixture
def trigger(pipeline_file):
    pipeline_file(PIPELINE)
    source = str(ROOT / "functions" / "smart_resume" / "main.py")
    return create_app(target="smart_resume", source=source).test_client()


class TestRefusals:
    def test_misspelt_field_is_named(self, trigger) -> None:
        response = trigger.post("/", data=json.dumps({"dryrun": True}), headers=SECRET)
        assert response.status_code == 400
        assert "unknown field 'dryrun'" in response.get_json()["detail"]

    def test_hostile_field_is_counted_not_named(self, trigger) -> None:
        body = json.dumps({"<img src=x>": 1, "dryrun": 1})
        detail = trigger.post("/", data=body, headers=SECRET).get_json()["detail"]
        assert "'dryrun'" in detail and "1 other unknown field(s)" in detail
        assert "<img" not in detail

    def test_every_400_leaves_a_warning_line(self, trigger, capsys) -> None:
        trigger.post("/", data="{not json", headers=SECRET)
        out = capsys.readouterr().out
        assert "WARNING" in out and "refused request (400): body is not valid JSON" in out
        assert "{not json" not in out


def test_cancel_that_stopped_nothing_is_completed(db, configure, pipeline_file):
    """A cancel that arrives while the last operation finishes stopped nothing: the run did
    everything, so it is `completed`, not `cancelled`."""
    pipeline_file(PIPELINE.replace("opfuncs:ok", "opfuncs:cancel_then_finish"))
    settings = configure(SMART_RESUME_HEARTBEAT_SECONDS="0.1", SMART_RESUME_LEASE_SECONDS="5")
    seed_clients(db, 1)
    out = start_run(settings, db, RunOptions(), trigger={"source": "test"})
    assert out.body["summary"]["processed"] == 1
    assert out.status == "completed"


def test_make_lint_leaves_the_users_own_packages_alone(tmp_path) -> None:
    """A package of the user's own operations beside shared/ is theirs to format."""
    import shutil
    import subprocess

    own = ROOT / "my_operations_pkg_for_test"
    own.mkdir()
    try:
        (own / "ops.py").write_text("def f( x ):\n  return x\n")  # not ruff-formatted
        done = subprocess.run(
            ["make", "-s", "lint"], cwd=ROOT, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        shutil.rmtree(own)
