"""Bench 9: the idle tick (nothing due) through a real `functions-framework` process over
HTTP, next to its floor, and where the rest goes.

The floor is what no code of ours can avoid: five bare Firestore round trips, one after another
(take the lock, read, query, release, record the report: the commits with as many writes as the
run's), plus the same trigger's answer to a request with a wrong secret (401: the process, HTTP
on loopback with a new connection per request as Cloud Scheduler makes, and the function's
admission). The tick's own round trips are traced: their number, the project function issuing
each, and how many the run waits for one after another (calls in flight together are one wait).
The run is measured with SMART_RESUME_LOG_FORMAT=json (what Cloud Functions uses) and text, and
with the report switched off (SMART_RESUME_EMAIL_ON=failure), and in-process through
`functions_framework.create_app(...).test_client()`. Every variant takes one request per round,
round-robin, so a noisy neighbour slows them alike; medians of ~30. Last, cProfile over the
in-process requests (log lines on, to /dev/null) says where the rest goes.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _emulator as E
import requests
from _wire import wire

TRIVIAL = """import functions_framework


@functions_framework.http
def hello(request):
    return "ok"
"""


OWN_CODE = (str(E.ROOT / "shared"), str(E.ROOT / "functions"))


class Served:
    """`functions-framework --source S --target T` on a free loopback port, in its own group."""

    def __init__(self, source: Path, target: str, env: dict[str, str], name: str) -> None:
        port = E.free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = E.WORK / f"{name}-{port}.log"
        binary = Path(sys.executable).parent / "functions-framework"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(binary), f"--source={source}", f"--target={target}", *self._where(port)],
                cwd=E.ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(requests.ConnectionError):
                requests.get(self.url, timeout=1)
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{name} did not start: {self.log.read_text()[-2000:]}")

    @staticmethod
    def _where(port: int) -> list[str]:
        return ["--host=127.0.0.1", f"--port={port}"]

    def post(self, secret: str = E.SECRET) -> requests.Response:
        return requests.post(self.url, json={}, headers={"X-Webhook-Secret": secret}, timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


#: A network round trip to Firestore in the same region, roughly; the emulator has none.
LATENCY = 0.005

#: The floor's five round trips: take the lock (the lock and the run record), read, query,
#: release (lock and record), record the report.
FLOOR = [("commit", 3), ("batch_get_documents", 0), ("run_query", 0), ("commit", 2), ("commit", 1)]


def _refused(served: Served) -> None:
    response = served.post(secret="not-the-secret-0123456")
    assert response.status_code == 401, (response.status_code, response.text)


def _replay(client: Any, sequence: list[tuple[str, int]]) -> None:
    """The run's round trips, bare: the same kinds in the same order, as many writes each."""
    scratch = client.collection("bench_floor")
    empty = client.collection("bench_floor_empty")
    api = client._firestore_api
    database = client._database_string
    for name, writes in sequence:
        if name == "commit":
            batch = client.batch()
            for i in range(max(writes, 1)):
                batch.set(scratch.document(f"d{i}"), {"n": i, "at": time.time()})
            batch.commit()
        elif name == "batch_get_documents":
            scratch.document("d0").get()
        elif name == "run_query":
            list(empty.limit(1).stream())
        elif name == "run_aggregation_query":
            empty.count().get()
        elif name == "begin_transaction":
            api.begin_transaction(request={"database": database})
        elif name == "rollback":
            continue  # rolls back the transaction begun above: its cost is in the begin
        else:
            raise AssertionError(f"no bare stand-in for {name}")


