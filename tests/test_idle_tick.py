"""An idle tick's round trips: which it makes, and that the independent ones are in flight
together, so its fixed cost is a few waits whatever the number of reads.

Every RPC is slowed by a fixed latency, as a real network adds one: calls issued together then
overlap, calls issued one after another do not, and the count of waits is exact.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from conftest import run_once, seed_clients

PIPE = """
[[operation]]
name = "first"
kind = "python"
target = "opfuncs:ok"
"""

LATENCY = 0.2
STREAMS = ("batch_get_documents", "run_query", "run_aggregation_query")
RPCS = ("commit", *STREAMS)


class Slowed:
    """Each RPC of the client waits `LATENCY` before it is sent; spans are recorded."""

    def __init__(self, db, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        self.spans: list[tuple[float, float]] = []
        self.mutex = threading.Lock()
        self.on = False
        api = db._firestore_api
        for name in RPCS:
            monkeypatch.setattr(api, name, self._wrap(name, getattr(api, name)))

    def _wrap(self, name, original):
        def call(*args, **kwargs):
            if not self.on:
                return original(*args, **kwargs)
            start = time.monotonic()
            time.sleep(LATENCY)
            result = original(*args, **kwargs)
            if name in STREAMS:
                result = iter(list(result))  # its answer is read here, within the span
            with self.mutex:
                self.calls[name] += 1
                self.spans.append((start, time.monotonic()))
            return result

        return call

    def waits(self) -> int:
        """Round trips waited for one after another: calls in flight together count once."""
        count, end = 0, float("-inf")
        for start, stop in sorted(self.spans):
            if start >= end:
                count += 1
            end = max(end, stop)
        return count


@pytest.fixture
def slowed(db, monkeypatch) -> Iterator[Slowed]:
    yield Slowed(db, monkeypatch)


def test_idle_tick_makes_eight_round_trips_in_four_waits(db, configure, pipeline_file, slowed):
    """Take the lock; read together two counts and the first due page; release the lock while
    the report's listings are read; record the report. What this process knows from its own
    last run is not read again: the last runs and the reports left unsent (nothing wrote the
    lock since: the take's precondition proves it), and the due-work record (the take's commit
    checks it unchanged, with a write that changes nothing)."""
    pipeline_file(PIPE)
    settings = configure(SMART_RESUME_EMAIL_ON="always")
    seed_clients(db, 20)
    run_once(settings, db)  # the first tick: its full pass and the clients' first run
    run_once(settings, db)  # reads the due-work record the pass wrote
    slowed.on = True
    out = run_once(settings, db)
    assert out.body["summary"]["clients"] == 0
    assert out.report["status"] == "sent"
    assert slowed.calls == {
        "commit": 3,  # take (checking the due-work record unchanged), release, the report
        "run_aggregation_query": 2,  # active clients, and those with a due time
        "run_query": 3,  # due page, failing work, problems
    }
    assert slowed.waits() <= 4  # 3 when the listings read at the start overlap the release


def test_a_due_record_changed_since_is_read(db, configure, pipeline_file):
    """The due-work record deleted by hand (to force a full pass) after this process read it:
    the take's check fails, the take reads the lock, the record is read and the pass runs."""
    pipeline_file(PIPE)
    settings = configure(SMART_RESUME_EMAIL_ON="always")
    seed_clients(db, 3)
    run_once(settings, db)
    run_once(settings, db)
    db.document(f"locks/{settings.lock_name}/meta/due").delete()
    run_once(settings, db)
    meta = db.document(f"locks/{settings.lock_name}/meta/due").get()
    assert meta.exists and meta.get("lastPass.reason") == "first tick of due-work selection"


def test_a_take_that_reads_the_lock_searches_for_what_it_does_not_know(
    db, configure, pipeline_file, slowed
):
    """Another process (or any writer of the lock since this one released it): the take
    reads the lock (and the due-work record with it, checked unchanged by the take's commit),
    the unsent reports are searched for and the last runs read."""
    from shared import lock

    pipeline_file(PIPE)
    settings = configure(SMART_RESUME_EMAIL_ON="always")
    seed_clients(db, 20)
    run_once(settings, db)
    run_once(settings, db)
    lock._released.clear()  # as in a fresh instance
    slowed.on = True
    run_once(settings, db)
    assert slowed.calls["batch_get_documents"] == 1  # the lock and the due-work record
    assert slowed.calls["run_query"] == 5  # ... unsent reports, last runs
    assert sum(slowed.calls.values()) == 11
    assert slowed.waits() == 5


def test_idle_tick_without_a_report_waits_three_times(db, configure, pipeline_file, slowed):
    """With EMAIL_ON=activity an idle tick sends nothing and reads nothing for a report."""
    pipeline_file(PIPE)
    settings = configure(SMART_RESUME_EMAIL_ON="activity")
    seed_clients(db, 20)
    run_once(settings, db)
    run_once(settings, db)
    slowed.on = True
    out = run_once(settings, db)
    assert out.report["status"] == "skipped"
    assert sum(slowed.calls.values()) == 5  # take, the due reads (3), release
    assert slowed.waits() == 3


def test_the_last_runs_a_warm_take_knows_are_those_a_read_finds(db, configure, pipeline_file):
    """The report's strip after warm takes (known), after a run that failed before starting
    (it marked the lock: read) and after a fresh instance (read) is, each time, what reading
    the runs gives: ids, outcomes and durations."""
    from dataclasses import replace

    from shared import lock, report

    pipeline_file(PIPE)
    settings = configure(SMART_RESUME_EMAIL_ON="always")
    seed_clients(db, 3)
    shown: list[tuple] = []
    real = report.build_message

    def spy(report_input):  # type: ignore[no-untyped-def]
        shown.append(report_input.history)
        return real(report_input)

    report.build_message = spy
    try:
        steps = ["run", "run", "run", "broken", "run", "run", "fresh", "run"]
        for step in steps:
            if step == "broken":
                run_once(replace(settings, module="no_such_module_x"), db)
                continue
            if step == "fresh":
                lock._released.clear()
            out = run_once(settings, db)
            assert out.status == "completed"
            read = report.last_runs(settings, db)
            assert [_seen(r) for r in shown[-1]] == [_seen(r) for r in read]
    finally:
        report.build_message = real
    assert len(shown[-1]) == len(steps)  # every run, the one that failed to start included


def _seen(record: dict) -> tuple:
    return (record["runId"], record["status"], (record.get("summary") or {}).get("durationSeconds"))
