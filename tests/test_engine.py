"""The resume engine on the real emulator, through `runner.start_run` as the trigger calls it."""

from __future__ import annotations

import datetime as dt
import threading
import time

import opfuncs
import pytest
from conftest import run_once, seed_clients

from shared import status
from shared.resume.pipeline import load_pipeline
from shared.resume.plan import RunOptions
from shared.runner import plan_run

PY = """
fresh_hours = 24
[[operation]]
name = "first"
kind = "python"
target = "opfuncs:{first}"
[[operation]]
name = "second"
kind = "python"
target = "opfuncs:{second}"
"""


run = run_once


def state(db, client_id: str, op: str) -> dict:
    return (
        db.collection("clients")
        .document(client_id)
        .collection("operations")
        .document(op)
        .get()
        .to_dict()
    )


def results(db, run_id: str) -> list[tuple[str, str, str]]:
    record = db.collection("runs").document(run_id).get().to_dict()
    return [(r["clientId"], r["operation"], r["outcome"]) for r in record["results"]]


class TestDecisions:
    def test_never_run_is_processed_then_skipped_while_fresh(self, db, configure, pipeline_file):
        """First run processes everything; the second skips it as fresh."""
        pipeline_file(PY.format(first="ok", second="ok"))
        settings = configure()
        seed_clients(db, 2)
        first = run(settings, db)
        assert first.status == "completed"
        assert first.body["summary"]["processed"] == 4
        assert first.body["summary"]["impact"] == {"items": 8}
        s = state(db, "c00000", "first")
        assert s["status"] == "success"
        assert s["runId"] == first.run_id
        assert s["attempts"] == 1
        assert s["checkpoint"] is None
        second = run(settings, db)
        assert second.body["summary"]["clients"] == 0  # nothing due: nothing even read
        assert second.body["summary"]["processed"] == 0
        assert len(opfuncs.SEEN) == 4
        client = run(settings, db, client_id="c00000")  # asked for by id: read, and skipped
        assert client.body["summary"]["skipped"] == 2
        assert len(opfuncs.SEEN) == 4

    def test_stale_success_runs_again(self, db, configure, pipeline_file):
        pipeline_file(PY.format(first="ok", second="ok"))
        settings = configure()
        seed_clients(db, 1)
        run(settings, db)
        old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=25)
        db.document("clients/c00000/operations/first").update({"finishedAt": old})
        db.document("clients/c00000").update({"nextDueAt": old + dt.timedelta(hours=24)})
        out = run(settings, db)
        assert results(db, out.run_id) == [
            ("c00000", "first", "processed"),
            ("c00000", "second", "skipped"),
        ]

    def test_failure_blocks_the_client_and_others_go_on(self, db, configure, pipeline_file):
        """A failed operation skips that client's later ones as blocked; the run completes."""
        pipeline_file(PY.format(first="boom", second="ok"))
        settings = configure()
        seed_clients(db, 2)
        opfuncs.BEHAVIOUR["fail_for"] = {"c00000"}
        out = run(settings, db)
        assert out.status == "completed"
        assert out.http_status == 200
        assert out.body["summary"]["failed"] == 1
        record = db.document(f"runs/{out.run_id}").get().to_dict()
        by_key = {(r["clientId"], r["operation"]): r for r in record["results"]}
        assert by_key[("c00000", "first")]["outcome"] == "failed"
        assert "ValueError: bad data for c00000" in by_key[("c00000", "first")]["error"]
        assert by_key[("c00000", "second")]["outcome"] == "skipped"
        assert by_key[("c00000", "second")]["reason"].startswith("blocked")
        assert by_key[("c00001", "second")]["outcome"] == "processed"
        failed = state(db, "c00000", "first")
        assert failed["status"] == "failed"
        assert "bad data" in failed["error"]

    def test_failed_operation_is_retried_next_run(self, db, configure, pipeline_file):
        pipeline_file(PY.format(first="boom", second="ok"))
        settings = configure()
        seed_clients(db, 1)
        run(settings, db)
        opfuncs.BEHAVIOUR["fail_for"] = set()
        out = run(settings, db)
        assert results(db, out.run_id) == [
            ("c00000", "first", "processed"),
            ("c00000", "second", "processed"),
        ]
        assert state(db, "c00000", "first")["attempts"] == 2
        assert state(db, "c00000", "first")["error"] is None


