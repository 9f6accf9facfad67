"""Watch the running smart-resume run until it ends, printing progress and heartbeat age.

    SMART_RESUME_WEBHOOK_SECRET=... python scripts/watch.py --local 8081
    python scripts/watch.py --url "$STATUS_URL" --gcloud

When nothing is running it waits up to --wait seconds for a run to start; then it reports the
last finished run. The health state (ok, running, stuck, overdue, failing, unknown) comes first,
and again whenever it changes. Its exit code is that of the run it watched (or the last run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _client


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/watch.py",
        description="Poll the smart_resume_status function until the run ends.",
        epilog=_client.EXIT_HELP,
    )
    _client.add_connection_args(p, _client.STATUS_PORT, "status")
    p.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between polls (1)"
    )
    p.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for a run to start when none is running (10)",
    )
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    return p


def health_line(health: dict[str, Any] | None) -> str | None:
    """`health: STUCK: reason; reason` (None when the status function has no health)."""
    if not health:
        return None
    reasons = "; ".join(health.get("reasons") or [])
    return f"health: {str(health.get('state')).upper()}" + (f": {reasons}" if reasons else "")


def finished_line(run: dict[str, Any]) -> str:
    line = f"run {run.get('runId')} ended {run.get('status')}"
    summary = _client.summary_line(run.get("summary"))
    if summary:
        line += f"\n  {summary}"
    if run.get("error"):
        line += f"\n  error: {run['error']}"
    return line


def final_record(status: _client.Endpoint, run_id: str | None) -> dict[str, Any] | None:
    http_status, body = status.call("GET", params={"runs": 10})
    if http_status != 200:
        return None
    for run in body.get("runs") or []:
        if run.get("runId") == run_id:
            return run
    return body.get("lastRun")


def main() -> int:
    args = parser().parse_args()
    if args.interval <= 0 or args.wait < 0:
        raise _client.UsageError("--interval must be positive and --wait not negative")
    status = _client.endpoint(args, _client.STATUS_PORT)
    assert status is not None
    watched: str | None = None
    give_up = time.monotonic() + args.wait
    waiting_said = False
    last_health: str | None = None
    while True:
        http_status, body = status.call("GET")
        if http_status != 200:
            print(f"HTTP {http_status}: {body.get('error', body)}", file=sys.stderr)
            return _client.exit_for(http_status, {})
        health = body.get("health") or {}
        if health.get("state") != last_health:
            last_health = health.get("state")
            line = health_line(health)
            if line:
                print(line, flush=True)
        if body.get("running"):
            watched = watched or body.get("runId")
            print(_client.progress_line(body), flush=True)
        elif body.get("stale"):
            print(
                f"STALE lock held by run {body.get('runId')} (heartbeat "
                f"{body.get('heartbeatAgeSeconds')}s ago): the next trigger takes it over, or "
                'unlock it (POST {"action": "unlock"})'
            )
            return _client.EXIT_FAILED
        elif watched or args.once or time.monotonic() >= give_up:
            run = final_record(status, watched) if watched else body.get("lastRun")
            if not run:
                print("not running; no run has finished yet")
                return _client.EXIT_OK
            if not watched:
                print("not running; last run:")
            print(finished_line(run), flush=True)
            return _client.EXIT_BY_STATUS.get(run.get("status", ""), _client.EXIT_FAILED)
        elif not waiting_said:
            print(f"not running; waiting up to {args.wait:g}s for a run to start", flush=True)
            waiting_said = True
        if args.once:
            return _client.EXIT_OK
        time.sleep(args.interval)


if __name__ == "__main__":
    _client.run_main(main)
