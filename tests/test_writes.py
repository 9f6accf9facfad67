"""The write path at production scale, on the real emulator.

Each test pins one defect that the emulator does not show by itself: merged checkpoints, a run
record over 1 MiB, a hot fence document, lost answers, contention errors, a stream outside the
lock, a malformed `operations` field, status reading whole runs.
"""

from __future__ import annotations

import json
import threading

import opfuncs
import pytest
from conftest import ROOT, run_once, seed_clients
from functions_framework import create_app
from google.api_core import exceptions as gexc
from google.cloud.firestore_v1.batch import WriteBatch

from shared.resume.plan import RunOptions
from shared.runs import stored_size

SECRET = {"X-Webhook-Secret": "test-secret-1-0123456"}


def pipeline(target: str, second: str | None = None) -> str:
    text = f'[[operation]]\nname = "first"\nkind = "python"\ntarget = "opfuncs:{target}"\n'
    if second:
        text += f'[[operation]]\nname = "second"\nkind = "python"\ntarget = "opfuncs:{second}"\n'
    return text


run = run_once


def op_state(db, client_id: str, op: str = "first") -> dict:
    return db.document(f"clients/{client_id}/operations/{op}").get().to_dict()


def paused_run(settings, db, meanwhile):
    """A run whose first operation (`opfuncs:gate`) waits while `meanwhile()` happens."""
    opfuncs.BEHAVIOUR.update(entered=threading.Event(), release=threading.Event())
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(out=run(settings, db)))
    worker.start()
    try:
        assert opfuncs.BEHAVIOUR["entered"].wait(10)
        meanwhile()
    finally:
        opfuncs.BEHAVIOUR["release"].set()
        worker.join(30)
    return box["out"]


class TestCheckpointsReplaced:
    def test_next_call_gets_exactly_the_last_checkpoint(self, db, configure, pipeline_file):
        """A key of an older checkpoint never survives into the next call (in this run's
        stored state, and in the next run's call)."""
        pipeline_file(pipeline("saver"))
        settings = configure()
        seed_clients(db, 1)
        opfuncs.BEHAVIOUR["saves"] = [{"cursor": "X", "page": 1}, {"page": 2}]
        first = run(settings, db)
        assert first.status == "partial"
        assert op_state(db, "c00000")["checkpoint"] == {"page": 2}
        opfuncs.BEHAVIOUR["saves"] = []
        run(settings, db)
        assert opfuncs.SEEN[-1]["checkpoint"] == {"page": 2}

    def test_counts_are_replaced_too(self, db, configure, pipeline_file):
        """A count map written whole: names from an earlier write do not linger."""
        pipeline_file(pipeline("ok"))
        settings = configure()
        seed_clients(db, 1)
        db.document("clients/c00000/operations/first").set(
            {"status": "partial", "checkpoint": {"a": 1}, "counts": {"old": 5}}
        )
        run(settings, db)
        state = op_state(db, "c00000")
        assert state["status"] == "success"
        assert state["checkpoint"] is None
        assert state["counts"] == {"old": 5, "items": 2}  # resumed counts go on, whole


@pytest.mark.slow
def test_huge_results_never_strand_the_lock(db, configure, pipeline_file):
    """2,100 clients with 200-character ids, each failing with a 500-character error: the run
    record stays under 1 MiB, the rest is paged, the lock is released, the report goes out."""
    pipeline_file(pipeline("long_error"))
    settings = configure(SMART_RESUME_CONCURRENCY="8")
    ids = seed_clients(db, 2100, prefix="c" * 195)
    assert len(ids[0]) == 200
    out = run(settings, db)
    assert out.http_status == 200
    assert out.status == "completed"
    assert out.body["summary"]["failed"] == 2100
    snap = db.document(f"runs/{out.run_id}").get()
    record = snap.to_dict()
    assert stored_size(record) < 1_000_000
    summary = record["summary"]
    paged = [
        r
        for page in db.collection(f"runs/{out.run_id}/results").stream()
        for r in page.to_dict()["results"]
    ]
    assert summary["resultsStored"] + len(paged) == 2100
    assert summary["resultsPaged"] == len(paged) > 0
    assert summary["resultsOmitted"] == 0
    assert record["report"]["status"] == "sent"
    lock = db.document("locks/smart-resume").get().to_dict()
    assert lock["held"] is False


