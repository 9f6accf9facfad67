"""Connection code shared by the operator scripts: where a function is, and how to call it.

`--local [PORT]` talks to a `functions-framework` process on 127.0.0.1; `--url URL` to a
deployed function, with `--gcloud` adding the identity token that a function deployed with
`--no-allow-unauthenticated` needs. The webhook secret always comes from the environment
(`SMART_RESUME_WEBHOOK_SECRET`, the first of its comma-separated values), never from a flag,
so it stays out of shell history and process listings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The exit codes of `python -m shared.resume`, re-exported for the scripts ("X as X").
from shared.exit_codes import EXIT_BY_STATUS as EXIT_BY_STATUS
from shared.exit_codes import EXIT_FAILED as EXIT_FAILED
from shared.exit_codes import EXIT_FAILURES, EXIT_LOCKED, EXIT_USAGE
from shared.exit_codes import EXIT_HELP as EXIT_HELP
from shared.exit_codes import EXIT_OK as EXIT_OK

TRIGGER_PORT = 8080
STATUS_PORT = 8081
SECRET_VAR = "SMART_RESUME_WEBHOOK_SECRET"


class UsageError(Exception):
    """Bad flags or a missing setting: exit 2."""


class Unreachable(Exception):
    """The function could not be reached: exit 1."""


def add_connection_args(
    parser: argparse.ArgumentParser, default_port: int, what: str, prefix: str = ""
) -> None:
    """`--local [PORT]` or `--url URL` (and `--gcloud` once, for the identity token)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        f"--{prefix}local",
        nargs="?",
        type=int,
        const=default_port,
        metavar="PORT",
        help=f"the {what} function on 127.0.0.1 (default, port {default_port})",
    )
    where.add_argument(f"--{prefix}url", metavar="URL", help=f"the {what} function's URL")
    if not prefix:
        parser.add_argument(
            "--gcloud",
            action="store_true",
            help="add 'Authorization: Bearer $(gcloud auth print-identity-token)' "
            "(a deployed function needs it)",
        )


def secret_from_env() -> str:
    values = [v.strip() for v in os.environ.get(SECRET_VAR, "").split(",") if v.strip()]
    if not values:
        raise UsageError(f"set {SECRET_VAR} to the webhook secret (the first value is sent)")
    return values[0]


def identity_token() -> str:
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        raise UsageError("--gcloud needs the Google Cloud CLI (gcloud) on PATH")
    done = subprocess.run(
        [gcloud, "auth", "print-identity-token"], capture_output=True, text=True, check=False
    )
    token = done.stdout.strip()
    if done.returncode != 0 or not token:
        detail = done.stderr.strip().splitlines()[-1:] or ["no token printed"]
        raise UsageError(f"gcloud auth print-identity-token failed: {detail[0]}")
    return token


@dataclass
class Endpoint:
    """One function: its URL and the headers every call carries."""

    url: str
    headers: dict[str, str]

    def call(
        self,
        method: str,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        timeout: float = 30,
    ) -> tuple[int, dict[str, Any]]:
        """The HTTP status and the JSON answer (non-JSON answers become `{"error": text}`)."""
        try:
            response = requests.request(
                method, self.url, json=body, params=params, headers=self.headers, timeout=timeout
            )
        except requests.RequestException as exc:
            raise Unreachable(f"cannot reach {self.url}: {type(exc).__name__}: {exc}") from None
        try:
            answer = response.json()
        except ValueError:
            answer = {"error": response.text.strip()[:500] or response.reason}
        if not isinstance(answer, dict):
            answer = {"error": f"unexpected answer: {answer!r}"[:500]}
        return response.status_code, answer


def endpoint(args: argparse.Namespace, default_port: int, prefix: str = "") -> Endpoint | None:
    """The endpoint the flags name; None when a prefixed (optional) pair was not given."""
    dest = prefix.replace("-", "_")
    local = getattr(args, f"{dest}local")
    url = getattr(args, f"{dest}url")
    if prefix and local is None and url is None:
        return None
    if url is None:
        url = f"http://127.0.0.1:{local or default_port}"
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--{prefix}url must start with http:// or https://, got {url!r}")
    headers = {"X-Webhook-Secret": secret_from_env()}
    if args.gcloud:
        headers["Authorization"] = f"Bearer {identity_token()}"
    return Endpoint(url, headers)


def exit_for(http_status: int, body: dict[str, Any]) -> int:
    """The exit code an answer maps to."""
    status = body.get("status")
    if isinstance(status, str) and status in EXIT_BY_STATUS:
        code = EXIT_BY_STATUS[status]
        if code == EXIT_OK and status == "completed" and (body.get("summary") or {}).get("failed"):
            return EXIT_FAILURES  # completed, but some client-operations failed
        return code
    if http_status in (400, 401, 403, 405):
        return EXIT_USAGE
    if http_status == 409:
        return EXIT_LOCKED
    return EXIT_OK if http_status < 300 else EXIT_FAILED


def progress_line(body: dict[str, Any]) -> str:
    """One line for a running run: where it is and how fresh its heartbeat is."""
    progress = body.get("progress") or {}
    where = "starting"
    if progress.get("clientId"):
        index = progress.get("clientIndex")
        number = index + 1 if isinstance(index, int) else "?"  # clientIndex counts from 0
        where = (
            f"client {progress['clientId']} ({number} of {progress.get('clientCount')}) "
            f"{progress.get('operation') or ''}"
        ).rstrip()
    heartbeat = body.get("heartbeatAgeSeconds")
    beat = f"heartbeat {heartbeat:.1f}s ago" if isinstance(heartbeat, int | float) else ""
    cancel = "  cancel requested" if body.get("cancelRequested") else ""
    age = body.get("ageSeconds") or 0
    return f"run {body.get('runId')}  {age:5.1f}s  {where}  {beat}{cancel}"


def summary_line(summary: dict[str, Any] | None) -> str:
    if not summary:
        return ""
    keys = ("clients", "processed", "skipped", "failed", "deferred", "durationSeconds")
    line = "  ".join(f"{k}={summary[k]}" for k in keys if k in summary)
    impact = impact_text(summary.get("impact"))
    return f"{line}  impact: {impact}" if impact else line


def impact_text(impact: Any) -> str:
    """`leads_scored=300, hot_leads=153` from the summary's impact map."""
    if not isinstance(impact, dict) or not impact:
        return ""
    return ", ".join(f"{k}={v}" for k, v in sorted(impact.items()))


def print_json(body: dict[str, Any]) -> None:
    print(json.dumps(body, indent=2, sort_keys=True, default=str))


def run_main(main: Callable[[], int]) -> None:
    """Run a script's main, mapping the shared errors to messages and exit codes."""
    try:
        code = main()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except Unreachable as exc:
        print(f"error: {exc} (is the function running?)", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
