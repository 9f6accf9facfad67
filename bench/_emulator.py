"""Shared bench plumbing: the emulator, the environment, seeding, round-trip counting, results.

Each bench module imports this first. The emulator is started here (on a free port, in its own
process group, killed at exit) unless FIRESTORE_EMULATOR_HOST already points at a running one.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "RESULTS.md"
for _p in (str(ROOT), str(BENCH), str(ROOT / "tests"), str(ROOT / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

PROJECT = "smart-resume-bench"
SECRET = "bench-secret-0123456789"
QUICK = "--quick" in sys.argv

import firestore_emulator  # noqa: E402  (found through the path set above)

WORK = Path(tempfile.mkdtemp(prefix="smart-resume-bench-"))
_emulator_host: str | None = None
_proc: subprocess.Popen[bytes] | None = None


def free_port() -> int:
    return firestore_emulator.free_port()


def _command(port: int) -> list[str]:
    try:
        return firestore_emulator.command(port)
    except firestore_emulator.ToolMissing as exc:
        sys.exit(f"the bench needs the Firestore emulator: {exc}")


def _stop() -> None:
    global _proc
    if _proc is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(_proc.pid, signal.SIGKILL)
        _proc.wait(timeout=10)
        _proc = None


def emulator() -> str:
    """The emulator's host:port, starting one for this process if none is configured."""
    global _emulator_host, _proc
    if _emulator_host:
        return _emulator_host
    existing = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if existing:
        _emulator_host = existing
        return existing
    port = free_port()
    log = open(WORK / f"emulator-{port}.log", "wb")  # noqa: SIM115
    _proc = subprocess.Popen(
        _command(port), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    atexit.register(_stop)
    host = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if _proc.poll() is not None:
            sys.exit(f"the emulator exited early; see {log.name}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"http://{host}/", timeout=1).text.strip() == "Ok":
                _emulator_host = host
                os.environ["FIRESTORE_EMULATOR_HOST"] = host
                _warm_up()
                return host
        time.sleep(0.1)
    sys.exit("the emulator did not answer within 90 s")


def _warm_up() -> None:
    """A fresh emulator (Java) is several times slower until its JIT has seen some traffic;
    without this, whichever benchmark runs first measures the warm-up."""
    from google.cloud import firestore

    warm = "smart-resume-bench-warmup"
    client = firestore.Client(project=warm)
    col = client.collection("warm")
    for i in range(300):
        col.document(f"d{i % 50}").set({"n": i, "s": "x" * 50})
        batch = client.batch()
        batch.set(col.document(f"b{i % 50}"), {"n": i})
        batch.update(col.document(f"d{i % 50}"), {"m": i})
        batch.commit()
        col.document(f"d{i % 50}").get()
    for _ in range(20):
        list(col.limit(50).stream())
        list(client.get_all([col.document(f"d{i}") for i in range(50)]))
    client.close()
    url = f"http://{_emulator_host}/emulator/v1/projects/{warm}/databases/(default)/documents"
    requests.delete(url, timeout=60)


def clear() -> None:
    url = f"http://{emulator()}/emulator/v1/projects/{PROJECT}/databases/(default)/documents"
    requests.delete(url, timeout=120).raise_for_status()


def base_env(**overrides: Any) -> dict[str, str]:
    """The variables a bench run uses (for os.environ or a child process)."""
    env = {
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "FIRESTORE_EMULATOR_HOST": emulator(),
        "SMART_RESUME_WEBHOOK_SECRET": SECRET,
        "SMART_RESUME_EMAIL_TRANSPORT": "outbox",
        "SMART_RESUME_OUTBOX": str(WORK / "outbox"),
        "SMART_RESUME_EMAIL_ON": "always",
        "SMART_RESUME_LOG_FORMAT": "text",
        "SMART_RESUME_HEARTBEAT_SECONDS": "60",
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def configure(**overrides: Any):  # type: ignore[no-untyped-def]
    """Apply the bench environment to this process; return (settings, client)."""
    for key in list(os.environ):
        if key.startswith("SMART_RESUME_"):
            del os.environ[key]
    os.environ.update(base_env(**overrides))
    from shared.config import get_settings
    from shared.store import get_client

    get_settings.cache_clear()
    settings = get_settings()
    quiet_logs()
    return settings, get_client(settings)


def quiet_logs() -> None:
    """The product logs every run to stdout; the bench prints only its own figures."""
    import logging

    from shared import log as slog

    slog.configure("text", level=logging.WARNING)
    # The trigger reconfigures the level on every request; a filter on the handler stays.
    for handler in logging.getLogger(slog.LOGGER_NAME).handlers:
        if not any(getattr(f, "_bench", False) for f in handler.filters):
            quiet = logging.Filter()
            quiet.filter = lambda record: record.levelno >= logging.WARNING  # type: ignore[method-assign]
            quiet._bench = True  # type: ignore[attr-defined]
            handler.addFilter(quiet)


def pipeline_file(text: str, name: str = "pipeline.toml") -> Path:
    path = WORK / name
    path.write_text(text)
    return path


NOOP_PIPELINE = """fresh_hours = 24
[[operation]]
name = "noop"
kind = "python"
target = "bench_ops:noop"
"""


def python_pipeline(n: int) -> str:
    ops = "".join(
        f'\n[[operation]]\nname = "op{i}"\nkind = "python"\ntarget = "bench_ops:noop"\n'
        for i in range(n)
    )
    return "fresh_hours = 24\n" + ops


# -- seeding -------------------------------------------------------------------------------


def seed_clients(  # type: ignore[no-untyped-def]
    client, count: int, ops: tuple[str, ...] = (), states: bool = False, start: int = 0
) -> None:
    """Active clients `c{start:05d}`...`c{count-1:05d}`, 500 writes per commit, 4 in flight.

    With `states`, each client also gets op-state documents in a realistic mix: a third fresh
    successes (skipped), a third old successes, a sixth failed, a sixth never ran.
    """
    now = dt.datetime.now(dt.UTC)
    old = now - dt.timedelta(days=3)
    writes: list[tuple[Any, dict[str, Any]]] = []
    col = client.collection("clients")
    for i in range(start, count):
        cid = f"c{i:05d}"
        ref = col.document(cid)
        writes.append((ref, {"name": f"Client {cid}", "active": True}))
        if not states:
            continue
        for j, op in enumerate(ops):
            kind = (i + j) % 6
            if kind == 5:
                continue  # never ran
            status = "failed" if kind == 4 else "success"
            finished = now if kind in (0, 1) else old
            writes.append(
                (
                    ref.collection("operations").document(op),
                    {
                        "status": status,
                        "runId": "seed",
                        "startedAt": finished,
                        "finishedAt": finished,
                        "checkpoint": None,
                        "counts": {"items": i % 7},
                        "error": "seeded failure" if status == "failed" else None,
                        "attempts": 1,
                    },
                )
            )
    chunks = [writes[i : i + 500] for i in range(0, len(writes), 500)]

    def commit(chunk: list[tuple[Any, dict[str, Any]]]) -> None:
        batch = client.batch()
        for ref, data in chunk:
            batch.set(ref, data)
        batch.commit()

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(commit, chunks))


# -- counting round trips -------------------------------------------------------------------

RPCS = (
    "get_document",
    "list_documents",
    "update_document",
    "delete_document",
    "batch_get_documents",
    "begin_transaction",
    "commit",
    "rollback",
    "run_query",
    "run_aggregation_query",
    "batch_write",
    "list_collection_ids",
    "partition_query",
)


class RoundTrips:
    """Counts the gRPC calls a Firestore client issues (each is one round trip)."""

    def __init__(self, client) -> None:  # type: ignore[no-untyped-def]
        self.counts: Counter[str] = Counter()
        self._mutex = threading.Lock()
        api = client._firestore_api
        for name in RPCS:
            original = getattr(api, name, None)
            if original is None or getattr(original, "_bench_counted", False):
                continue
            setattr(api, name, self._wrap(name, original))

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._mutex:
                self.counts[name] += 1
            return original(*args, **kwargs)

        counted._bench_counted = True  # type: ignore[attr-defined]
        return counted

    def reset(self) -> None:
        with self._mutex:
            self.counts.clear()

    @property
    def total(self) -> int:
        return sum(self.counts.values())


_round_trips: dict[int, RoundTrips] = {}


def round_trips(client) -> RoundTrips:  # type: ignore[no-untyped-def]
    """One counter per client, installed once."""
    counter = _round_trips.get(id(client))
    if counter is None:
        counter = _round_trips[id(client)] = RoundTrips(client)
    return counter


# -- timing and results ---------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    out: list[float] = []
    start = time.perf_counter()
    yield out
    out.append(time.perf_counter() - start)


def machine() -> str:
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip()
    return f"`{uname}`, nproc {os.cpu_count()}, Python {platform.python_version()}"


def report(title: str, lines: list[str], verdicts: list[str]) -> str:
    """Print a section and append it to bench/RESULTS.md."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mode = " (--quick)" if QUICK else ""
    text = "\n".join(
        [f"### {title}{mode}", "", f"{stamp}; {machine()}", "", *lines, "", *verdicts, ""]
    )
    print(text, flush=True)
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nAppended by `make bench` (`bench/run_all.py`).\n\n"
        )
    with RESULTS.open("a") as fh:
        fh.write(text + "\n")
    return text


def verdict(name: str, ok: bool, detail: str) -> str:
    return f"- {'PASS' if ok else 'MISS'} {name}: {detail}"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out
