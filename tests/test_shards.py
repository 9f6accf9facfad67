"""Shards: separate runs with their own locks, on separate processes, sharing
nothing but Firestore."""

from __future__ import annotations

import collections
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, seed_clients
from faults_helpers import wait_for
from functions_framework import create_app

from shared.resume.shards import shard_of

SECRET = {"X-Webhook-Secret": "test-secret-1-0123456"}
PIPELINE = '[[operation]]\nname = "first"\nkind = "python"\ntarget = "opfuncs:ok"\n'
FAST = {
    "SMART_RESUME_SHARDS": "3",
    "SMART_RESUME_HEARTBEAT_SECONDS": "0.2",
    "SMART_RESUME_LEASE_SECONDS": "1.5",
    "SMART_RESUME_TIME_BUDGET_SECONDS": "60",
    "SMART_RESUME_MAX_RUN_SECONDS": "120",
    "SMART_RESUME_CONCURRENCY": "4",
}


def test_shard_arithmetic_is_the_contracts() -> None:
    import hashlib

    for cid in ("c00001", "émile", "x" * 300):
        expected = int(hashlib.sha256(cid.encode()).hexdigest()[:8], 16) % 7
        assert shard_of(cid, 7) == expected


class TestAdmission:
    @pytest.fixture
    def trigger(self, pipeline_file, configure):
        pipeline_file(PIPELINE)
        configure(SMART_RESUME_SHARDS="3")
        source = str(ROOT / "functions" / "smart_resume" / "main.py")
        return create_app(target="smart_resume", source=source).test_client()

    @pytest.mark.parametrize(
        ("body", "detail"),
        [({}, "'shard' is required"), ({"shard": 3}, "from 0 to 2"), ({"shard": -1}, "0 to 2")],
    )
    def test_bad_or_missing_shard_is_400(self, trigger, db, body, detail) -> None:
        response = trigger.post("/", data=json.dumps(body), headers=SECRET)
        assert response.status_code == 400
        assert detail in response.get_json()["detail"]
        assert list(db.collection("locks").list_documents()) == []

    def test_shard_run_takes_its_own_lock(self, trigger, db) -> None:
        seed_clients(db, 30)
        response = trigger.post("/", data=json.dumps({"shard": 1}), headers=SECRET)
        assert response.status_code == 200, response.get_json()
        summary = response.get_json()["summary"]
        mine = [f"c{i:05d}" for i in range(30) if shard_of(f"c{i:05d}", 3) == 1]
        assert summary["processed"] == len(mine)
        assert db.document("locks/smart-resume-shard-1").get().to_dict()["held"] is False
        assert not db.document("locks/smart-resume").get().exists
        for cid in mine:
            assert db.document(f"clients/{cid}").get().to_dict()["shard"] == 1


@pytest.mark.slow
def test_three_shards_on_three_processes_run_every_client_once(
    function_process, pipeline_file, db
) -> None:
    """300 clients, N = 3, three concurrent shard triggers on three processes."""
    pipeline_file(PIPELINE)
    ids = seed_clients(db, 300)
    triggers = [function_process("smart_resume", **FAST) for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda k: triggers[k].post({"shard": k}, timeout=120), range(3)))
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    per_shard = [a.json()["summary"]["processed"] for a in answers]
    assert sum(per_shard) == 300
    mean = 100
    assert all(0.8 * mean <= n <= 1.2 * mean for n in per_shard), per_shard
    runs_of = collections.Counter()
    for cid in ids:
        state = db.document(f"clients/{cid}/operations/first").get().to_dict()
        assert state["status"] == "success" and state["attempts"] == 1  # exactly once
        client = db.document(f"clients/{cid}").get().to_dict()
        assert client["shard"] == shard_of(cid, 3)
        runs_of[state["runId"]] += 1
    assert sorted(runs_of.values()) == sorted(per_shard)  # one run per shard touched each


