"""The seeded fault harness: many ticks, several "processes", lost answers, aborted and slow
commits, processes cut off and coming back as zombies, forced unlocks, clients deleted and
edited mid-run; invariants checked after every tick against the real emulator.

Invariants (each a plain function of what the store holds and what the harness saw):

- fencing: on every client document and operation state, the writes that landed come from runs
  in the order they took the lock: once a newer run wrote there, no older run's write lands;
- every run's record ends (or its lock is still held, and goes stale for the next tick);
- no run sends two reports, and none is left `sending` once the healing runs are over;
- the lock is free, or held by a live run, or stale (never stranded);
- no saved checkpoint goes backwards.

`make test` runs a few seeds of 12 ticks; `SMART_RESUME_SOAK=N` runs N ticks per seed (the
figures in RELIABILITY.md come from a soak).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import harness_ops
import pytest
from conftest import PROJECT, seed_clients
from faulty import Faults, Landed, faulty_client

from shared import status
from shared.lock import Lock
from shared.resume.plan import RunOptions
from shared.runner import start_run
from shared.runs import FINISHED

SEEDS = (11, 23, 47)
TICKS = int(os.environ.get("SMART_RESUME_SOAK", "12"))
CLIENTS = 8
PIPE = (
    'fresh_hours = 24\n[[operation]]\nname = "pages"\nkind = "python"\n'
    'target = "harness_ops:pager"\n'
)
SETTINGS = {
    "SMART_RESUME_HEARTBEAT_SECONDS": "0.2",
    "SMART_RESUME_LEASE_SECONDS": "1",
    "SMART_RESUME_MAX_RUN_SECONDS": "30",
    "SMART_RESUME_TIME_BUDGET_SECONDS": "1.5",
    "SMART_RESUME_RPC_TIMEOUT_SECONDS": "1",
    "SMART_RESUME_CONCURRENCY": "2",
    "SMART_RESUME_RECONCILE_HOURS": "1000",
}


class Reports(logging.Handler):
    """Counts the reports each run sent (the `report sent` / `report failed` log lines)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None) or {}
        if record.getMessage().startswith(("report sent", "report failed")):
            run_id = fields.get("runId") or getattr(record, "runId", None)
            if run_id:
                self.sent[str(run_id)] += 1


