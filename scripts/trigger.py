"""Trigger one run of smart-resume, locally or deployed, and print how it ended.

    SMART_RESUME_WEBHOOK_SECRET=... python scripts/trigger.py --local 8080
    python scripts/trigger.py --url https://REGION-PROJECT.cloudfunctions.net/smart-resume --gcloud

The trigger answers when the run ends, so this waits (use scripts/watch.py meanwhile).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _client


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/trigger.py",
        description="POST to the smart_resume trigger with the webhook secret "
        f"(from ${_client.SECRET_VAR}) and print the outcome.",
        epilog=_client.EXIT_HELP,
    )
    _client.add_connection_args(p, _client.TRIGGER_PORT, "trigger")
    p.add_argument("--client", metavar="ID", help="only this client id (body clientId)")
    p.add_argument(
        "--operation",
        action="append",
        metavar="NAME",
        help="only this operation (body operations; repeat for several)",
    )
    p.add_argument("--stream", type=int, metavar="N", help="only clients of this stream")
    p.add_argument("--dry-run", action="store_true", help="only the plan: no lock, no writes")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    p.add_argument(
        "--timeout", type=float, default=3600, metavar="S", help="seconds to wait (default 3600)"
    )
    return p


def body_of(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.client:
        body["clientId"] = args.client
    if args.operation:
        body["operations"] = args.operation
    if args.stream is not None:
        body["stream"] = args.stream
    if args.dry_run:
        body["dryRun"] = True
    return body


def show(http_status: int, answer: dict[str, Any]) -> None:
    status = answer.get("status") or answer.get("error") or "?"
    print(f"HTTP {http_status}  status: {status}  run: {answer.get('runId') or '-'}")
    if answer.get("summary"):
        print(f"  {_client.summary_line(answer['summary'])}")
    for client in answer.get("plan") or []:
        for op in client.get("operations", []):
            print(
                f"  {client['clientId']:<20} {op['operation']:<22} {op['decision']:<6} "
                f"{op.get('reason', '')}"
            )
    if answer.get("error") and answer.get("status"):
        print(f"  error: {answer['error']}")
    if answer.get("detail"):
        print(f"  detail: {answer['detail']}")
    if answer.get("status") == "locked":
        print(f"  another run holds the lock ({answer.get('ageSeconds')}s old)")


def main() -> int:
    args = parser().parse_args()
    target = _client.endpoint(args, _client.TRIGGER_PORT)
    assert target is not None
    http_status, answer = target.call("POST", body_of(args), timeout=args.timeout)
    if args.json:
        _client.print_json(answer)
    else:
        show(http_status, answer)
    return _client.exit_for(http_status, answer)


if __name__ == "__main__":
    _client.run_main(main)
