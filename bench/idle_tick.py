"""Bench 3: what a tick reads: idle at 100, 1,000 and 10,000 clients x 3 operations, then busy
with 10% of 10,000 clients due.

Before the redesign every tick read every active client and every operation state (N + up to
3N documents) to find out that nothing was due; that read pattern is reproduced beside each
idle tick with `Selection.plans(selection.all_pages(), now)` (decision fields only: fewer bytes
than before, the same number of documents). A tick now reads only clients whose `nextDueAt`
has passed, plus a few documents to decide whether a full pass is due. Targets: an idle tick
reads <= 50 documents whatever the number of clients, and its wall time at 10,000 clients is
within 2x of the one at 100; a tick with 10% due reads <= 2x the due clients' own documents
(the client documents and their operation states).

Documents read are the engine's count (`Outcome.stats`); the wire count (`_wire.Wire`) adds
what the engine does not count as selection (the claim transaction reads the fence and the
client document, the report reads its run record).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import _emulator as E
import _ticks as T
from _wire import wire

OPS = 3
DUE_SHARE = 10  # one client in DUE_SHARE is due in the busy tick
#: The functions whose round trips are queries over `clients` (the emulator scans for each).
CLIENT_QUERIES = (
    "shared.resume.due.count",  # count_unstamped's two counts, count_due
    "shared.resume.due._pages",
    "shared.quarantine.",
)
REST = "rest: Python, no round trip"


def _tick(settings: Any, client: Any) -> tuple[float, Any, int, int, dict[str, float]]:
    """One run through `start_run`: seconds, outcome, wire reads, round trips, ms per RPC."""
    from shared.resume.plan import RunOptions
    from shared.runner import start_run

    counter = wire(client)
    counter.reset()
    start = time.perf_counter()
    outcome = start_run(settings, client, RunOptions(), trigger={"source": "bench"})
    elapsed = time.perf_counter() - start
    assert outcome.status == "completed", outcome.body
    ms = {k: v * 1000 for k, v in counter.seconds.items()}
    return elapsed, outcome, counter.read, counter.total_round_trips, ms


def _old_pattern(settings: Any, client: Any, pipeline: Any) -> tuple[float, int, int]:
    """The pre-redesign tick's reads: every active client and its states. (s, docs, plans)"""
    from shared.resume.due import Selection
    from shared.resume.plan import RunOptions

    selection = Selection(client, settings, pipeline, RunOptions())
    start = time.perf_counter()
    plans = list(selection.plans(selection.all_pages(), dt.datetime.now(dt.UTC)))
    return time.perf_counter() - start, selection.reads.documents, len(plans)


def _by_origin(settings: Any, client: Any, repeats: int) -> dict[str, float]:
    """ms per project function issuing RPCs in an idle tick, and the rest of the tick (median
    of `repeats` traced ticks, apart from the timed ones: finding each call's origin costs a
    little)."""
    counter = wire(client)
    per_tick: list[dict[str, float]] = []
    for _ in range(repeats):
        counter.trace = True
        try:
            elapsed = _tick(settings, client)[0]
        finally:
            counter.trace = False
        totals: dict[str, float] = {}
        for _name, origin, seconds in counter.calls:
            totals[origin] = totals.get(origin, 0.0) + seconds * 1000
        totals[REST] = elapsed * 1000 - sum(totals.values())
        per_tick.append(totals)
    origins = {o for t in per_tick for o in t}
    return {o: E.median([t.get(o, 0.0) for t in per_tick]) for o in origins}


