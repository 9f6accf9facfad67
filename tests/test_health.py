"""Health: every state reached for real, precedence, `?check=health`, progress that moves apart
from heartbeats, and reports left `sending` settled by the next run."""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
from conftest import ROOT, seed_clients
from faults_helpers import wait_for
from functions_framework import create_app

from shared import health, lock, runner
from shared.heartbeat import PROGRESS_AT, Heartbeat
from shared.lock import Lock, LockState
from shared.resume.plan import RunOptions
from shared.runner import start_run

SOURCE = str(ROOT / "functions" / "smart_resume_status" / "main.py")
SECRET = {"X-Webhook-Secret": "test-secret-1-0123456"}
OWNER = {"host": "h", "pid": 1, "function": "test"}
OK = '[[operation]]\nname = "work"\nkind = "python"\ntarget = "opfuncs:ok"\n'
BOOM = (
    'quarantine_after = 1\n[[operation]]\nname = "work"\nkind = "python"\ntarget = "opfuncs:boom"\n'
)
GATE = '[[operation]]\nname = "work"\nkind = "python"\ntarget = "opfuncs:gate"\n'
HANG = '[[operation]]\nname = "work"\nkind = "python"\ntarget = "test_health:hang"\n'
FAST = {
    "SMART_RESUME_HEARTBEAT_SECONDS": "0.2",
    "SMART_RESUME_LEASE_SECONDS": "2",
    "SMART_RESUME_TIME_BUDGET_SECONDS": "30",
    "SMART_RESUME_MAX_RUN_SECONDS": "60",
}


# --- operations and a resume module the function processes import (tests/ is on their path) --


def hang(ctx: Any) -> None:
    """Blocks without any progress (no checkpoint, nothing counted) while the heartbeat goes on:
    a worker stuck on a socket."""
    time.sleep(float(os.environ.get("TEST_HANG_SECONDS", "6")))


def run_smart_resume(run: Any) -> Any:
    """A resume module whose engine breaks: the run ends `failed`."""
    raise RuntimeError("engine broke on purpose")


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def status_fn():
    return create_app(target="smart_resume_status", source=SOURCE).test_client()


def health_of(status_fn) -> dict[str, Any]:
    response = status_fn.get("/", headers=SECRET)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["health"]


def check(status_fn) -> tuple[int, dict[str, Any]]:
    response = status_fn.get("/?check=health", headers=SECRET)
    return response.status_code, response.get_json()


def run_once(settings, db) -> Any:
    return start_run(settings, db, RunOptions(), trigger={"source": "test"})


@pytest.fixture
def behaviour():
    import opfuncs

    opfuncs.reset()
    yield opfuncs.BEHAVIOUR
    release = opfuncs.BEHAVIOUR.get("release")
    if release is not None:
        release.set()
    opfuncs.reset()


# --- each state, reached for real -----------------------------------------------------------


