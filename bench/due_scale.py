"""Bench 11: due work at any scale.

A. A full pass far longer than a tick's budget, in a layout of 4 shards: shard 0's ticks with
   a 3 s budget over N clients (100,000; 5,000 with --quick), 1 % of them due. Every tick
   processes due clients; the pass keeps its place and ends after k ticks.
B. A client created with only `name` and `active: true` while another is deactivated, among
   10,000 clients (2,000 with --quick) whose full pass is recorded: seen on the next tick.
C. 3 shards against one service limited to 10 calls a second (`max_per_second = 10`), run at
   once: the most calls any 1 s window saw, summed over the shards.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
import time
from typing import Any

import _emulator as E
import _ticks as T

BUDGET = 3.0


def _pipeline(url: str | None = None) -> Any:
    from shared.resume.pipeline import load_pipeline

    if url is None:
        path = E.pipeline_file(E.python_pipeline(1), "scale.toml")
    else:
        path = E.pipeline_file(
            'fresh_hours = 24\n[[operation]]\nname = "call"\nkind = "http"\n'
            f'url = "{url}"\nmax_per_second = 10\n',
            "limited.toml",
        )
    return path, load_pipeline(path)


def _due_in_shards(client: Any, ids: list[str], shards: int) -> None:
    """These clients due now (their state dropped: never ran), with their shard stamped."""
    from shared.resume.shards import shard_of

    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    writes = []
    for cid in ids:
        ref = client.collection("clients").document(cid)
        writes.append((ref, {"nextDueAt": past, "shard": shard_of(cid, shards)}))
    for start in range(0, len(writes), 250):
        batch = client.batch()
        for ref, fields in writes[start : start + 250]:
            batch.update(ref, fields)
            batch.delete(ref.collection("operations").document("op0"))
        batch.commit()


def full_pass(quick: bool) -> dict[str, Any]:
    from shared.resume.plan import RunOptions
    from shared.runner import start_run

    n = 5_000 if quick else 100_000
    path, pipeline = _pipeline()
    settings, client = E.configure(
        SMART_RESUME_PIPELINE=path,
        SMART_RESUME_SHARDS=4,
        SMART_RESUME_TIME_BUDGET_SECONDS=BUDGET,
        SMART_RESUME_CONCURRENCY=4,
    )
    E.clear()
    T.seed(client, pipeline, n, due=False)
    rows, k = [], 0
    meta = client.document(f"locks/{settings.lock_name}-shard-0/meta/due")
    while True:
        k += 1
        # New due work arrives between ticks (1 % of the clients, other ones each time).
        _due_in_shards(client, [T.client_id(i) for i in range(k, n, 100)], 4)
        out = start_run(settings, client, RunOptions(shard=0), trigger={"source": "bench"})
        running = (meta.get().to_dict() or {}).get("pass")
        rows.append(
            [
                k,
                out.body["summary"]["processed"],
                out.stats.get("documentsRead"),
                (running or {}).get("seen", "done"),
            ]
        )
        if running is None or k >= 200:
            break
    lines = E.table(["tick", "due processed", "documents read", "pass: clients seen"], rows)
    lines.append(
        f"{n} clients in 4 shards, shard 0's ticks, budget {BUDGET:g} s (the pass takes at "
        "most a third); 1 % due."
    )
    verdicts = [
        E.verdict(
            "due work runs on every tick", all(r[1] > 0 for r in rows), f"{[r[1] for r in rows]}"
        ),
        E.verdict("the pass ends", rows[-1][3] == "done", f"after {k} ticks"),
    ]
    E.report("11a. A full pass longer than the budget", lines, verdicts)
    return {"pass_ticks": k}


def new_client(quick: bool) -> dict[str, Any]:
    from shared.resume.plan import RunOptions
    from shared.runner import start_run

    n = 2_000 if quick else 10_000
    path, pipeline = _pipeline()
    settings, client = E.configure(SMART_RESUME_PIPELINE=path, SMART_RESUME_CONCURRENCY=4)
    E.clear()
    T.seed(client, pipeline, n, due=False)
    T.record_full_pass(client, settings, pipeline, n)
    idle = start_run(settings, client, RunOptions(), trigger={"source": "bench"})
    client.document("clients/brand-new").set({"name": "Brand new", "active": True})
    client.document(f"clients/{T.client_id(0)}").update({"active": False})
    out = start_run(settings, client, RunOptions(), trigger={"source": "bench"})
    record = client.document(f"runs/{out.run_id}").get().to_dict() or {}
    seen = [r["clientId"] for r in record.get("results", []) if r["outcome"] == "processed"]
    lines = E.table(
        ["tick", "documents read", "processed"],
        [
            ["idle (before)", idle.stats.get("documentsRead"), idle.body["summary"]["processed"]],
            ["with the new client", out.stats.get("documentsRead"), ", ".join(seen)],
        ],
    )
    lines.append(
        f"{n} clients; one created with only name and active, one deactivated, before the tick. "
        "The tick that sees it runs the full pass (every client document once)."
    )
    verdicts = [E.verdict("the new client runs on the next tick", seen == ["brand-new"], "")]
    E.report("11b. A new client while another is deactivated", lines, verdicts)
    return {"new_client_reads": out.stats.get("documentsRead")}


class _Counter(http.server.BaseHTTPRequestHandler):
    arrivals: list[float] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        with self.lock:
            self.arrivals.append(time.monotonic())
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"done": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def shared_limit(quick: bool) -> dict[str, Any]:
    from shared.resume.plan import RunOptions
    from shared.runner import start_run

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/call"
    path, pipeline = _pipeline(url)
    settings, client = E.configure(
        SMART_RESUME_PIPELINE=path, SMART_RESUME_SHARDS=3, SMART_RESUME_CONCURRENCY=4
    )
    E.clear()
    n = 60 if quick else 150
    T.seed(client, pipeline, n, due=True)
    _Counter.arrivals = []
    threads = [
        threading.Thread(
            target=start_run,
            args=(settings, client, RunOptions(shard=k)),
            kwargs={"trigger": {"source": "bench"}},
        )
        for k in range(3)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - started
    server.shutdown()
    times = sorted(_Counter.arrivals)
    most, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    lines = E.table(
        ["figure", "value"],
        [
            ["calls", len(times)],
            ["most calls in any 1 s window, all shards", most],
            ["rate over the run", f"{len(times) / took:.2f}/s"],
        ],
    )
    lines.append(f"{n} due clients in 3 shards, run at once; max_per_second = 10.")
    verdicts = [E.verdict("at most 10 calls in any 1 s, summed over shards", most <= 10, f"{most}")]
    E.report("11c. Limits shared by shards", lines, verdicts)
    return {"peak_calls_per_second": most}


def only(part: str, quick: bool = E.QUICK) -> None:
    {"a": full_pass, "b": new_client, "c": shared_limit}[part](quick)


def run(quick: bool = E.QUICK) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out.update(full_pass(quick))
    out.update(new_client(quick))
    out.update(shared_limit(quick))
    out["measured_at"] = dt.datetime.now(dt.UTC).isoformat()
    return out


if __name__ == "__main__":
    import sys

    part = next((a for a in sys.argv[1:] if a in ("a", "b", "c")), None)
    only(part) if part else run()
