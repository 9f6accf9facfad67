"""Fencing and the write path when answers are lost (each case failed on the code before part
three): a revoke that cannot be skipped, one client's trouble kept to that client, bounded
records, coalesced checkpoints, one report ever, the holder's own lease."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import opfuncs
import pytest
from conftest import PROJECT, run_once, seed_clients
from faulty import Faults, Landed, faulty_client

from shared import fence as fence_module
from shared import status
from shared.errors import LeaseLost, LockHeld, StoreUnavailable
from shared.fence import Fence, revoke
from shared.lock import Lock
from shared.runner import _fence_off

OWNER = {"host": "test", "pid": 1, "function": "test"}


def pipe(*targets: str) -> str:
    return "".join(
        f'[[operation]]\nname = "op{i}"\nkind = "python"\ntarget = "opfuncs:{t}"\n'
        for i, t in enumerate(targets)
    )


def backdate(db, seconds: float) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    db.document("locks/smart-resume").update({"heartbeatAt": old})


def zombie_with_a_claim(db, settings):
    """run-1 holds the lock and has client c1 claimed; then its heartbeat goes silent."""
    db.document("clients/c1").set({"name": "c1", "active": True})
    lease = Lock(db, settings).acquire("run-1", OWNER)
    zombie = Fence(db, settings, lease)
    claim = zombie.claim("c1")
    backdate(db, settings.lease_seconds + 5)
    return zombie, claim


def faulty(decide, log: list[Landed] | None = None):
    return faulty_client(PROJECT, Faults(decide=decide), 1, log if log is not None else [])


class TestRevokeThatCannotBeSkipped:
    def test_takeover_with_a_lost_answer_still_fences_off_the_old_run(self, db, settings):
        """Case 1: the takeover commit lands but its answer is lost; the lease rebuilt from the
        read-back still knows the old run, and its claim is revoked before any work."""
        zombie, claim = zombie_with_a_claim(db, settings)
        lost = faulty(lambda paths: "lose" if "locks/smart-resume" in paths else None)
        lock = Lock(lost, settings)
        lease = lock.acquire("run-2", OWNER)
        assert (lease.previous_run_id, lease.revoke) == ("run-1", ["run-1"])
        _fence_off(settings, db, Lock(db, settings), lease)
        doc = db.document("clients/c1/operations/a")
        with pytest.raises(LeaseLost):
            zombie.commit(claim, [(doc, {"v": 1})], {"nextDueAt": None})
        assert not doc.get().exists
        assert db.document("clients/c1").get().to_dict()["claim"]["revoked"] is True

    def test_revoke_is_retried_after_an_aborted_commit(self, db, settings):
        """Case 2: one aborted commit no longer leaves the zombie's claims open."""
        zombie, claim = zombie_with_a_claim(db, settings)
        Lock(db, settings).acquire("run-2", OWNER)
        aborts = iter(["abort"])
        flaky = faulty(lambda paths: next(aborts, None))
        assert revoke(flaky, settings, "run-1") == 1
        with pytest.raises(LeaseLost):
            zombie.commit(claim, [], None)

    def test_a_failed_unlock_revoke_is_finished_by_retrying_the_unlock(
        self, db, settings, monkeypatch
    ):
        """Case 2: a forced unlock whose revoke fails answers 503 (StoreUnavailable); the lock
        keeps the run to revoke, and the retried unlock ("not held") finishes the revoke."""
        zombie, claim = zombie_with_a_claim(db, settings)
        monkeypatch.setattr(fence_module, "REVOKE_SECONDS", 0.5)
        commits = iter(["ok"])  # the unlock itself lands; every revoke commit aborts
        broken = faulty(lambda paths: None if next(commits, None) else "abort")
        with pytest.raises(StoreUnavailable):
            status.unlock(settings, broken, force=True)
        assert db.document("locks/smart-resume").get().to_dict()["revoke"] == ["run-1"]
        again = status.unlock(settings, db, force=True)
        assert again == {"status": "not held", "changed": False, "revokedClaims": 1}
        assert db.document("locks/smart-resume").get().to_dict()["revoke"] == []
        with pytest.raises(LeaseLost):
            zombie.commit(claim, [], None)

    def test_force_release_reads_back_a_lost_answer(self, db, settings):
        Lock(db, settings).acquire("run-1", OWNER)
        lost = faulty(lambda paths: "lose")
        body = status.unlock(settings, lost, force=True)
        assert (body["status"], body["runId"]) == ("unlocked", "run-1")
        data = db.document("locks/smart-resume").get().to_dict()
        assert (data["held"], data["token"]) == (False, 2)