class TestStates:
    def test_unknown_on_an_empty_database(self, status_fn, configure) -> None:
        """Nothing ever ran: `unknown`, alone, 200 without an expected interval and 503 with
        one (a watched deployment that never ran is not healthy)."""
        body = health_of(status_fn)
        assert body == {
            "state": "unknown",
            "reasons": ["no run has been recorded yet"],
            "lastSuccessAt": None,
            "expectedEverySeconds": None,
        }
        assert check(status_fn) == (200, body)
        configure(SMART_RESUME_EXPECTED_EVERY_SECONDS="2")
        code, body = check(status_fn)
        assert code == 503
        assert body["state"] == "unknown"
        assert body["reasons"] == ["no run has been recorded yet"]
        assert body["expectedEverySeconds"] == 2.0

    def test_ok_after_a_completed_run(self, status_fn, db, configure, pipeline_file) -> None:
        pipeline_file(OK)
        settings = configure()
        seed_clients(db, 1)
        outcome = run_once(settings, db)
        assert outcome.status == "completed"
        code, body = check(status_fn)
        assert code == 200
        assert body["state"] == "ok"
        assert outcome.run_id in body["reasons"][0] and "completed" in body["reasons"][0]
        record = db.document(f"runs/{outcome.run_id}").get().to_dict()
        assert body["lastSuccessAt"] == record["finishedAt"].isoformat().replace("+00:00", "Z")

    def test_overdue_with_a_two_second_expected_interval(
        self, status_fn, db, configure, pipeline_file
    ) -> None:
        """A run completes; 2 s expected, 1 s grace (half, the default): overdue after 3 s."""
        pipeline_file(OK)
        seed_clients(db, 1)
        settings = configure(SMART_RESUME_EXPECTED_EVERY_SECONDS="2")
        assert settings.grace_seconds == 1.0
        assert run_once(settings, db).status == "completed"
        code, body = check(status_fn)
        assert (code, body["state"]) == (200, "ok")
        started = time.monotonic()
        code, body = wait_for(lambda: (r := check(status_fn))[0] == 503 and r, timeout=15)
        waited = time.monotonic() - started
        print(f"FIGURE overdue: 503 overdue {waited:.2f} s after the run ended (2 s + 1 s grace)")
        assert body["state"] == "overdue"
        assert body["expectedEverySeconds"] == 2.0
        assert "no run has ended completed, partial or cancelled for" in body["reasons"][0]
        assert 2.0 < waited + 1.0 < 10  # judged on the server's clock, roughly 3 s after the end
        # The next run that ends well clears it.
        assert run_once(settings, db).status == "completed"
        assert check(status_fn)[1]["state"] == "ok"

    def test_failing_after_a_failed_run(self, status_fn, db, configure, pipeline_file) -> None:
        pipeline_file(OK)
        settings = configure(SMART_RESUME_MODULE="test_health")
        outcome = run_once(settings, db)
        assert outcome.status == "failed"
        code, body = check(status_fn)
        assert (code, body["state"]) == (503, "failing")
        assert body["reasons"] == [
            f"the last run {outcome.run_id} ended failed: engine broke on purpose"
        ]
        assert body["lastSuccessAt"] is None

    def test_failing_after_a_quarantine(self, status_fn, db, configure, pipeline_file) -> None:
        """The run itself completes, but an operation failed once with quarantine_after = 1."""
        pipeline_file(BOOM)
        settings = configure()
        seed_clients(db, 1)
        assert run_once(settings, db).status == "completed"
        response = status_fn.get("/", headers=SECRET).get_json()
        assert [(q["clientId"], q["operation"]) for q in response["quarantined"]] == [
            ("c00000", "work")
        ]
        assert set(response["quarantined"][0]) == {
            "clientId",
            "operation",
            "failures",
            "since",
            "error",
        }
        assert response["health"]["state"] == "failing"
        assert "1 client-operation is quarantined (c00000/work)" in response["health"]["reasons"][0]
        assert check(status_fn)[0] == 503

    def test_running_then_stuck_while_heartbeats_go_on(
        self, status_fn, db, configure, pipeline_file, behaviour
    ) -> None:
        """An operation that blocks: `running` at first, `stuck` once its progress has not moved
        for SMART_RESUME_STUCK_SECONDS although the heartbeat stays fresh; ok once it ends."""
        pipeline_file(GATE)
        seed_clients(db, 1)
        settings = configure(**FAST, SMART_RESUME_STUCK_SECONDS="1.5")
        behaviour.update(entered=threading.Event(), release=threading.Event())
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(run_once, settings, db)
            assert behaviour["entered"].wait(10)
            code, body = wait_for(
                lambda: (
                    "at client c00000, operation work" in (r := check(status_fn))[1]["reasons"][0]
                    and r
                ),
                timeout=10,
            )
            assert (code, body["state"]) == (200, "running"), body
            code, body = wait_for(lambda: (r := check(status_fn))[0] == 503 and r, timeout=15)
            assert body["state"] == "stuck"
            assert "has made no progress for" in body["reasons"][0]
            assert "although it still heartbeats" in body["reasons"][0]
            status = status_fn.get("/", headers=SECRET).get_json()
            assert status["running"] is True
            assert status["heartbeatAgeSeconds"] < 1.5  # alive
            assert status["progressAgeSeconds"] >= 1.5  # but not moving
            assert PROGRESS_AT not in status["progress"]
            behaviour["release"].set()
            assert future.result(timeout=30).status == "completed"
        code, body = check(status_fn)
        assert (code, body["state"]) == (200, "ok")


# --- precedence ---------------------------------------------------------------------------


