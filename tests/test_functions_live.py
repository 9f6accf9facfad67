"""Both functions as real `functions-framework` processes on loopback, against the emulator."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import seed_clients
from faults_helpers import wait_for

FAST = {
    "SMART_RESUME_HEARTBEAT_SECONDS": "0.2",
    "SMART_RESUME_LEASE_SECONDS": "1.5",
    "SMART_RESUME_TIME_BUDGET_SECONDS": "60",
    "SMART_RESUME_MAX_RUN_SECONDS": "120",
}


def _slow_service(ops, pages: int, delay: float) -> str:
    def handler(payload):
        time.sleep(delay)
        page = (payload.get("checkpoint") or {}).get("page", 0) + 1
        return 200, {"done": page >= pages, "checkpoint": {"page": page}, "counts": {"rows": 1}}

    return ops.route("/work", handler)


def _pipeline(pipeline_file, url: str) -> None:
    pipeline_file(f'[[operation]]\nname = "work"\nkind = "http"\nurl = "{url}"\n')


@pytest.mark.slow
def test_12_concurrent_posts_one_run_eleven_409(function_process, ops, pipeline_file, db):
    _pipeline(pipeline_file, _slow_service(ops, pages=4, delay=0.25))
    seed_clients(db, 1)
    trigger = function_process("smart_resume", **FAST)
    barrier = threading.Barrier(12)

    def fire(_):
        barrier.wait()
        return trigger.post({})

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(fire, range(12)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] + [409] * 11
    winner = next(a.json() for a in answers if a.status_code == 200)
    assert winner["status"] == "completed"
    assert all(a.json()["status"] == "locked" for a in answers if a.status_code == 409)
    assert len(ops.calls("/work")) == 4  # one run's worth of calls


@pytest.mark.slow
def test_two_processes_share_one_lock(function_process, ops, pipeline_file, db):
    _pipeline(pipeline_file, _slow_service(ops, pages=3, delay=0.3))
    seed_clients(db, 1)
    a = function_process("smart_resume", **FAST)
    b = function_process("smart_resume", **FAST)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(a.post, {})
        time.sleep(0.3)
        second = pool.submit(b.post, {})
        codes = sorted([first.result().status_code, second.result().status_code])
    assert codes == [200, 409]
    assert len(ops.calls("/work")) == 3


@pytest.mark.slow
def test_status_during_and_after_a_run(function_process, ops, pipeline_file, db):
    _pipeline(pipeline_file, _slow_service(ops, pages=6, delay=0.3))
    seed_clients(db, 2)
    trigger = function_process("smart_resume", **FAST)
    status = function_process("smart_resume_status", **FAST)
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(trigger.post, {})
        during = wait_for(lambda: (s := status.get().json())["running"] and s["progress"] and s)
        during = wait_for(lambda: (s := status.get().json())["progress"].get("clientId") and s)
        assert during["runId"]
        assert during["heartbeatAgeSeconds"] < 1.5
        assert during["progress"]["operation"] == "work"
        assert during["progress"]["clientCount"] == 2
        result = run.result().json()
    after = status.get("?runs=5").json()
    assert after["running"] is False
    assert after["lastRun"]["runId"] == result["runId"]
    assert after["lastRun"]["status"] == "completed"
    assert after["runs"][0]["runId"] == result["runId"]


@pytest.mark.slow
def test_sigkill_mid_run_is_taken_over_and_resumed_from_checkpoint(
    function_process, ops, pipeline_file, db
):
    """A killed run's lock goes stale; the next trigger takes over and resumes the checkpoint."""
    _pipeline(pipeline_file, _slow_service(ops, pages=20, delay=0.2))
    seed_clients(db, 1)
    victim = function_process("smart_resume", **FAST)
    state = db.document("clients/c00000/operations/work")
    with ThreadPoolExecutor(1) as pool:
        pool.submit(victim.post, {})
        # Saves are coalesced to one a second: wait for one to land, then kill.
        wait_for(lambda: ((state.get().to_dict() or {}).get("checkpoint") or {}).get("page"))
        victim.signal(signal.SIGKILL)
    killed_run = db.document("locks/smart-resume").get().to_dict()["runId"]
    saved = state.get().to_dict()["checkpoint"]
    assert saved and saved["page"] >= 1
    survivor = function_process("smart_resume", **FAST)
    # Retry until the killed run's lease (1.5 s) expires; until then the answer is 409.
    answer = wait_for(lambda: (r := survivor.post({})).status_code == 200 and r.json(), pause=0.3)
    assert answer["status"] == "completed"
    assert db.document(f"runs/{killed_run}").get().to_dict()["status"] == "abandoned"
    new_run_calls = [c for c in ops.calls("/work") if c["runId"] == answer["runId"]]
    assert new_run_calls[0]["checkpoint"]["page"] >= saved["page"]
    pages = [(c["checkpoint"] or {}).get("page", 0) for c in ops.calls("/work")]
    assert pages[-1] == 19
    record = db.document(f"runs/{answer['runId']}").get().to_dict()
    assert record["tookOver"] == killed_run


@pytest.mark.slow
def test_cancel_and_unlock_through_the_status_function(function_process, ops, pipeline_file, db):
    _pipeline(pipeline_file, _slow_service(ops, pages=50, delay=0.1))
    seed_clients(db, 1)
    trigger = function_process("smart_resume", **FAST)
    status = function_process("smart_resume_status", **FAST)
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(trigger.post, {})
        wait_for(lambda: status.get().json()["running"])
        assert status.post({"action": "cancel"}).status_code == 202
        assert run.result().json()["status"] == "cancelled"
    state = db.document("clients/c00000/operations/work").get().to_dict()
    assert state["status"] == "partial"
    # A live run refuses a plain unlock; force releases it and the run answers abandoned.
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(trigger.post, {})
        wait_for(lambda: status.get().json()["running"])
        assert status.post({"action": "unlock"}).status_code == 409
        assert status.post({"action": "unlock", "force": True}).status_code == 200
        answer = run.result()
    assert answer.status_code == 500
    assert answer.json()["status"] == "abandoned"
    assert answer.json()["error"] == "lease lost"