class Died(BaseException):
    """The process running this run stops, as if killed: nothing after it runs."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id


class Harness:
    def __init__(self, seed: int, db: Any, settings: Any) -> None:
        self.rng = random.Random(seed)
        self.db = db
        self.settings = settings
        self.landed: list[Landed] = []
        self.processes = [Faults(lose=0.05, abort=0.05, delay=0.1) for _ in range(3)]
        self.clients = [
            faulty_client(PROJECT, faults, seed * 10 + i, self.landed)
            for i, faults in enumerate(self.processes)
        ]
        self.tokens: dict[str, int] = {}
        self.pages: dict[str, int] = {}
        self.runs: set[str] = set()
        self.events: Counter[str] = Counter()
        self.violations: list[str] = []
        self.dying: set[int] = set()  # threads whose run dies as it sends its report

    def send(self, real: Any) -> Any:
        """The transport, for a run whose process dies mid-send: its claim stays `sending`
        (and what that process remembered of the lock is not lost here: a later take may
        know the claim, and must settle it)."""

        def send(settings: Any, message: Any) -> None:
            if threading.get_ident() in self.dying:
                raise Died(message.run_id)
            real(settings, message)

        return send

    # -- one tick --------------------------------------------------------------------------

    def tick(self, number: int) -> None:
        seed_clients(self.db, 1, prefix=f"t{number:03d}-")  # new work: seen via a full pass
        threads = []
        self.active = self.rng.sample(range(3), self.rng.choice((1, 1, 2)))
        for index in self.active:
            thread = threading.Thread(target=self._run, args=(index,), daemon=True)
            threads.append(thread)
            thread.start()
        chaos = self.rng.uniform(0.1, 1.2)
        time.sleep(chaos)
        self._chaos()
        for thread in threads:
            thread.join(30)
            assert not thread.is_alive(), "a run did not end within 30 s"
        for faults in self.processes:
            faults.partitioned.clear()

    def _run(self, index: int, may_die: bool = True) -> None:
        if may_die and self.rng.random() < 0.15:
            self.dying.add(threading.get_ident())  # dies after claiming its report
        try:
            out = start_run(
                self.settings, self.clients[index], RunOptions(), trigger={"source": "harness"}
            )
        except Died as died:
            self.events["died sending its report"] += 1
            self.runs.add(died.run_id)
            return
        except Exception as exc:  # the store was unreachable before the run started
            self.events[f"refused: {type(exc).__name__}"] += 1
            return
        finally:
            self.dying.discard(threading.get_ident())
        self.events[f"run {out.status}"] += 1
        if out.run_id:
            self.runs.add(out.run_id)

    def _chaos(self) -> None:
        roll = self.rng.random()
        if roll < 0.2:
            self.events["forced unlock"] += 1
            try:
                status.unlock(self.settings, self.db, force=True)
            except Exception as exc:
                self.events[f"unlock failed: {type(exc).__name__}"] += 1
        elif roll < 0.45:
            faults = self.processes[self.rng.choice(self.active)]
            faults.partitioned.set()
            self.events["partitioned"] += 1
            heal = self.rng.uniform(0.3, 2.0)
            threading.Timer(heal, faults.partitioned.clear).start()
        elif roll < 0.55:
            victim = f"c{self.rng.randrange(CLIENTS):05d}"
            self.db.document(f"clients/{victim}").delete()
            self.events["client deleted"] += 1
            threading.Timer(
                0.5, lambda: seed_clients(self.db, 1, prefix=victim[:-5] + "x" + victim[-4:])
            ).start()
        elif roll < 0.75:
            victim = f"c{self.rng.randrange(CLIENTS):05d}"
            try:
                self.db.document(f"clients/{victim}").update({"name": f"renamed {roll:.3f}"})
                self.events["client edited"] += 1
            except Exception:
                pass

    # -- invariants ------------------------------------------------------------------------

    def check(self, reports: Reports) -> None:
        self._fencing()
        self._records()
        for run_id, n in reports.sent.items():
            if n > 1:
                self.violations.append(f"run {run_id} sent {n} reports")
        self._lock()
        self._checkpoints()

    def _fencing(self) -> None:
        for entry in self.landed:
            if entry.token is not None and entry.run_id:
                self.tokens.setdefault(entry.run_id, entry.token)
        newest: dict[str, tuple[int, str]] = {}
        for entry in sorted(self.landed, key=lambda e: e.at):
            token = self.tokens.get(entry.run_id or "")
            if token is None:
                continue
            for path in entry.paths:
                if not path.startswith("clients/"):
                    continue
                seen = newest.get(path)
                if seen is not None and token < seen[0]:
                    self.violations.append(
                        f"{path}: run {entry.run_id} (token {token}) wrote after run "
                        f"{seen[1]} (token {seen[0]})"
                    )
                if seen is None or token >= seen[0]:
                    newest[path] = (token, entry.run_id or "")

    def _records(self) -> None:
        lock = self.db.document("locks/smart-resume").get().to_dict() or {}
        for run_id in self.runs:
            record = self.db.document(f"runs/{run_id}").get().to_dict() or {}
            if record.get("status") in FINISHED:
                continue
            if lock.get("held") and lock.get("runId") == run_id:
                continue  # cut off while holding it: stale soon, taken over next tick
            self.violations.append(f"run {run_id} left its record {record.get('status')}")

    def _lock(self) -> None:
        state = Lock(self.db, self.settings).read()
        if state.held and not state.stale and state.run_id not in self.runs:
            return  # a run of this tick still finishing its release? (none should be)
        if state.held and not state.stale:
            time.sleep(float(self.settings.lease_seconds) + 0.2)
            again = Lock(self.db, self.settings).read()
            if again.held and again.run_id == state.run_id and not again.stale:
                self.violations.append(f"lock held by finished run {state.run_id}, not stale")

    def _checkpoints(self) -> None:
        for snap in self.db.collection_group("operations").stream():
            data = snap.to_dict() or {}
            path = snap.reference.path
            if data.get("status") == "success":
                self.pages[path] = harness_ops.PAGES
                continue
            page = (data.get("checkpoint") or {}).get("page", 0)
            before = self.pages.get(path, 0)
            if page < before and before < harness_ops.PAGES:
                self.violations.append(f"{path}: checkpoint went back from {before} to {page}")
            self.pages[path] = max(page, before if before < harness_ops.PAGES else 0)


def figure(name: str, **values: object) -> None:
    print(f"FIGURE {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_invariants_hold_under_seeded_faults(
    seed, db, configure, pipeline_file, emulator, monkeypatch
):
    from shared import runner

    # A claim older than 2 s is settled by the next run: the end's healing runs outlast it.
    monkeypatch.setattr(runner, "sending_grace", lambda _: 2.0)
    pipeline_file(PIPE)
    settings = configure(**SETTINGS)
    seed_clients(db, CLIENTS)
    harness_ops.CALLS.clear()
    reports = Reports()
    logger = logging.getLogger("smart_resume")
    logger.addHandler(reports)
    harness = Harness(seed, db, settings)
    from shared import transports

    monkeypatch.setattr(transports, "send", harness.send(transports.send))
    try:
        for number in range(TICKS):
            harness.tick(number)
            harness.check(reports)
            assert not harness.violations, harness.violations
        # The end: everything healed, runs until the work is done; every record ends.
        for _ in range(12):
            time.sleep(float(settings.lease_seconds) + 0.1)
            harness._run(0, may_die=False)
        harness.check(reports)
        for run_id in harness.runs:
            record = db.document(f"runs/{run_id}").get().to_dict() or {}
            if record.get("status") not in FINISHED:
                harness.violations.append(f"run {run_id} never ended: {record.get('status')}")
            if (record.get("report") or {}).get("status") == "sending":
                # Settled by a later run, whether it searched or knew (a warm take).
                harness.violations.append(f"run {run_id} left its report sending")
        assert not harness.violations, harness.violations
    finally:
        logger.removeHandler(reports)
    injected: Counter[str] = Counter()
    for faults in harness.processes:
        injected.update(faults.injected)
    by_run: defaultdict[str, int] = defaultdict(int)
    for run_id, *_ in harness_ops.CALLS:
        by_run[run_id] += 1
    figure(
        "harness",
        seed=seed,
        ticks=TICKS,
        runs=len(harness.runs),
        commits_landed=len(harness.landed),
        **{f"injected_{k}": v for k, v in sorted(injected.items())},
        **{k.replace(" ", "_").replace(":", ""): v for k, v in sorted(harness.events.items())},
        violations=len(harness.violations),
    )
    assert injected["lost"] > 0 and injected["aborted"] > 0
