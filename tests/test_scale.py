"""Due work at any scale (each case failed on the code before part three): a full pass longer
than the budget, a new client while another is deactivated, a retry during a run, a
Retry-After past the budget, limits shared by shards, and health's `behind`, first run and
silent holder."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from typing import Any

import opfuncs
from conftest import ROOT, run_once, seed_clients
from functions_framework import create_app

from shared.resume import due, limits
from shared.resume.pipeline import Operation

PIPE = '[[operation]]\nname = "first"\nkind = "python"\ntarget = "opfuncs:ok"\n'


def meta(db) -> dict[str, Any]:
    return db.document("locks/smart-resume/meta/due").get().to_dict() or {}


def health(query: str = "") -> dict[str, Any]:
    source = str(ROOT / "functions" / "smart_resume_status" / "main.py")
    app = create_app("smart_resume_status", source).test_client()
    secret = os.environ["SMART_RESUME_WEBHOOK_SECRET"].split(",")[0]
    headers = {"X-Webhook-Secret": secret, "Accept": "application/json"}
    return app.get("/" + query, headers=headers).get_json()


class TestFullPass:
    def test_a_pass_longer_than_the_budget_resumes_and_due_work_runs_every_tick(
        self, db, configure, pipeline_file, monkeypatch
    ):
        """Before: the pass restarted from the first client on every tick and due work never
        ran (`partial, processed=0` forever)."""
        pipeline_file(PIPE)
        settings = configure(SMART_RESUME_TIME_BUDGET_SECONDS="1.5")
        monkeypatch.setattr(due, "FULL_PAGE_SIZE", 10)
        real = due.Selection.plan_page

        def slow(self, page, now):  # a big collection: every page of the pass takes a while
            time.sleep(0.1)
            return real(self, page, now)

        monkeypatch.setattr(due.Selection, "plan_page", slow)
        seed_clients(db, 120)
        cursors, processed = [], []
        for _ in range(12):
            out = run_once(settings, db)
            processed.append(out.body["summary"]["processed"])
            running = meta(db).get("pass")
            cursors.append(running["cursor"] if running else None)
            if running is None:
                break
        assert cursors[-1] is None and len(cursors) >= 3, cursors  # done, over several ticks
        assert cursors[:-1] == sorted(cursors[:-1])  # each tick went on where the last stopped
        assert all(n > 0 for n in processed), processed  # due work ran on every tick
        assert meta(db)["lastPass"]["clients"] >= 120

    def test_a_new_client_is_seen_next_tick_while_another_is_deactivated(
        self, db, configure, pipeline_file
    ):
        """Before: the count of active clients did not change, so the new one waited for the
        daily pass."""
        pipeline_file(PIPE)
        settings = configure(SMART_RESUME_RECONCILE_HOURS="1000")
        seed_clients(db, 5)
        run_once(settings, db)
        db.document("clients/fresh").set({"name": "Fresh", "active": True})
        db.document("clients/c00000").update({"active": False})
        out = run_once(settings, db)
        record = db.document(f"runs/{out.run_id}").get().to_dict()
        assert [(r["clientId"], r["outcome"]) for r in record["results"]] == [
            ("fresh", "processed")
        ]


class TestRetryDuringARun:
    def test_a_release_made_while_the_client_runs_is_kept(self, db, configure, pipeline_file):
        """Before: the run's close rewrote the client's failing summary from its plan-time
        states, so the released operation stayed listed as quarantined."""
        from shared import quarantine, status
        from shared.resume.pipeline import load_pipeline

        pipeline_file(
            '[[operation]]\nname = "first"\nkind = "python"\ntarget = "opfuncs:gate"\n'
            '[[operation]]\nname = "second"\nkind = "python"\ntarget = "opfuncs:ok"\n'
        )
        settings = configure()
        seed_clients(db, 1)
        now = dt.datetime.now(dt.UTC)
        db.document("clients/c00000/operations/second").set(
            {"status": "quarantined", "failures": 6, "finishedAt": now, "quarantinedAt": now}
        )
        opfuncs.BEHAVIOUR.update(entered=threading.Event(), release=threading.Event())
        box: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: box.update(out=run_once(settings, db)))
        worker.start()
        assert opfuncs.BEHAVIOUR["entered"].wait(10)
        released = quarantine.release(
            settings, db, load_pipeline(settings.pipeline_path), "c00000", "second"
        )
        assert released["operations"] == ["second"]
        opfuncs.BEHAVIOUR["release"].set()
        worker.join(30)
        assert box["out"].status == "completed"
        client = db.document("clients/c00000").get().to_dict()
        assert client["failingCount"] == 0 and client["quarantinedCount"] == 0
        assert status.snapshot(settings, db)["quarantined"] == []


class TestRetryAfterPastTheBudget:
    def test_the_operation_is_due_when_the_service_said(self, db, configure, pipeline_file, ops):
        """Before: saved `partial`, due next tick: with `Retry-After: 3600` the service was
        called on every tick."""
        url = ops.route("/busy", lambda payload: (429, {"error": "busy"}, {"Retry-After": "3600"}))
        pipeline_file(f'[[operation]]\nname = "work"\nkind = "http"\nurl = "{url}"\n')
        settings = configure()
        seed_clients(db, 1)
        first = run_once(settings, db)
        assert first.body["summary"]["deferred"] == 1
        state = db.document("clients/c00000/operations/work").get().to_dict()
        wait = (state["heldUntil"] - dt.datetime.now(dt.UTC)).total_seconds()
        assert 3500 < wait <= 3600
        client = db.document("clients/c00000").get().to_dict()
        assert client["nextDueAt"] == state["heldUntil"]
        calls = len(ops.calls("/busy"))
        second = run_once(settings, db)
        assert second.body["summary"]["clients"] == 0 and len(ops.calls("/busy")) == calls
        backed_off = health()["backedOff"]
        assert [(b["clientId"], b["operation"]) for b in backed_off] == [("c00000", "work")]


class TestSharedLimits:
    def test_each_of_n_shards_takes_its_share_of_the_limits(self):
        """Before: every shard's limiter allowed the whole `max_per_second` on its own."""
        op = Operation(
            name="work", kind="http", url="http://x", max_per_second=10, max_concurrent=4
        )
        alone = limits.Registry(1).limiter(op)
        shared = limits.Registry(3).limiter(op)
        assert alone.max_concurrent == 4 and shared.max_concurrent == 1
        assert shared._interval >= 3 * alone._interval * 0.9  # ~10/3 per second per shard