def run(quick: bool = E.QUICK) -> dict[str, Any]:
    sizes = (100, 1000) if quick else (100, 1000, 10000)
    repeats = 5 if quick else 9
    path = E.pipeline_file(E.python_pipeline(OPS), "three.toml")
    settings, client = E.configure(SMART_RESUME_PIPELINE=path)
    from shared.resume.pipeline import load_pipeline

    pipeline = load_pipeline(settings.pipeline_path)
    E.clear()
    idle: dict[int, dict[str, Any]] = {}
    seeded = 0
    for size in sizes:
        T.seed(client, pipeline, size, due=False, start=seeded)
        seeded = size
        reconciled = T.record_full_pass(client, settings, pipeline, size)
        _tick(settings, client)  # warm: channel, module, the emulator's indexes
        ticks = [_tick(settings, client) for _ in range(repeats)]
        _, outcome, wire_reads, trips, _ = ticks[-1]
        assert outcome.body["summary"]["clients"] == 0, outcome.body
        assert T.full_pass_at(client, settings, pipeline) == reconciled, "a full pass ran"
        old_s, old_docs, planned = _old_pattern(settings, client, pipeline)
        assert planned == size, (planned, size)
        idle[size] = {
            "ms": E.median([t[0] for t in ticks]) * 1000,
            "docs": outcome.stats["documentsRead"],
            "wire": wire_reads,
            "trips": trips,
            "commits": outcome.stats["commits"],
            "old_ms": old_s * 1000,
            "old_docs": old_docs,
            "origins_ms": _by_origin(settings, client, 3),
        }
    rows = [
        [
            size,
            f"{f['ms']:.0f}",
            f["docs"],
            f["wire"],
            f["trips"],
            f["commits"],
            f"{f['old_ms']:.0f}",
            f["old_docs"],
            f"{f['old_docs'] / f['docs']:.0f}x",
        ]
        for size, f in idle.items()
    ]
    lines = E.table(
        [
            "clients",
            "idle tick ms (median)",
            "documents read (stats)",
            "documents read (wire)",
            "round trips",
            "engine commits",
            "old pattern: reads alone ms",
            "old pattern: documents",
            "fewer documents",
        ],
        rows,
    )

    origins = [*sorted({o for f in idle.values() for o in f["origins_ms"]} - {REST}), REST]
    lines += [
        "",
        "Where an idle tick's time goes: ms per project function issuing round trips, and the "
        "rest of the tick (median of 3 traced ticks):",
        "",
    ]
    lines += E.table(
        ["function", *(str(size) for size in idle)],
        [
            [
                o if o == REST else f"`{o}`",
                *(f"{f['origins_ms'].get(o, 0.0):.1f}" for f in idle.values()),
            ]
            for o in origins
        ],
    )

    # Busy: one client in DUE_SHARE due again, one of its operation states deleted.
    size = sizes[-1]
    due_ids = [T.client_id(i) for i in range(0, size, DUE_SHARE)]
    T.make_due(client, due_ids, drop="op0")
    own_docs = len(due_ids) * OPS  # each due client's document and its OPS - 1 states left
    busy_s, busy, busy_wire, busy_trips, _ = _tick(settings, client)
    summary = busy.body["summary"]
    assert summary["clients"] == len(due_ids) and summary["processed"] == len(due_ids), summary
    after_s, after, *_ = _tick(settings, client)
    assert after.body["summary"]["clients"] == 0, after.body
    busy_docs = busy.stats["documentsRead"]
    lines += [
        "",
        f"Busy tick, {len(due_ids)} of {size} clients due (`nextDueAt` in the past, `op0`'s "
        f"state deleted; `op1`, `op2` fresh): {busy_s:.2f} s, {summary['processed']} "
        f"operations run, documents read {busy_docs} (stats) / {busy_wire} (wire), "
        f"{busy_trips} round trips, {busy.stats['commits']} engine commits; the due clients' "
        f"own documents: {own_docs} ({len(due_ids)} client documents + "
        f"{len(due_ids) * (OPS - 1)} states). The tick after it is idle again: "
        f"{after.stats['documentsRead']} documents, {after_s * 1000:.0f} ms.",
        "",
        f"{OPS} `python` operations per client; idle = every state a fresh success and "
        f"`nextDueAt` a day ahead, the full pass recorded (none ran: checked). Idle tick: "
        f"median of {repeats} after a warm-up, the whole `start_run` (lock, selection, release, "
        "report to the outbox). Old pattern: one pass of the reads alone, not a whole run.",
    ]
    small, large = sizes[0], sizes[-1]
    worst = max(f["docs"] for f in idle.values())
    growth = idle[large]["ms"] / idle[small]["ms"]
    rest = {  # the traced ticks without their queries over `clients`
        s: sum(ms for o, ms in idle[s]["origins_ms"].items() if not o.startswith(CLIENT_QUERIES))
        for s in (small, large)
    }
    verdicts = [
        E.verdict(
            "idle tick reads <= 50 documents at every size",
            worst <= 50,
            ", ".join(f"{s}: {f['docs']}" for s, f in idle.items()),
        ),
        E.verdict(
            f"idle tick at {large} within 2x the wall time at {small}",
            growth <= 2,
            f"{idle[small]['ms']:.0f} -> {idle[large]['ms']:.0f} ms ({growth:.2f}x); without "
            f"its queries over `clients` (which the emulator answers by scanning) "
            f"{rest[small]:.0f} -> {rest[large]:.0f} ms ({rest[large] / rest[small]:.2f}x)",
        ),
        E.verdict(
            "busy tick reads <= 2x the due clients' documents",
            busy_docs <= 2 * own_docs,
            f"{busy_docs} / {own_docs} = {busy_docs / own_docs:.2f}x (wire, claims and run "
            f"record included: {busy_wire / own_docs:.2f}x)",
        ),
    ]
    E.report("3. Idle and due ticks", lines, verdicts)
    return {"idle": idle, "busy_docs": busy_docs, "own_docs": own_docs}


if __name__ == "__main__":
    run()