def _profile(app_client: Any, n: int) -> tuple[dict[str, list[list[Any]]], float]:
    """cProfile over `n` requests: top 10 by cumulative time (all, and the project's own
    functions) and by own time, in ms per request; and ms per request under the profiler."""
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(n):
        _post(app_client)
    profiler.disable()
    per_request = (time.perf_counter() - start) / n
    stats = pstats.Stats(profiler, stream=io.StringIO())

    def top(key: str, own_code: bool = False) -> list[list[Any]]:
        stats.sort_stats(key)
        rows = []
        for func in stats.fcn_list:  # type: ignore[attr-defined]
            where, line, fn = func
            if own_code and not where.startswith(OWN_CODE):
                continue
            _cc, calls, own, cumulative, _callers = stats.stats[func]  # type: ignore[attr-defined]
            short = where.split("site-packages/")[-1].replace(str(E.ROOT) + "/", "")
            short = short.replace(sys.base_prefix + "/lib/", "")
            rows.append(
                [
                    f"`{short}:{line}({fn})`",
                    f"{calls / n:g}",
                    f"{cumulative * 1000 / n:.2f}",
                    f"{own * 1000 / n:.2f}",
                ]
            )
            if len(rows) == 10:
                break
        return rows

    tables = {
        "Top 10 by cumulative time": top("cumulative"),
        "Top 10 of the project's own functions (shared/, functions/) by cumulative time": top(
            "cumulative", own_code=True
        ),
        "Top 10 by own time": top("tottime"),
    }
    return tables, per_request