class TestFencing:
    def test_fence_document_is_not_written_during_a_run(self, db, configure, pipeline_file):
        """Fencing reads the fence; only acquire and unlock write it."""
        pipeline_file(pipeline("ok", "ok"))
        settings = configure(SMART_RESUME_CONCURRENCY="4")
        seed_clients(db, 20)
        writes: list[str] = []
        real = WriteBatch.commit

        def spy(self, *args, **kwargs):
            names = [w.update.name or w.delete or "transform" for w in self._write_pbs]
            result = real(self, *args, **kwargs)
            writes.extend(names)  # only the writes that landed
            return result

        WriteBatch.commit = spy  # type: ignore[method-assign]
        try:
            out = run(settings, db)
        finally:
            WriteBatch.commit = real  # type: ignore[method-assign]
        assert out.body["summary"]["processed"] == 40
        fence_writes = [w for w in writes if w.endswith("/fence/current")]
        assert len(fence_writes) == 1  # the acquire's
        per_doc: dict[str, int] = {}
        for w in writes:
            per_doc[w] = per_doc.get(w, 0) + 1
        # No document takes more than a handful of writes: the client's own commits.
        assert max(per_doc.values()) <= 4

    def test_zombie_lands_no_write_after_force_unlock(self, db, configure, pipeline_file):
        """A run paused inside an operation, force-unlocked meanwhile, writes nothing more."""
        from shared import status

        pipeline_file(pipeline("gate", "ok"))
        settings = configure()
        seed_clients(db, 2)
        seen: dict = {}

        def unlock_while_paused() -> None:
            seen["before"] = op_state(db, "c00000")
            assert seen["before"]["status"] == "running"
            status.unlock(settings, db, force=True)

        out = paused_run(settings, db, unlock_while_paused)
        before = seen["before"]
        assert out.status == "abandoned"
        assert op_state(db, "c00000") == before  # the success never landed
        assert db.document("clients/c00000/operations/second").get().exists is False
        assert db.document("clients/c00001/operations/first").get().exists is False

    def test_user_writing_a_client_mid_run_does_not_stop_it(self, db, configure, pipeline_file):
        """The chain's precondition also fails when the user's app writes the client; the
        claim read back is still ours, so the run goes on."""
        pipeline_file(pipeline("gate", "ok"))
        settings = configure()
        seed_clients(db, 1)
        rename = lambda: db.document("clients/c00000").update({"name": "Renamed"})  # noqa: E731
        out = paused_run(settings, db, rename)
        assert out.status == "completed"
        assert op_state(db, "c00000", "second")["status"] == "success"
        assert db.document("clients/c00000").get().to_dict()["name"] == "Renamed"


class TestTransientErrors:
    def test_aborted_commits_are_retried_and_nothing_is_lost(
        self, db, configure, pipeline_file, monkeypatch
    ):
        """A third of the plain commits fail with Aborted before reaching the store."""
        pipeline_file(pipeline("ok", "ok"))
        settings = configure(SMART_RESUME_CONCURRENCY="4")
        seed_clients(db, 30)
        real = WriteBatch.commit
        calls = {"n": 0}
        mutex = threading.Lock()

        def flaky(self, *args, **kwargs):
            with mutex:
                calls["n"] += 1
                fail = calls["n"] % 3 == 0
            if fail and not any("locks/" in (w.update.name or "") for w in self._write_pbs):
                raise gexc.Aborted("injected contention")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(WriteBatch, "commit", flaky)
        out = run(settings, db)
        assert out.status == "completed"
        assert out.body["summary"]["processed"] == 60
        for i in range(30):
            assert op_state(db, f"c{i:05d}", "second")["status"] == "success"

    def test_release_whose_answer_is_lost_reports_the_real_outcome(
        self, db, configure, pipeline_file, monkeypatch
    ):
        """DeadlineExceeded after the release landed: the run answers completed, not failed."""
        pipeline_file(pipeline("ok"))
        settings = configure()
        seed_clients(db, 2)
        real = WriteBatch.commit

        def lost_answer(self, *args, **kwargs):
            result = real(self, *args, **kwargs)
            releasing = any(
                (w.update.name or "").endswith("locks/smart-resume")
                and "held" in w.update.fields
                and not w.update.fields["held"].boolean_value
                for w in self._write_pbs
            )
            if releasing:
                raise gexc.DeadlineExceeded("answer lost")
            return result

        monkeypatch.setattr(WriteBatch, "commit", lost_answer)
        out = run(settings, db)
        assert out.status == "completed"
        assert out.http_status == 200
        record = db.document(f"runs/{out.run_id}").get().to_dict()
        assert record["status"] == "completed"
        assert db.document("locks/smart-resume").get().to_dict()["held"] is False

    def test_acquire_whose_answer_is_lost_keeps_and_uses_the_lock(
        self, db, configure, pipeline_file, monkeypatch
    ):
        """DeadlineExceeded after the acquire landed: the run reads back and goes on."""
        pipeline_file(pipeline("ok"))
        settings = configure()
        seed_clients(db, 1)
        real = WriteBatch.commit
        done = {"once": False}

        def lost_answer(self, *args, **kwargs):
            result = real(self, *args, **kwargs)
            acquiring = any(
                (w.update.name or "").endswith("locks/smart-resume")
                and w.update.fields.get("held") is not None
                and w.update.fields["held"].boolean_value
                for w in self._write_pbs
            )
            if acquiring and not done["once"]:
                done["once"] = True
                raise gexc.DeadlineExceeded("answer lost")
            return result

        monkeypatch.setattr(WriteBatch, "commit", lost_answer)
        out = run(settings, db)
        assert out.status == "completed"
        assert op_state(db, "c00000")["status"] == "success"
        assert db.document("locks/smart-resume").get().to_dict()["held"] is False