class TestPrecedence:
    def test_stuck_overdue_and_failing_at_once(
        self, status_fn, db, configure, pipeline_file, behaviour
    ) -> None:
        """Quarantined work (failing), no success within 2 + 1 s (overdue) and a blocked live
        run (stuck): `stuck` wins and the reasons name all three, in order."""
        pipeline_file(BOOM)
        seed_clients(db, 1)
        settings = configure(**FAST)
        assert run_once(settings, db).status == "completed"  # quarantines c00000/work
        pipeline_file(BOOM + GATE.replace('"work"', '"later"'))
        seed_clients(db, 1, prefix="d")
        settings = configure(
            **FAST, SMART_RESUME_EXPECTED_EVERY_SECONDS="2", SMART_RESUME_STUCK_SECONDS="1.5"
        )
        behaviour.update(entered=threading.Event(), release=threading.Event(), fail_for={"nobody"})
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(
                start_run, settings, db, RunOptions(client_id="d00000"), trigger={"source": "t"}
            )
            assert behaviour["entered"].wait(10)
            body = wait_for(
                lambda: (
                    (h := health_of(status_fn))["state"] == "stuck" and len(h["reasons"]) == 3 and h
                ),
                timeout=20,
            )
            behaviour["release"].set()
            future.result(timeout=30)
        stuck, overdue, failing = body["reasons"]
        assert "no progress" in stuck
        assert "no run has ended completed, partial or cancelled for" in overdue
        assert "quarantined" in failing

    def test_overdue_wins_over_failing(self, status_fn, db, configure, pipeline_file) -> None:
        pipeline_file(OK)
        seed_clients(db, 1)
        settings = configure(SMART_RESUME_EXPECTED_EVERY_SECONDS="2")
        assert run_once(settings, db).status == "completed"
        broken = configure(
            SMART_RESUME_EXPECTED_EVERY_SECONDS="2", SMART_RESUME_MODULE="test_health"
        )
        assert run_once(broken, db).status == "failed"
        assert health_of(status_fn)["state"] == "failing"  # the success is still recent
        body = wait_for(lambda: (h := health_of(status_fn))["state"] == "overdue" and h, timeout=15)
        assert [r.split(" ")[0] for r in body["reasons"]] == ["no", "the"]
        assert "ended failed" in body["reasons"][1]

    def test_failing_wins_over_running(
        self, status_fn, db, configure, pipeline_file, behaviour
    ) -> None:
        pipeline_file(BOOM)
        seed_clients(db, 1)
        settings = configure(**FAST)
        assert run_once(settings, db).status == "completed"
        pipeline_file(GATE)
        seed_clients(db, 1, prefix="d")
        behaviour.update(entered=threading.Event(), release=threading.Event())
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(
                start_run, settings, db, RunOptions(client_id="d00000"), trigger={"source": "t"}
            )
            assert behaviour["entered"].wait(10)
            code, body = check(status_fn)
            behaviour["release"].set()
            future.result(timeout=30)
        assert (code, body["state"]) == (503, "failing")
        assert "quarantined" in body["reasons"][0]
        assert "is running" in body["reasons"][1]

    @pytest.mark.parametrize(
        ("live", "stuck", "overdue", "failed", "quarantined", "state"),
        [
            (True, True, True, True, True, "stuck"),
            (True, True, False, False, False, "stuck"),
            (False, False, True, True, True, "overdue"),
            (True, False, True, False, False, "overdue"),
            (True, False, False, True, False, "failing"),
            (False, False, False, False, True, "failing"),
            (True, False, False, False, False, "running"),
            (False, False, False, False, False, "ok"),
        ],
    )
    def test_judgement_order(
        self, configure, live, stuck, overdue, failed, quarantined, state
    ) -> None:
        """The whole order on synthetic evidence: first of stuck, overdue, failing, running, ok;
        every reason that applies is listed, in that order."""
        settings = configure(SMART_RESUME_EXPECTED_EVERY_SECONDS="60")
        now = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
        ago = lambda s: now - dt.timedelta(seconds=s)  # noqa: E731
        lock = LockState(
            exists=True,
            held=live,
            run_id="run-live" if live else None,
            token=3,
            stale=False,
            read_time=now,
            acquired_at=ago(2000 if stuck else 5),
            heartbeat_at=ago(1),
            released_at=None,
            age_seconds=2000 if stuck else 5,
            heartbeat_age_seconds=1,
            cancel_requested=False,
            progress={"clientId": "c1", "operation": "work"},
            owner={},
        )
        success = {
            "runId": "run-ok",
            "status": "completed",
            "finishedAt": ago(500 if overdue else 30),
        }
        newest = [{"runId": "run-bad", "status": "failed", "error": "x"}] if failed else []
        evidence = health.Evidence(
            lock,
            [*newest, success],
            success,
            [{"clientId": "c1", "operation": "work"}] if quarantined else [],
        )
        body = health.judge(settings, evidence)
        assert body["state"] == state
        kinds = []
        for reason in body["reasons"]:
            if "no progress" in reason:
                kinds.append("stuck")
            elif reason.startswith("no run has ended"):
                kinds.append("overdue")
            elif "ended failed" in reason or "quarantined" in reason:
                kinds.append("failing")
            elif "is running" in reason:
                kinds.append("running")
            else:
                kinds.append("ok")
        assert kinds[0] == state
        assert kinds == sorted(kinds, key=health.ORDER.index)
        assert ("overdue" in kinds) == overdue
        assert kinds.count("failing") == failed + quarantined
        assert body["lastSuccessAt"] == "2026-11-28T" + ago(500 if overdue else 30).strftime(
            "%H:%M:%SZ"
        )