class TestCheckpoints:
    def test_time_budget_defers_and_next_run_resumes_at_checkpoint(
        self, db, configure, pipeline_file
    ):
        """Budget spent mid-operation: partial with checkpoint; the next run starts from it."""
        pipeline_file(PY.format(first="chunked", second="ok"))
        settings = configure(SMART_RESUME_TIME_BUDGET_SECONDS="0.5")
        seed_clients(db, 2)
        opfuncs.BEHAVIOUR.update(pages=6, page_delay=0.15)
        out = run(settings, db)
        assert out.status == "partial"
        assert out.body["summary"]["deferred"] >= 2
        partial = state(db, "c00000", "first")
        assert partial["status"] == "partial"
        page = partial["checkpoint"]["page"]
        assert 1 <= page < 6
        settings = configure(SMART_RESUME_TIME_BUDGET_SECONDS="60")
        opfuncs.SEEN.clear()
        out = run(settings, db)
        assert out.status == "completed"
        resumed = next(s for s in opfuncs.SEEN if s["client"] == "c00000")
        assert resumed["checkpoint"] == {"page": page}
        done = state(db, "c00000", "first")
        assert done["status"] == "success"
        assert done["counts"] == {"pages": 6}  # counts continue across the resume

    def test_failed_operation_resumes_from_its_last_checkpoint(self, db, configure, pipeline_file):
        """A failure mid-way keeps the checkpoint; the retry continues from it."""
        pipeline_file(PY.format(first="chunked", second="ok"))
        settings = configure()
        seed_clients(db, 1)

        def fail_once(ctx, page):
            if page == 2 and not opfuncs.BEHAVIOUR.get("failed"):
                opfuncs.BEHAVIOUR["failed"] = True
                raise RuntimeError("transient trouble")

        opfuncs.BEHAVIOUR.update(pages=4, after_page=fail_once)
        out = run(settings, db)
        assert out.body["summary"]["failed"] == 1
        failed = state(db, "c00000", "first")
        assert (failed["status"], failed["checkpoint"]) == ("failed", {"page": 2})
        run(settings, db)
        assert opfuncs.SEEN[-2]["checkpoint"] == {"page": 2}
        assert state(db, "c00000", "first")["status"] == "success"

    def test_http_checkpoint_loop_sends_each_saved_checkpoint_in_order(
        self, db, configure, pipeline_file, ops
    ):
        def service(payload):
            page = (payload["checkpoint"] or {}).get("page", 0) + 1
            return 200, {"done": page == 3, "checkpoint": {"page": page}, "counts": {"rows": 10}}

        url = ops.route("/score", service)
        pipeline_file(f'[[operation]]\nname = "score"\nkind = "http"\nurl = "{url}"\n')
        settings = configure()
        seed_clients(db, 1)
        out = run(settings, db)
        calls = ops.calls("/score")
        assert [c["checkpoint"] for c in calls] == [None, {"page": 1}, {"page": 2}]
        assert {c["runId"] for c in calls} == {out.run_id}
        assert calls[0]["clientId"] == "c00000"
        assert calls[0]["operation"] == "score"
        assert out.body["summary"]["impact"] == {"rows": 30}

    def test_cancel_mid_run(self, db, configure, pipeline_file):
        """A cancel request stops the run at its next check; the operation keeps its checkpoint."""
        pipeline_file(PY.format(first="wait_for_stop", second="ok"))
        settings = configure(SMART_RESUME_HEARTBEAT_SECONDS="0.1", SMART_RESUME_LEASE_SECONDS="5")
        seed_clients(db, 2)
        started = threading.Event()
        opfuncs.BEHAVIOUR["started"] = started

        def cancel_soon():
            started.wait(10)
            status.cancel(settings, db)

        threading.Thread(target=cancel_soon).start()
        out = run(settings, db)
        assert out.status == "cancelled"
        assert out.http_status == 200
        s = state(db, "c00000", "first")
        assert s["status"] == "partial"
        assert s["checkpoint"]["step"] >= 1
        assert len(opfuncs.SEEN) == 1  # the second client never started


