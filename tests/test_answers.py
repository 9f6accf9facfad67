"""Clearer answers (issue: what a new user trips on): refusals named and logged, and a run
called `cancelled` only when the cancel stopped something."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, seed_clients
from functions_framework import create_app

from shared.resume.plan import RunOptions
from shared.runner import start_run

SECRET = {"X-Webhook-Secret": "test-secret-1-0123456"}
PIPELINE = '[[operation]]\nname = "first"\nkind = "python"\ntarget = "opfuncs:ok"\n'


@pytest.fixture
def trigger(pipeline_file):
    pipeline_file(PIPELINE)
    source = str(ROOT / "functions" / "smart_resume" / "main.py")
    return create_app(target="smart_resume", source=source).test_client()


@pytest.fixture
def status_app(pipeline_file):
    pipeline_file(PIPELINE)
    source = str(ROOT / "functions" / "smart_resume_status" / "main.py")
    return create_app(target="smart_resume_status", source=source).test_client()


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

    def test_misspelt_query_parameter_is_named(self, status_app) -> None:
        """`?run=3` was once ignored (the default 5 runs came back as if asked for)."""
        response = status_app.get("/?run=3", headers=SECRET)
        assert response.status_code == 400
        detail = response.get_json()["detail"]
        assert "unknown query parameter 'run'" in detail and "runs" in detail
        assert status_app.get("/?runs=3", headers=SECRET).status_code == 200
        response = status_app.get("/?clients=5&runs=2", headers=SECRET)
        assert response.status_code == 400  # the client grid reads only clients and after
        assert "'runs'" in response.get_json()["detail"]

    def test_trigger_refuses_query_parameters(self, trigger, db) -> None:
        """Options go in the body: `?dryRun=1` must not start a real run."""
        seed_clients(db, 1)
        response = trigger.post("/?dryRun=1", headers=SECRET)
        assert response.status_code == 400
        assert "unknown query parameter 'dryRun'" in response.get_json()["detail"]
        assert not db.document("locks/smart-resume").get().exists  # nothing ran

    def test_both_functions_word_an_unknown_field_alike(self, trigger, status_app) -> None:
        run = trigger.post("/", data=json.dumps({"dryrun": 1}), headers=SECRET)
        act = status_app.post("/", data=json.dumps({"acton": "cancel"}), headers=SECRET)
        assert run.get_json()["detail"].startswith("unknown field 'dryrun'; allowed: ")
        assert act.get_json()["detail"].startswith("unknown field 'acton'; allowed: ")

    def test_unknown_operation_names_are_named_bounded(self, trigger) -> None:
        """`'operations' has 1 unknown name(s)` says which (it did not) when it is a
        misspelling of a known one; any other name is input, counted and never echoed; a long
        list names at most a few."""
        body = json.dumps({"operations": ["frist"], "dryRun": True})
        detail = trigger.post("/", data=body, headers=SECRET).get_json()["detail"]
        assert detail == (
            "'operations' has 1 unknown name(s): 'frist' (did you mean 'first'?); known: first"
        )
        names = ["<img src=x>", "zq7echo", *(f"firs{i}" for i in range(10))]
        body = json.dumps({"operations": names, "dryRun": True})
        detail = trigger.post("/", data=body, headers=SECRET).get_json()["detail"]
        assert detail.startswith("'operations' has 12 unknown name(s): 'firs0' (did you mean")
        assert "'firs4' (did you mean 'first'?) and 7 others not shown; known: first" in detail
        assert "<img" not in detail and "zq7echo" not in detail

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


class TestClearerRunAnswers:
    def test_unknown_client_is_404_and_not_echoed(self, trigger, db) -> None:
        for body in ({"clientId": "nope-123"}, {"clientId": "nope-123", "dryRun": True}):
            response = trigger.post("/", data=json.dumps(body), headers=SECRET)
            assert response.status_code == 404
            assert response.get_json() == {"status": "not found", "error": "unknown client"}
        assert not db.document("locks/smart-resume").get().exists  # no lock, no run record

    def test_inactive_client_is_named_in_run_and_plan(self, trigger, db) -> None:
        db.document("clients/sleepy").set({"name": "Sleepy", "active": False})
        run = trigger.post("/", data=json.dumps({"clientId": "sleepy"}), headers=SECRET)
        assert run.status_code == 200 and "inactive" in run.get_json()["detail"]
        body = {"clientId": "sleepy", "dryRun": True}
        plan = trigger.post("/", data=json.dumps(body), headers=SECRET).get_json()
        assert plan["plan"] == [] and "inactive" in plan["detail"]

    def test_dry_run_fails_like_the_run_when_the_module_cannot_load(
        self, trigger, configure
    ) -> None:
        configure(SMART_RESUME_MODULE="no_such_module_here")
        body = json.dumps({"dryRun": True})
        response = trigger.post("/", data=body, headers=SECRET)
        assert response.status_code == 500
        assert "cannot import no_such_module_here" in response.get_json()["error"]

    def test_409_says_heartbeat_age_and_when_it_goes_stale(self, trigger, db, settings) -> None:
        from shared.lock import Lock

        Lock(db, settings).acquire("other-run", {"host": "h"})
        body = trigger.post("/", headers=SECRET).get_json()
        assert body["status"] == "locked"
        assert 0 <= body["heartbeatAgeSeconds"] < 5
        assert settings.lease_seconds - 5 < body["staleInSeconds"] <= settings.lease_seconds

    def test_broken_pipeline_answer_names_the_file_relative_to_the_code(
        self, configure, db
    ) -> None:
        configure(SMART_RESUME_PIPELINE="examples/does-not-exist.toml")
        source = str(ROOT / "functions" / "smart_resume" / "main.py")
        app = create_app(target="smart_resume", source=source).test_client()
        error = app.post("/", data=json.dumps({"dryRun": True}), headers=SECRET).get_json()
        assert "examples/does-not-exist.toml: pipeline file not found" in error["error"]
        assert str(ROOT) not in json.dumps(error)


def test_idle_status_reports_no_heartbeat_age(db, configure, pipeline_file) -> None:
    from shared import status

    pipeline_file(PIPELINE)
    settings = configure()
    seed_clients(db, 1)
    start_run(settings, db, RunOptions(), trigger={"source": "test"})
    body = status.snapshot(settings, db)
    assert body["running"] is False
    assert body["heartbeatAgeSeconds"] is None and body["lastHeartbeatAt"] is None