# --- ?check=health ------------------------------------------------------------------------


class TestCheck:
    def test_needs_the_secret(self, status_fn) -> None:
        assert status_fn.get("/?check=health").status_code == 401
        assert (
            status_fn.get("/?check=health", headers={"X-Webhook-Secret": "no"}).status_code == 401
        )

    @pytest.mark.parametrize(
        "query", ["check=", "check=status", "check=HEALTH", "check=health&check=x"]
    )
    def test_other_checks_are_400(self, status_fn, query) -> None:
        response = status_fn.get(f"/?{query}", headers=SECRET)
        assert response.status_code == 400
        assert "'check'" in response.get_json()["detail"]

    def test_answers_the_health_object_only(self, status_fn) -> None:
        code, body = check(status_fn)
        assert code == 200
        assert set(body) == {"state", "reasons", "lastSuccessAt", "expectedEverySeconds"}

    def test_store_unreachable_is_503(self, status_fn, configure) -> None:
        from conftest import free_port

        configure(
            FIRESTORE_EMULATOR_HOST=f"127.0.0.1:{free_port()}", SMART_RESUME_RPC_TIMEOUT_SECONDS="1"
        )
        response = status_fn.get("/?check=health", headers=SECRET)
        assert response.status_code == 503


# --- progress apart from heartbeats -----------------------------------------------------------