class TestHttpOperations:
    def _pipeline(self, pipeline_file, url: str, **extra) -> None:
        lines = [
            'name = "call"',
            'kind = "http"',
            f'url = "{url}"',
            "retry_initial_seconds = 0.01",
        ]
        lines += [f"{k} = {v}" for k, v in extra.items()]
        pipeline_file("[[operation]]\n" + "\n".join(lines) + "\n")

    def test_retries_429_and_503_then_succeeds(self, db, configure, pipeline_file, ops):
        answers = iter([(429, {}), (503, {}), (200, {"done": True})])
        url = ops.route("/op", lambda p: next(answers))
        self._pipeline(pipeline_file, url)
        seed_clients(db, 1)
        out = run(configure(), db)
        assert out.body["summary"]["processed"] == 1
        assert len(ops.calls("/op")) == 3

    def test_400_fails_at_once(self, db, configure, pipeline_file, ops):
        url = ops.route("/op", lambda p: (400, {"error": "bad"}))
        self._pipeline(pipeline_file, url)
        seed_clients(db, 1)
        out = run(configure(), db)
        assert out.body["summary"]["failed"] == 1
        assert len(ops.calls("/op")) == 1
        assert "answered 400" in state(db, "c00000", "call")["error"]

    def test_timeout_fails_after_retries(self, db, configure, pipeline_file, ops):
        url = ops.route("/op", lambda p: (time.sleep(1.0), (200, {}))[1])
        self._pipeline(pipeline_file, url, timeout_seconds=0.2, retries=1)
        seed_clients(db, 1)
        out = run(configure(), db)
        assert out.body["summary"]["failed"] == 1
        assert "no answer" in state(db, "c00000", "call")["error"]
        assert len(ops.calls("/op")) == 2

    def test_max_calls_guard(self, db, configure, pipeline_file, ops):
        url = ops.route("/op", lambda p: (200, {"done": False, "checkpoint": {"n": 1}}))
        self._pipeline(pipeline_file, url, max_calls=4)
        seed_clients(db, 1)
        run(configure(), db)
        assert len(ops.calls("/op")) == 4
        assert "max_calls (4)" in state(db, "c00000", "call")["error"]

    @pytest.mark.parametrize(
        ("body", "error"),
        [
            ({"done": "yes"}, "'done' must be true or false"),
            ({"done": False, "checkpoint": [1]}, "'checkpoint' must be an object"),
            ([1, 2], "not an object"),
            ({"counts": {"a": "x"}}, "'counts' must map"),
        ],
    )
    def test_malformed_answers_fail_clearly(self, db, configure, pipeline_file, ops, body, error):
        url = ops.route("/op", lambda p: (200, body))
        self._pipeline(pipeline_file, url)
        seed_clients(db, 1)
        run(configure(), db)
        assert error in state(db, "c00000", "call")["error"]


class TestOrderAndFilters:
    def test_oldest_work_goes_first(self, db, configure, pipeline_file):
        """Never-run clients first, then the one whose failure is oldest."""
        pipeline_file(PY.format(first="ok", second="ok"))
        settings = configure()
        seed_clients(db, 3)
        now = dt.datetime.now(dt.UTC)
        for client_id, hours in (("c00000", 1), ("c00001", 5)):
            for op in ("first", "second"):
                db.document(f"clients/{client_id}/operations/{op}").set(
                    {"status": "failed", "finishedAt": now - dt.timedelta(hours=hours)}
                )
        run(settings, db)
        order = list(dict.fromkeys(s["client"] for s in opfuncs.SEEN))
        assert order == ["c00002", "c00001", "c00000"]

    def test_filters_client_operations_and_stream(self, db, configure, pipeline_file):
        pipeline_file(PY.format(first="ok", second="ok"))
        settings = configure()
        seed_clients(db, 2, prefix="a", stream=1)
        seed_clients(db, 2, prefix="b", stream=2)
        db.document("clients/inactive").set({"name": "off", "active": False, "stream": 1})
        out = run(settings, db, stream=1, operations=("second",))
        assert out.body["summary"]["clients"] == 2
        assert {(c, o) for c, o, _ in results(db, out.run_id)} == {
            ("a00000", "second"),
            ("a00001", "second"),
        }
        out = run(settings, db, client_id="b00001")
        assert out.body["summary"]["clients"] == 1
        assert {c for c, _, _ in results(db, out.run_id)} == {"b00001"}

    def test_client_operation_subset_and_unknown_names(self, db, configure, pipeline_file):
        """A client's `operations` narrows the pipeline; unknown names are reported, not fatal."""
        pipeline_file(PY.format(first="ok", second="ok"))
        settings = configure()
        db.document("clients/x").set(
            {"name": "X", "active": True, "operations": ["second", "nope"]}
        )
        out = run(settings, db)
        assert out.status == "completed"
        assert sorted(results(db, out.run_id)) == [
            ("x", "nope", "skipped"),
            ("x", "second", "processed"),
        ]

    def test_concurrency_4_counts_correctly(self, db, configure, pipeline_file):
        pipeline_file(PY.format(first="ok", second="ok"))
        settings = configure(SMART_RESUME_CONCURRENCY="4")
        seed_clients(db, 12)
        opfuncs.BEHAVIOUR["delay"] = 0.05
        out = run(settings, db)
        summary = out.body["summary"]
        assert (summary["clients"], summary["processed"], summary["failed"]) == (12, 24, 0)
        assert summary["impact"] == {"items": 48}
        assert len(opfuncs.SEEN) == 24
        per_client = {}
        for s in opfuncs.SEEN:
            per_client.setdefault(s["client"], []).append(s["operation"])
        assert all(ops == ["first", "second"] for ops in per_client.values())