def _post(app_client: Any) -> None:
    """One idle tick through the in-process trigger, its log lines to /dev/null."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        response = app_client.post("/", json={}, headers={"X-Webhook-Secret": E.SECRET})
    assert response.status_code == 200, response.get_json()


def _loud_logs() -> None:
    """Undo `E.quiet_logs`: the profile must see what logging costs."""
    import logging

    from shared import log as slog

    for handler in logging.getLogger(slog.LOGGER_NAME).handlers:
        for f in [f for f in handler.filters if getattr(f, "_bench", False)]:
            handler.removeFilter(f)


def _trigger(served: Served) -> None:
    response = served.post()
    assert response.status_code == 200, (response.status_code, response.text)
    assert response.json()["status"] == "completed", response.json()


def run(quick: bool = E.QUICK) -> dict[str, float]:
    n = 10 if quick else 30
    pipeline = E.pipeline_file(E.NOOP_PIPELINE, "empty.toml")
    _, client = E.configure(
        SMART_RESUME_PIPELINE=pipeline,
        SMART_RESUME_LOG_FORMAT="json",
        SMART_RESUME_LOCK_NAME="bench-inprocess",
    )
    E.clear()
    base = {**os.environ, **E.base_env(SMART_RESUME_PIPELINE=pipeline)}
    base["PYTHONPATH"] = str(E.BENCH)  # the pipeline's `bench_ops:noop`
    # Each trigger has a lock of its own: it released it last, so it retakes it in one commit,
    # as a warm instance does (sharing one lock, each would find it released by another).
    variants = {
        "json": {"SMART_RESUME_LOG_FORMAT": "json", "SMART_RESUME_LOCK_NAME": "bench-json"},
        "text": {"SMART_RESUME_LOG_FORMAT": "text", "SMART_RESUME_LOCK_NAME": "bench-text"},
        "json, no report (EMAIL_ON=failure)": {
            "SMART_RESUME_LOG_FORMAT": "json",
            "SMART_RESUME_EMAIL_ON": "failure",
            "SMART_RESUME_LOCK_NAME": "bench-noreport",
        },
    }
    trivial_source = E.WORK / "trivial_main.py"
    trivial_source.write_text(TRIVIAL)
    main = E.ROOT / "functions/smart_resume/main.py"
    servers: dict[str, Served] = {}
    trivial_server: Served | None = None
    try:
        for label, extra in variants.items():
            servers[label] = Served(main, "smart_resume", {**base, **extra}, "trigger")
        trivial_server = Served(trivial_source, "hello", base, "trivial")

        # In-process, through the same trigger, log lines on (to /dev/null).
        import functions_framework

        app_client = functions_framework.create_app(target="smart_resume", source=str(main))
        app_client = app_client.test_client()
        _loud_logs()
        for _ in range(3):  # warm: clients, channels, each lock's first tick (a full pass)
            for served in servers.values():
                _trigger(served)
            trivial_server.post().raise_for_status()
            _post(app_client)
        counter = wire(client)
        counter.reset()
        counter.trace = True
        _post(app_client)
        counter.trace = False
        sequence, origins = list(counter.sequence), list(counter.origins)
        waits = counter.waits()
        _replay(client, sequence)  # warm
        _replay(client, FLOOR)

        # Round-robin, so a noisy neighbour slows every variant alike.
        http: dict[str, list[float]] = {label: [] for label in servers}
        trivial, refused, inproc, rpc, bare, floor_rts = [], [], [], [], [], []
        run_kinds: list[dict[str, float]] = []
        bare_kinds: list[dict[str, float]] = []
        for _ in range(n):
            for label, served in servers.items():
                start = time.perf_counter()
                _trigger(served)
                http[label].append(time.perf_counter() - start)
            start = time.perf_counter()
            trivial_server.post().raise_for_status()
            trivial.append(time.perf_counter() - start)
            start = time.perf_counter()
            _refused(servers["json"])
            refused.append(time.perf_counter() - start)
            start = time.perf_counter()
            _replay(client, FLOOR)
            floor_rts.append(time.perf_counter() - start)
            counter.reset()
            start = time.perf_counter()
            _post(app_client)
            inproc.append(time.perf_counter() - start)
            rpc.append(sum(counter.seconds.values()))
            run_kinds.append(dict(counter.seconds))
            counter.reset()
            start = time.perf_counter()
            _replay(client, sequence)
            bare.append(time.perf_counter() - start)
            bare_kinds.append(dict(counter.seconds))
        # With a network's round trip added to every RPC (in-process: the wire adds it), where
        # calls in flight together overlap as they do against the real service.
        counter.latency = LATENCY
        slow_run, slow_floor = [], []
        for _ in range(n):
            start = time.perf_counter()
            _post(app_client)
            slow_run.append(time.perf_counter() - start)
            start = time.perf_counter()
            _replay(client, FLOOR)
            slow_floor.append(time.perf_counter() - start)
        counter.latency = 0.0
    finally:
        for served in servers.values():
            served.stop()
        if trivial_server is not None:
            trivial_server.stop()
    tables, profiled = _profile(app_client, n)
    E.quiet_logs()

    own_round_trips = E.median(bare)
    trivial_ms = E.median(trivial)
    floor = E.median(floor_rts) + E.median(refused)
    json_ms = E.median(http["json"])
    inproc_ms, rpc_ms = E.median(inproc), E.median(rpc)
    rows = [
        [
            f"idle tick over HTTP, {label}",
            n,
            f"{E.median(t) * 1000:.1f}",
            f"{_p90(t) * 1000:.1f}",
            f"{E.median(t) / floor:.2f}x",
        ]
        for label, t in http.items()
    ]
    rows += [
        [
            "idle tick in-process (test client), json logs",
            n,
            f"{inproc_ms * 1000:.1f}",
            f"{_p90(inproc) * 1000:.1f}",
            f"{inproc_ms / floor:.2f}x",
        ],
        ["floor: five bare round trips", n, f"{E.median(floor_rts) * 1000:.1f}", "", ""],
        ["floor: the trigger's 401 over HTTP", n, f"{E.median(refused) * 1000:.1f}", "", ""],
        ["floor: the two together", "", f"{floor * 1000:.1f}", "", "1.00x"],
        [
            f"the tick's own {len(sequence)} round trips, bare, one after another",
            n,
            f"{own_round_trips * 1000:.1f}",
            f"{_p90(bare) * 1000:.1f}",
            f"{own_round_trips / floor:.2f}x",
        ],
        ["a trivial function over HTTP", n, f"{trivial_ms * 1000:.1f}", "", ""],
    ]
    slow = E.median(slow_run) / (E.median(slow_floor) + E.median(refused))
    rows += [
        [
            f"idle tick in-process, {LATENCY * 1000:g} ms added to every round trip",
            n,
            f"{E.median(slow_run) * 1000:.1f}",
            f"{_p90(slow_run) * 1000:.1f}",
            f"{slow:.2f}x",
        ],
        [
            f"floor with {LATENCY * 1000:g} ms per round trip (five, plus the 401)",
            n,
            f"{(E.median(slow_floor) + E.median(refused)) * 1000:.1f}",
            "",
            "1.00x",
        ],
    ]
    lines = [
        f"The idle tick makes {len(sequence)} Firestore round trips and waits for {waits} of "
        "them one after another (calls in flight together count once).",
        "",
    ]
    lines += E.table(["what", "requests", "median ms", "p90 ms", "vs floor"], rows)
    parts = [
        ["the tick's round trips, bare, one after another", f"{own_round_trips * 1000:.1f}"],
        ["the same round trips inside the run, summed", f"{rpc_ms * 1000:.1f}"],
        ["the in-process run", f"{inproc_ms * 1000:.1f}"],
        ["HTTP and the process (HTTP json - in-process)", f"{(json_ms - inproc_ms) * 1000:.1f}"],
        ["  of which a trivial function's request (floor)", f"{trivial_ms * 1000:.1f}"],
    ]
    lines += ["", "Where the json run's time goes (medians, ms):", ""]
    lines += E.table(["part", "ms"], parts)
    kinds = sorted({name for name, _ in sequence})
    lines += ["", "The round trips by kind, inside the in-process run vs bare (median ms):", ""]
    lines += E.table(
        ["RPC", "calls per run", "inside the run ms", "bare ms"],
        [
            [
                kind,
                sum(1 for name, _ in sequence if name == kind),
                f"{E.median([k.get(kind, 0.0) for k in run_kinds]) * 1000:.1f}",
                f"{E.median([k.get(kind, 0.0) for k in bare_kinds]) * 1000:.1f}",
            ]
            for kind in kinds
        ],
    )
    lines += [
        "",
        f"json - text = {(json_ms - E.median(http['text'])) * 1000:.1f} ms; with the report "
        f"(outbox) - without = "
        f"{(json_ms - E.median(http['json, no report (EMAIL_ON=failure)'])) * 1000:.1f} ms.",
        "",
        "The idle tick's round trips, in order (RPC (writes): the project function issuing it):",
        "",
        *(
            f"{i}. {name}{f' ({w})' if w else ''}: `{origin}`"
            for i, ((name, w), origin) in enumerate(zip(sequence, origins, strict=True), 1)
        ),
        "",
        f"cProfile of {n} in-process requests (test client, json log lines to /dev/null): "
        f"{profiled * 1000:.1f} ms per request under the profiler; figures in ms per request.",
    ]
    for title, table in tables.items():
        lines += ["", f"{title}:", ""]
        lines += E.table(["function", "calls/request", "cumulative ms", "own ms"], table)
    ratio = json_ms / floor
    verdicts = [
        f"- idle tick over HTTP (json) = floor x {ratio:.2f} ({json_ms * 1000:.1f} ms vs "
        f"{floor * 1000:.1f} ms; goal <= 2x: {'met' if ratio <= 2 else 'MISSED'}); "
        f"{len(sequence)} round trips, {waits} waited for one after another",
        f"- with {LATENCY * 1000:g} ms of network per round trip (in-process): floor x {slow:.2f}",
    ]
    E.report("9. Idle tick over HTTP vs its floor", lines, verdicts)
    return {"json_ms": json_ms * 1000, "floor_ms": floor * 1000, "round_trips": len(sequence)}


if __name__ == "__main__":
    run()