class TestOneClientsTrouble:
    def test_a_client_deleted_mid_operation_skips_only_itself(self, db, configure, pipeline_file):
        """Case 3: with concurrency 1 the deleted client's worker goes on with the next
        clients (before: four healthy clients silently skipped and the run failed)."""
        pipeline_file(pipe("gate"))
        settings = configure()
        seed_clients(db, 5)
        opfuncs.BEHAVIOUR.update(entered=threading.Event(), release=threading.Event())
        box: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: box.update(out=run_once(settings, db)))
        worker.start()
        assert opfuncs.BEHAVIOUR["entered"].wait(10)
        db.document("clients/c00000").delete()
        opfuncs.BEHAVIOUR["release"].set()
        worker.join(30)
        out = box["out"]
        assert out.status == "completed", out.body
        record = db.document(f"runs/{out.run_id}").get().to_dict()
        processed = {r["clientId"] for r in record["results"] if r["outcome"] == "processed"}
        assert {"c00001", "c00002", "c00003", "c00004"} <= processed
        assert db.document("locks/smart-resume").get().to_dict()["held"] is False

    def test_a_client_claimed_by_a_live_run_of_another_lock_is_skipped(
        self, db, configure, pipeline_file
    ):
        """Case 4: the client is skipped, not the run (before: `abandoned`, the lock still
        held by the run, no report)."""
        pipeline_file(pipe("ok"))
        settings = configure()
        seed_clients(db, 3)
        now = dt.datetime.now(dt.UTC)
        db.document("locks/smart-resume-shard-2").set(
            {
                "held": True,
                "runId": "old-layout",
                "acquiredAt": now,
                "heartbeatAt": now,
                "leaseSeconds": 300,
                "maxRunSeconds": 1800,
            }
        )
        claim = {"runId": "old-layout", "token": 4, "lock": "smart-resume-shard-2", "open": True}
        # Due already (the full pass leaves a client another run works on to that run).
        db.document("clients/c00001").update({"claim": claim, "nextDueAt": now})
        out = run_once(settings, db)
        assert out.status == "completed", out.body
        rows = {
            r["clientId"]: r for r in db.document(f"runs/{out.run_id}").get().to_dict()["results"]
        }
        assert rows["c00001"]["outcome"] == "skipped"
        assert "smart-resume-shard-2" in rows["c00001"]["reason"]
        assert rows["c00000"]["outcome"] == rows["c00002"]["outcome"] == "processed"
        db.document("locks/smart-resume-shard-2").update({"held": False})
        out = run_once(settings, db, client_id="c00001")
        assert out.body["summary"]["processed"] == 1  # a claim of a run that ended is taken

    def test_a_reserved_count_name_fails_that_operation_only(self, db, configure, pipeline_file):
        """Case 5: `__total__` is refused by Firestore; the operation fails naming it (and
        backs off like any failure) instead of failing every run."""
        pipeline_file(pipe("ok"))
        settings = configure()
        seed_clients(db, 2)
        opfuncs.BEHAVIOUR["counts_for"] = {"c00000": {"__total__": 1}}
        out = run_once(settings, db)
        assert out.status == "completed" and out.body["summary"]["failed"] == 1
        state = db.document("clients/c00000/operations/op0").get().to_dict()
        assert state["status"] == "failed" and "__total__" in state["error"]
        assert db.document("clients/c00001/operations/op0").get().to_dict()["status"] == "success"


class TestBoundedRecords:
    def test_ten_thousand_count_names_still_release(self, db, configure, pipeline_file):
        """Case 6: 100 clients x 100 distinct count names: the summary keeps the largest 100
        and says how many were cut; the release lands and the report goes out."""
        pipeline_file(pipe("ok"))
        settings = configure(SMART_RESUME_CONCURRENCY="4")
        ids = seed_clients(db, 100)
        opfuncs.BEHAVIOUR["counts_for"] = {
            cid: {f"{cid}-n{i}": i + 1 for i in range(100)} for cid in ids
        }
        out = run_once(settings, db)
        assert out.status == "completed"
        summary = db.document(f"runs/{out.run_id}").get().to_dict()["summary"]
        assert len(summary["impact"]) == 100
        assert summary["impactOmitted"]["names"] == 9900
        assert db.document("locks/smart-resume").get().to_dict()["held"] is False


class TestCoalescedCheckpoints:
    def test_fast_paging_writes_each_document_about_once_a_second(
        self, db, configure, pipeline_file
    ):
        """Case 7: 200 checkpoints in well under a second (before: 201 writes each to the
        state and the client document); the last checkpoint and the outcome are saved. (The
        client document's first write is the full pass stamping the new client.)"""
        pipeline_file(pipe("chunked"))
        settings = configure()
        seed_clients(db, 1)
        opfuncs.BEHAVIOUR.update(pages=200, page_delay=0)
        landed: list[Landed] = []
        counting = faulty_client(PROJECT, Faults(), 1, landed)
        out = run_once(settings, counting)
        assert out.status == "completed"
        duration = out.body["summary"]["durationSeconds"]
        writes = {
            path: sum(path in e.paths for e in landed)
            for path in ("clients/c00000", "clients/c00000/operations/op0")
        }
        assert writes["clients/c00000/operations/op0"] <= 2 + int(duration), writes
        assert writes["clients/c00000"] <= 3 + int(duration), writes
        state = db.document("clients/c00000/operations/op0").get().to_dict()
        assert state["status"] == "success" and state["counts"] == {"pages": 200}

    def test_an_outcome_survives_a_failed_commit(self, db, configure, pipeline_file):
        """Case 8: the commit that would carry the next operation's `running` mark fails past
        its retries; the previous operation's success is still saved by the client's close."""
        pipeline_file(pipe("ok", "ok"))
        settings = configure(SMART_RESUME_RPC_TIMEOUT_SECONDS="0.5")
        seed_clients(db, 1)
        opfuncs.BEHAVIOUR["delay"] = 1.1  # the first operation outlasts the 1 s spacing
        since: list[float] = []

        def decide(paths: list[str]) -> str | None:
            """The first commit carrying op1's mark fails, with its retries (0.5 s); the
            client's close right after is let through."""
            if "clients/c00000/operations/op1" in paths and not since:
                since.append(time.monotonic())
            return "unavailable" if since and time.monotonic() < since[0] + 0.55 else None

        out = run_once(settings, faulty(decide))
        assert out.status == "failed"
        state = db.document("clients/c00000/operations/op0").get().to_dict()
        assert state["status"] == "success"