class TestPlanning:
    def _dump(self, db) -> dict:
        docs = {}
        for coll in db.collections():
            for doc in coll.list_documents():
                snap = doc.get()
                docs[doc.path] = (snap.exists, snap.update_time)
                for sub in doc.collections():
                    for d in sub.list_documents():
                        s = d.get()
                        docs[d.path] = (s.exists, s.update_time)
        return docs

    def test_plan_writes_nothing(self, db, configure, pipeline_file):
        pipeline_file(PY.format(first="ok", second="ok"))
        settings = configure()
        seed_clients(db, 3)
        run(settings, db, client_id="c00001")
        before = self._dump(db)
        pipeline = load_pipeline(settings.pipeline_path)
        plan = plan_run(settings, db, RunOptions(dry_run=True), pipeline).body["plan"]
        fresh = next(p for p in plan if p["clientId"] == "c00001")
        assert [s["decision"] for s in fresh["operations"]] == ["skip", "skip"]
        assert self._dump(db) == before

    def test_2000_clients_planned_with_batched_reads(self, db, configure, pipeline_file):
        """Reads are a page query plus one get_all per 500 clients, not one per document."""
        from shared.resume.due import Selection

        pipeline_file(PY.format(first="ok", second="ok"))
        settings = configure()
        seed_clients(db, 2000)
        selection = Selection(db, settings, load_pipeline(settings.pipeline_path), RunOptions())
        plans = list(selection.plans(selection.all_pages(), dt.datetime.now(dt.UTC)))
        assert len(plans) == 2000
        assert selection.reads.round_trips == 4 + 4 + 1  # 4 full pages, 4 get_all, 1 empty


def test_one_commit_per_client_operation(db, configure, pipeline_file, monkeypatch):
    """Per client: the claim carries the first `running` mark; writes within a second of the
    last commit are coalesced, and the close commits the rest on its own: fast operations cost
    two commits per client, not one per write."""
    from shared.fence import Fence

    pipeline_file(PY.format(first="ok", second="ok"))
    settings = configure(SMART_RESUME_RECONCILE_HOURS="1000")
    seed_clients(db, 3)
    commits: list[str] = []
    real_claim, real_commit = Fence.claim, Fence.commit

    def claim(self, *args, **kwargs):
        commits.append("claim")
        return real_claim(self, *args, **kwargs)

    def commit(self, *args):
        commits.append("commit")
        return real_commit(self, *args)

    monkeypatch.setattr(Fence, "claim", claim)
    monkeypatch.setattr(Fence, "commit", commit)
    out = run(settings, db)
    assert out.body["summary"]["processed"] == 6
    assert commits.count("claim") == 3
    assert len(commits) == 3 * 2
    for client_id in ("c00000", "c00001", "c00002"):
        assert state(db, client_id, "second")["status"] == "success"
