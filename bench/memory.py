"""Bench 5: peak RSS of a full run over 1,000 vs 10,000 clients (one fast `python` operation).

Each size runs in a fresh child process, which seeds nothing and only runs: the parent seeds the
emulator first. The child reports `ru_maxrss` and `VmHWM`; the verdict uses `VmHWM`, because
Linux carries `ru_maxrss` over from the parent at fork (a big parent inflates a small child's
figure), while `VmHWM` belongs to the child's own address space. Target: <= 250 MB at 10,000
clients and growing less than 2x from 1,000 to 10,000.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import _emulator as E

CHILD = "--child"


def _status(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child() -> None:
    """Run once through `start_run` and print peak RSS (MB) before and after, as JSON."""
    E.quiet_logs()
    from shared.config import get_settings
    from shared.resume.plan import RunOptions
    from shared.runner import start_run
    from shared.store import get_client

    settings = get_settings()
    client = get_client(settings)
    E.quiet_logs()
    before = _status("VmRSS")
    start = time.perf_counter()
    outcome = start_run(settings, client, RunOptions(), trigger={"source": "bench"})
    elapsed = time.perf_counter() - start
    peak = _status("VmHWM")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = outcome.body.get("summary", {})
    print(
        json.dumps(
            {
                "status": outcome.status,
                "processed": summary.get("processed"),
                "before_mb": round(before, 1),
                "peak_mb": round(peak, 1),
                "ru_maxrss_mb": round(maxrss, 1),
                "seconds": round(elapsed, 2),
            }
        )
    )


def run(quick: bool = E.QUICK) -> dict[int, dict[str, float]]:
    sizes = (500, 2000) if quick else (1000, 10000)
    concurrency = 4
    path = E.pipeline_file(E.NOOP_PIPELINE, "noop.toml")
    _settings, client = E.configure(SMART_RESUME_PIPELINE=path)
    env = {
        **os.environ,
        **E.base_env(SMART_RESUME_PIPELINE=path, SMART_RESUME_CONCURRENCY=concurrency),
    }
    env["PYTHONPATH"] = os.pathsep.join([str(E.ROOT), str(E.BENCH)])
    figures: dict[int, dict[str, float]] = {}
    for size in sizes:
        E.clear()
        E.seed_clients(client, size)
        proc = subprocess.run(
            [sys.executable, __file__, CHILD],
            cwd=E.ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["processed"] == size, result
        figures[size] = result
    small, large = sizes
    rows = [
        [
            size,
            figures[size]["before_mb"],
            figures[size]["peak_mb"],
            figures[size]["ru_maxrss_mb"],
            f"{figures[size]['peak_mb'] - figures[size]['before_mb']:.1f}",
            figures[size]["seconds"],
            f"{figures[size]['seconds'] * 1000 / size:.2f}",
        ]
        for size in sizes
    ]
    lines = E.table(
        [
            "clients",
            "RSS before run MB",
            "peak RSS (VmHWM) MB",
            "ru_maxrss MB",
            "run adds MB",
            "run s",
            "ms/client",
        ],
        rows,
    )
    lines += [
        "",
        f"one `python` operation returning None; SMART_RESUME_CONCURRENCY={concurrency}; "
        "each size in a fresh child process (peak = VmHWM)",
    ]
    growth = figures[large]["peak_mb"] / figures[small]["peak_mb"]
    verdicts = [
        E.verdict(
            f"peak RSS <= 250 MB at {large}",
            figures[large]["peak_mb"] <= 250,
            f"{figures[large]['peak_mb']:.0f} MB",
        ),
        E.verdict(f"grows < 2x from {small} to {large}", growth < 2, f"{growth:.2f}x"),
    ]
    E.report("5. Memory", lines, verdicts)
    return figures


if __name__ == "__main__":
    if CHILD in sys.argv:
        _child()
    else:
        run()