class TestProgress:
    @pytest.fixture
    def fast(self, configure):
        return configure(
            SMART_RESUME_HEARTBEAT_SECONDS="0.1",
            SMART_RESUME_LEASE_SECONDS="2",
            SMART_RESUME_STUCK_SECONDS="0.8",
        )

    def stored(self, lock: Lock) -> dict[str, Any]:
        return lock.read().progress

    def test_moves_are_stamped_on_the_servers_clock(self, db, fast) -> None:
        """Moves before the first beat date from the start (no progressAt); a later move is
        stamped with the beat's commit time and carried by the following beats."""
        lock = Lock(db, fast)
        lease = lock.acquire("run-1", OWNER)
        with Heartbeat(lock, lease, 0.1, 2) as hb:
            hb.set_progress(clientId="c1", operation="a")
            wait_for(lambda: hb.beats >= 2, timeout=5)
            assert self.stored(lock) == {"clientId": "c1", "operation": "a"}
            hb.set_progress(clientId="c1", operation="b")
            stamped = wait_for(lambda: self.stored(lock).get(PROGRESS_AT), timeout=5)
            assert isinstance(stamped, dt.datetime)
            beats = hb.beats
            wait_for(lambda: hb.beats >= beats + 2, timeout=5)
            carried = lock.read().progress[PROGRESS_AT]
            # Later beats carry the stamp over (as the commit time: the emulator's transform
            # keeps milliseconds only), they do not re-stamp it.
            assert abs((carried - stamped).total_seconds()) < 0.05
            beats = hb.beats
            wait_for(lambda: hb.beats >= beats + 3, timeout=5)
            state = lock.read()
            assert state.progress[PROGRESS_AT] == carried
            assert state.heartbeat_at > carried
            assert hb.progress == {"clientId": "c1", "operation": "b"}
            hb.touch()  # a saved checkpoint
            wait_for(lambda: self.stored(lock)[PROGRESS_AT] > stamped, timeout=5)

    def test_the_same_position_again_is_no_progress(self, db, fast, status_fn) -> None:
        """set_progress with the same client and operation does not move progress: stuck."""
        lock = Lock(db, fast)
        lease = lock.acquire("run-1", OWNER)
        with Heartbeat(lock, lease, 0.1, 2) as hb:
            hb.set_progress(clientId="c1", operation="a", clientIndex=0)
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                hb.set_progress(clientId="c1", operation="a", clientIndex=0)
                time.sleep(0.05)
            assert health_of(status_fn)["state"] == "stuck"

    def test_touch_keeps_a_run_from_looking_stuck(self, db, fast, status_fn) -> None:
        """A run that saves checkpoints (touch) stays running well past the stuck threshold;
        once it stops touching, it is stuck within the threshold plus a beat."""
        lock = Lock(db, fast)
        lease = lock.acquire("run-1", OWNER)
        with Heartbeat(lock, lease, 0.1, 2) as hb:
            hb.set_progress(clientId="c1", operation="a")
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                hb.touch()
                time.sleep(0.05)
                assert health_of(status_fn)["state"] == "running"
            stopped = time.monotonic()
            wait_for(lambda: health_of(status_fn)["state"] == "stuck", timeout=10)
            assert time.monotonic() - stopped < 0.8 + 5  # tolerant: a loaded machine


# --- reports left `sending` ----------------------------------------------------------------


