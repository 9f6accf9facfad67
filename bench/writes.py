"""Bench 6: the write path of a busy run: 2,000 clients x 3 `python` operations, concurrency 8.

Firestore sustains about one write per second per document; the previous design wrote one
fence document with every state commit, so a busy run wrote that document hundreds of times a
second. Now a run claims each client and chains that client's commits on its own document.
Measured here: commits per executed client-operation (target <= 1.0; before the redesign
1.34), and writes per document per second, the most writes any one document took divided by
the run's duration (target <= 1). The writes are counted on the wire (`_wire.Wire`), so the
lock document's acquire, heartbeats and release, the run record and the report count too; the
engine's own count (`Outcome.stats`) is shown beside them.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import _emulator as E
import _ticks as T
from _wire import wire

OPS = 3
CONCURRENCY = 8
BEFORE_COMMITS_PER_OP = 1.34  # bench 6 before the redesign (per_op.py, 2026-11-28)


def kind(path: str) -> str:
    """Which sort of document a path is, for the tables."""
    parts = path.split("/")
    if parts[0] == "clients":
        return "client document" if len(parts) == 2 else "operation state"
    if parts[0] == "locks":
        if len(parts) == 2:
            return "lock document"
        return {"fence": "fence document", "meta": "full-pass record"}.get(parts[2], path)
    if parts[0] == "runs":
        return "run record" if len(parts) == 2 else "run results"
    return path


def _by_kind(writes: Counter[str]) -> list[list[Any]]:
    kinds: dict[str, list[int]] = {}
    for path, n in writes.items():
        kinds.setdefault(kind(path), []).append(n)
    return [
        [name, len(ns), sum(ns), max(ns)]
        for name, ns in sorted(kinds.items(), key=lambda kv: -sum(kv[1]))
    ]


def run(quick: bool = E.QUICK) -> dict[str, float]:
    clients = 500 if quick else 2000
    path = E.pipeline_file(E.python_pipeline(OPS), "three.toml")
    settings, client = E.configure(SMART_RESUME_PIPELINE=path, SMART_RESUME_CONCURRENCY=CONCURRENCY)
    from shared.resume.pipeline import load_pipeline
    from shared.resume.plan import RunOptions
    from shared.runner import start_run

    pipeline = load_pipeline(settings.pipeline_path)
    E.clear()
    T.seed(client, pipeline, clients, due=True)
    reconciled = T.record_full_pass(client, settings, pipeline, clients)
    counter = wire(client)
    counter.reset()
    start = time.perf_counter()
    outcome = start_run(settings, client, RunOptions(), trigger={"source": "bench"})
    duration = time.perf_counter() - start
    summary = outcome.body.get("summary", {})
    executed = summary.get("processed", 0)
    assert outcome.status == "completed" and executed == clients * OPS, outcome.body
    assert T.full_pass_at(client, settings, pipeline) == reconciled, "the tick ran a full pass"

    commits = outcome.stats["commits"]
    engine_writes: Counter[str] = outcome.stats["writesByDocument"]
    per_op = commits / executed
    hottest, most = counter.writes.most_common(1)[0]
    lock_path = f"locks/{settings.lock_name}"
    lock_writes = counter.writes[lock_path]
    beats = int(duration // settings.heartbeat_seconds)
    rate = most / duration
    fence_before = commits / duration
    burst, burst_path = counter.burst(1.0)
    engine_hot, engine_most = engine_writes.most_common(1)[0]

    lines = E.table(
        ["figure", "value"],
        [
            ["run duration (start_run)", f"{duration:.2f} s"],
            ["client-operations executed", executed],
            ["engine commits (claims, state commits, flushes)", commits],
            ["commits per client-operation", f"{per_op:.3f} (before: {BEFORE_COMMITS_PER_OP})"],
            [
                "most writes to one document (wire, lock included)",
                f"{most}: {hottest} ({kind(hottest)})",
            ],
            ["writes per document per second (max / duration)", f"{rate:.3f}"],
            [
                "lock document writes (acquire + heartbeats + release)",
                f"{lock_writes} (expected 2 + {beats} beats at "
                f"SMART_RESUME_HEARTBEAT_SECONDS={settings.heartbeat_seconds:g}): "
                f"{lock_writes / duration:.3f}/s",
            ],
            [
                "before the redesign: the fence document, one write per state commit",
                f"{commits} / {duration:.2f} s = {fence_before:.0f} writes/s",
            ],
            ["most writes to one document within any 1 s", f"{burst} ({kind(burst_path)})"],
        ],
    )
    lines += ["", "Writes by kind of document (wire):", ""]
    lines += E.table(
        ["document", "documents", "writes", "max per document"], _by_kind(counter.writes)
    )
    lines += [
        "",
        f"{clients} clients x {OPS} `python` operations returning None (bench_ops.noop), "
        f"each due (3-day-old successes), SMART_RESUME_CONCURRENCY={CONCURRENCY}; no full pass "
        f"(its record was seeded). Engine's own count: {commits} commits, busiest document "
        f"{engine_most} writes ({kind(engine_hot)}); on the wire "
        f"{sum(counter.writes.values())} writes in {counter.commits} commits, RPCs "
        f"{dict(sorted(counter.round_trips.items()))}.",
        f"Commits per client: {commits / clients:.3f} ({OPS} per client: the claim carries the "
        "first `running` mark, each later `running` mark carries the previous outcome; the last "
        f"outcome rides in the worker's next claim; + {CONCURRENCY} final flushes, one per "
        "worker). Heartbeats add 1 write to the lock per interval: "
        f"{1 / settings.heartbeat_seconds:.3f}/s however long the run.",
    ]
    verdicts = [
        E.verdict(
            "commits per client-operation <= 1.0 (to 2 decimals)",
            round(per_op, 2) <= 1.0,
            f"{per_op:.3f} (before {BEFORE_COMMITS_PER_OP}); without the {CONCURRENCY} final "
            f"flushes {(commits - CONCURRENCY) / executed:.3f}",
        ),
        E.verdict(
            "writes per document per second <= 1",
            rate <= 1,
            f"{rate:.3f} ({most} writes to {kind(hottest)} in {duration:.2f} s); the fence "
            f"document before: {fence_before:.0f}/s",
        ),
    ]
    E.report("6. Write path (busy run)", lines, verdicts)
    paged = fast_checkpoints(quick)
    return {
        "duration": duration,
        "per_op": per_op,
        "rate": rate,
        "fence_before": fence_before,
        **paged,
    }


def fast_checkpoints(quick: bool = E.QUICK) -> dict[str, float]:
    """Operations that checkpoint as fast as they can (`bench_ops.pager`): the peak writes to
    any document in any 1 s window, and the sustained rate of the busiest one."""
    clients = 8 if quick else 24
    pipe = (
        'fresh_hours = 24\n[[operation]]\nname = "pages"\nkind = "python"\n'
        'target = "bench_ops:pager"\n'
    )
    path = E.pipeline_file(pipe, "pager.toml")
    settings, client = E.configure(SMART_RESUME_PIPELINE=path, SMART_RESUME_CONCURRENCY=4)
    from shared.resume.pipeline import load_pipeline
    from shared.resume.plan import RunOptions
    from shared.runner import start_run

    pipeline = load_pipeline(settings.pipeline_path)
    E.clear()
    T.seed(client, pipeline, clients, due=True)
    T.record_full_pass(client, settings, pipeline, clients)
    counter = wire(client)
    counter.reset()
    start = time.perf_counter()
    outcome = start_run(settings, client, RunOptions(), trigger={"source": "bench"})
    duration = time.perf_counter() - start
    assert outcome.status == "completed", outcome.body
    saves = clients * __import__("bench_ops").PAGES
    counter.write_times = {
        p: t for p, t in counter.write_times.items() if p.startswith("clients/")
    }  # the run's own record and lock are the busy-run figures above
    burst, burst_path = counter.burst(1.0)
    client_paths = {p: n for p, n in counter.writes.items() if p.startswith("clients/")}
    busiest, most = max(client_paths.items(), key=lambda kv: kv[1])
    lines = E.table(
        ["figure", "value"],
        [
            ["checkpoints saved by the operations", saves],
            ["writes that reached the store (clients and states)", sum(client_paths.values())],
            ["run duration", f"{duration:.2f} s"],
            ["peak writes to one document in any 1 s window", f"{burst} ({kind(burst_path)})"],
            ["most writes to one client or state document", f"{most} ({kind(busiest)})"],
            [
                "its sustained rate while the operation ran (claim and close aside)",
                f"{(most - 2) / (__import__('bench_ops').PAGES * 0.01):.2f}/s",
            ],
        ],
    )
    verdicts = [
        E.verdict("peak writes to any document in any 1 s <= 2", burst <= 2, f"{burst}"),
        E.verdict(
            "sustained writes per document <= 1/s",
            (most - 2) / (__import__("bench_ops").PAGES * 0.01) <= 1.05,
            f"{(most - 2) / (__import__('bench_ops').PAGES * 0.01):.2f}/s",
        ),
        E.verdict(
            "the last checkpoint and the outcome are saved",
            outcome.body["summary"]["impact"].get("pages") == saves,
            f"impact pages = {outcome.body['summary']['impact'].get('pages')} of {saves}",
        ),
    ]
    E.report("6b. Write path (operations that checkpoint fast)", lines, verdicts)
    return {"peak_per_second": burst, "checkpoints": saves}


if __name__ == "__main__":
    run()
