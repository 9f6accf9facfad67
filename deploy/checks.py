"""A deploy's checks on its settings, before any command: defaults, values derived from
others, and every problem at once.

The functions' own startup checks run here too, on the values they would be deployed with,
so that a bad value is found before a deploy, not by every request after it answering 500.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from deploy import note, schedule
from deploy.read import PREFIX, REQUIRED, SHORT_NAMES, Draft
from shared.config import (
    FINISH_MARGIN_SECONDS,
    OWN_VARIABLES,
    TRANSPORTS,
    VARIABLES,
    load_settings,
)
from shared.errors import ConfigError

#: Cloud Scheduler's longest attempt deadline, and a function's longest timeout (seconds).
DEADLINE, FUNCTION_TIMEOUT = 1800, 3600
LONGEST_BUDGET = DEADLINE - FINISH_MARGIN_SECONDS
DEFAULTS = {"FUNCTION_NAME": "smart-resume", "STATUS_FUNCTION_NAME": "smart-resume-status"}
DEFAULTS |= {"STATUS_MAX_INSTANCES": "3", "RUN_AFTER_DEPLOY": "1", "SCHEDULER_JOB": "smart-resume"}
DEFAULTS |= {"ALLOW_UNAUTHENTICATED": "0", "TRIGGER_CONCURRENCY": "4", "TRIGGER_MEMORY": "512Mi"}
DEFAULTS |= {"DATABASE": "(default)", "RUN_WAIT_SECONDS": "300"}
COUNT = "[1-9][0-9]*"
HEADER_SECRET = "[A-Za-z_][A-Za-z0-9_]*=[A-Za-z0-9_-]+"
PIN = "must be a version number (pin it; 'latest' is refused)"


def whole(lo: int, hi: int, zeros: bool = False) -> Callable[[str], bool]:
    """A whole number from lo to hi (with leading zeros only when `zeros`)."""
    return lambda v: (
        bool(re.fullmatch("[0-9]+" if zeros else "0|" + COUNT, v)) and lo <= int(v) <= hi
    )


def memory(value: str) -> bool:
    """512Mi to 4Gi: concurrency above 1 needs a whole vCPU, which needs 512Mi at least."""
    found = re.fullmatch(r"([1-9][0-9]*)(Mi|Gi)", value)
    return bool(found) and 512 <= int(found[1]) * (1024 if found[2] == "Gi" else 1) <= 4096


#: (setting, what a value must match or pass, what it must be), each checked when set.
RULES: tuple[tuple[str, str | Callable[[str], bool], str], ...] = (
    ("WEBHOOK_SECRET_VERSION", COUNT, PIN),  # pinned: `latest` changes what runs unseen
    ("SENDGRID_SECRET_VERSION", COUNT, PIN),
    ("PING_SECRET_VERSION", COUNT, PIN),
    ("ALLOW_UNAUTHENTICATED", "[01]", "must be 0 or 1"),
    (
        "TRIGGER_CONCURRENCY",  # 2 or more: a request during a run gets the code's 409
        whole(2, 1000),
        "must be a whole number from 2 to 1000 (with 1, Cloud Run answers a second request "
        "with 429 before the code sees it)",
    ),
    (
        "TRIGGER_MEMORY",
        memory,
        "must be from 512Mi to 4Gi, written like 512Mi or 1Gi (the trigger runs with 1 vCPU)",
    ),
    (
        "DATABASE",
        r"\(default\)|[a-z][a-z0-9-]{2,61}[a-z0-9]",
        "must be (default) or a Firestore database id (4 to 63 lowercase letters, digits and "
        "hyphens, starting with a letter)",
    ),
    ("SMART_RESUME_STREAM", "[0-9]+", "must be a whole number"),
    (
        "SHARDS",
        whole(1, 100),
        "must be a whole number from 1 to 100 (one Scheduler job and trigger instance per shard)",
    ),
    ("RUN_AFTER_DEPLOY", "[01]", "must be 1 (run the job once after the deploy) or 0"),
    ("RUN_WAIT_SECONDS", whole(0, 3600, True), "must be a whole number of seconds from 0 to 3600"),
    (
        "ALERT_CHANNEL",
        r"projects/[a-z0-9:.-]+/notificationChannels/[A-Za-z0-9_-]+",
        "must be a notification channel id or projects/PROJECT/notificationChannels/ID (gcloud "
        "beta monitoring channels list)",
    ),
    (
        "SMART_RESUME_EXPECTED_EVERY_SECONDS",
        r"(?!0+(\.0+)?$)[0-9]+(\.[0-9]+)?",  # not zero
        "must be a positive number of seconds (or none)",
    ),
)


def short_names(d: Draft) -> None:
    """Short names set their SMART_RESUME_* variable. Both set to different values is
    ambiguous, unless one is an argument and the other from the file: the argument wins."""
    for short in (name for name in SHORT_NAMES if d[name]):
        long = PREFIX + short
        if d[long] and d[long] != d[short]:
            long_arg, short_arg = (d.sources[n] == "command line" for n in (long, short))
            if long_arg and not short_arg:
                continue
            if long_arg == short_arg:
                d.problems.append(
                    f"{short} and {long} are both set, to different values "
                    f"({d.sources[short]} and {d.sources[long]})"
                )
        d.set(long, d[short], f"from {short}, {d.sources[short]}")


def pipeline(d: Draft, root: Path) -> None:
    """The pipeline is staged at the same path inside each bundle: it must be in the repository."""
    path = d["SMART_RESUME_PIPELINE"]
    if path.startswith("/"):
        d.problems.append(
            "SMART_RESUME_PIPELINE must be a path relative to the repository (it is staged)"
        )
    elif ".." in path.split("/"):
        d.problems.append(
            f"SMART_RESUME_PIPELINE={path} must not go through '..': give its path inside the "
            "repository"
        )
    elif path and not (root / path).is_file():
        d.problems.append(f"SMART_RESUME_PIPELINE={path}: no such file in {root}")


def deploy(d: Draft) -> int:
    """Defaults, derived values and the deploy's own checks; the time budget (0 if bad)."""
    missing = [n for n in REQUIRED if not d[n]]
    missing += [
        f"{s}_VERSION"
        for s in ("SENDGRID_SECRET", "PING_SECRET")
        if d[f"{s}_NAME"] and not d[f"{s}_VERSION"]
    ]
    if missing:
        d.problems.append(f"missing settings: {' '.join(missing)}")
    for name, value in DEFAULTS.items():
        d.default(name, value)
    d.default("SCHEDULER_LOCATION", d["REGION"], "default: REGION")
    if d["SHARDS"] and d["SMART_RESUME_SHARDS"] and d["SHARDS"] != d["SMART_RESUME_SHARDS"]:
        d.problems.append(
            "SHARDS and SMART_RESUME_SHARDS are both set, to different values "
            f"({d.sources['SHARDS']} and {d.sources['SMART_RESUME_SHARDS']})"
        )
    if d["SMART_RESUME_SHARDS"]:
        d.default(
            "SHARDS",
            d["SMART_RESUME_SHARDS"],
            f"from SMART_RESUME_SHARDS, {d.sources['SMART_RESUME_SHARDS']}",
        )
    d.default("SHARDS", "1")
    # Given to both functions only with shards: with 1, the deployed settings stay as they were.
    if d["SHARDS"] == "1":
        d.set("SMART_RESUME_SHARDS", "", "")
    elif d["SMART_RESUME_SHARDS"] != d["SHARDS"]:
        d.set("SMART_RESUME_SHARDS", d["SHARDS"], f"from SHARDS, {d.sources['SHARDS']}")
    if re.fullmatch(r"[A-Za-z0-9_-]+", d["ALERT_CHANNEL"]) and d["PROJECT_ID"]:
        d.values["ALERT_CHANNEL"] = (
            f"projects/{d['PROJECT_ID']}/notificationChannels/{d['ALERT_CHANNEL']}"
        )
    overdue_off = d["SMART_RESUME_EXPECTED_EVERY_SECONDS"] == "none"
    if overdue_off:
        d.set("SMART_RESUME_EXPECTED_EVERY_SECONDS", "", "")
    for name, rule, must in RULES:
        value = d[name]
        if value and not (re.fullmatch(rule, value) if isinstance(rule, str) else rule(value)):
            d.problems.append(f"{name}={value} {must}")
    # Of http operations (headers = {"Authorization" = "env:NAME"}): each pair named if wrong
    # (a trailing comma is allowed, an empty pair between two is not).
    pairs = d["HEADER_SECRETS"].removesuffix(",").split(",") if d["HEADER_SECRETS"] else []
    for pair in pairs:
        if not re.fullmatch(HEADER_SECRET, pair):
            d.problems.append(f"HEADER_SECRETS: {pair!r} is not VARIABLE=secret-name")
        elif OWN_VARIABLES.match(variable := pair.split("=", 1)[0]):
            d.problems.append(f"HEADER_SECRETS: {variable} is smart-resume's own, not a header's")
    if d["ALLOW_UNAUTHENTICATED"] == "0" and not d["OIDC_SERVICE_ACCOUNT"]:
        d.problems.append(
            "OIDC_SERVICE_ACCOUNT is required unless ALLOW_UNAUTHENTICATED=1: without it Cloud Run "
            "refuses the Scheduler's calls"
        )
    if d["AWS_ACCESS_KEY_SECRET_NAME"] and not d["AWS_SECRET_KEY_SECRET_NAME"]:
        d.problems.append("AWS_SECRET_KEY_SECRET_NAME goes with AWS_ACCESS_KEY_SECRET_NAME")
    budget = _budget(d)
    if not overdue_off:
        _expected_every(d, budget)
    _transport(d)
    return budget