class TestUnsentReports:
    def left_sending(self, db, run_id: str, hours: float) -> None:
        at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)
        db.document(f"runs/{run_id}").update(
            {"report": {"status": "sending", "transport": "outbox", "at": at, "error": None}}
        )

    def test_the_next_run_sends_or_marks_lost(self, db, configure, pipeline_file, tmp_path) -> None:
        """Three earlier runs left `sending`: one an hour ago (sent now), one two days ago
        (lost: too late), one a moment ago (still being sent by its own run: left alone)."""
        pipeline_file(OK)
        seed_clients(db, 1)
        outbox = tmp_path / "outbox"
        settings = configure(SMART_RESUME_EMAIL_TRANSPORT="outbox", SMART_RESUME_OUTBOX=str(outbox))
        ids = [run_once(settings, db).run_id for _ in range(3)]
        for path in outbox.glob("*"):
            path.unlink()
        self.left_sending(db, ids[0], hours=1)
        self.left_sending(db, ids[1], hours=49)
        db.document(f"runs/{ids[2]}").update(
            {"report": {"status": "sending", "transport": "outbox", "at": dt.datetime.now(dt.UTC)}}
        )
        # Claims written by hand, not by releases of the lock: as a fresh instance finds them.
        lock._released.clear()
        latest = run_once(settings, db)
        reports = {i: db.document(f"runs/{i}").get().to_dict()["report"] for i in ids}
        assert reports[ids[0]]["status"] == "sent"
        assert (outbox / f"{ids[0]}.eml").is_file()
        assert reports[ids[1]]["status"] == "lost"
        assert "too late to send" in reports[ids[1]]["error"]
        assert reports[ids[1]]["settledBy"] == latest.run_id
        assert not (outbox / f"{ids[1]}.eml").exists()
        assert reports[ids[2]]["status"] == "sending"  # within the grace: its run still sends
        assert latest.report["status"] == "sent"

    def test_a_warm_instance_sends_what_a_run_that_failed_before_starting_left(
        self, db, configure, pipeline_file, monkeypatch, tmp_path
    ) -> None:
        """This process released the lock last (its next take reads nothing it knows). Then a
        run whose module would not load claims its report and dies sending it: its claim
        marked the lock, so the next take reads the lock and the report goes out."""
        from shared import runner, transports

        pipeline_file(OK)
        seed_clients(db, 1)
        outbox = tmp_path / "outbox"
        settings = configure(SMART_RESUME_EMAIL_TRANSPORT="outbox", SMART_RESUME_OUTBOX=str(outbox))
        run_once(settings, db)
        assert lock._released  # the next take would be warm

        def dies(*_: object) -> None:
            raise SystemExit("the instance stops mid-send")

        with monkeypatch.context() as patch:
            patch.setattr(transports, "send", dies)
            with pytest.raises(SystemExit):
                run_once(replace(settings, module="no_such_module_x"), db)
        broken = [d for d in db.collection("runs").get() if d.get("status") == "failed"]
        assert [d.get("report.status") for d in broken] == ["sending"]
        monkeypatch.setattr(runner, "sending_grace", lambda _: 0.0)
        run_once(settings, db)
        assert db.document(f"runs/{broken[0].id}").get().get("report.status") == "sent"
        assert (outbox / f"{broken[0].id}.eml").is_file()

    def test_a_warm_take_settles_the_claim_its_own_process_left(
        self, db, configure, pipeline_file, monkeypatch, tmp_path
    ) -> None:
        """A run stops while sending its report (the claim stays `sending`); the next take in
        the same process is warm (nothing wrote the lock since) and makes no search for unsent
        reports, yet it knows the claim it left and sends it once the grace is over."""
        from shared import runner, transports

        pipeline_file(OK)
        seed_clients(db, 1)
        outbox = tmp_path / "outbox"
        settings = configure(SMART_RESUME_EMAIL_TRANSPORT="outbox", SMART_RESUME_OUTBOX=str(outbox))
        run_once(settings, db)

        def dies(*_: object) -> None:
            raise SystemExit("the run stops mid-send")

        with monkeypatch.context() as patch:
            patch.setattr(transports, "send", dies)
            with pytest.raises(SystemExit):
                run_once(settings, db)
        stuck = [d for d in db.collection("runs").get() if d.get("report.status") == "sending"]
        assert len(stuck) == 1 and lock._released  # the next take is warm
        monkeypatch.setattr(runner, "sending_grace", lambda _: 0.0)
        run_once(settings, db)
        assert db.document(f"runs/{stuck[0].id}").get().get("report.status") == "sent"
        assert (outbox / f"{stuck[0].id}.eml").is_file()

    @pytest.mark.slow
    def test_instance_killed_between_claim_and_send(
        self, function_process, db, pipeline_file, configure, monkeypatch, tmp_path
    ) -> None:
        """A real trigger process is SIGKILLed while its report is `sending` (the provider never
        answers); the next run sends it: no run record keeps `sending` past the next run."""
        from fake_sendgrid import FakeSendGrid

        pipeline_file(OK)
        seed_clients(db, 1)
        mail = {
            "SMART_RESUME_EMAIL_FROM": "a@example.com",
            "SMART_RESUME_EMAIL_TO": "b@example.com",
            "SENDGRID_API_KEY": "SG.test-key",
        }
        with FakeSendGrid(silent=True) as silent:
            trigger = function_process(
                "smart_resume",
                **FAST,
                **mail,
                SMART_RESUME_EMAIL_TRANSPORT="sendgrid",
                SMART_RESUME_SENDGRID_HOST=silent.host,
                SMART_RESUME_EMAIL_TIMEOUT_SECONDS="30",
            )
            with ThreadPoolExecutor(1) as pool:
                pool.submit(trigger.post, {}, timeout=60)
                wait_for(lambda: silent.requests, timeout=30)
                run_id = db.collection("runs").get()[0].id
                record = db.document(f"runs/{run_id}").get().to_dict()
                assert (record["status"], record["report"]["status"]) == ("completed", "sending")
                trigger.signal(signal.SIGKILL)
        # The next run, here in-process; the grace for a send in flight is shortened to 0 so the
        # test need not wait for it (6 x the email timeout + 30 s in production).
        monkeypatch.setattr(runner, "sending_grace", lambda settings: 0.0)
        outbox = tmp_path / "outbox"
        settings = configure(SMART_RESUME_EMAIL_TRANSPORT="outbox", SMART_RESUME_OUTBOX=str(outbox))
        nxt = run_once(settings, db)
        assert nxt.status == "completed"
        report = db.document(f"runs/{run_id}").get().to_dict()["report"]
        assert report["status"] == "sent"
        assert (outbox / f"{run_id}.eml").is_file()
        left = [
            d.id
            for d in db.collection("runs").get()
            if d.to_dict()["report"]["status"] == "sending"
        ]
        assert left == []


