"""Where settings come from: the settings file and KEY=VALUE arguments, never the shell.

A shell set up by local_emulator.md exports a 10 s lease, the outbox transport and perhaps a
local pipeline, which must not reach production: its variables named like settings are
ignored, and a note names them (never their values: one could be a secret). Each value keeps
where it came from ("deploy.env:12", "command line", "default") for the listing and warnings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from deploy import Failed, note
from shared.config import VARIABLES

REQUIRED = "PROJECT_ID REGION SERVICE_ACCOUNT SCHEDULE TIME_ZONE WEBHOOK_SECRET_NAME"
REQUIRED = (*REQUIRED.split(), "WEBHOOK_SECRET_VERSION")
#: deploy.sh's other settings, in the order the settings listing shows them.
OPTIONAL = """SENDGRID_SECRET_NAME SENDGRID_SECRET_VERSION PING_SECRET_NAME PING_SECRET_VERSION
    OIDC_SERVICE_ACCOUNT ALLOW_UNAUTHENTICATED FUNCTION_NAME STATUS_FUNCTION_NAME SCHEDULER_JOB
    SCHEDULER_LOCATION SHARDS TRIGGER_CONCURRENCY TRIGGER_MEMORY DATABASE ALERT_CHANNEL
    RUN_WAIT_SECONDS AWS_REGION STATUS_MAX_INSTANCES HEADER_SECRETS AWS_ACCESS_KEY_SECRET_NAME
    AWS_SECRET_KEY_SECRET_NAME RUN_AFTER_DEPLOY"""
OPTIONAL = tuple(OPTIONAL.split())
PREFIX = "SMART_RESUME_"
#: Each sets SMART_RESUME_<NAME>; any SMART_RESUME_* of shared/config.py is a setting too.
SHORT_NAMES = ("LOCK_NAME", "STREAM", "TIME_BUDGET_SECONDS", "EMAIL_TRANSPORT", "EMAIL_FROM")
SHORT_NAMES += ("EMAIL_TO",)
#: Secrets are never settings: they come from Secret Manager, named by <NAME>_NAME, _VERSION.
SECRETS = {"SMART_RESUME_WEBHOOK_SECRET": "WEBHOOK_SECRET", "SENDGRID_API_KEY": "SENDGRID_SECRET"}
SECRETS["SMART_RESUME_PING_URL"] = "PING_SECRET"
KEY_VALUE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.S)


def is_setting(name: str) -> bool:
    """Named like a setting: one of deploy.sh's own, or any SMART_RESUME_*."""
    return name.startswith(PREFIX) or name in (*REQUIRED, *OPTIONAL, *SHORT_NAMES)


def not_a_setting(name: str) -> str | None:
    """Why `name` cannot be set in the settings file or as an argument; None when it can."""
    if name in SECRETS:
        return (
            f"{name} is a secret, not a setting: store it in Secret Manager and set "
            f"{SECRETS[name]}_NAME and {SECRETS[name]}_VERSION"
        )
    if name.startswith(PREFIX) and name not in VARIABLES:
        return f"{name} is not a smart-resume setting (see shared/config.py)"
    if not is_setting(name):
        return f"{name} is not a deploy.sh setting (see deploy.env.example)"
    return None


@dataclass
class Draft:
    """Settings while they are read and checked: values, their sources, what is wrong."""

    label: str  # the settings file, as messages name it
    values: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> str:
        return self.values.get(name, "")

    def set(self, name: str, value: str, source: str) -> None:
        """Set `name` (an empty value clears it)."""
        self.values.pop(name, None)
        self.sources.pop(name, None)
        if value:
            self.values[name], self.sources[name] = value, source

    def default(self, name: str, value: str, source: str = "default") -> None:
        if not self[name]:
            self.set(name, value, source)

    def said(self, name: str) -> str:
        """NAME=VALUE (where it came from), for messages."""
        return f"{name}={self[name]} ({self.sources.get(name, 'default')})"


def ignore_shell(environ: Mapping[str, str], label: str) -> None:
    """Say which settings the shell has set, by name only: none of them is used."""
    ignored = []
    for name in sorted(n for n in environ if is_setting(n) and environ[n]):
        if name in ("SMART_RESUME_WEBHOOK_SECRET", "SMART_RESUME_PING_URL"):
            note(
                f"note: {name} in the environment is not deployed (it is a secret); the functions "
                f"read it from Secret Manager ({SECRETS[name]}_NAME)"
            )
        else:
            ignored.append(name)
    if ignored:
        note(
            f"note: ignored from the shell's environment: {', '.join(ignored)} (deploy.sh takes "
            f"settings from {label} and KEY=VALUE arguments only)"
        )


def read_file(d: Draft, path: str, given: bool) -> None:
    """KEY=VALUE lines, read as data (never executed); a key set twice takes its last value,
    as a shell would. A file named by --env-file must exist; a missing deploy.env is a note."""
    if os.path.isdir(path):
        raise Failed(2, f"--env-file {path} is a folder, not a settings file")
    if not os.access(path, os.R_OK):  # a named pipe (<(sops -d ...)) is readable: fine
        if given:
            raise Failed(2, f"--env-file {path}: no such file, or not readable")
        note(
            f"note: no {d.label} beside deploy.sh: copy deploy.env.example to deploy.env and fill "
            "it in (or pass every setting as KEY=VALUE)"
        )
        return
    line_of: dict[str, int] = {}
    with open(path, encoding="utf-8", newline="\n") as lines:
        for n, line in enumerate(lines, 1):
            where, line = f"{d.label}:{n}", line.strip()
            if not line or line.startswith("#"):
                continue
            match = KEY_VALUE.fullmatch(line.removeprefix("export "))
            if not match:
                raise Failed(2, f"{where}: expected KEY=VALUE")
            key, value = match.groups()
            if len(value) > 1 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            elif re.search(r"\s#", value):  # `KEY=value  # why` would deploy the comment
                d.problems.append(
                    f"{where}: {key}: a comment after the value would be part of it; put it on a "
                    "line of its own (or quote the whole value)"
                )
                continue
            if key in line_of:
                note(
                    f"note: {where}: {key} is set again; this value wins over line {line_of[key]}'s"
                )
            line_of[key] = n
            why = not_a_setting(key)
            if why:
                d.problems.append(f"{where}: {why}")
            else:
                d.set(key, value, where)


def read_arguments(d: Draft, arguments: Iterable[str]) -> None:
    """KEY=VALUE arguments, over the file's settings (`KEY=` clears one)."""
    for argument in arguments:
        key, value = argument.split("=", 1)
        why = not_a_setting(key)
        if "\n" in argument:  # one line per setting, as in the file and the listing
            why = f"{key}: a value cannot hold a line break"
        if why:
            d.problems.append(f"command line: {why}")
        else:
            d.set(key, value, "command line")
