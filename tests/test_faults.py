"""Fault injection: crashes, a zombie holder, a store outage, broken operations services and
email providers, and contention, against the real emulator and real function processes.

Figures the tests measure are printed as `FIGURE ...` lines (see RELIABILITY.md); run with
`-s` to see them.
"""

from __future__ import annotations

import gzip
import itertools
import json
import random
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import PROJECT, ROOT, Emulator, seed_clients
from fake_sendgrid import FakeSendGrid
from faults_helpers import FlakyServer, post_until_admitted, snapshot, wait_for
from functions_framework import create_app
from google.cloud import firestore

from shared import transports
from shared.resume.plan import RunOptions
from shared.runner import start_run

FAST = {
    "SMART_RESUME_HEARTBEAT_SECONDS": "0.2",
    "SMART_RESUME_LEASE_SECONDS": "1",
    "SMART_RESUME_MAX_RUN_SECONDS": "60",
    "SMART_RESUME_TIME_BUDGET_SECONDS": "30",
    "SMART_RESUME_RPC_TIMEOUT_SECONDS": "2",
}
SEED = 20261128
TRIGGER = {"source": "test"}


def figure(name: str, **values: object) -> None:
    print(f"FIGURE {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


def http_pipeline(pipeline_file, url: str, name: str = "work", **extra: object) -> None:
    lines = [f'name = "{name}"', 'kind = "http"', f'url = "{url}"', "max_calls = 100000"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    pipeline_file("[[operation]]\n" + "\n".join(lines) + "\n")


def paging_service(pages: int, delay: float):
    """An operations service that works `pages` pages, checkpointing after each."""

    def handle(payload):
        if "checkpoint" not in payload:  # a request cut off by a killed caller
            return 400, {"error": "incomplete request"}
        page = (payload["checkpoint"] or {}).get("page", 0) + 1
        time.sleep(delay)
        return 200, {"done": page >= pages, "checkpoint": {"page": page}, "counts": {"rows": 1}}

    return handle


def op_states(db) -> dict[str, dict]:
    return {
        doc.reference.parent.parent.id: doc.to_dict()
        for doc in db.collection_group("operations").stream()
    }


def lock_doc(db) -> dict:
    return db.document("locks/smart-resume").get().to_dict() or {}


def run_doc(db, run_id: str) -> dict:
    return db.document(f"runs/{run_id}").get().to_dict() or {}


def page_of(call: dict) -> int:
    return (call["checkpoint"] or {}).get("page", 0)


# --- crash ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_moments_20_times(function_process, ops, pipeline_file, db):
    """20 seeded SIGKILLs mid-run: every next trigger takes over after the lease, marks the old
    run abandoned, resumes each partial operation from its saved checkpoint, no saved
    checkpoint ever goes backwards, and within a run the service never sees one go backwards
    (saves are coalesced to one a second, so a kill repeats at most the chunks since the last
    save); a last run completes everything."""
    pages, kills = 600, 20
    http_pipeline(pipeline_file, ops.route("/work", paging_service(pages, 0.02)))
    clients = seed_clients(db, 3)
    rng = random.Random(SEED)
    before_run: dict[str, dict[str, dict]] = {}  # run id -> op states when it started
    killed: list[str] = []
    takeovers: list[float] = []
    killed_at = 0.0
    for trial in range(kills + 1):
        proc = function_process("smart_resume", **FAST)
        state_before = op_states(db)
        box: dict = {}

        def fire(proc=proc, box=box) -> None:
            try:
                box["response"], _ = post_until_admitted(lambda: proc.post({}, timeout=90))
            except requests.RequestException as exc:
                box["error"] = exc

        thread = threading.Thread(target=fire)
        thread.start()
        holder = wait_for(
            lambda: lock_doc(db).get("held") and lock_doc(db).get("runId") not in before_run,
            timeout=30,
        )
        assert holder
        run_id = lock_doc(db)["runId"]
        before_run[run_id] = state_before
        if killed:
            takeovers.append(time.monotonic() - killed_at)
            assert run_doc(db, killed[-1])["status"] == "abandoned"
            assert run_doc(db, run_id)["tookOver"] == killed[-1]
        if trial == kills:
            thread.join(90)
            final = box["response"]
            while final.status_code == 200 and final.json()["status"] == "partial":
                state_before = op_states(db)
                final = proc.post({}, timeout=90)
                before_run[final.json()["runId"]] = state_before
            assert final.status_code == 200, final.text
            assert final.json()["status"] == "completed"
            break
        time.sleep(rng.uniform(0.3, 2.5))
        proc.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        thread.join(10)
        assert "error" in box, "the run finished before it could be killed; raise `pages`"
        killed.append(run_id)

    calls = [c for c in ops.calls("/work") if "clientId" in c]  # not ones cut off by a kill
    repeats = resumed = 0
    for client in clients:
        mine = [c for c in calls if c["clientId"] == client]
        sent = [page_of(c) for c in mine]
        for run_id in before_run:
            in_run = [page_of(c) for c in mine if c["runId"] == run_id]
            assert in_run == sorted(in_run), f"a checkpoint went backwards in {run_id}: {in_run}"
        saved_pages = [
            (states[client].get("checkpoint") or {}).get("page", 0)
            for states in before_run.values()
            if client in states and states[client].get("status") != "success"
        ]
        assert saved_pages == sorted(saved_pages), f"a saved checkpoint went back: {saved_pages}"
        repeats += sum(1 for a, b in itertools.pairwise(sent) if a >= b)
        assert sent[-1] == pages - 1
        for run_id, states in before_run.items():
            first = next((c for c in mine if c["runId"] == run_id), None)
            saved = states.get(client)
            if first is None or saved is None:
                continue
            assert first["checkpoint"] == saved.get("checkpoint"), (run_id, client)
            resumed += saved.get("checkpoint") is not None
    assert all(s["status"] == "success" for s in op_states(db).values())
    assert all(run_doc(db, r)["status"] == "abandoned" for r in killed)
    assert all("report" not in run_doc(db, r) for r in killed)
    assert resumed >= 5
    figure(
        "crash",
        kills=len(killed),
        abandoned=len(killed),
        resumed_from_checkpoint=resumed,
        checkpoints_backwards=0,
        repeated_calls=repeats,
        calls=len(calls),
        takeover_max_s=round(max(takeovers), 2),
        takeover_mean_s=round(sum(takeovers) / len(takeovers), 2),
    )


# --- zombie ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_stopped_holder_is_fenced_after_takeover(function_process, ops, pipeline_file, db):
    """SIGSTOP a run while its operation call is in flight, until its lease expires; a second
    run takes over and finishes; SIGCONT the first: it writes nothing, makes no further call,
    answers 500 abandoned, and sends no report."""
    held = threading.Event()
    release = threading.Event()
    zombie: dict[str, str] = {}
    inner = paging_service(6, 0.02)

    def service(payload):
        zombie.setdefault("runId", payload["runId"])
        if payload["runId"] == zombie["runId"] and page_of(payload) == 3:
            held.set()
            release.wait(30)  # answered while the caller is stopped
        return inner(payload)

    http_pipeline(pipeline_file, ops.route("/work", service))
    seed_clients(db, 2)
    first = function_process("smart_resume", **FAST)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(first.post, {}, timeout=60)
        assert held.wait(20)
        first.signal(signal.SIGSTOP)
        release.set()
        calls_at_stop = len(ops.calls("/work"))
        second = function_process("smart_resume", **FAST)
        stopped_at = time.monotonic()
        response, _ = post_until_admitted(lambda: second.post({}))
        took_over = time.monotonic() - stopped_at
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "completed"
        assert run_doc(db, zombie["runId"])["status"] == "abandoned"
        before = snapshot(db)
        calls_before = len(ops.calls("/work"))
        first.signal(signal.SIGCONT)
        result = answer.result(timeout=20)
    assert result.status_code == 500
    assert result.json() == {"status": "abandoned", "runId": zombie["runId"], "error": "lease lost"}
    assert snapshot(db) == before  # nothing the zombie tried landed
    after = ops.calls("/work")[calls_before:]
    assert not [c for c in after if c["runId"] == zombie["runId"]]
    record = run_doc(db, zombie["runId"])
    assert "report" not in record
    assert f"[run {zombie['runId']}]" not in first.log()  # no report email for the zombie
    assert "stopped without writing anything more" in first.log()
    figure(
        "zombie",
        zombie_calls_before_stop=calls_at_stop,
        writes_landed=0,
        calls_after_cont=0,
        takeover_s=round(took_over, 2),
    )


# --- store outage ---------------------------------------------------------------------------


@pytest.mark.slow
def test_store_outage_fails_bounded_and_recovers(function_process, ops, pipeline_file, monkeypatch):
    """The emulator dies mid-run: the run ends failed within a bound set by the RPC deadline,
    an error report is attempted, both processes stay up and answer 503 quickly; after a
    restart on the same port the next run completes."""
    own = Emulator.start()
    port = int(own.host.rsplit(":", 1)[1])
    try:
        with monkeypatch.context() as m:
            m.setenv("FIRESTORE_EMULATOR_HOST", own.host)
            own_db = firestore.Client(project=PROJECT)
        http_pipeline(pipeline_file, ops.route("/work", paging_service(400, 0.02)))
        seed_clients(own_db, 2)
        env = {**FAST, "FIRESTORE_EMULATOR_HOST": own.host}
        trigger = function_process("smart_resume", **env)
        status_fn = function_process("smart_resume_status", **env)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(trigger.post, {}, timeout=60)
            wait_for(lambda: len(ops.calls("/work")) >= 5)
            own.stop()
            down_at = time.monotonic()
            response = answer.result(timeout=40)
        ended_after = time.monotonic() - down_at
        assert response.status_code == 500, response.text
        body = response.json()
        assert body["status"] == "failed"
        assert "Firestore" in body["error"]
        assert ended_after < 5 * 2 + 5  # a few RPC deadlines, never the client's ~280 s default
        assert "report email" in trigger.log().split(body["runId"], 1)[-1]
        started = time.monotonic()
        status_answer = status_fn.get("/")
        status_seconds = time.monotonic() - started
        assert status_answer.status_code == 503
        assert status_answer.json() == {"error": "store unavailable"}
        assert status_seconds < 2 + 3
        started = time.monotonic()
        assert trigger.post({}).status_code == 503
        trigger_seconds = time.monotonic() - started
        assert trigger_seconds < 2 * 2 + 3
        assert trigger.proc.poll() is None and status_fn.proc.poll() is None

        own = Emulator.start(port)
        restarted_at = time.monotonic()
        seed_clients(own_db, 2, prefix="r")  # the emulator keeps nothing across a restart
        ops.routes["/work"] = paging_service(3, 0)
        recovered = None
        while time.monotonic() - restarted_at < 60:
            response = trigger.post({})
            if response.status_code == 200:
                recovered = time.monotonic() - restarted_at
                break
            time.sleep(0.2)
        assert recovered is not None, response.text
        assert response.json()["status"] == "completed"
        assert response.json()["summary"]["processed"] == 2
        assert status_fn.get("/").json()["running"] is False
        figure(
            "outage",
            run_failed_after_s=round(ended_after, 2),
            status_503_in_s=round(status_seconds, 2),
            trigger_503_in_s=round(trigger_seconds, 2),
            recovered_after_restart_s=round(recovered, 2),
        )
    finally:
        own.stop()


# --- operations service faults --------------------------------------------------------------

OK = (200, "application/json", b'{"done": true, "counts": {"rows": 1}}')
BIG = 50 * 1024 * 1024


class TestOperationsServiceFaults:
    """Faults test_engine.py does not cover; each ends in its documented outcome, and the other
    client (served by a healthy service) and the run itself are untouched."""

    CASES = {
        "resets then success": (["reset", "reset", OK], "success", None, 3),
        "reset storm": (["reset"], "failed", "cannot reach", 4),
        "closed without answer then success": (["close", OK], "success", None, 2),
        "429 storm": ([(429, "application/json", b"{}")], "failed", "answered 429 (after 4", 4),
        "500 twice then success": (
            [(500, "text/plain", b"oops"), (500, "text/plain", b"oops"), OK],
            "success",
            None,
            3,
        ),
        "garbage JSON": ([(200, "application/json", b"{not json")], "failed", "malformed", 1),
        "plain-text 2xx means done": ([(200, "text/plain", b"<html>ok")], "success", None, 1),
        "50 MB body": ([(200, "application/json", b" " * BIG)], "failed", "more than 1048576", 1),
        "50 MB gzip bomb": ("gzip", "failed", "more than 1048576", 1),
        "50 MB error body": ([(400, "text/plain", b"x" * BIG)], "failed", "answered 400", 1),
        "hang then success": (["hang", OK], "success", None, 2),
        "done null": ([(200, "application/json", b'{"done": null}')], "failed", "'done'", 1),
    }

    @pytest.fixture
    def two_clients(self, db, ops):
        db.document("clients/c00000").set({"name": "A", "active": True, "operations": ["call"]})
        db.document("clients/c00001").set({"name": "B", "active": True, "operations": ["other"]})
        return ops.route("/other", lambda p: (200, {"done": True}))

    def _pipeline(self, pipeline_file, url: str, other: str) -> None:
        pipeline_file(
            f'[[operation]]\nname = "call"\nkind = "http"\nurl = "{url}"\n'
            "retries = 3\nretry_initial_seconds = 0.01\ntimeout_seconds = 0.5\n"
            f'[[operation]]\nname = "other"\nkind = "http"\nurl = "{other}"\n'
        )

    @pytest.mark.parametrize("case", list(CASES))
    def test_fault(self, db, configure, pipeline_file, two_clients, case) -> None:
        """The faulty client-operation ends as documented; the run and the other client do not."""
        script, status, error, requests_made = self.CASES[case]
        if script == "gzip":
            bomb = gzip.compress(b"\0" * BIG)
            script = [(200, "application/json\r\nContent-Encoding: gzip", bomb)]
        server = FlakyServer(script)
        try:
            self._pipeline(pipeline_file, server.url, two_clients)
            started = time.monotonic()
            out = start_run(configure(), db, RunOptions(), trigger=TRIGGER)
            elapsed = time.monotonic() - started
        finally:
            server.close()
        assert out.status == "completed" and out.http_status == 200
        assert elapsed < 10
        state = db.document("clients/c00000/operations/call").get().to_dict()
        assert state["status"] == status
        if error:
            assert error in state["error"]
            assert len(state["error"]) <= 500
        assert server.requests == requests_made
        other = db.document("clients/c00001/operations/other").get().to_dict()
        assert other["status"] == "success"
        assert lock_doc(db)["held"] is False
        assert run_doc(db, out.run_id)["status"] == "completed"

    def test_oversized_checkpoint_fails_the_operation_not_the_run(
        self, db, configure, pipeline_file, two_clients
    ) -> None:
        """A 2xx whose checkpoint cannot be stored fails that client-operation; the run goes on."""
        body = json.dumps({"done": False, "checkpoint": {"blob": "x" * 1_048_500}}).encode()
        assert len(body) <= 1 << 20  # within the bounded read, over the document limit
        server = FlakyServer([(200, "application/json", body), OK])
        try:
            self._pipeline(pipeline_file, server.url, two_clients)
            out = start_run(configure(), db, RunOptions(), trigger=TRIGGER)
        finally:
            server.close()
        assert out.status == "completed", out.body
        assert out.body["summary"]["failed"] == 1


# --- email provider faults ------------------------------------------------------------------


class TestEmailProviderFaults:
    KEY = "SG.email-fault-key-0123456789abcdef"

    @pytest.mark.parametrize(
        ("statuses", "silent", "report"),
        [
            ([202], False, "sent"),
            ([401], False, "failed"),
            ([403], False, "failed"),
            ([429], False, "failed"),
            ([500], False, "failed"),
            ([202], True, "failed"),
        ],
        ids=["control-202", "401", "403", "429", "500", "never-answers"],
    )
    def test_run_result_is_unchanged(
        self, db, configure, pipeline_file, monkeypatch, capsys, statuses, silent, report
    ) -> None:
        """Whatever the provider does, the run's answer and record stay the same; only the
        report status says failed, and the API key never shows."""
        monkeypatch.setattr(transports, "RETRY_INITIAL_SECONDS", 0.01)
        monkeypatch.setattr(transports, "RETRY_MAX_SECONDS", 0.05)
        pipeline_file('[[operation]]\nname = "score"\nkind = "python"\ntarget = "opfuncs:ok"\n')
        seed_clients(db, 2)
        with FakeSendGrid(statuses, silent=silent) as fake:
            settings = configure(
                SMART_RESUME_EMAIL_TRANSPORT="sendgrid",
                SENDGRID_API_KEY=self.KEY,
                SMART_RESUME_EMAIL_FROM="reports@example.com",
                SMART_RESUME_EMAIL_TO="ops@example.com",
                SMART_RESUME_SENDGRID_HOST=fake.host,
                SMART_RESUME_EMAIL_TIMEOUT_SECONDS="0.5",
            )
            started = time.monotonic()
            out = start_run(settings, db, RunOptions(), trigger=TRIGGER)
            elapsed = time.monotonic() - started
        assert out.http_status == 200
        assert out.status == "completed"
        assert out.body["summary"]["processed"] == 2
        record = run_doc(db, out.run_id)
        assert record["status"] == "completed"
        assert record["report"]["status"] == report
        assert lock_doc(db)["held"] is False
        assert elapsed < 10
        assert self.KEY not in capsys.readouterr().out + json.dumps(record, default=str)


# --- contention -----------------------------------------------------------------------------


def _contend(n: int, attempt) -> list[int]:
    barrier = threading.Barrier(n)

    def one(i: int) -> int:
        barrier.wait()
        return attempt(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.slow
def test_200_threaded_trials_never_double_run(db, ops, pipeline_file):
    """8 threads post at once through create_app clients, 200 times: each trial's client is
    worked exactly once; every other answer is 409 (or a fresh skip)."""
    trials, threads = 200, 8
    served: Counter[str] = Counter()

    def service(payload):
        served[payload["clientId"]] += 1
        time.sleep(0.01)
        return 200, {"done": True}

    http_pipeline(pipeline_file, ops.route("/work", service))
    clients = seed_clients(db, trials)
    source = str(ROOT / "functions" / "smart_resume" / "main.py")
    app = create_app(target="smart_resume", source=source)
    test_clients = [app.test_client() for _ in range(threads)]
    statuses: Counter[int] = Counter()
    for client_id in clients:
        body = json.dumps({"clientId": client_id})
        codes = _contend(
            threads,
            lambda i, body=body: (
                test_clients[i]
                .post("/", data=body, headers={"X-Webhook-Secret": "test-secret-1-0123456"})
                .status_code
            ),
        )
        statuses.update(codes)
        assert set(codes) <= {200, 409}, codes
        assert 200 in codes
    doubles = [c for c in clients if served[c] != 1]
    assert doubles == []
    figure(
        "contention-threads",
        trials=trials,
        threads=threads,
        double_runs=0,
        **{f"http_{k}": v for k, v in sorted(statuses.items())},
    )


@pytest.mark.slow
def test_50_multi_process_trials_never_double_run(function_process, ops, pipeline_file, db):
    """4 real function processes post at once, 50 times: each trial's client is worked once."""
    trials, processes = 50, 4
    served: Counter[str] = Counter()

    def service(payload):
        served[payload["clientId"]] += 1
        time.sleep(0.02)
        return 200, {"done": True}

    http_pipeline(pipeline_file, ops.route("/work", service))
    clients = seed_clients(db, trials, prefix="m")
    procs = [function_process("smart_resume", **FAST) for _ in range(processes)]
    statuses: Counter[int] = Counter()
    for client_id in clients:
        codes = _contend(
            processes,
            lambda i, client_id=client_id: procs[i].post({"clientId": client_id}).status_code,
        )
        statuses.update(codes)
        assert set(codes) <= {200, 409}, codes
    doubles = [c for c in clients if served[c] != 1]
    assert doubles == []
    assert all(p.proc.poll() is None for p in procs)
    figure(
        "contention-processes",
        trials=trials,
        processes=processes,
        double_runs=0,
        **{f"http_{k}": v for k, v in sorted(statuses.items())},
    )
