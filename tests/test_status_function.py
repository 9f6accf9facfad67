"""The status function through `create_app`: every answer in docs/reference.md."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from conftest import ROOT, seed_clients
from functions_framework import create_app

from shared.lock import Lock
from shared.resume.plan import RunOptions
from shared.runner import start_run

SOURCE = str(ROOT / "functions" / "smart_resume_status" / "main.py")
SECRET = {"X-Webhook-Secret": "test-secret-2-0123456"}
OWNER = {"host": "h", "pid": 1, "function": "test"}


@pytest.fixture
def status_fn():
    return create_app(target="smart_resume_status", source=SOURCE).test_client()


def act(client, body):
    return client.post("/", data=json.dumps(body), headers=SECRET)


def _stale(db, settings) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=settings.lease_seconds + 10)
    db.document(f"locks/{settings.lock_name}").update({"heartbeatAt": old})


class TestGet:
    def test_never_ran(self, status_fn) -> None:
        """No lock document yet: not running, nothing to report, limits shown."""
        response = status_fn.get("/", headers=SECRET)
        assert response.status_code == 200
        body = response.get_json()
        assert body["running"] is False
        assert body["stale"] is False
        assert body["runId"] is None
        assert body["lastRun"] is None
        assert body["token"] == 0
        assert body["limits"] == {
            "heartbeatSeconds": 60.0,
            "leaseSeconds": 300.0,
            "maxRunSeconds": 1800.0,
            "timeBudgetSeconds": 1500.0,
        }

    def test_health_and_quarantined_are_always_there(self, status_fn) -> None:
        """`health` with its four keys, and `quarantined` (empty)."""
        body = status_fn.get("/", headers=SECRET).get_json()
        assert set(body["health"]) == {"state", "reasons", "lastSuccessAt", "expectedEverySeconds"}
        assert body["health"]["state"] == "unknown"
        assert body["quarantined"] == []
        assert body["progressAgeSeconds"] is None

    def test_check_health_is_200_or_503(self, status_fn, configure) -> None:
        """`?check=health`: the health object alone; 503 once an expected interval makes a
        deployment that never ran unhealthy."""
        response = status_fn.get("/?check=health", headers=SECRET)
        assert response.status_code == 200
        assert response.get_json()["state"] == "unknown"
        configure(SMART_RESUME_EXPECTED_EVERY_SECONDS="60")
        response = status_fn.get("/?check=health", headers=SECRET)
        assert response.status_code == 503
        assert response.get_json()["expectedEverySeconds"] == 60.0
        assert status_fn.get("/?check=nope", headers=SECRET).status_code == 400

    def test_running_fields(self, status_fn, db, settings) -> None:
        lease = Lock(db, settings).acquire("run-a", OWNER)
        Lock(db, settings).renew(
            lease, {"clientId": "c1", "clientIndex": 0, "clientCount": 3, "operation": "score"}
        )
        body = status_fn.get("/", headers=SECRET).get_json()
        assert body["running"] is True
        assert body["runId"] == "run-a"
        assert body["token"] == 1
        assert body["startedAt"].endswith("Z")
        assert body["lastHeartbeatAt"].endswith("Z")
        assert 0 <= body["ageSeconds"] < 10
        assert 0 <= body["heartbeatAgeSeconds"] < 10
        assert body["progress"] == {
            "clientId": "c1",
            "clientIndex": 0,
            "clientCount": 3,
            "operation": "score",
        }
        assert body["cancelRequested"] is False
        assert body["health"]["state"] == "running"
        assert 0 <= body["progressAgeSeconds"] < 10
        assert body["lastProgressAt"] == body["startedAt"]  # it never moved since

    def test_stale_lock_is_not_running(self, status_fn, db, settings) -> None:
        Lock(db, settings).acquire("run-a", OWNER)
        _stale(db, settings)
        body = status_fn.get("/", headers=SECRET).get_json()
        assert (body["running"], body["stale"]) == (False, True)

    def test_last_run_and_runs(self, status_fn, db, settings) -> None:
        seed_clients(db, 1)
        ids = [
            start_run(settings, db, RunOptions(), trigger={"source": "test"}).run_id
            for _ in range(3)
        ]
        body = status_fn.get("/?runs=2", headers=SECRET).get_json()
        assert body["lastRun"]["runId"] == ids[-1]
        assert body["lastRun"]["status"] == "completed"
        assert [r["runId"] for r in body["runs"]] == [ids[2], ids[1]]

    @pytest.mark.parametrize("runs", ["0", "51", "-1", "abc", "1e3", "10" * 10, ""])
    def test_runs_out_of_range_is_400(self, status_fn, runs) -> None:
        response = status_fn.get(f"/?runs={runs}", headers=SECRET)
        assert response.status_code == 400
        assert "'runs'" in response.get_json()["detail"]

    def test_auth_required(self, status_fn) -> None:
        assert status_fn.get("/").status_code == 401
        assert status_fn.get("/", headers={"X-Webhook-Secret": "nope"}).status_code == 401

    @pytest.mark.parametrize("method", ["put", "delete", "patch"])
    def test_other_methods_are_405(self, status_fn, method) -> None:
        assert getattr(status_fn, method)("/", headers=SECRET).status_code == 405


class TestActions:
    def test_cancel_running(self, status_fn, db, settings) -> None:
        Lock(db, settings).acquire("run-a", OWNER)
        response = act(status_fn, {"action": "cancel"})
        assert response.status_code == 202
        assert response.get_json()["runId"] == "run-a"
        assert db.document("locks/smart-resume").get().to_dict()["cancelRequested"] is True
        assert status_fn.get("/", headers=SECRET).get_json()["cancelRequested"] is True

    def test_cancel_when_nothing_runs_is_409(self, status_fn) -> None:
        assert act(status_fn, {"action": "cancel"}).status_code == 409

    def test_unlock_live_is_409_and_force_releases(self, status_fn, db, settings) -> None:
        Lock(db, settings).acquire("run-a", OWNER)
        assert act(status_fn, {"action": "unlock"}).status_code == 409
        assert db.document("locks/smart-resume").get().to_dict()["held"] is True
        response = act(status_fn, {"action": "unlock", "force": True})
        assert response.status_code == 200
        lock = db.document("locks/smart-resume").get().to_dict()
        assert (lock["held"], lock["token"]) == (False, 2)

    def test_unlock_stale_marks_the_run_abandoned(self, status_fn, db, settings) -> None:
        """Unlocking bumps the token and marks the holder's run abandoned."""
        seed_clients(db, 1)
        lease = Lock(db, settings).acquire(
            "run-a",
            OWNER,
            extra=lambda b, _: b.set(db.document("runs/run-a"), {"status": "running"}),
        )
        _stale(db, settings)
        response = act(status_fn, {"action": "unlock"})
        assert response.status_code == 200
        assert response.get_json()["runId"] == "run-a"
        assert db.document("runs/run-a").get().to_dict()["status"] == "abandoned"
        from shared.errors import LeaseLost
        from shared.fence import Fence

        with pytest.raises(LeaseLost):
            Fence(db, settings, lease).claim("c00000", [(db.document("clients/c00000/x/y"), {})])
        assert not db.document("clients/c00000/x/y").get().exists

    def test_unlock_free_lock_is_200_without_change(self, status_fn, db) -> None:
        response = act(status_fn, {"action": "unlock"})
        assert response.status_code == 200
        assert response.get_json()["changed"] is False

    @pytest.mark.parametrize(
        "body",
        [
            {"action": "explode"},
            {},
            {"action": "unlock", "force": "yes"},
            {"action": "cancel", "extra": 1},
            {"action": ["cancel"]},
        ],
    )
    def test_bad_actions_are_400(self, status_fn, body) -> None:
        response = act(status_fn, body)
        assert response.status_code == 400
        assert response.get_json()["error"] == "invalid request"

    def test_store_unreachable_is_503(self, status_fn, configure) -> None:
        from conftest import free_port

        configure(
            FIRESTORE_EMULATOR_HOST=f"127.0.0.1:{free_port()}", SMART_RESUME_RPC_TIMEOUT_SECONDS="1"
        )
        assert status_fn.get("/", headers=SECRET).status_code == 503


def test_runs_of_another_lock_are_not_shown(status_fn, db, configure) -> None:
    """Two streams in one database: each status function shows its own lock's runs."""
    seed_clients(db, 1)
    other = configure(SMART_RESUME_LOCK_NAME="stream-2")
    other_run = start_run(other, db, RunOptions(), trigger={"source": "test"}).run_id
    mine = configure(SMART_RESUME_LOCK_NAME="smart-resume")
    my_run = start_run(mine, db, RunOptions(), trigger={"source": "test"}).run_id
    body = status_fn.get("/?runs=5", headers=SECRET).get_json()
    assert [r["runId"] for r in body["runs"]] == [my_run]
    assert body["lastRun"]["runId"] == my_run
    assert other_run != my_run
