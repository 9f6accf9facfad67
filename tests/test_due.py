"""Due work: a tick reads what is due, sees new and changed data, backs off
failing work and quarantines it until an operator releases it."""

from __future__ import annotations

import datetime as dt
import json
import time

import opfuncs
import pytest
from conftest import ROOT, run_once, seed_clients
from functions_framework import create_app

from shared.resume.plan import NEVER, RunOptions
from shared.runner import plan_run

SECRET = {"X-Webhook-Secret": "test-secret-1-0123456"}
TWO = """
{top}
[[operation]]
name = "first"
kind = "python"
target = "opfuncs:{first}"
{first_extra}
[[operation]]
name = "second"
kind = "python"
target = "opfuncs:ok"
"""


def two(first: str = "ok", top: str = "", first_extra: str = "") -> str:
    return TWO.format(first=first, top=top, first_extra=first_extra)


run = run_once


def client_doc(db, client_id: str = "c00000") -> dict:
    return db.document(f"clients/{client_id}").get().to_dict()


def op_state(db, client_id: str = "c00000", op: str = "first") -> dict:
    return db.document(f"clients/{client_id}/operations/{op}").get().to_dict()


def outcomes(db, run_id: str) -> dict[tuple[str, str], tuple[str, str]]:
    record = db.document(f"runs/{run_id}").get().to_dict()
    return {(r["clientId"], r["operation"]): (r["outcome"], r["reason"]) for r in record["results"]}