class TestHealth:
    def test_the_first_run_after_a_deploy_is_running_not_overdue(self, db, configure):
        from shared.lock import Lock

        configure(SMART_RESUME_EXPECTED_EVERY_SECONDS="600")
        Lock(db, configure()).acquire("first-run", {"host": "h", "pid": 1, "function": "t"})
        assert health()["health"]["state"] == "running"

    def test_a_holder_gone_silent_is_stuck(self, db, configure):
        from shared.lock import Lock

        settings = configure()
        Lock(db, settings).acquire("dead", {"host": "h", "pid": 1, "function": "t"})
        old = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=settings.lease_seconds + 60)
        db.document("locks/smart-resume").update({"heartbeatAt": old})
        body = health()["health"]
        assert body["state"] == "stuck" and "gone silent" in body["reasons"][0]

    def test_behind_when_the_oldest_due_client_has_waited_too_long(self, db, configure):
        configure(SMART_RESUME_BEHIND_SECONDS="600")
        two_hours_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
        seed_clients(db, 1, nextDueAt=two_hours_ago)
        db.document("runs/20260101-000000-aaaaaa").set(
            {"runId": "20260101-000000-aaaaaa", "lockName": "smart-resume", "status": "completed"}
        )
        body = health()["health"]
        assert body["state"] == "behind" and "has waited" in body["reasons"][0]


class TestShardLayoutChange:
    def test_a_run_of_the_old_layout_never_writes_its_shard_back(
        self, db, configure, pipeline_file
    ):
        """Going from 3 shards to 2 while an old shard-2 run is live: the new layout's pass
        stamps the client `shard = 0`; the old run's close used to write `shard = 2` back,
        hiding the client from every shard of the new layout until the next daily pass."""
        from shared.resume.shards import shard_of

        pipeline_file('[[operation]]\nname = "first"\nkind = "python"\ntarget = "opfuncs:gate"\n')
        settings = configure(SMART_RESUME_SHARDS="3")
        client_id = next(f"x{i}" for i in range(100) if shard_of(f"x{i}", 3) == 2)
        db.document(f"clients/{client_id}").set({"name": "X", "active": True})
        opfuncs.BEHAVIOUR.update(entered=threading.Event(), release=threading.Event())
        box: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: box.update(out=run_once(settings, db, shard=2)))
        worker.start()
        assert opfuncs.BEHAVIOUR["entered"].wait(10)
        new_shard = shard_of(client_id, 2)
        db.document(f"clients/{client_id}").update({"shard": new_shard})  # the new layout
        opfuncs.BEHAVIOUR["release"].set()
        worker.join(30)
        assert box["out"].status == "completed"
        assert db.document(f"clients/{client_id}").get().to_dict()["shard"] == new_shard


class TestCountsAndPlan:
    def test_the_summary_counts_add_up_after_a_stop(self, db, configure, pipeline_file):
        """Before: a run stopped at client 33 of 45 said `clients 38, deferred 10`, and the
        plan then listed 24 client-operations to run."""
        pipeline_file(PIPE)
        settings = configure(SMART_RESUME_TIME_BUDGET_SECONDS="1")
        seed_clients(db, 8)
        opfuncs.BEHAVIOUR["delay"] = 0.4
        out = run_once(settings, db)
        summary = out.body["summary"]
        assert out.status == "partial"
        assert summary["clients"] == 8
        assert summary["clientsReached"] + summary["clientsNotReached"] == 8
        assert summary["clientsNotReached"] > 0
        reached_ops = summary["processed"] + summary["deferred"] + summary["skipped"]
        assert reached_ops == summary["clientsReached"]  # one operation each

    def test_the_plan_says_a_step_after_a_quarantined_one_is_blocked(
        self, db, configure, pipeline_file
    ):
        """Before: after `first` was quarantined, the plan said `second` would run; the run
        then skipped both."""
        from shared.resume.pipeline import load_pipeline
        from shared.resume.plan import RunOptions
        from shared.runner import plan_run

        pipeline_file(
            PIPE + '[[operation]]\nname = "second"\nkind = "python"\ntarget = "opfuncs:ok"\n'
        )
        settings = configure()
        seed_clients(db, 1)
        now = dt.datetime.now(dt.UTC)
        db.document("clients/c00000/operations/first").set(
            {"status": "quarantined", "failures": 6, "finishedAt": now, "quarantinedAt": now}
        )
        planned = plan_run(
            settings, db, RunOptions(client_id="c00000"), load_pipeline(settings.pipeline_path)
        )
        steps = {s["operation"]: s for s in planned.body["plan"][0]["operations"]}
        assert steps["second"]["decision"] == "skip"
        assert steps["second"]["reason"] == "blocked: first is quarantined"