class TestAdmission:
    @pytest.fixture
    def trigger(self, pipeline_file):
        pipeline_file(pipeline("ok"))
        source = str(ROOT / "functions" / "smart_resume" / "main.py")
        return create_app(target="smart_resume", source=source).test_client()

    def test_body_stream_other_than_the_configured_one_is_400(self, trigger, configure, db):
        configure(SMART_RESUME_STREAM="1")
        seed_clients(db, 1, stream=2)
        response = trigger.post("/", data=json.dumps({"stream": 2}), headers=SECRET)
        assert response.status_code == 400
        assert "SMART_RESUME_STREAM" in response.get_json()["detail"]
        assert not db.document("locks/smart-resume").get().exists
        same = trigger.post("/", data=json.dumps({"stream": 1, "dryRun": True}), headers=SECRET)
        assert same.status_code == 200


@pytest.mark.parametrize("field", ["first", {"first": True}, ["first", 3]])
def test_malformed_operations_field_runs_nothing(db, configure, pipeline_file, field, capsys):
    """A string, a map or a list holding a number is not widened to the whole pipeline."""
    pipeline_file(pipeline("ok", "ok"))
    settings = configure()
    seed_clients(db, 1, operations=field)
    out = run(settings, db)
    assert out.body["summary"]["processed"] == 0
    record = db.document(f"runs/{out.run_id}").get().to_dict()
    assert {r["reason"] for r in record["results"]} == {"invalid operations field"}
    assert {r["outcome"] for r in record["results"]} == {"skipped"}
    assert "not a list of operation names" in capsys.readouterr().out


def test_unknown_operation_names_are_warned_about(db, configure, pipeline_file, capsys):
    pipeline_file(pipeline("ok", "ok"))
    settings = configure()
    seed_clients(db, 1, operations=["second", "typo"])
    out = run(settings, db)
    assert out.body["summary"]["processed"] == 1
    assert "the pipeline lacks ('typo')" in capsys.readouterr().out


def test_status_never_reads_results(db, configure, pipeline_file):
    """GET and ?runs=N carry each run's summary, never its per-client results."""
    from shared import status

    pipeline_file(pipeline("ok"))
    settings = configure()
    seed_clients(db, 3)
    run(settings, db)
    body = status.snapshot(settings, db, runs=5)
    assert body["lastRun"]["summary"]["processed"] == 3
    assert "results" not in body["lastRun"]
    assert all("results" not in r for r in body["runs"])


def test_planning_does_not_hold_checkpoints(db, configure, pipeline_file):
    """Deciding reads the decision fields only; the checkpoint is loaded when the step runs."""
    import datetime as dt

    from shared.resume.due import Selection
    from shared.resume.pipeline import load_pipeline

    pipeline_file(pipeline("chunked"))
    settings = configure()
    seed_clients(db, 1)
    db.document("clients/c00000/operations/first").set(
        {"status": "partial", "checkpoint": {"page": 2, "blob": "x" * 10000}, "counts": {}}
    )
    selection = Selection(db, settings, load_pipeline(settings.pipeline_path), RunOptions())
    (plan,) = selection.plans(selection.all_pages(), dt.datetime.now(dt.UTC))
    assert "checkpoint" not in plan.steps[0].state
    opfuncs.BEHAVIOUR["pages"] = 3
    run(settings, db)
    assert opfuncs.SEEN[0]["checkpoint"]["page"] == 2  # loaded when the step started
    assert op_state(db, "c00000")["status"] == "success"


def test_run_whose_heartbeat_flagged_lost_still_releases(db, configure, pipeline_file, monkeypatch):
    """A lease flagged lost at the very end (a renewal that failed) is not a takeover: the
    preconditioned release lands, and the run reports its real outcome."""
    from shared.heartbeat import Heartbeat

    pipeline_file(pipeline("ok"))
    settings = configure()
    seed_clients(db, 1)
    real_exit = Heartbeat.__exit__

    def exit_lost(self, *args):
        self.lost.set()
        return real_exit(self, *args)

    monkeypatch.setattr(Heartbeat, "__exit__", exit_lost)
    out = run(settings, db)
    assert out.status == "completed"
    assert db.document("locks/smart-resume").get().to_dict()["held"] is False