class TestDueSelection:
    def test_next_due_written_with_the_states(self, db, configure, pipeline_file):
        """After a run, each client is due when its freshest-expiring operation expires."""
        pipeline_file(two(top="fresh_hours = 24", first_extra="fresh_hours = 2"))
        settings = configure()
        seed_clients(db, 2)
        before = dt.datetime.now(dt.UTC)
        run(settings, db)
        due = client_doc(db)["nextDueAt"]
        assert before + dt.timedelta(hours=2) <= due <= before + dt.timedelta(hours=2, minutes=1)
        assert client_doc(db)["claim"]["open"] is False

    def test_idle_tick_reads_a_handful_of_documents(self, db, configure, pipeline_file):
        """With nothing due, a tick reads a few documents whatever the number of clients."""
        pipeline_file(two())
        settings = configure()
        seed_clients(db, 300)
        run(settings, db)
        out = run(settings, db)
        assert out.body["summary"]["clients"] == 0
        assert out.stats["documentsRead"] <= 6
        assert out.stats["commits"] == 0

    def test_new_client_runs_on_the_next_tick(self, db, configure, pipeline_file):
        """A client written with only name and active: true is found (the count changed)."""
        pipeline_file(two())
        settings = configure()
        seed_clients(db, 3)
        run(settings, db)
        db.document("clients/new-one").set({"name": "New", "active": True})
        out = run(settings, db)
        assert out.body["summary"]["clients"] == 1
        assert op_state(db, "new-one", "second")["status"] == "success"

    def test_appended_operation_makes_every_client_due(self, db, configure, pipeline_file):
        pipeline_file(two().split('[[operation]]\nname = "second"')[0])
        settings = configure()
        seed_clients(db, 3)
        assert run(settings, db).body["summary"]["processed"] == 3
        pipeline_file(two())
        settings = configure()
        out = run(settings, db)
        assert out.body["summary"]["processed"] == 3  # the new operation, for each client
        assert out.body["summary"]["skipped"] == 3  # the fresh one
        assert op_state(db, "c00002", "second")["status"] == "success"

    def test_shorter_fresh_hours_makes_clients_due(self, db, configure, pipeline_file):
        pipeline_file(two(first_extra="fresh_hours = 24"))
        settings = configure()
        seed_clients(db, 2)
        run(settings, db)
        old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
        for cid in ("c00000", "c00001"):
            db.document(f"clients/{cid}/operations/first").update({"finishedAt": old})
        assert run(settings, db).body["summary"]["clients"] == 0  # still fresh under 24h
        pipeline_file(two(first_extra="fresh_hours = 2"))
        settings = configure()
        out = run(settings, db)
        assert out.body["summary"]["processed"] == 2
        assert outcomes(db, out.run_id)[("c00000", "first")][0] == "processed"

    def test_count_change_triggers_a_full_pass(self, db, configure, pipeline_file):
        """Reactivating a client changes the count: the full pass repairs its due time."""
        pipeline_file(two())
        settings = configure()
        seed_clients(db, 3)
        db.document("clients/c00002").update({"active": False})
        run(settings, db)
        assert op_state(db, "c00001", "second")["status"] == "success"
        db.document("clients/c00002").update({"active": True})
        out = run(settings, db)
        assert out.body["summary"]["clients"] == 1
        assert op_state(db, "c00002", "second")["status"] == "success"

    def test_periodic_full_pass_repairs_a_wrong_due_time(self, db, configure, pipeline_file):
        pipeline_file(two())
        settings = configure(SMART_RESUME_RECONCILE_HOURS="0.0001")
        seed_clients(db, 2)
        run(settings, db)
        db.document("clients/c00000").update({"nextDueAt": NEVER})
        db.document("clients/c00000/operations/first").delete()  # work the due time hides
        time.sleep(0.5)
        out = run(settings, db)
        assert out.body["summary"]["processed"] == 1
        assert client_doc(db)["nextDueAt"] < NEVER

    def test_wrong_due_time_is_repaired_when_read(self, db, configure, pipeline_file):
        """A client read as due with nothing to run gets its due time corrected, so the next
        tick does not read it again."""
        pipeline_file(two())
        settings = configure()
        seed_clients(db, 2)
        run(settings, db)
        past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        db.document("clients/c00000").update({"nextDueAt": past})
        out = run(settings, db)
        assert out.body["summary"] == {**out.body["summary"], "clients": 1, "processed": 0}
        assert client_doc(db)["nextDueAt"] > dt.datetime.now(dt.UTC) + dt.timedelta(hours=23)
        assert run(settings, db).body["summary"]["clients"] == 0

    def test_oldest_due_first(self, db, configure, pipeline_file):
        pipeline_file(two())
        settings = configure()
        seed_clients(db, 3)
        run(settings, db)
        now = dt.datetime.now(dt.UTC)
        for i, cid in enumerate(("c00002", "c00000", "c00001")):
            db.document(f"clients/{cid}").update({"nextDueAt": now - dt.timedelta(hours=3 - i)})
            db.document(f"clients/{cid}/operations/first").delete()
        out = run(settings, db)
        order = [r[0] for r in outcomes(db, out.run_id) if r[1] == "first"]
        assert order == ["c00002", "c00000", "c00001"]

    def test_migrates_data_written_before_due_work(self, db, configure, pipeline_file):
        """Clients without nextDueAt, states without failures: the first tick sorts it out."""
        pipeline_file(two())
        settings = configure()
        seed_clients(db, 3)
        recent = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        for cid in ("c00000", "c00001"):
            for op in ("first", "second"):
                db.document(f"clients/{cid}/operations/{op}").set(
                    {"status": "success", "finishedAt": recent, "checkpoint": None}
                )
        db.document("clients/c00001/operations/second").set(
            {"status": "failed", "finishedAt": recent, "error": "old", "checkpoint": {"p": 1}}
        )
        out = run(settings, db)
        got = outcomes(db, out.run_id)
        assert got[("c00001", "second")][0] == "processed"  # an old failure: retried
        assert got[("c00002", "first")][0] == "processed"  # never ran
        assert ("c00000", "first") not in got  # fresh: not even read
        assert any(s["checkpoint"] == {"p": 1} for s in opfuncs.SEEN)  # resumed
        for cid in ("c00000", "c00001", "c00002"):
            assert isinstance(client_doc(db, cid)["nextDueAt"], dt.datetime)


