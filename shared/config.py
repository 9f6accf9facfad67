"""Settings: read once from the environment into a frozen dataclass, on first use, never at import.

Every bad value is collected and reported together, so an operator fixes a deployment in one
round instead of one variable per redeploy.
"""

from __future__ import annotations

import functools
import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.env import Reader, flag, header_safe, http_url, split, unknown_names, url_secrets
from shared.errors import ConfigError

#: The folder that holds `shared/`: the repository root locally, the bundle root when deployed.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

TRANSPORTS = ("sendgrid", "ses", "log", "outbox")
#: When a report is mailed: every run; failures only; or runs that did something (or ended
#: other than completed). `shared.report.wanted` decides.
EMAIL_ON = ("always", "failure", "activity")
LOG_FORMATS = ("text", "json")

#: The longest timeout Cloud Functions (2nd gen) allows an HTTP function: a run cannot outlive it.
PLATFORM_TIMEOUT_SECONDS = 3600
#: What a run needs after its time budget: the operation in flight stops at its next check, the
#: lock is released, the run record written and the report mailed (email timeout and retries).
FINISH_MARGIN_SECONDS = 120
#: The shortest webhook secret accepted (server misconfigured below it).
MIN_SECRET = 16
#: smart-resume's own settings and its providers' keys: never sent to an operation's service
#: (`env:` headers) nor replaced by one of its secrets (deploy.sh's HEADER_SECRETS).
OWN_VARIABLES = re.compile(
    r"^(SMART_RESUME_.*|SENDGRID_API_KEY|AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)"
    r"|GOOGLE_APPLICATION_CREDENTIALS)$"
)
LOOPBACK = ("127.0.0.1", "::1", "localhost")

