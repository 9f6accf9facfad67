"""The trigger function through `create_app`: every status in docs/reference.md."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, seed_clients
from functions_framework import create_app

SOURCE = str(ROOT / "functions" / "smart_resume" / "main.py")
SECRET = {"X-Webhook-Secret": "test-secret-1-0123456"}
PIPELINE = """
[[operation]]
name = "first"
kind = "python"
target = "opfuncs:ok"
[[operation]]
name = "second"
kind = "python"
target = "opfuncs:ok"
"""


@pytest.fixture
def trigger(pipeline_file):
    pipeline_file(PIPELINE)
    return create_app(target="smart_resume", source=SOURCE).test_client()


def post(client, body=None, headers=None, **kw):
    data = body if isinstance(body, str | bytes) or body is None else json.dumps(body)
    return client.post("/", data=data, headers={**SECRET, **(headers or {})}, **kw)


class TestAdmission:
    @pytest.mark.parametrize("method", ["get", "put", "delete", "patch"])
    def test_only_post(self, trigger, method) -> None:
        response = getattr(trigger, method)("/", headers=SECRET)
        assert response.status_code == 405
        assert response.headers["Allow"] == "POST"

    def test_missing_secret_is_401(self, trigger) -> None:
        response = trigger.post("/")
        assert response.status_code == 401
        assert response.get_json() == {"error": "unauthorized"}

    def test_wrong_secret_is_401_and_logged_without_the_secret(self, trigger, capsys) -> None:
        response = post(trigger, headers={"X-Webhook-Secret": "guess-123"})
        assert response.status_code == 401
        out = capsys.readouterr().out
        assert "rejected request" in out
        assert "guess-123" not in out

    def test_secret_in_query_string_is_not_accepted(self, trigger) -> None:
        assert trigger.post("/?X-Webhook-Secret=test-secret-1-0123456").status_code == 401
        assert trigger.post("/?secret=test-secret-1-0123456").status_code == 401

    def test_both_rotated_secrets_work(self, trigger, db) -> None:
        """During rotation the old and the new secret are both accepted."""
        for secret in ("test-secret-1-0123456", "test-secret-2-0123456"):
            response = post(trigger, {"dryRun": True}, headers={"X-Webhook-Secret": secret})
            assert response.status_code == 200

    def test_no_secret_configured_fails_closed(self, configure, pipeline_file) -> None:
        pipeline_file(PIPELINE)
        configure(SMART_RESUME_WEBHOOK_SECRET="")
        client = create_app(target="smart_resume", source=SOURCE).test_client()
        response = post(client)
        assert response.status_code == 500
        assert response.get_json() == {"error": "server misconfigured"}

    def test_bad_setting_is_500_misconfigured(self, trigger, configure) -> None:
        configure(SMART_RESUME_CONCURRENCY="lots")
        response = post(trigger)
        assert response.status_code == 500
        assert response.get_json() == {"error": "server misconfigured"}

    def test_method_is_checked_before_configuration(self, trigger, configure) -> None:
        configure(SMART_RESUME_CONCURRENCY="lots")
        assert trigger.get("/").status_code == 405


class TestBody:
    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ("{not json", "not valid JSON"),
            ("[1, 2]", "JSON object"),
            ({"clientid": "x"}, "unknown field"),
            ({"clientId": 5}, "'clientId'"),
            ({"operations": "first"}, "'operations'"),
            ({"operations": ["nope"]}, "'operations'"),
            ({"operations": [1]}, "'operations'"),
            ({"dryRun": "yes"}, "'dryRun'"),
            ({"stream": "2"}, "'stream'"),
            ({"stream": True}, "'stream'"),
            ({"stream": -1}, "'stream'"),
        ],
    )
    def test_invalid_body_is_400_naming_the_field(self, trigger, body, field) -> None:
        response = post(trigger, body, content_type="application/json")
        assert response.status_code == 400
        payload = response.get_json()
        assert payload["error"] == "invalid request"
        assert field in payload["detail"]

    def test_huge_body_is_413(self, trigger) -> None:
        response = post(trigger, json.dumps({"clientId": "x" * 70_000}))
        assert response.status_code == 413

    def test_secret_is_checked_before_the_body(self, trigger) -> None:
        assert trigger.post("/", data="{not json").status_code == 401


class TestRuns:
    def test_completed_run(self, trigger, db) -> None:
        seed_clients(db, 2)
        response = post(trigger)
        assert response.status_code == 200
        body = response.get_json()
        assert body["status"] == "completed"
        summary = body["summary"]
        for key in ("clients", "processed", "skipped", "failed", "deferred", "durationSeconds"):
            assert key in summary
        assert (summary["clients"], summary["processed"]) == (2, 4)
        assert summary["impact"] == {"items": 8}
        record = db.document(f"runs/{body['runId']}").get().to_dict()
        assert record["status"] == "completed"
        assert record["report"]["status"] == "sent"
        assert db.document("locks/smart-resume").get().to_dict()["held"] is False

    def test_dry_run_plans_and_writes_nothing(self, trigger, db) -> None:
        seed_clients(db, 1)
        response = post(trigger, {"dryRun": True})
        body = response.get_json()
        assert response.status_code == 200
        assert body["status"] == "planned"
        assert body["plan"][0]["operations"][0] == {
            "operation": "first",
            "decision": "run",
            "reason": "never ran",
        }
        assert not list(db.collection("runs").stream())
        assert not db.document("locks/smart-resume").get().exists

    def test_locked_is_409(self, trigger, db, settings) -> None:
        from shared.lock import Lock

        Lock(db, settings).acquire("other-run", {"host": "h"})
        response = post(trigger)
        assert response.status_code == 409
        body = response.get_json()
        assert body["status"] == "locked"
        assert body["runId"] == "other-run"
        assert body["ageSeconds"] >= 0

    def test_duplicate_schedule_delivery_runs_nothing(self, trigger, db) -> None:
        seed_clients(db, 1)
        tick = {"X-CloudScheduler-ScheduleTime": "2026-11-28T06:00:00Z"}
        first = post(trigger, headers=tick).get_json()
        again = post(trigger, headers=tick)
        assert again.status_code == 200
        assert again.get_json() == {"status": "duplicate", "runId": first["runId"]}
        assert len(list(db.collection("runs").stream())) == 1
        other_tick = {"X-CloudScheduler-ScheduleTime": "2026-11-28T09:00:00Z"}
        assert post(trigger, headers=other_tick).get_json()["status"] == "completed"

    def test_same_tick_of_another_job_is_not_a_duplicate(self, trigger, db) -> None:
        seed_clients(db, 1)
        tick = "2026-11-28T06:00:00Z"
        a = {"X-CloudScheduler-ScheduleTime": tick, "X-CloudScheduler-JobName": "job-a"}
        b = {"X-CloudScheduler-ScheduleTime": tick, "X-CloudScheduler-JobName": "job-b"}
        assert post(trigger, headers=a).get_json()["status"] == "completed"
        assert post(trigger, headers=a).get_json()["status"] == "duplicate"
        assert post(trigger, headers=b).get_json()["status"] == "completed"

    def test_failed_run_of_a_tick_may_be_retried(self, trigger, db, configure) -> None:
        tick = {"X-CloudScheduler-ScheduleTime": "2026-11-28T06:00:00Z"}
        configure(SMART_RESUME_MODULE="json")
        assert post(trigger, headers=tick).status_code == 500
        configure(SMART_RESUME_MODULE="shared.resume")
        assert post(trigger, headers=tick).get_json()["status"] == "completed"

    @pytest.mark.parametrize(
        ("module", "message"),
        [("json", "does not export a callable run_smart_resume"), ("no_such_mod", "cannot import")],
    )
    def test_module_load_failure_is_500_with_report_and_no_lock(
        self, trigger, db, configure, module, message
    ) -> None:
        configure(SMART_RESUME_MODULE=module)
        response = post(trigger)
        assert response.status_code == 500
        body = response.get_json()
        assert body["status"] == "failed"
        assert message in body["error"]
        assert "Traceback" not in response.get_data(as_text=True)
        record = db.document(f"runs/{body['runId']}").get().to_dict()
        assert record["status"] == "failed"
        assert record["report"]["status"] == "sent"
        lock = db.document("locks/smart-resume").get()
        assert not lock.exists or lock.to_dict()["held"] is False

    def test_broken_pipeline_is_a_failed_run_with_a_report(
        self, trigger, db, pipeline_file
    ) -> None:
        """A pipeline that does not load fails the run (recorded, reported), takes no lock."""
        path = pipeline_file('[[operation]]\nname = "a"\nkind = "ftp"\n')
        response = post(trigger, {"operations": ["a"]})
        assert response.status_code == 500
        body = response.get_json()
        assert body["status"] == "failed"
        assert str(path) in body["error"]
        assert "field 'kind'" in body["error"]
        record = db.document(f"runs/{body['runId']}").get().to_dict()
        assert (record["status"], record["report"]["status"]) == ("failed", "sent")
        assert not db.document("locks/smart-resume").get().exists
        dry = post(trigger, {"dryRun": True})
        assert dry.status_code == 500
        assert "field 'kind'" in dry.get_json()["error"]

    def test_custom_module_and_reload(self, trigger, db, configure, tmp_path, monkeypatch) -> None:
        """SMART_RESUME_RELOAD_MODULE=1 picks up a changed module without a restart."""
        monkeypatch.syspath_prepend(str(tmp_path))
        module = tmp_path / "my_resume.py"
        template = (
            "from shared.resume.engine import RunResult, summarize\n"
            "def run_smart_resume(run):\n"
            "    s = summarize([], 0, 0.0); s['impact'] = {{'version': {v}}}\n"
            "    return RunResult('completed', s, [])\n"
        )
        module.write_text(template.format(v=1))
        configure(SMART_RESUME_MODULE="my_resume", SMART_RESUME_RELOAD_MODULE="1")
        assert post(trigger).get_json()["summary"]["impact"] == {"version": 1}
        module.write_text(template.format(v=2) + "\n# changed\n")
        assert post(trigger).get_json()["summary"]["impact"] == {"version": 2}

    def test_resume_module_raising_is_a_failed_run_and_releases(
        self, trigger, db, configure, tmp_path, monkeypatch
    ) -> None:
        monkeypatch.syspath_prepend(str(tmp_path))
        (tmp_path / "bad_resume.py").write_text(
            "def run_smart_resume(run):\n    raise RuntimeError('engine broke\\nsecond line')\n"
        )
        configure(SMART_RESUME_MODULE="bad_resume")
        response = post(trigger)
        assert response.status_code == 500
        body = response.get_json()
        assert body == {
            "status": "failed",
            "runId": body["runId"],
            "error": "engine broke second line",
        }
        assert db.document(f"runs/{body['runId']}").get().to_dict()["status"] == "failed"
        assert db.document("locks/smart-resume").get().to_dict()["held"] is False

    def test_store_unreachable_is_503_quickly(self, trigger, configure) -> None:
        import time

        from conftest import free_port

        configure(
            FIRESTORE_EMULATOR_HOST=f"127.0.0.1:{free_port()}",
            SMART_RESUME_RPC_TIMEOUT_SECONDS="1",
        )
        started = time.monotonic()
        response = post(trigger)
        assert response.status_code == 503
        assert response.get_json() == {"error": "store unavailable"}
        assert time.monotonic() - started < 10
