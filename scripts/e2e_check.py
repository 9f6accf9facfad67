"""A minimal end-to-end check: one client, one operation, through the real trigger.

    SMART_RESUME_WEBHOOK_SECRET=... python scripts/e2e_check.py --local 8080 --status-local 8081

Triggers `{"clientId": CLIENT, "operations": [OPERATION]}`, asserts that the run completed
with exactly that client-operation processed (or skipped as fresh) and nothing failed, and,
given the status function, that it recorded the run with that outcome. Exit 0: pass, 1: fail.
By default it uses the demo data (`python -m shared.resume seed-demo`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _client

OUTCOMES = ("processed", "skipped", "failed", "deferred")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/e2e_check.py",
        description="Run one client-operation through the trigger and check the outcome.",
        epilog="exit codes: 0 every check passed, 1 a check failed or a function was "
        "unreachable, 2 usage.",
    )
    _client.add_connection_args(p, _client.TRIGGER_PORT, "trigger")
    _client.add_connection_args(p, _client.STATUS_PORT, "status (optional)", prefix="status-")
    p.add_argument("--client", default="demo-01", metavar="ID", help="client id (demo-01)")
    p.add_argument(
        "--operation", default="score_leads", metavar="NAME", help="operation (score_leads)"
    )
    p.add_argument(
        "--expect",
        default="processed,skipped",
        metavar="OUTCOMES",
        help="accepted outcomes, comma-separated (processed,skipped)",
    )
    p.add_argument(
        "--timeout", type=float, default=600, metavar="S", help="seconds to wait (default 600)"
    )
    return p


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, ok: bool, what: str, detail: Any = "") -> bool:
        print(f"{'PASS' if ok else 'FAIL'}  {what}" + ("" if ok or detail == "" else f": {detail}"))
        self.failed += not ok
        return ok


def outcome_of(summary: dict[str, Any]) -> str | None:
    """The one outcome the summary counts (None if it counts anything but exactly one)."""
    counted = [o for o in OUTCOMES if summary.get(o)]
    if len(counted) == 1 and summary[counted[0]] == 1:
        return counted[0]
    return None


def main() -> int:
    args = parser().parse_args()
    expect = {o.strip() for o in args.expect.split(",") if o.strip()}
    if not expect or not expect <= set(OUTCOMES):
        raise _client.UsageError(f"--expect takes outcomes among {', '.join(OUTCOMES)}")
    trigger = _client.endpoint(args, _client.TRIGGER_PORT)
    status = _client.endpoint(args, _client.STATUS_PORT, prefix="status-")
    assert trigger is not None
    check = Checks()
    body = {"clientId": args.client, "operations": [args.operation]}
    print(f"trigger {trigger.url} with {body}")
    http_status, answer = trigger.call("POST", body, timeout=args.timeout)
    check(http_status == 200, "the trigger answered 200", f"HTTP {http_status} {answer}")
    check(answer.get("status") == "completed", "the run completed", answer.get("status"))
    summary = answer.get("summary") or {}
    run_id = answer.get("runId")
    if not check(
        summary.get("clients") == 1,
        f"client {args.client} was selected",
        f"clients={summary.get('clients')} (unknown or inactive client? seed it first)",
    ):
        return 1
    outcome = outcome_of(summary)
    check(
        outcome in expect,
        f"{args.client}/{args.operation} was {' or '.join(sorted(expect))}",
        f"{_client.summary_line(summary)}",
    )
    check(summary.get("failed") == 0, "nothing failed", summary.get("failed"))
    if status is not None:
        http_status, snap = status.call("GET", params={"runs": 5})
        runs = {r.get("runId"): r for r in snap.get("runs") or []}
        record = runs.get(run_id) or {}
        check(http_status == 200, "the status function answered 200", f"HTTP {http_status}")
        check(not snap.get("running"), "the lock is released", snap.get("runId"))
        check(record.get("status") == "completed", f"run {run_id} is recorded completed", record)
        recorded = record.get("summary") or {}
        check(
            outcome is not None and recorded.get(outcome) == 1,
            f"its record counts {args.client}/{args.operation} as {outcome}",
            recorded,
        )
    print("e2e check passed" if not check.failed else f"e2e check FAILED ({check.failed})")
    return 0 if not check.failed else 1


if __name__ == "__main__":
    _client.run_main(main)