# --- real function processes ----------------------------------------------------------------


@pytest.mark.slow
def test_states_through_real_function_processes(function_process, db, pipeline_file) -> None:
    """Both functions as processes: unknown (503 with an expected interval), ok after a run,
    overdue after 2 + 1 s, failing after a quarantine; the codes of `?check=health` each time."""
    pipeline_file(BOOM.replace("quarantine_after = 1", "quarantine_after = 2"))
    seed_clients(db, 1)
    env = {**FAST, "SMART_RESUME_EXPECTED_EVERY_SECONDS": "2"}
    trigger = function_process("smart_resume", **env)
    status = function_process("smart_resume_status", **env)

    def probe() -> tuple[int, str]:
        answer = status.get("?check=health")
        return answer.status_code, answer.json()["state"]

    assert probe() == (503, "unknown")
    assert trigger.post({}).json()["status"] == "completed"  # boom fails once: backing off
    assert probe() == (200, "ok")
    assert status.get().json()["health"]["state"] == "ok"
    assert wait_for(lambda: probe() == (503, "overdue"), timeout=15)
    assert trigger.post({}).json()["status"] == "completed"  # second failure: quarantined
    assert probe() == (503, "failing")
    body = status.get().json()
    assert body["quarantined"][0]["clientId"] == "c00000"
    assert body["health"]["reasons"][0].startswith("1 client-operation is quarantined")


@pytest.mark.slow
def test_stuck_through_real_function_processes(function_process, db, pipeline_file) -> None:
    """A trigger process whose python operation blocks while its heartbeat goes on: the status
    process says running, then stuck (503), then ok once it ends."""
    pipeline_file(HANG)
    seed_clients(db, 1)
    env = {**FAST, "SMART_RESUME_STUCK_SECONDS": "1.5", "TEST_HANG_SECONDS": "5"}
    trigger = function_process("smart_resume", **env)
    status = function_process("smart_resume_status", **env)
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(trigger.post, {})
        wait_for(lambda: status.get().json()["running"], timeout=15)
        began = time.monotonic()
        first = status.get("?check=health")
        assert (first.status_code, first.json()["state"]) == (200, "running")
        stuck = wait_for(
            lambda: (r := status.get("?check=health")).status_code == 503 and r.json(), timeout=15
        )
        assert stuck["state"] == "stuck"
        print(
            f"FIGURE stuck: 503 stuck {time.monotonic() - began:.2f} s after the run was first "
            "seen running (threshold 1.5 s, heartbeat 0.2 s)"
        )
        snapshot = status.get().json()
        assert snapshot["running"] is True and snapshot["heartbeatAgeSeconds"] < 2
        assert run.result(timeout=60).json()["status"] == "completed"
    final = status.get("?check=health")
    assert (final.status_code, final.json()["state"]) == (200, "ok")


# --- the operator's views: health first ------------------------------------------------------


def test_cli_status_shows_health_first(db, configure, pipeline_file, capsys) -> None:
    from shared.resume.cli import main

    pipeline_file(BOOM)
    configure()
    seed_clients(db, 1)
    assert main(["status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        "health: UNKNOWN",
        "  - no run has been recorded yet",
        "  last success: never",
    ]
    assert main(["run"]) == 5  # completed, with a failed client-operation
    capsys.readouterr()
    assert main(["status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "health: FAILING"
    assert lines[1].startswith("  - 1 client-operation is quarantined (c00000/work)")
    assert any(line.startswith("QUARANTINED: c00000 work") for line in lines)


@pytest.mark.slow
def test_watch_shows_health_first(function_process, db, pipeline_file) -> None:
    import subprocess
    import sys

    pipeline_file(OK)
    seed_clients(db, 1)
    trigger = function_process("smart_resume")
    status = function_process("smart_resume_status")
    assert trigger.post({}).json()["status"] == "completed"
    port = status.url.rsplit(":", 1)[1]
    done = subprocess.run(
        [sys.executable, "scripts/watch.py", "--local", port, "--once"],
        cwd=ROOT,
        env={**os.environ, "SMART_RESUME_WEBHOOK_SECRET": "test-secret-1-0123456"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("health: OK: the last run ")
    assert "ended completed" in done.stdout