def _budget(d: Draft) -> int:
    """The time budget: the trigger's timeout and the job's deadline are budget + margin."""
    budget = d["SMART_RESUME_TIME_BUDGET_SECONDS"] or VARIABLES["SMART_RESUME_TIME_BUDGET_SECONDS"]
    max_run = d["SMART_RESUME_MAX_RUN_SECONDS"] or VARIABLES["SMART_RESUME_MAX_RUN_SECONDS"]
    if not re.fullmatch(COUNT, budget):
        d.problems.append(
            f"SMART_RESUME_TIME_BUDGET_SECONDS={budget} must be a whole number of seconds"
        )
        return 0
    if int(budget) > LONGEST_BUDGET:
        d.problems.append(
            f"TIME_BUDGET_SECONDS (SMART_RESUME_TIME_BUDGET_SECONDS)={budget} is too long: budget "
            f"+ {FINISH_MARGIN_SECONDS} s to finish must fit Cloud Scheduler's {DEADLINE} s "
            f"attempt deadline (and the function's {FUNCTION_TIMEOUT} s timeout), so at most "
            f"{LONGEST_BUDGET}"
        )
    if re.fullmatch(COUNT, max_run) and int(budget) >= int(max_run):
        d.problems.append(
            f"SMART_RESUME_TIME_BUDGET_SECONDS ({budget}) must be shorter than "
            f"SMART_RESUME_MAX_RUN_SECONDS ({max_run}), or a running lock would look stale"
        )
    return int(budget)


