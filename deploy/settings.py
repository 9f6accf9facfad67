"""A deploy's settings, read and checked once into a frozen dataclass that everything after
reads; a bad setting stops the deploy before any command, with every problem named at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from deploy import ROOT, checks, read, testlike
from deploy.read import OPTIONAL, PREFIX, REQUIRED, Draft
from shared.config import FINISH_MARGIN_SECONDS


class SettingsError(Exception):
    """The settings cannot be used: every problem, and the warnings to say before them."""

    def __init__(
        self, command: str, env_file: str, problems: list[str], warnings: list[str]
    ) -> None:
        super().__init__("\n".join(problems))
        self.problems, self.warnings = problems, warnings
        self.heading = f"cannot {command}, fix these settings ({env_file} or KEY=VALUE arguments):"


@dataclass(frozen=True)
class Settings:
    """Every setting in effect (as written, and where it came from) and, for a deploy, the
    checked values the commands are built from. No secret is a setting, only their names."""

    command: str = "deploy"
    root: Path = ROOT
    values: Mapping[str, str] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    project_id: str = ""
    region: str = ""
    service_account: str = ""
    schedule: str = ""
    time_zone: str = ""
    webhook_secret_name: str = ""
    webhook_secret_version: str = ""
    sendgrid_secret_name: str = ""
    sendgrid_secret_version: str = ""
    ping_secret_name: str = ""
    ping_secret_version: str = ""
    oidc_service_account: str = ""
    allow_unauthenticated: bool = False
    function_name: str = "smart-resume"
    status_function_name: str = "smart-resume-status"
    scheduler_job: str = "smart-resume"
    scheduler_location: str = ""
    shards: int = 1
    trigger_concurrency: int = 4
    trigger_memory: str = "512Mi"
    database: str = "(default)"
    alert_channel: str = ""
    run_wait_seconds: int = 300
    aws_region: str = ""
    status_max_instances: str = "3"
    header_secrets: str = ""
    aws_access_key_secret_name: str = ""
    aws_secret_key_secret_name: str = ""
    run_after_deploy: bool = True
    time_budget_seconds: int = 1500  # SMART_RESUME_TIME_BUDGET_SECONDS

    @property
    def timeout(self) -> int:
        """The trigger's timeout and the job's attempt deadline: the budget and time to finish."""
        return self.time_budget_seconds + FINISH_MARGIN_SECONDS

    @property
    def passed(self) -> list[str]:
        """The SMART_RESUME_* settings, given to both functions, sorted."""
        return sorted(name for name in self.values if name.startswith(PREFIX))

    def listing(self) -> list[str]:
        """The settings in effect, in the listing's order: required, optional, passed."""
        return [name for name in (*REQUIRED, *OPTIONAL, *self.passed) if name in self.values]


CONVERT = {"int": int, "bool": lambda value: value == "1", "str": str}


def load(
    command: str = "deploy",
    arguments: Iterable[str] = (),
    env_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    root: Path = ROOT,
) -> Settings:
    """The settings of `env_file` (default: deploy.env in `root`) with KEY=VALUE `arguments`
    over them; the shell's `environ` only to say what is ignored. Raises SettingsError."""
    d = Draft(label=env_file or "deploy.env")
    path = env_file or str(root / "deploy.env")
    read.ignore_shell(os.environ if environ is None else environ, d.label)
    read.read_file(d, path, given=env_file is not None)
    read.read_arguments(d, arguments)
    checks.short_names(d)
    checks.pipeline(d, root)
    typed: dict[str, object] = {}
    warnings = []
    if command == "deploy":
        typed["time_budget_seconds"] = checks.deploy(d)
        warnings = testlike.warnings(d, root)
        if not d.problems:
            passed = sorted(name for name in d.values if name.startswith(PREFIX))
            d.problems = checks.function_problems(d, passed)
    if d.problems:
        raise SettingsError(command, path, d.problems, warnings)
    for f in fields(Settings) if command == "deploy" else ():
        if f.name.upper() in d.values and f.name.upper() in (*REQUIRED, *OPTIONAL):
            typed[f.name] = CONVERT[str(f.type)](d[f.name.upper()])
    return Settings(command, root, d.values, d.sources, tuple(warnings), **typed)
