"""Warnings about values that look like test settings (local_emulator.md's, or the
placeholders of deploy.env.example): deployed all the same, but each is said, with where it
came from and what it does in production.
"""

from __future__ import annotations

import re
from pathlib import Path

from deploy import Failed
from deploy.bundle import pipeline_targets
from deploy.checks import transport
from deploy.read import Draft
from shared.config import VARIABLES

#: A value under a minute, and what it does in production.
SHORT = {
    "SMART_RESUME_LEASE_SECONDS": "another run takes the lock over after one slow heartbeat",
    "SMART_RESUME_HEARTBEAT_SECONDS": "the lock is written that often for the whole run",
    "SMART_RESUME_TIME_BUDGET_SECONDS": "each run stops that soon and leaves the rest to the "
    "next tick",
}
NOT_EMAILED = {
    "log": "reports are only logged, never emailed",
    "outbox": "reports are written to the instance's temporary disk and lost with it, never "
    "emailed",
}
LOOPBACK = re.compile(r'url *= *"https?://(localhost|127\.[0-9.]+|\[::1\])[^"]*"')


def under_a_minute(value: str) -> bool:
    """Read as the functions read it (`3e1` is 30 s too); a bad number is theirs to refuse."""
    try:
        return float(value) < 60
    except ValueError:
        return False


def warnings(d: Draft, root: Path) -> list[str]:
    """Values that look like test settings (local_emulator.md's, the example's placeholders):
    deployed all the same, but each said, with where it came from and what it does."""
    found = [
        f"{d.said(name)} is under a minute, a test value: {effect} (default {VARIABLES[name]})"
        for name, effect in SHORT.items()
        if under_a_minute(d[name])
    ]
    chosen, source = transport(d)
    if chosen in NOT_EMAILED:
        found.append(
            f"SMART_RESUME_EMAIL_TRANSPORT={chosen} ({source}): {NOT_EMAILED[chosen]}; set "
            "EMAIL_TRANSPORT=sendgrid (with SENDGRID_SECRET_NAME) or ses"
        )
    for name in ("PROJECT_ID", "SERVICE_ACCOUNT", "OIDC_SERVICE_ACCOUNT"):
        if re.search(r"(^|[@.])my-project($|[.])", d[name]):
            found.append(
                f"{d.said(name)} holds my-project, the placeholder of deploy.env.example: set your "
                "project"
            )
    for name in ("SMART_RESUME_EMAIL_FROM", "SMART_RESUME_EMAIL_TO"):
        if re.search(r"[@.]example\.(com|org|net)([^a-z0-9.-]|$)", d[name].lower()):
            found.append(
                f"{d.said(name)} has an example.com address, the placeholder of "
                "deploy.env.example: set real addresses"
            )
    path = d["SMART_RESUME_PIPELINE"] or "pipeline.toml"
    if (root / path).is_file() and ".." not in path.split("/"):
        # The repository's own pipeline.toml runs the demo's operations: fine locally, a
        # surprise in production (every client's "leads" scored by examples/leads.py).
        try:
            demo = "examples" in pipeline_targets(root, path)
        except Failed:  # not TOML: the stage says so
            demo = False
        if demo:
            found.append(
                f"the pipeline {path} ({d.sources.get('SMART_RESUME_PIPELINE', 'default')}) runs "
                "the demo's operations (examples/): write your own pipeline (edit pipeline.toml, "
                "or set SMART_RESUME_PIPELINE)"
            )
        # An http operation on this machine's own address cannot be what production calls.
        lines = (root / path).read_text(encoding="utf-8").splitlines()
        matches = (LOOPBACK.search(x) for x in lines if not x.lstrip().startswith("#"))
        local = next((match[0] for match in matches if match), None)
        if local:
            found.append(
                f"the pipeline {path} has an operation {local}: a local address, which a "
                "deployed function cannot reach"
            )
    if d["SMART_RESUME_PIPELINE"].startswith(("examples/", "./examples/")):
        found.append(
            f"{d.said('SMART_RESUME_PIPELINE')} is under examples/, a demo pipeline: set your own "
            "(or none, for pipeline.toml)"
        )
    return found
