"""Bench 8: peak RSS (`ru_maxrss`) of a busy run over 10,000 clients vs 1,000, 3 operations each.

The selection streams due clients a page at a time, so what a run holds should follow the page,
not the number of clients. Each size runs `start_run` once in a fresh child that seeds nothing
(the parent seeds first) and prints its own `ru_maxrss`. Target: 10,000 clients <= 1.2x the
peak of 1,000.

The child is started through `sh` (which forks, then execs Python): Linux carries the parent's
peak into `ru_maxrss` of a process it spawns directly (`vfork` shares the parent's memory until
exec, and exec keeps that high-water mark), so a child spawned straight from a big parent would
report the parent's figure. `VmHWM` (the child's own address space) is printed as a cross-check.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import _emulator as E
import _ticks as T

CHILD = "--child"
OPS = 3
CONCURRENCY = 8


def _status(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _mark_phases(marks: dict[str, float]) -> None:
    """Record the peak so far when the engine hands its results over (`store_results`, right
    after the clients ran), when the lock is released (the results pages are stored by then)
    and when the report starts (after the release commit, which carries the run record)."""
    import shared.lock
    import shared.report
    import shared.runs

    def marking(label: str, original: Any) -> Any:
        def marked(*args: Any, **kwargs: Any) -> Any:
            marks.setdefault(label, _status("VmHWM"))
            return original(*args, **kwargs)

        return marked

    shared.runs.Runs.store_results = marking(  # type: ignore[method-assign]
        "after_clients_mb", shared.runs.Runs.store_results
    )
    shared.lock.Lock.release = marking(  # type: ignore[method-assign]
        "pages_stored_mb", shared.lock.Lock.release
    )
    shared.report.send_smart_resume_report = marking(
        "before_report_mb", shared.report.send_smart_resume_report
    )


def _child() -> None:
    """Run once through `start_run`; print the peaks (MB) as JSON."""
    E.quiet_logs()
    from shared.config import get_settings
    from shared.resume.plan import RunOptions
    from shared.runner import start_run
    from shared.store import get_client

    settings = get_settings()
    client = get_client(settings)
    E.quiet_logs()
    marks: dict[str, float] = {}
    _mark_phases(marks)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    outcome = start_run(settings, client, RunOptions(), trigger={"source": "bench"})
    elapsed = time.perf_counter() - start
    summary = outcome.body.get("summary", {})
    print(
        json.dumps(
            {
                "status": outcome.status,
                "processed": summary.get("processed"),
                "before_mb": round(before, 1),
                "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "vmhwm_mb": round(_status("VmHWM"), 1),
                "seconds": round(elapsed, 2),
                **{k: round(v, 1) for k, v in marks.items()},
            }
        )
    )


def _spawn(env: dict[str, str]) -> dict[str, float]:
    """The child, through `sh` so its ru_maxrss is its own (see the module docstring)."""
    proc = subprocess.run(
        ["/bin/sh", "-c", '"$0" "$1" "$2"; exit $?', sys.executable, __file__, CHILD],
        cwd=E.ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(quick: bool = E.QUICK) -> dict[int, dict[str, float]]:
    sizes = (500, 2000) if quick else (1000, 10000)
    path = E.pipeline_file(E.python_pipeline(OPS), "three.toml")
    settings, client = E.configure(SMART_RESUME_PIPELINE=path, SMART_RESUME_CONCURRENCY=CONCURRENCY)
    from shared.resume.pipeline import load_pipeline

    pipeline = load_pipeline(settings.pipeline_path)
    env = {
        **os.environ,
        **E.base_env(SMART_RESUME_PIPELINE=path, SMART_RESUME_CONCURRENCY=CONCURRENCY),
    }
    env["PYTHONPATH"] = os.pathsep.join([str(E.ROOT), str(E.BENCH)])
    figures: dict[int, dict[str, float]] = {}
    for size in sizes:
        E.clear()
        T.seed(client, pipeline, size, due=True)
        T.record_full_pass(client, settings, pipeline, size)
        result = _spawn(env)
        assert result["status"] == "completed" and result["processed"] == size * OPS, result
        figures[size] = result
    rows = [
        [
            size,
            f["before_mb"],
            f["ru_maxrss_mb"],
            f["vmhwm_mb"],
            f.get("after_clients_mb", "-"),
            f.get("pages_stored_mb", "-"),
            f.get("before_report_mb", "-"),
            f"{f['ru_maxrss_mb'] - f['before_mb']:.1f}",
            f["seconds"],
        ]
        for size, f in figures.items()
    ]
    lines = E.table(
        [
            "clients",
            "ru_maxrss before the run MB",
            "peak ru_maxrss MB",
            "VmHWM MB",
            "peak when the clients are done MB",
            "... results pages stored MB",
            "... record written, lock released MB",
            "run adds MB",
            "run s",
        ],
        rows,
    )
    small, large = sizes
    growth = figures[large]["ru_maxrss_mb"] / figures[small]["ru_maxrss_mb"]
    added = {s: figures[s]["ru_maxrss_mb"] - figures[s]["before_mb"] for s in sizes}
    lines += [
        "",
        f"{OPS} `python` operations returning None per client, all due; "
        f"SMART_RESUME_CONCURRENCY={CONCURRENCY}; no full pass (its record was seeded); one "
        "fresh child per size, started through `sh`. What the run itself adds grows "
        f"{added[small]:.1f} -> {added[large]:.1f} MB "
        f"({(added[large] - added[small]) * 1024 / ((large - small) * OPS):.2f} KB per extra "
        "client-operation).",
    ]
    verdicts = [
        E.verdict(
            f"peak RSS at {large} <= 1.2x the peak at {small}",
            growth <= 1.2,
            f"{figures[small]['ru_maxrss_mb']:.0f} -> {figures[large]['ru_maxrss_mb']:.0f} MB "
            f"({growth:.2f}x)",
        )
    ]
    E.report("8. Peak RSS (ru_maxrss)", lines, verdicts)
    return figures


if __name__ == "__main__":
    if CHILD in sys.argv:
        _child()
    else:
        run()