def _expected_every(d: Draft, budget: int) -> None:
    """Unless set, how often a run should end well is derived from a fixed-period SCHEDULE."""
    name, grace = "SMART_RESUME_EXPECTED_EVERY_SECONDS", "SMART_RESUME_GRACE_SECONDS"
    when = d["SCHEDULE"]
    if d[name] or not when:
        return
    every = schedule.period(when)
    if every is None:
        note(
            f"note: SCHEDULE '{when}' has no fixed period, so no expected interval is guessed: "
            f"runs are never reported overdue unless you set {name}"
        )
        return
    d.set(name, str(every), "derived from SCHEDULE")
    # A run may start up to a period after the last one ended and take its whole budget and
    # margin: the grace covers that, or a long run would look overdue.
    if budget:
        longest = max(every // 2, budget + FINISH_MARGIN_SECONDS)
        d.default(grace, str(longest), "derived from SCHEDULE and the time budget")
    said = f"{name}={every}, {grace}={d[grace] or every // 2}"
    note(f"note: SCHEDULE '{when}' runs every {every} s: {said}")


def transport(d: Draft) -> tuple[str, str]:
    """The email transport the functions will use (lowercased) and where that came from."""
    if d["SMART_RESUME_EMAIL_TRANSPORT"]:
        return d["SMART_RESUME_EMAIL_TRANSPORT"].lower(), d.sources["SMART_RESUME_EMAIL_TRANSPORT"]
    if d["SENDGRID_SECRET_NAME"]:
        return "sendgrid", "default with SENDGRID_SECRET_NAME"
    return "log", "default without SENDGRID_SECRET_NAME"


def _transport(d: Draft) -> None:
    chosen, _ = transport(d)
    if chosen not in TRANSPORTS:
        d.problems.append(f"EMAIL_TRANSPORT={chosen} is not one of {', '.join(TRANSPORTS)}")
    for needed, missing in (
        ("EMAIL_FROM", chosen in ("sendgrid", "ses") and not d["SMART_RESUME_EMAIL_FROM"]),
        ("EMAIL_TO", chosen in ("sendgrid", "ses") and not d["SMART_RESUME_EMAIL_TO"]),
        ("SENDGRID_SECRET_NAME", chosen == "sendgrid" and not d["SENDGRID_SECRET_NAME"]),
        ("AWS_REGION", chosen == "ses" and not d["AWS_REGION"]),
    ):
        if missing:
            d.problems.append(f"{needed} is required for the {chosen} transport")


def function_problems(d: Draft, passed: list[str]) -> list[str]:
    """The functions' startup checks on what they would get (secrets: placeholders)."""
    env = {"GOOGLE_CLOUD_PROJECT": d["PROJECT_ID"], **{n: d[n] for n in passed}}
    env |= {"AWS_REGION": d["AWS_REGION"]} if d["AWS_REGION"] else {}
    env |= {"SENDGRID_API_KEY": "placeholder"} if d["SENDGRID_SECRET_NAME"] else {}
    env |= {"SMART_RESUME_PING_URL": "https://ping.invalid/x"} if d["PING_SECRET_NAME"] else {}
    try:
        load_settings({**env, "SMART_RESUME_WEBHOOK_SECRET": "placeholder-of-16-chars-or-more"})
    except ConfigError as exc:
        return [f"the functions would refuse this at startup: {p}" for p in exc.problems]
    return []