class TestReleaseUnderAnOutage:
    def test_a_brief_outage_is_waited_out(self, db, settings):
        """The store refuses commits for 0.3 s as the run releases: the release waits and
        lands, rather than spend its attempts in milliseconds and call the lease lost."""
        armed: list[float] = []

        def decide(paths: list[str]) -> str | None:
            return "unavailable" if armed and time.monotonic() < armed[0] + 0.3 else None

        lock = Lock(faulty(decide), settings)
        lease = lock.acquire("run-1", OWNER)
        armed.append(time.monotonic())
        assert lock.release(lease) is True
        assert db.document("locks/smart-resume").get().to_dict()["held"] is False

    def test_a_store_that_stays_down_is_an_error_not_a_lost_lease(self, db, settings):
        """Refused to the end: `StoreUnavailable` (the run reports it), never False (which
        says another run has the lock); the lock is still held, to go stale."""
        lock = Lock(faulty(lambda paths: "unavailable" if len(paths) > 0 else None), settings)
        lease = Lock(db, settings).acquire("run-1", OWNER)
        with pytest.raises(StoreUnavailable):
            lock.release(lease)
        assert db.document("locks/smart-resume").get().to_dict()["held"] is True


class TestOneReportEver:
    def test_release_landed_but_read_back_failed(self, db, configure, pipeline_file):
        """Case 9: the release commit lands, its answer is lost and reading back fails: no
        report from this run (the claim landed `sending`); the next run sends it, once."""
        pipeline_file(pipe("ok"))
        settings = configure(SMART_RESUME_RPC_TIMEOUT_SECONDS="0.5")
        seed_clients(db, 1)
        faults = Faults()

        def decide(paths: list[str]) -> str | None:
            releasing = (
                "locks/smart-resume" in paths
                and "locks/smart-resume/fence/current" not in paths
                and any(p.startswith("runs/") for p in paths)
            )
            if releasing and faults.injected["lost"] == 0:
                faults.partitioned.set()  # every read after this commit fails
                return "lose"
            return None

        faults.decide = decide
        faults.injected["lost"] = 0
        client = faulty_client(PROJECT, faults, 1, [])
        first = run_once(settings, client)
        assert first.status == "failed" and first.report is None
        record = db.document(f"runs/{first.run_id}").get().to_dict()
        assert record["status"] == "completed" and record["report"]["status"] == "sending"
        old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        db.document(f"runs/{first.run_id}").update({"report.at": old})
        second = run_once(settings, db)
        assert second.status == "completed"
        record = db.document(f"runs/{first.run_id}").get().to_dict()
        assert record["report"]["status"] == "sent"


class TestTheHoldersLease:
    def test_staleness_is_judged_by_the_lease_the_holder_recorded(self, db, configure):
        """Case 10: a holder with a 300 s lease, read by a contender whose own lease is 1 s,
        is live 5 s after its last heartbeat (before: taken over while alive)."""
        holder = configure(SMART_RESUME_LEASE_SECONDS="300")
        Lock(db, holder).acquire("run-1", OWNER)
        backdate(db, 5)
        contender = configure(SMART_RESUME_LEASE_SECONDS="1", SMART_RESUME_HEARTBEAT_SECONDS="0.2")
        with pytest.raises(LockHeld) as held:
            Lock(db, contender).acquire("run-2", OWNER)
        assert held.value.stale_in_seconds > 200
        assert status.snapshot(contender, db)["stale"] is False


class TestFinishingInTheMargin:
    def test_result_pages_past_the_margin_are_counted_not_waited_for(self, db, settings):
        """Case 9: with a slow store the finishing phase could outlast the 120 s margin;
        result pages due after their share of it are counted as omitted, never written late."""
        from shared.runs import Runs

        results = [{"clientId": f"c{i}", "error": "E" * 4000} for i in range(400)]
        inline, omitted = Runs(db, settings).store_results("r1", results, until=0.0)
        assert inline and omitted == len(results) - len(inline)
        assert not list(db.collection("runs/r1/results").stream())
