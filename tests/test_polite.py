"""Polite to the services it calls (per-operation limits): shared rate and concurrency limits,
Retry-After, idempotency keys and calls that fit the run, against a local service that enforces
its own limits and the real emulator.

Timing assertions leave room for a loaded two-core machine: they check what must never happen
(a call over the limit, a call inside a hold) and bound durations loosely.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import threading
import time
from typing import Any

import pytest
from conftest import seed_clients
from ops_server import RateLimited, ServiceProcess, paging

from shared import status
from shared.report import ReportInput, build_message
from shared.resume import limits
from shared.resume.operations import idempotency_key
from shared.resume.plan import RunOptions
from shared.runner import start_run

TRIGGER = {"source": "test"}
SEEN: list[dict[str, Any]] = []


def run(settings, db, **options):
    return start_run(settings, db, RunOptions(**options), trigger=TRIGGER)


def http_pipeline(pipeline_file, url: str, name: str = "work", **extra: object) -> None:
    lines = [f'name = "{name}"', 'kind = "http"', f'url = "{url}"', "retry_initial_seconds = 0.01"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    pipeline_file("[[operation]]\n" + "\n".join(lines) + "\n")


def state(db, client_id: str, op: str = "work") -> dict[str, Any]:
    return db.document(f"clients/{client_id}/operations/{op}").get().to_dict() or {}


def most_in_any_second(times: list[float]) -> int:
    times = sorted(times)
    best, low = 0, 0
    for high, t in enumerate(times):
        while t - times[low] >= 1.0:
            low += 1
        best = max(best, high - low + 1)
    return best


# -- python operations used through the pipeline (target "test_polite:...") ------------------


def keyed(ctx: Any) -> dict[str, Any]:
    """Records its idempotency key before and after saving a checkpoint; done on page 2."""
    page = (ctx.checkpoint or {}).get("page", 0)
    SEEN.append({"checkpoint": ctx.checkpoint, "key": ctx.idempotency_key})
    ctx.save_checkpoint({"page": page + 1})
    SEEN.append({"checkpoint": ctx.checkpoint, "key": ctx.idempotency_key})
    return {"done": page + 1 >= 2}


def slow(ctx: Any) -> None:
    time.sleep(0.1)


@pytest.fixture(autouse=True)
def _clean():
    SEEN.clear()
    yield
    SEEN.clear()


class TestLimiter:
    """The shared limiter itself, with threads standing in for workers."""

    def _hammer(self, limiter: limits.Limiter, calls: int, threads: int = 8) -> list[float]:
        starts: list[float] = []
        mutex = threading.Lock()
        remaining = [calls]
        deadline = time.monotonic() + 60

        def worker() -> None:
            while True:
                with mutex:
                    if not remaining[0]:
                        return
                    remaining[0] -= 1
                assert limiter.acquire(deadline, lambda: False) is None
                with mutex:
                    starts.append(time.monotonic())
                time.sleep(0.001)
                limiter.release()

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return starts

    def test_no_second_window_holds_more_than_max_per_second(self) -> None:
        """8 threads, 25 calls at 10/s: never more than 10 starts in any one second."""
        starts = self._hammer(limits.Limiter(10, None), 25)
        assert len(starts) == 25
        assert most_in_any_second(starts) <= 10
        assert 1.9 <= max(starts) - min(starts) <= 4

    def test_a_fraction_below_one_spaces_calls(self) -> None:
        starts = sorted(self._hammer(limits.Limiter(2.5, None), 5))
        assert most_in_any_second(starts) <= 2  # no half calls: 2 in any second

    def test_spacing_counts_from_when_the_request_went_out(self, ops) -> None:
        """A worker slow to send (0.3 s after its slot) does not let the next call go at once."""
        url = ops.route("/x", lambda p: (200, {}))
        limiter = limits.Limiter(10, None)
        now = time.monotonic()
        gate = limits.Gate(limiter, limits.Budget(now + 30, now + 40), lambda: False)
        session = limits.stamped_session()
        assert gate.enter() is None
        time.sleep(0.3)
        with gate.sending():
            session.post(url, json={}, timeout=5)
        sent = ops.received("/x")[0].at
        gate.leave()
        assert gate.enter() is None
        assert time.monotonic() - sent >= 0.09  # not at once: an interval after the send
        gate.leave()
        session.close()

    def test_max_concurrent(self) -> None:
        limiter = limits.Limiter(None, 2)
        deadline = time.monotonic() + 10
        assert limiter.acquire(deadline, lambda: False) is None
        assert limiter.acquire(deadline, lambda: False) is None
        threading.Timer(0.3, limiter.release).start()
        started = time.monotonic()
        assert limiter.acquire(deadline, lambda: False) is None
        assert time.monotonic() - started >= 0.25
        assert limiter.counts() == {"calls": 3, "retried": 0, "throttled": 1}

    def test_a_hold_past_the_budget_refuses_at_once(self) -> None:
        limiter = limits.Limiter(None, None)
        deadline = time.monotonic() + 5
        limiter.hold(deadline)
        started = time.monotonic()
        assert limiter.acquire(deadline, lambda: False) == limits.HELD_PAST_BUDGET
        assert time.monotonic() - started < 0.5

    def test_a_waiter_wakes_up_for_the_stop_check(self) -> None:
        limiter = limits.Limiter(None, None)
        deadline = time.monotonic() + 30
        limiter.hold(deadline - 1)
        stop = threading.Event()
        threading.Timer(0.3, stop.set).start()
        started = time.monotonic()
        assert limiter.acquire(deadline, stop.is_set) == limits.STOPPING
        assert time.monotonic() - started < 2

    def test_no_call_starts_after_the_budget(self) -> None:
        limiter = limits.Limiter(1, None)
        deadline = time.monotonic() + 0.5
        assert limiter.acquire(deadline, lambda: False) is None
        assert limiter.acquire(deadline, lambda: False) == limits.OUT_OF_TIME

    def test_budget_cuts_calls_before_the_max_run(self) -> None:
        now = time.monotonic()
        wide = limits.Budget.of(now + 1500, 1500, 1800)
        assert wide.end == pytest.approx(now + 1800 - 120)
        close = limits.Budget.of(now + 2, 2, 4)  # closer than the margin: half-way
        assert close.end == pytest.approx(now + 3)
        assert close.timeout(60) <= 3
        assert wide.timeout(10) == 10

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("2", 2.0),
            (" 1.5 ", 1.5),
            ("-5", 0.0),
            ("99999999999", limits.MAX_RETRY_AFTER_SECONDS),
            ("soon", None),
            ("nan", None),
            ("", None),
            (None, None),
            ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
        ],
    )
    def test_retry_after_values(self, value, expected) -> None:
        assert limits.retry_after(value) == expected

    def test_retry_after_http_date(self) -> None:
        now = time.time()
        value = email.utils.formatdate(now + 30, usegmt=True)
        assert limits.retry_after(value, now) == pytest.approx(30, abs=1)


class TestRateLimits:
    def test_max_per_second_holds_across_8_workers(self, db, configure, pipeline_file):
        """24 clients x 2 chunks at max_per_second = 10 with 8 workers: the service (in its own
        process), which enforces 10 calls/s itself, counts 0 violations and answers no 429."""
        with ServiceProcess(10, 2) as service:
            http_pipeline(pipeline_file, service.url + "/work", max_per_second=10)
            seed_clients(db, 24)
            out = run(configure(SMART_RESUME_CONCURRENCY="8"), db)
            stats = service.stats()
        summary = out.body["summary"]
        assert out.status == "completed", out.body
        assert summary["processed"] == 24
        assert (stats["violations"], stats["rejected"]) == (0, 0)
        arrivals = stats["arrivals"]
        assert len(arrivals) == 48
        assert most_in_any_second(arrivals) <= 10
        assert (len(arrivals) - 1) / (max(arrivals) - min(arrivals)) <= 10
        assert summary["calls"]["work"]["calls"] == 48
        assert summary["calls"]["work"]["retried"] == 0
        assert summary["calls"]["work"]["throttled"] > 0

    def test_without_the_limit_the_service_sees_violations(self, db, configure, pipeline_file):
        """The control: the same service does catch 8 unlimited workers going over."""
        with ServiceProcess(10, 2, retry_after="0") as service:
            http_pipeline(pipeline_file, service.url + "/work", retries=20)
            seed_clients(db, 24)
            run(configure(SMART_RESUME_CONCURRENCY="8"), db)
            assert service.stats()["violations"] > 0

    def test_max_concurrent_holds_across_workers(self, db, configure, pipeline_file, ops):
        service = RateLimited(1000, paging(1, delay=0.1))
        http_pipeline(pipeline_file, ops.route("/work", service), max_concurrent=2)
        seed_clients(db, 10)
        out = run(configure(SMART_RESUME_CONCURRENCY="8"), db)
        assert out.body["summary"]["processed"] == 10
        assert service.in_flight_max == 2

    def test_python_operations_pass_the_same_gate(self, db, configure, pipeline_file):
        pipeline_file(
            '[[operation]]\nname = "slow"\nkind = "python"\ntarget = "test_polite:slow"\n'
            "max_concurrent = 1\n"
        )
        seed_clients(db, 6)
        started = time.monotonic()
        out = run(configure(SMART_RESUME_CONCURRENCY="6"), db)
        assert out.body["summary"]["processed"] == 6
        assert time.monotonic() - started >= 0.55  # one at a time: 6 x 0.1 s
        assert out.body["summary"]["calls"]["slow"]["calls"] == 6
        assert out.body["summary"]["calls"]["slow"]["throttled"] >= 1


class TestRetryAfter:
    def test_retry_after_2_holds_every_worker_back(self, db, configure, pipeline_file, ops, capsys):
        """One 429 with Retry-After: 2 and no call of the operation, from any worker, reaches
        the service in the next 2 s (but those already on their way)."""
        answered: list[float] = []
        mutex = threading.Lock()

        def service(payload: dict[str, Any]) -> tuple[Any, ...]:
            with mutex:
                first = not answered
                if first:
                    answered.append(time.monotonic())
            if first:
                return 429, {"error": "slow down"}, {"Retry-After": "2"}
            time.sleep(0.05)
            return 200, {"done": True}

        http_pipeline(pipeline_file, ops.route("/work", service))
        seed_clients(db, 16)
        out = run(configure(SMART_RESUME_CONCURRENCY="8"), db)
        assert out.status == "completed", out.body
        assert out.body["summary"]["processed"] == 16
        held_at = answered[0]
        arrivals = [r.at - held_at for r in ops.received("/work")]
        inside = [round(a, 3) for a in arrivals if 0.5 < a < 1.95]
        assert inside == []
        after = [a for a in arrivals if a >= 1.95]
        assert len(after) >= 8  # the rest waited, then went on
        calls = out.body["summary"]["calls"]["work"]
        assert calls["retried"] == 1
        assert calls["calls"] == 17
        assert calls["throttled"] >= 2
        log = capsys.readouterr().out
        assert "retrying: attempt 2 of 4 in 2.00 s, because" in log
        assert "answered 429 (Retry-After" in log

    @pytest.mark.parametrize("header", ["3600", "http-date"])
    def test_retry_after_past_the_budget_defers_with_the_checkpoint(
        self, db, configure, pipeline_file, ops, header
    ):
        """The second chunk answers 429 with a Retry-After past the budget: that operation is
        deferred (partial, checkpoint kept, not a failure), the other clients make no call."""
        value = email.utils.formatdate(time.time() + 3600, usegmt=True)
        value = value if header == "http-date" else header

        def service(payload: dict[str, Any]) -> tuple[Any, ...]:
            if payload["checkpoint"]:
                return 429, {}, {"Retry-After": value}
            return 200, {"done": False, "checkpoint": {"page": 1}}

        http_pipeline(pipeline_file, ops.route("/work", service))
        seed_clients(db, 3)
        started = time.monotonic()
        out = run(configure(SMART_RESUME_TIME_BUDGET_SECONDS="20"), db)
        assert time.monotonic() - started < 10
        assert out.status == "partial"
        assert out.body["summary"]["deferred"] == 3
        assert out.body["summary"]["failed"] == 0
        states = [state(db, c) for c in ("c00000", "c00001", "c00002")]
        assert [s["status"] for s in states] == ["partial"] * 3
        checkpoints = [s["checkpoint"] for s in states]
        assert sorted(checkpoints, key=bool) == [None, None, {"page": 1}]
        assert not any(s.get("failures") for s in states)
        assert len(ops.calls("/work")) == 2  # chunk 1 and the 429; nobody called again

    def test_garbage_retry_after_uses_the_normal_backoff(self, db, configure, pipeline_file, ops):
        answers = iter([(503, {}, {"Retry-After": "whenever"}), (200, {"done": True})])
        http_pipeline(pipeline_file, ops.route("/work", lambda p: next(answers)))
        seed_clients(db, 1)
        started = time.monotonic()
        out = run(configure(), db)
        assert out.body["summary"]["processed"] == 1
        assert time.monotonic() - started < 5

    def test_cancel_wakes_a_worker_held_by_retry_after(self, db, configure, pipeline_file, ops):
        """A hold of 20 s ends at the cancel, not at 20 s: the run stops as cancelled."""
        held = threading.Event()

        def service(payload: dict[str, Any]) -> tuple[Any, ...]:
            held.set()
            return 429, {}, {"Retry-After": "20"}

        http_pipeline(pipeline_file, ops.route("/work", service))
        seed_clients(db, 2)
        settings = configure(
            SMART_RESUME_HEARTBEAT_SECONDS="0.1",
            SMART_RESUME_LEASE_SECONDS="5",
            SMART_RESUME_TIME_BUDGET_SECONDS="60",
        )

        def cancel_soon() -> None:
            held.wait(10)
            time.sleep(0.3)
            status.cancel(settings, db)

        threading.Thread(target=cancel_soon).start()
        started = time.monotonic()
        out = run(settings, db)
        assert time.monotonic() - started < 8
        assert out.status == "cancelled", out.body
        assert state(db, "c00000")["status"] == "partial"
        assert len(ops.calls("/work")) == 1


class TestIdempotencyKeys:
    def test_same_key_on_a_retry_new_key_for_the_next_chunk(
        self, db, configure, pipeline_file, ops
    ):
        """A retried attempt repeats the key; the next chunk has another; every call names the
        run in X-Smart-Resume-Run."""
        inner = paging(2)
        failed = []

        def service(payload: dict[str, Any]) -> tuple[Any, ...]:
            if not failed:
                failed.append(True)
                return 503, {}
            return inner(payload)

        http_pipeline(pipeline_file, ops.route("/work", service))
        seed_clients(db, 1)
        out = run(configure(), db)
        assert out.body["summary"]["processed"] == 1
        got = ops.received("/work")
        keys = [r.headers["Idempotency-Key"] for r in got]
        assert len(keys) == 3
        assert keys[0] == keys[1] != keys[2]
        assert keys[0] == idempotency_key("c00000", "work", None)
        assert keys[2] == idempotency_key("c00000", "work", {"page": 1})
        canonical = json.dumps(["c00000", "work", {"page": 1}], separators=(",", ":"))
        assert keys[2] == hashlib.sha256(canonical.encode()).hexdigest()
        assert {r.headers["X-Smart-Resume-Run"] for r in got} == {out.run_id}
        assert out.body["summary"]["calls"]["work"] == {"calls": 3, "retried": 1, "throttled": 0}

    def test_a_call_cut_by_the_run_and_the_next_runs_first_call_share_the_key(
        self, db, configure, pipeline_file, ops
    ):
        """Run 1 (budget 2 s, max run 4 s): chunk 2 hangs, and its call is cut by the time the
        run has left (at 3 s, not its 60 s timeout); the run ends partial at page 1. Run 2's
        first call repeats that chunk with the same key, under its own run id."""
        release = threading.Event()

        def service(payload: dict[str, Any]) -> tuple[Any, ...]:
            if payload["checkpoint"] and not release.is_set():
                release.wait(15)  # run 1's second chunk: longer than the run may last
            return paging(3)(payload)

        http_pipeline(pipeline_file, ops.route("/work", service), timeout_seconds=60)
        seed_clients(db, 1)
        settings = configure(SMART_RESUME_TIME_BUDGET_SECONDS="2", SMART_RESUME_MAX_RUN_SECONDS="4")
        started = time.monotonic()
        first = run(settings, db)
        elapsed = time.monotonic() - started
        release.set()
        assert first.status == "partial", first.body
        assert 2 <= elapsed < 4.5  # cut at ~3 s: before the lock could look stale at 4 s
        assert state(db, "c00000")["checkpoint"] == {"page": 1}
        cut = ops.received("/work")[-1]
        assert cut.payload["checkpoint"] == {"page": 1}

        second = run(
            configure(SMART_RESUME_TIME_BUDGET_SECONDS=None, SMART_RESUME_MAX_RUN_SECONDS=None), db
        )
        assert second.status == "completed"
        resumed = next(r for r in ops.received("/work") if r.payload["runId"] == second.run_id)
        assert resumed.payload["checkpoint"] == {"page": 1}
        assert resumed.headers["Idempotency-Key"] == cut.headers["Idempotency-Key"]
        assert resumed.headers["X-Smart-Resume-Run"] == second.run_id != first.run_id
        last = ops.received("/work")[-1]
        assert last.headers["Idempotency-Key"] != cut.headers["Idempotency-Key"]

    def test_python_operations_get_the_same_key(self, db, configure, pipeline_file):
        """`ctx.idempotency_key` is the key an http call of the chunk would carry: new after
        each saved checkpoint, the same when the next run resumes from it."""
        pipeline_file(
            '[[operation]]\nname = "keyed"\nkind = "python"\ntarget = "test_polite:keyed"\n'
        )
        seed_clients(db, 1)
        settings = configure()
        run(settings, db)
        run(settings, db, client_id="c00000")
        assert [s["checkpoint"] for s in SEEN] == [None, {"page": 1}, {"page": 1}, {"page": 2}]
        keys = [s["key"] for s in SEEN]
        assert keys[0] == idempotency_key("c00000", "keyed", None)
        assert keys[1] == idempotency_key("c00000", "keyed", {"page": 1})
        assert keys[1] == keys[2]  # the next run resumes that chunk with its key
        assert len(set(keys)) == 3


def test_the_report_names_calls_retried_and_throttled():
    summary = {
        "clients": 1,
        "processed": 1,
        "calls": {"work": {"calls": 12, "retried": 2, "throttled": 5}},
    }
    message = build_message(
        ReportInput(run_id="r1", status="completed", summary=summary, results=[], client_names={})
    )
    assert "work: 12 calls, 2 retried, 5 throttled" in message.text
    assert "work: 12 calls, 2 retried, 5 throttled" in message.html
