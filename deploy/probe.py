"""How the first run after a deploy ended, read from the status function with your identity
token: the deployment proven end to end. A failed run, or none at all (a refused secret, a
broken trigger), fails the deploy.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.error
import urllib.request
from typing import Any

from deploy import Failed, note
from deploy.commands import job_names
from deploy.settings import Settings


def _get(url: str, query: str, secret: str, token: str) -> tuple[int | None, dict[str, Any]]:
    headers = {"X-Webhook-Secret": secret, "Authorization": f"Bearer {token}"}
    request = urllib.request.Request(f"{url.rstrip('/')}/?{query}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (OSError, ValueError) as exc:
        return None, {"error": type(exc).__name__}


def _when(text: object) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def server_time(url: str, secret: str, token: str) -> dt.datetime | None:
    """The status function's clock: a run is new if it started after this."""
    status, body = _get(url, "runs=1", secret, token)
    return _when(body.get("serverTime")) if status == 200 else None


def wait(url: str, since: dt.datetime | None, seconds: int, secret: str, token: str) -> int:
    """Wait for a run that started after `since` to end, and say how: 1 it failed or none
    started, else 0 (it ended well, is still running, or its answer could not be read)."""
    since = since or dt.datetime.now(dt.UTC) - dt.timedelta(seconds=60)  # a minute of slack
    deadline = time.monotonic() + seconds
    while True:
        status, body = _get(url, "runs=10", secret, token)
        if status != 200:
            why = f"HTTP {status}" if status else body.get("error", "no answer")
            hint = " (your account needs the invoker role on it)" if status in (401, 403) else ""
            note(f"could not read the run's answer from the status function: {why}{hint}")
            return 0
        new = [r for r in body.get("runs") or [] if (_when(r.get("startedAt")) or since) > since]
        run = new[-1] if new else {}
        if run.get("status") not in (None, "running"):
            summary, health = run.get("summary") or {}, body.get("health") or {}
            counts = ", ".join(
                f"{summary.get(k, 0)} {k}" for k in ("clients", "processed", "skipped", "failed")
            )
            error = f"; error: {run['error']}" if run.get("error") else ""
            note(f"first run {run.get('runId')} ended {run.get('status')} ({counts}){error}")
            note(f"health: {health.get('state')}: {'; '.join(health.get('reasons') or [])}")
            return 1 if run.get("status") in ("failed", "abandoned") else 0
        if time.monotonic() < deadline:
            time.sleep(max(0.2, min(5.0, deadline - time.monotonic())))
        elif run:
            note(
                f"first run {run.get('runId')} is still running after {seconds} s; follow it with: "
                "python scripts/watch.py --url STATUS_URL --gcloud"
            )
            return 0
        elif body.get("running"):
            note(
                f"run {body.get('runId')} was already running, so the job's run was refused (409); "
                "the deployment answers"
            )
            return 0
        else:
            note(
                f"no run started within {seconds} s of running the job: check its last attempt "
                "(gcloud scheduler jobs describe), the trigger's logs, the secret and the OIDC "
                "account"
            )
            return 1


def report(
    s: Settings, url: str, status_url: str, since: dt.datetime | None, secret: str, token: str
) -> int:
    """After the job (each shard's) ran: wait for one run that started after it (with shards,
    follow the others with scripts/watch.py), say what was deployed; the exit status."""
    ended, watch = 0, f"python scripts/watch.py --url {status_url} --gcloud"
    if not token:
        note(
            f"could not get an identity token, so the run's answer is not read: follow it with "
            f"{watch}"
        )
    elif s.run_wait_seconds:
        ended = wait(status_url, since, s.run_wait_seconds, secret, token)
    else:
        note(f"not waiting for the run (RUN_WAIT_SECONDS=0): {watch}")
    names = job_names(s)
    jobs = f"jobs {names[0]}..{names[-1]} run" if s.shards > 1 else f"job {names[0]} runs"
    alert = (
        f"; uptime check and alert policy '{s.status_function_name} health'"
        if s.alert_channel
        else ""
    )
    note(
        f"deployed {s.function_name} ({url}) and {s.status_function_name}; Scheduler {jobs} "
        f"'{s.schedule}' ({s.time_zone}){alert}"
    )
    if ended:
        raise Failed(1, "deployed, but the first run did not end well (see above)")
    return 0