class TestBackoffAndQuarantine:
    PIPE = two(first="boom", top="retry_backoff_seconds = 1\nquarantine_after = 4")

    def test_backoff_then_quarantine_then_release(self, db, configure, pipeline_file):
        pipeline_file(self.PIPE)
        settings = configure()
        seed_clients(db, 1)
        first = run(settings, db)  # failure 1: due again on the next tick
        assert outcomes(db, first.run_id)[("c00000", "second")][1].startswith("blocked")
        assert op_state(db)["failures"] == 1
        run(settings, db)  # failure 2: backs off 1 s
        assert op_state(db)["failures"] == 2
        backing = run(settings, db, client_id="c00000")
        outcome, reason = outcomes(db, backing.run_id)[("c00000", "first")]
        assert outcome == "skipped" and reason.startswith("backing off after 2 failures")
        assert outcomes(db, backing.run_id)[("c00000", "second")][0] == "skipped"
        assert len([s for s in opfuncs.SEEN if s["operation"] == "first"]) == 2
        plan = plan_run(settings, db, RunOptions(dry_run=True), _pipeline(settings))
        step = plan.body["plan"][0]["operations"][0]
        assert step["decision"] == "skip" and "dueAt" in step
        time.sleep(1.1)
        run(settings, db)  # failure 3: backs off 2 s
        time.sleep(2.1)
        run(settings, db)  # failure 4: quarantined
        state = op_state(db)
        assert state["status"] == "quarantined" and state["failures"] == 4
        assert client_doc(db)["nextDueAt"] == NEVER
        from shared import status

        body = status.snapshot(settings, db)
        assert body["quarantined"] == [
            {
                "clientId": "c00000",
                "operation": "first",
                "failures": 4,
                "error": "ValueError: bad data for c00000",
                "since": body["quarantined"][0]["since"],
            }
        ]
        time.sleep(4.1)
        assert run(settings, db).body["summary"]["clients"] == 0  # quarantine never expires
        opfuncs.BEHAVIOUR["fail_for"] = set()
        app = _status_app()
        released = app.post(
            "/", data=json.dumps({"action": "retry", "clientId": "c00000"}), headers=SECRET
        )
        assert released.status_code == 200
        assert released.get_json() == {
            "status": "released",
            "clientId": "c00000",
            "operations": ["first"],
        }
        assert op_state(db)["failures"] == 0
        out = run(settings, db)
        assert out.body["summary"]["processed"] == 2
        assert status.snapshot(settings, db)["quarantined"] == []

    def test_retry_action_errors(self, db, configure, pipeline_file):
        pipeline_file(self.PIPE)
        configure()
        seed_clients(db, 1)
        app = _status_app()

        def post(body):
            return app.post("/", data=json.dumps(body), headers=SECRET)

        assert post({"action": "retry", "clientId": "nobody"}).status_code == 404
        bad_op = post({"action": "retry", "clientId": "c00000", "operation": "nope"})
        assert bad_op.status_code == 400
        assert post({"action": "retry"}).status_code == 400
        nothing = post({"action": "retry", "clientId": "c00000", "operation": "first"})
        assert nothing.status_code == 200 and nothing.get_json()["operations"] == []

    def test_cli_retry(self, db, configure, pipeline_file, capsys):
        from shared.resume.cli import main

        pipeline_file(two(first="boom", top="quarantine_after = 1"))
        settings = configure()
        seed_clients(db, 1)
        run(settings, db)
        assert op_state(db)["status"] == "quarantined"
        assert main(["status"]) == 0
        assert "QUARANTINED: c00000 first" in capsys.readouterr().out
        assert main(["retry", "c00000", "--operation", "first"]) == 0
        assert "released first of c00000" in capsys.readouterr().out
        assert main(["retry", "nobody"]) == 2

    def test_quarantine_after_zero_never_quarantines(self, db, configure, pipeline_file):
        pipeline_file(two(first="boom", top="quarantine_after = 0\nretry_backoff_seconds = 0"))
        settings = configure()
        seed_clients(db, 1)
        for _ in range(4):
            run(settings, db)
        assert op_state(db)["status"] == "failed"
        assert op_state(db)["failures"] == 4

    def test_success_resets_failures(self, db, configure, pipeline_file):
        pipeline_file(self.PIPE)
        settings = configure()
        seed_clients(db, 1)
        run(settings, db)
        opfuncs.BEHAVIOUR["fail_for"] = set()
        run(settings, db)
        assert op_state(db)["status"] == "success"
        assert op_state(db)["failures"] == 0
        assert client_doc(db)["failingCount"] == 0


def test_pipeline_timing_settings_are_validated(tmp_path):
    from shared.errors import PipelineError
    from shared.resume.pipeline import load_pipeline

    path = tmp_path / "p.toml"
    path.write_text(two(top="quarantine_after = -1", first_extra="retry_backoff_seconds = 'x'"))
    with pytest.raises(PipelineError) as err:
        load_pipeline(path)
    assert "quarantine_after" in str(err.value)
    assert "operation 'first': retry_backoff_seconds" in str(err.value)


def _pipeline(settings):
    from shared.resume.pipeline import load_pipeline

    return load_pipeline(settings.pipeline_path)


def _status_app():
    source = str(ROOT / "functions" / "smart_resume_status" / "main.py")
    return create_app(target="smart_resume_status", source=source).test_client()


def test_report_names_quarantined_work(db, configure, pipeline_file, isolated_env):
    """The run's report lists every quarantined client-operation, HTML-escaped."""
    from pathlib import Path

    pipeline_file(two(first="boom", top="quarantine_after = 1"))
    settings = configure(SMART_RESUME_EMAIL_TRANSPORT="outbox")
    seed_clients(db, 1, prefix="<b>")
    out = run(settings, db)
    html = (Path(isolated_env["SMART_RESUME_OUTBOX"]) / f"{out.run_id}.html").read_text()
    assert "QUARANTINED &lt;b&gt;00000 / first: 1 failures in a row" in html
    assert "<b>00000" not in html