#: Every variable smart-resume reads, with its default as documented (None: unset).
#: The README's configuration table is checked against this mapping by a test.
VARIABLES: dict[str, str | None] = {
    "SMART_RESUME_WEBHOOK_SECRET": None,
    "SMART_RESUME_LOCK_NAME": "smart-resume",
    "SMART_RESUME_HEARTBEAT_SECONDS": "60",
    "SMART_RESUME_LEASE_SECONDS": "300",
    "SMART_RESUME_MAX_RUN_SECONDS": "1800",
    "SMART_RESUME_TIME_BUDGET_SECONDS": "1500",
    "SMART_RESUME_RECONCILE_HOURS": "24",
    "SMART_RESUME_PIPELINE": "pipeline.toml",
    "SMART_RESUME_MODULE": "shared.resume",
    "SMART_RESUME_RELOAD_MODULE": "0",
    "SMART_RESUME_CONCURRENCY": "1",
    "SMART_RESUME_STREAM": None,
    "SMART_RESUME_EMAIL_TRANSPORT": None,
    "SMART_RESUME_EMAIL_FROM": None,
    "SMART_RESUME_EMAIL_TO": None,
    "SMART_RESUME_EMAIL_ON": "always",
    "SENDGRID_API_KEY": None,
    "SMART_RESUME_SENDGRID_HOST": "https://api.sendgrid.com",
    "SMART_RESUME_OUTBOX": "outbox",
    "AWS_REGION": None,
    "GOOGLE_CLOUD_PROJECT": None,
    "FIRESTORE_EMULATOR_HOST": None,
    "SMART_RESUME_RPC_TIMEOUT_SECONDS": "10",
    "SMART_RESUME_EMAIL_TIMEOUT_SECONDS": "10",
    "SMART_RESUME_LOG_FORMAT": None,
    "SMART_RESUME_EXPECTED_EVERY_SECONDS": None,
    "SMART_RESUME_GRACE_SECONDS": None,
    "SMART_RESUME_STUCK_SECONDS": "900",
    "SMART_RESUME_PING_URL": None,
    "SMART_RESUME_SHARDS": "1",
    "SMART_RESUME_BEHIND_SECONDS": None,
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable, validated. Secrets stay out of `repr()` so logs never leak them."""

    webhook_secrets: tuple[str, ...] = field(repr=False)
    lock_name: str
    heartbeat_seconds: float
    lease_seconds: float
    max_run_seconds: float
    time_budget_seconds: float
    reconcile_hours: float
    pipeline_path: Path
    module: str
    reload_module: bool
    concurrency: int
    stream: int | None
    email_transport: str
    email_from: str | None
    email_to: tuple[str, ...]
    email_on: str
    sendgrid_api_key: str | None = field(repr=False)
    sendgrid_host: str
    outbox: Path
    aws_region: str | None
    project: str | None
    emulator_host: str | None
    rpc_timeout_seconds: float
    email_timeout_seconds: float
    log_format: str
    #: How often a run is expected to end well (completed, partial or cancelled); None: never
    #: overdue. The grace is added before a missing run counts as overdue.
    expected_every_seconds: float | None = None
    grace_seconds: float = 0.0
    #: A live run whose progress has not moved for this long is stuck.
    stuck_seconds: float = 900.0
    #: The dead man's switch (healthchecks.io style); a secret, like the webhook secret.
    ping_url: str | None = field(default=None, repr=False)
    #: Shards that run in parallel, each a run with its own lock (1: no sharding).
    shards: int = 1
    #: The oldest due client waiting longer than this makes health `behind`.
    behind_seconds: float = 3600.0

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every value that must never appear in a log line, response or file."""
        found = (*self.webhook_secrets, self.sendgrid_api_key, *url_secrets(self.ping_url))
        return tuple(s for s in found if s)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build and validate settings; raise one `ConfigError` naming every bad variable."""
    r = Reader(os.environ if env is None else env, VARIABLES)
    heartbeat = r.seconds("SMART_RESUME_HEARTBEAT_SECONDS")
    lease = r.seconds("SMART_RESUME_LEASE_SECONDS")
    max_run = r.seconds("SMART_RESUME_MAX_RUN_SECONDS")
    budget = r.seconds("SMART_RESUME_TIME_BUDGET_SECONDS")
    if lease <= heartbeat:
        r.problems.append(
            f"SMART_RESUME_LEASE_SECONDS ({lease:g}) must be longer than "
            f"SMART_RESUME_HEARTBEAT_SECONDS ({heartbeat:g})"
        )
    if budget >= max_run:
        r.problems.append(
            f"SMART_RESUME_TIME_BUDGET_SECONDS ({budget:g}) must be shorter than "
            f"SMART_RESUME_MAX_RUN_SECONDS ({max_run:g}), or a running lock would look stale"
        )
    # The platform kills the function at its timeout, so a run whose budget plus the finishing
    # margin exceeds it would die before releasing its lock and sending its report.
    if budget + FINISH_MARGIN_SECONDS > PLATFORM_TIMEOUT_SECONDS:
        r.problems.append(
            f"SMART_RESUME_TIME_BUDGET_SECONDS ({budget:g}) plus the {FINISH_MARGIN_SECONDS} s "
            f"needed to finish a run exceeds the {PLATFORM_TIMEOUT_SECONDS} s limit of an HTTP "
            "Cloud Function"
        )
    if max_run > PLATFORM_TIMEOUT_SECONDS:
        r.problems.append(
            f"SMART_RESUME_MAX_RUN_SECONDS ({max_run:g}) exceeds the {PLATFORM_TIMEOUT_SECONDS} s "
            "limit of an HTTP Cloud Function, which no run can outlive"
        )
    reconcile_hours = r.positive("SMART_RESUME_RECONCILE_HOURS", "hours")
    shards = r.parse("SMART_RESUME_SHARDS", int, "a whole number", 1)
    if not 1 <= shards <= 1000:
        r.problems.append(f"SMART_RESUME_SHARDS must be between 1 and 1000, got {shards}")
        shards = 1
    webhook_secrets = split(r.env.get("SMART_RESUME_WEBHOOK_SECRET"))
    unusable = [i for i, secret in enumerate(webhook_secrets, 1) if not header_safe(secret)]
    if unusable:
        # Which one by position, never by value: this message is logged.
        which = ", ".join(f"#{i}" for i in unusable)
        r.problems.append(
            f"SMART_RESUME_WEBHOOK_SECRET value {which} of {len(webhook_secrets)} contains a "
            "non-ASCII or control character, so no request could ever match it"
        )
    short = [i for i, secret in enumerate(webhook_secrets, 1) if len(secret) < MIN_SECRET]
    if short:
        # A short secret can be guessed, and too short to be masked reliably in logs.
        which = ", ".join(f"#{i}" for i in short)
        r.problems.append(
            f"SMART_RESUME_WEBHOOK_SECRET value {which} of {len(webhook_secrets)} is shorter "
            f"than {MIN_SECRET} characters"
        )
    concurrency = r.parse("SMART_RESUME_CONCURRENCY", int, "a whole number", 1)
    if concurrency < 1 or concurrency > 64:
        r.problems.append(f"SMART_RESUME_CONCURRENCY must be between 1 and 64, got {concurrency}")
    stream = r.parse("SMART_RESUME_STREAM", int, "a whole number", None)
    if stream is not None and stream < 0:
        r.problems.append(f"SMART_RESUME_STREAM must not be negative, got {stream}")

    api_key = r.raw("SENDGRID_API_KEY")
    transport = r.choice(
        "SMART_RESUME_EMAIL_TRANSPORT", TRANSPORTS, "sendgrid" if api_key else "log"
    )
    email_from = r.raw("SMART_RESUME_EMAIL_FROM")
    email_to = split(r.raw("SMART_RESUME_EMAIL_TO"))
    if transport in ("sendgrid", "ses"):
        # Found at startup, not at the end of a two-hour run when the report cannot go out.
        if not email_from:
            r.problems.append(f"SMART_RESUME_EMAIL_FROM is required for the {transport} transport")
        if not email_to:
            r.problems.append(f"SMART_RESUME_EMAIL_TO is required for the {transport} transport")
    if transport == "sendgrid" and not api_key:
        r.problems.append("SENDGRID_API_KEY is required for the sendgrid transport")
    region = r.raw("AWS_REGION") or r.env.get("AWS_DEFAULT_REGION")
    if transport == "ses" and not region:
        r.problems.append("AWS_REGION is required for the ses transport")
    host = r.raw("SMART_RESUME_SENDGRID_HOST") or ""
    if not host.startswith(("http://", "https://")):
        r.problems.append(f"SMART_RESUME_SENDGRID_HOST={host!r} is not an http(s) URL")
    elif host.startswith("http://") and urllib.parse.urlsplit(host).hostname not in LOOPBACK:
        # The API key travels in a header: only a test stand-in on this machine may be plain.
        r.problems.append(
            f"SMART_RESUME_SENDGRID_HOST={host!r} must be https:// (http only on loopback)"
        )

    lock_name = r.raw("SMART_RESUME_LOCK_NAME") or "smart-resume"
    if "/" in lock_name or lock_name in (".", "..") or len(lock_name) > 200:
        r.problems.append(f"SMART_RESUME_LOCK_NAME={lock_name!r} is not a valid document id")
    module = r.raw("SMART_RESUME_MODULE") or "shared.resume"
    if not all(part.isidentifier() for part in module.split(".")):
        r.problems.append(f"SMART_RESUME_MODULE={module!r} is not a dotted module name")

    expected = r.optional_seconds("SMART_RESUME_EXPECTED_EVERY_SECONDS", None)
    grace = _grace(r, expected)
    stuck = r.seconds("SMART_RESUME_STUCK_SECONDS")
    if stuck <= heartbeat:  # False for NaN: a bad value is reported once, by name
        # Progress is stamped by the heartbeat, so it cannot be judged finer than one beat.
        r.problems.append(
            f"SMART_RESUME_STUCK_SECONDS ({stuck:g}) must be longer than "
            f"SMART_RESUME_HEARTBEAT_SECONDS ({heartbeat:g})"
        )
    behind = r.optional_seconds("SMART_RESUME_BEHIND_SECONDS", 2 * expected if expected else 3600.0)
    ping_url = r.raw("SMART_RESUME_PING_URL")
    if ping_url is not None and not http_url(ping_url):
        # Never echo the value: it is a secret.
        r.problems.append("SMART_RESUME_PING_URL is not an http(s) URL with a host")

    pipeline = Path(r.raw("SMART_RESUME_PIPELINE") or "pipeline.toml")
    outbox = Path(r.raw("SMART_RESUME_OUTBOX") or "outbox")
    settings = Settings(
        webhook_secrets=webhook_secrets,
        lock_name=lock_name,
        heartbeat_seconds=heartbeat,
        lease_seconds=lease,
        max_run_seconds=max_run,
        time_budget_seconds=budget,
        reconcile_hours=reconcile_hours,
        shards=shards,
        pipeline_path=pipeline if pipeline.is_absolute() else PROJECT_ROOT / pipeline,
        module=module,
        reload_module=r.parse("SMART_RESUME_RELOAD_MODULE", flag, "0 or 1", False),
        concurrency=concurrency,
        stream=stream,
        email_transport=transport,
        email_from=email_from,
        email_to=email_to,
        email_on=r.choice("SMART_RESUME_EMAIL_ON", EMAIL_ON, "always"),
        sendgrid_api_key=api_key,
        sendgrid_host=host.rstrip("/"),
        outbox=outbox,
        aws_region=region,
        # None lets the client find the project from the runtime's credentials.
        project=r.raw("GOOGLE_CLOUD_PROJECT") or r.env.get("GCLOUD_PROJECT") or None,
        emulator_host=r.raw("FIRESTORE_EMULATOR_HOST"),
        rpc_timeout_seconds=r.seconds("SMART_RESUME_RPC_TIMEOUT_SECONDS"),
        email_timeout_seconds=r.seconds("SMART_RESUME_EMAIL_TIMEOUT_SECONDS"),
        log_format=_log_format(r),
        expected_every_seconds=expected,
        grace_seconds=grace,
        stuck_seconds=stuck,
        behind_seconds=behind,
        ping_url=ping_url,
    )
    if r.problems:
        raise ConfigError(r.problems)
    return settings


def _log_format(r: Reader) -> str:
    default = "json" if r.env.get("K_SERVICE") else "text"  # Cloud Logging reads JSON lines
    return r.choice("SMART_RESUME_LOG_FORMAT", LOG_FORMATS, default)


def _grace(r: Reader, expected: float | None) -> float:
    """The grace before a run is overdue: as set (0 allowed), else half the expected interval."""
    name = "SMART_RESUME_GRACE_SECONDS"
    value = r.parse(name, float, "a number of seconds", math.nan)
    if r.raw(name) is None or math.isnan(value):
        return expected / 2 if expected else 0.0
    if not 0 <= value < math.inf:
        r.problems.append(f"{name} must be zero or a positive number of seconds, got {value:g}")
        return 0.0
    return value


#: Names under smart-resume's own prefix: any other name with it is most likely a misspelling.
PREFIX = "SMART_RESUME_"
MAX_UNKNOWN_NAMED = 10


def unknown_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """One warning per `SMART_RESUME_*` variable that no code reads, naming the closest known
    one: a misspelt `SMART_RESUME_CONCURENCY=4` is otherwise ignored without a word."""
    return unknown_names(os.environ if env is None else env, VARIABLES, PREFIX, MAX_UNKNOWN_NAMED)


def warn_unknown_variables(function: str) -> None:
    """A function's start: log each unknown variable once (the log format the settings would
    choose, so the warning reaches Cloud Logging with its severity even when they are bad)."""
    warnings = unknown_variables()
    if not warnings:
        return
    from shared import log as logging_setup

    logging_setup.configure(_log_format(Reader(os.environ, VARIABLES)))
    logger = logging_setup.get_logger("config")
    for warning in warnings:
        logger.warning("%s at start: %s", function, warning)


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, built on first use. Tests call `get_settings.cache_clear()`."""
    return load_settings()


def describe(settings: Settings) -> dict[str, Any]:
    """The non-secret limits, as the status function reports them."""
    return {
        "heartbeatSeconds": settings.heartbeat_seconds,
        "leaseSeconds": settings.lease_seconds,
        "maxRunSeconds": settings.max_run_seconds,
        "timeBudgetSeconds": settings.time_budget_seconds,
    }