@pytest.mark.slow
def test_a_killed_shard_holds_up_no_other_and_is_taken_over(
    function_process, pipeline_file, db, ops
) -> None:
    """Shard 0 is killed mid-run; shards 1 and 2 finish; a later trigger of shard 0 takes its
    stale lock over and finishes its clients."""

    def slow(payload):
        time.sleep(0.3)
        return 200, {"done": True}

    url = ops.route("/slow", slow)
    pipeline_file(f'[[operation]]\nname = "first"\nkind = "http"\nurl = "{url}"\n')
    ids = seed_clients(db, 30)
    doomed = function_process("smart_resume", **FAST)
    others = [function_process("smart_resume", **FAST) for _ in range(2)]
    with ThreadPoolExecutor(3) as pool:
        killed = pool.submit(doomed.post, {"shard": 0}, timeout=120)
        wait_for(
            lambda: (db.document("locks/smart-resume-shard-0").get().to_dict() or {}).get("held"),
            timeout=30,
        )
        time.sleep(0.5)
        doomed.signal(signal.SIGKILL)
        answers = list(pool.map(lambda k: others[k - 1].post({"shard": k}, timeout=120), (1, 2)))
        with pytest.raises(Exception):  # noqa: B017 (the connection dies with the process)
            killed.result(timeout=30)
    assert [a.json()["status"] for a in answers] == ["completed", "completed"]
    time.sleep(1.6)  # the lease of shard 0 runs out
    retry = function_process("smart_resume", **FAST).post({"shard": 0}, timeout=120)
    assert retry.status_code == 200 and retry.json()["status"] == "completed", retry.text
    for cid in ids:
        state = db.document(f"clients/{cid}/operations/first").get().to_dict()
        assert state["status"] == "success", (cid, state)


def test_status_answers_for_every_shard_and_for_one(db, configure, pipeline_file) -> None:
    """Without `?shard` the status lists every shard and the worst health; with it, one."""
    pipeline_file(PIPELINE)
    configure(SMART_RESUME_SHARDS="3")
    seed_clients(db, 12)
    source = str(ROOT / "functions" / "smart_resume" / "main.py")
    trigger = create_app(target="smart_resume", source=source).test_client()
    assert trigger.post("/", data=json.dumps({"shard": 2}), headers=SECRET).status_code == 200
    source = str(ROOT / "functions" / "smart_resume_status" / "main.py")
    app = create_app(target="smart_resume_status", source=source).test_client()
    body = app.get("/", headers=SECRET).get_json()
    assert [s["shard"] for s in body["shards"]] == [0, 1, 2]
    assert body["health"]["state"] == "unknown"  # shards 0 and 1 never ran: the worst
    assert body["shards"][2]["health"]["state"] == "ok"
    one = app.get("/?shard=2", headers=SECRET).get_json()
    assert one["shard"] == 2 and one["lastRun"]["status"] == "completed"
    assert app.get("/?shard=3", headers=SECRET).status_code == 400
    unlock = app.post("/", data=json.dumps({"action": "unlock"}), headers=SECRET)
    assert unlock.status_code == 200 and len(unlock.get_json()["shards"]) == 3


def test_cli_run_needs_a_shard_and_exits_5_on_failures(db, configure, pipeline_file, capsys):
    from shared.resume.cli import main

    pipeline_file(PIPELINE.replace("opfuncs:ok", "opfuncs:boom"))
    configure(SMART_RESUME_SHARDS="2")
    seed_clients(db, 6)
    assert main(["run"]) == 2
    assert "--shard K is required" in capsys.readouterr().err
    assert main(["run", "--shard", "5"]) == 2
    assert main(["run", "--shard", "1"]) == 5  # completed, with failed client-operations
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "shard 0:" in out and "shard 1:" in out


def test_shards_back_to_an_earlier_count_lose_no_client(db, configure, pipeline_file) -> None:
    """3 shards, then 2, then 3 again within a day: shard 2's record of its last full pass
    still matches, but the clients it owns were stamped with shard 0 or 1 meanwhile. Another
    shard's full pass (which reads every active client anyway) repairs their stored shard, so
    shard 2 runs them on its next tick instead of a day later."""
    import opfuncs
    from conftest import run_once

    pipeline_file(
        "fresh_hours = 0.0005\n"  # 1.8 s: every client is due again on each step
        '[[operation]]\nname = "first"\nkind = "python"\ntarget = "opfuncs:ok"\n'
    )
    ids = seed_clients(db, 30)

    def tick(count: int) -> None:
        settings = configure(SMART_RESUME_SHARDS=str(count))
        time.sleep(1.9)
        for shard in range(count):
            assert run_once(settings, db, shard=shard).status == "completed"

    tick(3)
    tick(2)
    opfuncs.SEEN.clear()
    tick(3)
    ran = collections.Counter(seen["client"] for seen in opfuncs.SEEN)
    assert sorted(ran) == ids and set(ran.values()) == {1}
    stored = {s.id: s.get("shard") for s in db.collection("clients").stream()}
    assert stored == {i: shard_of(i, 3) for i in ids}
