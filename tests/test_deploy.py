"""deploy.sh and the deploy/ package behind it: the settings, the gcloud commands (as data,
and through the real gcloud parser), the staged bundles, and deploys through a fake gcloud.

Most tests call the package in-process (`load`, `run.deploy` with a dry `Runner`); a handful
run ./deploy.sh itself, as a user does.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from deploy import Failed, bundle, schedule
from deploy.__main__ import HELP, main
from deploy.commands import Command, quote
from deploy.read import OPTIONAL, REQUIRED, SHORT_NAMES
from deploy.run import Runner
from deploy.run import deploy as run_deploy_steps
from deploy.settings import Settings, SettingsError, load

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy.sh"
EXAMPLE = ROOT / "deploy.env.example"
BASH = shutil.which("bash") or "/bin/bash"
FUNCTIONS = ("smart_resume", "smart_resume_status")
SECRET = "s3cr3t-new-value"
OLD_SECRET = "s3cr3t-old-value"
URL = "https://smart-resume-abc123-ew.a.run.app"
#: Path parts that must never reach a deployed bundle.
FORBIDDEN = {"__pycache__", ".venv", "tests", ".pytest_cache", ".git", "build"}
#: Settings whose default the example shows commented out, documented there.
NEW_SETTINGS = ("TRIGGER_CONCURRENCY", "TRIGGER_MEMORY", "DATABASE", "SHARDS")


def _index_commands() -> list[str]:
    """The index commands a deploy runs with the example: one per index and field override
    of firestore.indexes.json (the file the query-shape test checks the code against)."""
    spec = json.loads((ROOT / "firestore.indexes.json").read_text())
    out = []
    for index in spec["indexes"]:
        fields = " ".join(
            f"--field-config=field-path={f['fieldPath']},order={f['order'].lower()}"
            for f in index["fields"]
        )
        out.append(
            f"gcloud firestore indexes composite create --collection-group="
            f"{index['collectionGroup']} --query-scope=collection {fields} "
            "'--database=(default)' --project=my-project --async"
        )
    for override in spec["fieldOverrides"]:
        out.append(
            f"gcloud firestore indexes fields update {override['fieldPath']} --collection-group="
            f"{override['collectionGroup']} --disable-indexes '--database=(default)' "
            "--project=my-project --async"
        )
    return out


INDEX_COMMANDS = _index_commands()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_args(settings: dict[str, str] | None) -> list[str]:
    """Settings as KEY=VALUE arguments (over the settings file; `KEY=` clears)."""
    return [f"{key}={value}" for key, value in (settings or {}).items()]


def example(settings: dict[str, str] | None = None, env_file: Path = EXAMPLE, **kw) -> Settings:
    """The example's settings, with `settings` as arguments over them (the shell: none)."""
    path = str(env_file) if env_file else None
    return load("deploy", as_args(settings), path, environ={}, **kw)


def problems(settings: dict[str, str] | None = None, env_file: Path = EXAMPLE, **kw) -> list[str]:
    """What refuses these settings (there must be something)."""
    with pytest.raises(SettingsError) as refused:
        example(settings, env_file, **kw)
    return refused.value.problems


class Dry:
    """A dry run's plan, in-process: the steps (commands and comments) and what it prints,
    exactly as `./deploy.sh --dry-run` prints them on standard output."""

    def __init__(self, build: Path, settings: dict[str, str] | None = None, **kw) -> None:
        self.settings = example(settings, **kw)
        self.runner = Runner(build, out=io.StringIO())
        assert run_deploy_steps(self.settings, self.runner) == 0
        self.out = self.runner.out.getvalue()
        self.steps = self.runner.steps
        self.commands = [c for c in self.steps if isinstance(c, Command)]
        self.printed = [c.shown()[2:] for c in self.commands]

    def all(self, purpose: str) -> list[Command]:
        return [c for c in self.commands if c.purpose == purpose]

    def one(self, purpose: str, name: str | None = None) -> Command:
        """The command for `purpose` (on `name`, the word after the verb, when given)."""
        found = [c for c in self.all(purpose) if name is None or name in c.argv[:6]]
        assert len(found) == 1, (purpose, name, self.printed)
        return found[0]


def flag(cmd: Command | str, name: str) -> str:
    """The value of `--name=value` in a command, or in the --flags-file it names (the secret
    header is read from one, never passed on the command line)."""
    args = cmd.argv if isinstance(cmd, Command) else shlex.split(cmd)
    found = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    for held in [a.split("=", 1)[1] for a in args if a.startswith("--flags-file=")]:
        found += [v for k, v in json.loads(Path(held).read_text()).items() if k == f"--{name}"]
    assert len(found) == 1, (name, args)
    return found[0]


def env_vars(cmd: Command | str) -> dict[str, str]:
    """A function's variables, read from its --env-vars-file (one `NAME: "json"` a line)."""
    lines = Path(flag(cmd, "env-vars-file")).read_text().splitlines()
    return {name: json.loads(value) for name, value in (line.split(": ", 1) for line in lines)}


def settings_listing(stdout: str) -> dict[str, tuple[str, str]]:
    """The deploy's settings listing: name -> (value, where it came from)."""
    lines = stdout.splitlines()
    start = lines.index("# settings (where each value came from):")
    found = {}
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        word, source = re.fullmatch(r"#   (.+)  \((.+)\)", line).groups()
        name, value = shlex.split(word)[0].split("=", 1)
        found[name] = (value, source)
    return found


def example_line(name: str) -> str:
    """Where the example sets `name`, as messages name it: FILE:LINE."""
    lines = EXAMPLE.read_text().splitlines()
    return f"{EXAMPLE}:{next(i for i, x in enumerate(lines, 1) if x.startswith(f'{name}='))}"


def example_plus(tmp_path: Path, name: str, line: str) -> tuple[Path, int]:
    """A settings file `name`: the example with `line` added at its end; and that line's number."""
    settings = tmp_path / name
    settings.write_text(EXAMPLE.read_text() + line + "\n")
    return settings, len(EXAMPLE.read_text().splitlines()) + 1


class Result:
    """What an in-process `main` printed and returned."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(*args: str) -> Result:
    """deploy.sh's command line, in-process (the environment as the test set it)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        returncode = main(list(args))
    return Result(returncode, out.getvalue(), err.getvalue())


def command(stdout: str, start: str) -> str:
    """The one printed command that starts with `start`."""
    found = [line[2:] for line in stdout.splitlines() if line.startswith(f"+ {start}")]
    assert len(found) == 1, f"expected one {start!r} in:\n{stdout}"
    return found[0]


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch):
    """Sets the shell's environment for an in-process `cli` (the suite's own settings gone)."""

    def apply(**env: str) -> None:
        for key in [k for k in os.environ if k.startswith(("SMART_RESUME_", "SENDGRID_"))]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)

    return apply


@pytest.fixture(scope="session")
def path_without_gcloud(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PATH with every usual command except gcloud, as on a machine without the Cloud CLI."""
    bin_dir = tmp_path_factory.mktemp("no-gcloud-bin")
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not folder or not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            target = bin_dir / entry.name
            if entry.name == "gcloud" or target.exists() or target.is_symlink():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    return str(bin_dir)


def run_deploy(
    *args: str, path: str, env: dict[str, str] | None = None, script: Path = SCRIPT
) -> subprocess.CompletedProcess[str]:
    """./deploy.sh with `args`; `env` is the shell's environment over a minimal one."""
    base = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    return subprocess.run(
        [BASH, str(script), *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- settings: where they come from -------------------------------------------------------

#: A production-like settings file: nothing in it looks like a test setting.
PRODUCTION = """\
PROJECT_ID=acme-prod
REGION=europe-west1
SERVICE_ACCOUNT=smart-resume@acme-prod.iam.gserviceaccount.com
SCHEDULE=0 * * * *
TIME_ZONE=Europe/Paris
WEBHOOK_SECRET_NAME=smart-resume-webhook
WEBHOOK_SECRET_VERSION=3
SENDGRID_SECRET_NAME=smart-resume-sendgrid
SENDGRID_SECRET_VERSION=2
EMAIL_FROM=smart-resume@acme.io
EMAIL_TO=ops@acme.io,oncall@acme.io
OIDC_SERVICE_ACCOUNT=smart-resume-scheduler@acme-prod.iam.gserviceaccount.com
SMART_RESUME_LEASE_SECONDS=300
SMART_RESUME_HEARTBEAT_SECONDS=60
"""
#: What local_emulator.md has a shell export (its section 2), and a region of its last section.
LOCAL_SHELL = {
    "FIRESTORE_EMULATOR_HOST": "127.0.0.1:8085",
    "GOOGLE_CLOUD_PROJECT": "smart-resume-local",
    "SMART_RESUME_WEBHOOK_SECRET": "local-secret",
    "SMART_RESUME_EMAIL_TRANSPORT": "outbox",
    "SMART_RESUME_OUTBOX": "outbox",
    "SMART_RESUME_HEARTBEAT_SECONDS": "1",
    "SMART_RESUME_LEASE_SECONDS": "10",
    "REGION": "us-central1",
}


class TestWhereSettingsComeFrom:
    """The settings file and KEY=VALUE arguments only, each value with its source."""

    def test_each_setting_and_where_it_came_from(self) -> None:
        """The file's line, the command line, a default, a value derived from SCHEDULE, a
        short name's; every SMART_RESUME_* one is given to the functions."""
        s = example({"REGION": "us-central1", "SMART_RESUME_EMAIL_ON": "failure"})
        said = {name: (s.values[name], s.sources.get(name, "default")) for name in s.listing()}
        assert said["PROJECT_ID"] == ("my-project", example_line("PROJECT_ID"))
        assert said["SCHEDULE"] == ("0 * * * *", example_line("SCHEDULE"))
        assert said["REGION"] == ("us-central1", "command line")
        assert said["SMART_RESUME_EMAIL_ON"] == ("failure", "command line")
        assert said["FUNCTION_NAME"] == ("smart-resume", "default")
        assert said["TRIGGER_CONCURRENCY"] == ("4", "default")
        assert said["SCHEDULER_LOCATION"] == ("us-central1", "default: REGION")
        assert said["SMART_RESUME_EMAIL_TO"] == (
            "ops@example.com,oncall@example.com",
            f"from EMAIL_TO, {example_line('EMAIL_TO')}",
        )
        assert said["SMART_RESUME_EXPECTED_EVERY_SECONDS"] == ("3600", "derived from SCHEDULE")
        assert said["SMART_RESUME_GRACE_SECONDS"][1].startswith("derived from SCHEDULE")
        assert set(REQUIRED) <= set(said)
        assert "ALERT_CHANNEL" not in said and "SENDGRID_API_KEY" not in said
        # Typed, for the commands.
        assert (s.region, s.shards, s.trigger_concurrency, s.run_wait_seconds) == (
            "us-central1",
            1,
            4,
            300,
        )
        assert (s.allow_unauthenticated, s.run_after_deploy, s.timeout) == (False, True, 1620)
        assert s.passed == sorted(n for n in said if n.startswith("SMART_RESUME_"))

    def test_the_listing_is_printed_before_the_commands(self, tmp_path: Path) -> None:
        """As comment lines (the commands start with `+ `), each KEY=VALUE as an argument
        takes it; the functions get exactly the listed SMART_RESUME_* values."""
        dry = Dry(tmp_path, {"LOCK_NAME": "it's mine"})
        listing = settings_listing(dry.out)
        assert listing["SMART_RESUME_LOCK_NAME"] == ("it's mine", "from LOCK_NAME, command line")
        lines = dry.out.splitlines()
        first = min(i for i, line in enumerate(lines) if line.startswith("+ "))
        assert lines.index("# settings (where each value came from):") < first
        passed = env_vars(dry.one("deploy the trigger"))
        assert passed.pop("GOOGLE_CLOUD_PROJECT") == listing["PROJECT_ID"][0]
        assert {name: listing[name][0] for name in passed} == passed

    def test_arguments_win_over_the_file_and_an_empty_one_clears(self, tmp_path: Path) -> None:
        dry = Dry(
            tmp_path,
            {"REGION": "us-central1", "SMART_RESUME_EMAIL_ON": "failure", "LOCK_NAME": ""},
        )
        assert "--region=us-central1" in dry.one("deploy the trigger").argv
        found = env_vars(dry.one("deploy the trigger"))
        assert found["SMART_RESUME_EMAIL_ON"] == "failure"
        assert "SMART_RESUME_LOCK_NAME" not in found
        assert "europe-west1" not in "\n".join(dry.printed)

    def test_an_argument_wins_over_the_file_under_either_name(self) -> None:
        """The file says EMAIL_TRANSPORT=sendgrid; SMART_RESUME_EMAIL_TRANSPORT=ses as an
        argument wins (not a conflict); the two names as arguments at once are a conflict."""
        s = example({"SMART_RESUME_EMAIL_TRANSPORT": "ses", "AWS_REGION": "eu-west-1"})
        assert s.values["SMART_RESUME_EMAIL_TRANSPORT"] == "ses"
        both = problems({"EMAIL_TRANSPORT": "log", "SMART_RESUME_EMAIL_TRANSPORT": "ses"})
        assert any(
            "both set, to different values (command line and command line)" in p for p in both
        )

    def test_the_shell_s_settings_are_not_deployed(self, shell, tmp_path: Path) -> None:
        """A shell set up for local tests deploys none of its values; one note names the
        variables it ignored, without their values; other variables are left alone."""
        shell(
            **LOCAL_SHELL,
            SMART_RESUME_PIPELINE="examples/local-only.toml",  # no such file: unused
            SHARDS="",  # set, but empty: nothing was ignored
            CLOUDSDK_CORE_PROJECT="gcloud-s-own",  # not a setting
            SENDGRID_API_KEY="SG.key-value",
            SMART_RESUME_PING_URL="https://hc-ping.com/0f9e-deploy-token",
        )
        result = cli("--dry-run", "--env-file", str(EXAMPLE), "--build-dir", str(tmp_path))
        assert result.returncode == 0, result.stderr
        found = env_vars(command(result.stdout, "gcloud functions deploy smart-resume "))
        for name in (
            "SMART_RESUME_LEASE_SECONDS",
            "SMART_RESUME_HEARTBEAT_SECONDS",
            "SMART_RESUME_OUTBOX",
            "SMART_RESUME_PIPELINE",
            "SMART_RESUME_WEBHOOK_SECRET",
        ):
            assert name not in found, name
        assert found["SMART_RESUME_EMAIL_TRANSPORT"] == "sendgrid"  # the file's
        assert found["GOOGLE_CLOUD_PROJECT"] == "my-project"
        notes = [line for line in result.stderr.splitlines() if "ignored from the shell" in line]
        assert notes == [
            "note: ignored from the shell's environment: REGION, SMART_RESUME_EMAIL_TRANSPORT, "
            "SMART_RESUME_HEARTBEAT_SECONDS, SMART_RESUME_LEASE_SECONDS, SMART_RESUME_OUTBOX, "
            f"SMART_RESUME_PIPELINE (deploy.sh takes settings from {EXAMPLE} and KEY=VALUE "
            "arguments only)"
        ]
        for name in ("SMART_RESUME_WEBHOOK_SECRET", "SMART_RESUME_PING_URL"):
            assert f"{name} in the environment is not deployed" in result.stderr
        for value in (
            "local-only",
            "us-central1",
            "local-secret",
            "gcloud-s-own",
            "SG.key-value",
            "0f9e-deploy-token",
        ):
            assert value not in result.stdout + result.stderr, value
        assert not [w for w in warnings(result.stderr) if "SECONDS" in w or "outbox" in w]

    def test_a_named_settings_file_must_exist_and_be_a_file(self, tmp_path: Path) -> None:
        for path, why in ((tmp_path / "nope.env", "no such file"), (tmp_path, "is a folder")):
            with pytest.raises(Failed) as failed:
                load("deploy", [], str(path), environ={})
            assert failed.value.status == 2 and why in failed.value.message

    def test_without_deploy_env_a_note_says_what_to_do(self, tmp_path: Path, capsys) -> None:
        assert "missing settings" in problems(env_file=None, root=tmp_path)[0]
        assert "note: no deploy.env beside deploy.sh: copy deploy.env.example" in (
            capsys.readouterr().err
        )

    def test_the_file_is_data_a_repeated_key_takes_its_last_value(
        self, tmp_path: Path, capsys
    ) -> None:
        twice, last = example_plus(tmp_path, "twice.env", "export REGION='us-east1'")
        s = example(env_file=twice)
        assert (s.region, s.sources["REGION"]) == ("us-east1", f"{twice}:{last}")
        assert f"{twice}:{last}: REGION is set again; this value wins over line" in (
            capsys.readouterr().err
        )
        bad, line = example_plus(tmp_path, "bad.env", "$(touch pwned)")
        with pytest.raises(Failed, match=f"{re.escape(str(bad))}:{line}: expected KEY=VALUE"):
            example(env_file=bad)

    def test_a_comment_after_a_value_is_refused_not_deployed(self, tmp_path: Path) -> None:
        settings, line = example_plus(tmp_path, "deploy.env", "EMAIL_TO=ops@x.example # on call")
        assert problems(env_file=settings) == [
            f"{settings}:{line}: EMAIL_TO: a comment after the value would be part of it; put it "
            "on a line of its own (or quote the whole value)"
        ]
        quoted, _ = example_plus(tmp_path, "quoted.env", 'EMAIL_FROM="Ops #1 <ops@x.example>"')
        assert example(env_file=quoted).values["SMART_RESUME_EMAIL_FROM"] == (
            "Ops #1 <ops@x.example>"
        )

    def test_an_unknown_key_is_refused_with_where_it_is(self, tmp_path: Path) -> None:
        settings, line = example_plus(tmp_path, "typo.env", "REGOIN=us-central1")
        found = problems(
            {"SMART_RESUME_LEASE": "60", "region": "us-central1", "REGION": "a\nb"},
            env_file=settings,
        )
        assert found == [
            f"{settings}:{line}: REGOIN is not a deploy.sh setting (see deploy.env.example)",
            "command line: SMART_RESUME_LEASE is not a smart-resume setting (see shared/config.py)",
            "command line: region is not a deploy.sh setting (see deploy.env.example)",
            "command line: REGION: a value cannot hold a line break",
        ]

    def test_a_secret_is_never_a_setting(self, tmp_path: Path) -> None:
        """A secret's value in the file or as an argument is refused by name only (it comes
        from Secret Manager)."""
        settings, line = example_plus(
            tmp_path, "secret.env", f"SMART_RESUME_WEBHOOK_SECRET={SECRET}"
        )
        found = "\n".join(
            problems(
                {
                    "SMART_RESUME_PING_URL": "https://hc-ping.com/0f9e-deploy-token",
                    "SENDGRID_API_KEY": "SG.key-value",
                },
                env_file=settings,
            )
        )
        for problem in (
            f"{settings}:{line}: SMART_RESUME_WEBHOOK_SECRET is a secret, not a setting: store it"
            " in Secret Manager and set WEBHOOK_SECRET_NAME and WEBHOOK_SECRET_VERSION",
            "command line: SMART_RESUME_PING_URL is a secret, not a setting: store it in Secret "
            "Manager and set PING_SECRET_NAME and PING_SECRET_VERSION",
            "command line: SENDGRID_API_KEY is a secret, not a setting: store it in Secret "
            "Manager and set SENDGRID_SECRET_NAME and SENDGRID_SECRET_VERSION",
        ):
            assert problem in found, problem
        for value in (SECRET, "0f9e-deploy-token", "SG.key-value"):
            assert value not in found


# --- settings: what is refused, what is derived, what is warned about ---------------------


class TestChecks:
    def test_missing_settings_are_all_named_in_one_message(self, tmp_path: Path) -> None:
        """No settings: one message naming every missing one, before anything is staged."""
        empty = tmp_path / "empty.env"
        empty.write_text("# nothing\n")
        result = cli("--dry-run", "--env-file", str(empty), "--build-dir", str(tmp_path / "b"))
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr.count("cannot deploy, fix these settings") == 1
        missing = next(line for line in result.stderr.splitlines() if "missing settings" in line)
        assert missing == "  - missing settings: " + " ".join(REQUIRED)
        assert "OIDC_SERVICE_ACCOUNT is required unless ALLOW_UNAUTHENTICATED=1" in result.stderr
        assert not (tmp_path / "b").exists()
        only_stage = cli("stage", "--env-file", str(empty), "--build-dir", str(tmp_path / "b"))
        assert only_stage.returncode == 0, only_stage.stderr  # staging needs no deploy setting

    def test_bad_values_are_all_refused_at_once(self) -> None:
        """An unpinned secret version, a typo'd variable and a budget past the lease."""
        found = problems(
            {
                "WEBHOOK_SECRET_VERSION": "latest",
                "SMART_RESUME_TIME_BUDGET": "100",
                "TIME_BUDGET_SECONDS": "1900",
            }
        )
        found = "\n".join(found)
        assert "WEBHOOK_SECRET_VERSION=latest must be a version number" in found
        assert "SMART_RESUME_TIME_BUDGET is not a smart-resume setting" in found
        assert "must be shorter than SMART_RESUME_MAX_RUN_SECONDS (1800)" in found

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("TRIGGER_CONCURRENCY", "1"),
            ("TRIGGER_CONCURRENCY", "0"),
            ("TRIGGER_CONCURRENCY", "1001"),
            ("TRIGGER_CONCURRENCY", "04"),
            ("TRIGGER_CONCURRENCY", "four"),
            ("TRIGGER_CONCURRENCY", "99999999999999999999"),
            ("TRIGGER_MEMORY", "256Mi"),
            ("TRIGGER_MEMORY", "8Gi"),
            ("TRIGGER_MEMORY", "512MB"),
            ("TRIGGER_MEMORY", "lots"),
            ("DATABASE", "Default"),
            ("DATABASE", "db"),
            ("DATABASE", "(default) --async"),
            ("SHARDS", "0"),
            ("SHARDS", "101"),
            ("SHARDS", "-1"),
            ("SHARDS", "05"),
            ("SHARDS", "1.5"),
            ("SHARDS", "three"),
            ("SHARDS", "3 "),
            ("SHARDS", "99999999999999999999"),
            ("SMART_RESUME_EXPECTED_EVERY_SECONDS", "hourly"),
            ("SMART_RESUME_EXPECTED_EVERY_SECONDS", "0"),
            ("SMART_RESUME_EXPECTED_EVERY_SECONDS", "0.00"),
            ("RUN_WAIT_SECONDS", "soon"),
            ("RUN_WAIT_SECONDS", "3601"),
            ("RUN_AFTER_DEPLOY", "maybe"),
            ("ALLOW_UNAUTHENTICATED", "yes"),
            ("ALERT_CHANNEL", "projects/p/channels/1"),
            ("ALERT_CHANNEL", "my channel"),
            ("PING_SECRET_VERSION", "latest"),
            ("SENDGRID_SECRET_VERSION", "0"),
            ("STREAM", "x"),
        ],
    )
    def test_a_bad_value_is_refused_with_what_it_must_be(self, name: str, value: str) -> None:
        """One problem naming NAME=VALUE and what it must be (a range, a form); nothing else."""
        settings = {name: value}
        if name == "PING_SECRET_VERSION":
            settings["PING_SECRET_NAME"] = "smart-resume-ping"
        named = "SMART_RESUME_STREAM" if name == "STREAM" else name
        found = problems(settings)
        assert len(found) == 1, found
        assert found[0].startswith(f"{named}={value} must be"), found

    @pytest.mark.parametrize(
        ("name", "value", "typed"),
        [
            ("SHARDS", "100", 100),
            ("TRIGGER_CONCURRENCY", "2", 2),
            ("TRIGGER_CONCURRENCY", "1000", 1000),
            ("TRIGGER_MEMORY", "4Gi", "4Gi"),
            ("RUN_WAIT_SECONDS", "3600", 3600),
            ("RUN_WAIT_SECONDS", "0", 0),
            ("ALLOW_UNAUTHENTICATED", "1", True),
            ("RUN_AFTER_DEPLOY", "0", False),
        ],
    )
    def test_the_limits_themselves_are_accepted(self, name: str, value: str, typed: object) -> None:
        assert getattr(example({name: value}), name.lower()) == typed

    @pytest.mark.parametrize("name", ["TIME_BUDGET_SECONDS", "SMART_RESUME_TIME_BUDGET_SECONDS"])
    @pytest.mark.parametrize("budget", ["1681", "3000", "99999999999999999999"])
    @pytest.mark.parametrize("dry", [True, False])
    def test_a_budget_beyond_the_attempt_deadline_is_refused(
        self, tmp_path: Path, name: str, budget: str, dry: bool
    ) -> None:
        """Budget + 120 s over Cloud Scheduler's 1800 s: one line naming the setting and both
        limits, and no command, in a dry run as in a deploy."""
        settings = {
            "TIME_BUDGET_SECONDS": "",
            name: budget,
            "SMART_RESUME_MAX_RUN_SECONDS": "99999",
        }
        args = ["--env-file", str(EXAMPLE), "--build-dir", str(tmp_path), *as_args(settings)]
        result = cli(*(["--dry-run"] if dry else []), *args)
        assert result.returncode == 2
        assert result.stdout == ""
        lines = [line for line in result.stderr.splitlines() if "1800 s" in line]
        assert len(lines) == 1, result.stderr
        for word in ("TIME_BUDGET_SECONDS", "SMART_RESUME_TIME_BUDGET_SECONDS", "3600 s", "1680"):
            assert word in lines[0]

    def test_values_the_functions_would_refuse_are_refused_before_deploying(self) -> None:
        """The functions' own startup checks run on the values they would be deployed with:
        otherwise every request after the deploy answers 500."""
        found = problems({"SMART_RESUME_LEASE_SECONDS": "soon", "SMART_RESUME_CONCURRENCY": "100"})
        assert found[0].startswith(
            "the functions would refuse this at startup: SMART_RESUME_LEASE_SECONDS"
        )
        assert (
            "the functions would refuse this at startup: SMART_RESUME_CONCURRENCY must be "
            "between 1 and 64, got 100"
        ) in found

    def test_the_pipeline_must_be_a_file_in_the_repository(self) -> None:
        for path, why in (
            (f"../{ROOT.name}/pipeline.toml", "must not go through '..'"),
            ("/etc/hosts", "must be a path relative to the repository (it is staged)"),
            ("nope.toml", f"nope.toml: no such file in {ROOT}"),
        ):
            assert why in "\n".join(problems({"SMART_RESUME_PIPELINE": path})), path

    @pytest.mark.parametrize(
        ("settings", "problem"),
        [
            ({"EMAIL_TRANSPORT": "pigeon"}, "EMAIL_TRANSPORT=pigeon is not one of sendgrid, ses"),
            ({"EMAIL_TO": ""}, "EMAIL_TO is required for the sendgrid transport"),
            ({"EMAIL_FROM": ""}, "EMAIL_FROM is required for the sendgrid transport"),
            (
                {"EMAIL_TRANSPORT": "sendgrid", "SENDGRID_SECRET_NAME": ""},
                "SENDGRID_SECRET_NAME is required for the sendgrid transport",
            ),
            ({"EMAIL_TRANSPORT": "SES"}, "AWS_REGION is required for the ses transport"),
            ({"SENDGRID_SECRET_VERSION": ""}, "missing settings: SENDGRID_SECRET_VERSION"),
            ({"PING_SECRET_NAME": "p"}, "missing settings: PING_SECRET_VERSION"),
            (
                {"AWS_ACCESS_KEY_SECRET_NAME": "k"},
                "AWS_SECRET_KEY_SECRET_NAME goes with AWS_ACCESS_KEY_SECRET_NAME",
            ),
            (
                {"HEADER_SECRETS": "API_KEY=api-key,bad pair"},
                "HEADER_SECRETS: 'bad pair' is not VARIABLE=secret-name",
            ),
            (
                {"HEADER_SECRETS": "LEADS_TOKEN=leads,,OTHER=o"},
                "HEADER_SECRETS: '' is not VARIABLE=secret-name",
            ),
            (
                {"HEADER_SECRETS": "SMART_RESUME_WEBHOOK_SECRET=mine"},
                "HEADER_SECRETS: SMART_RESUME_WEBHOOK_SECRET is smart-resume's own",
            ),
            (
                {"SHARDS": "2", "SMART_RESUME_SHARDS": "3"},
                "SHARDS and SMART_RESUME_SHARDS are both set, to different values (command line "
                "and command line)",
            ),
            (
                {"OIDC_SERVICE_ACCOUNT": ""},
                "OIDC_SERVICE_ACCOUNT is required unless ALLOW_UNAUTHENTICATED=1",
            ),
        ],
    )
    def test_settings_that_go_together(self, settings: dict[str, str], problem: str) -> None:
        assert any(p.startswith(problem) for p in problems(settings)), problems(settings)

    @pytest.mark.parametrize(
        ("schedule", "expected", "grace"),
        [
            ("0 * * * *", "3600", "1800"),
            ("*/15 * * * *", "900", "1620"),  # budget 1500 + 120 > half of 900
            ("30 2 * * *", "86400", "43200"),
            ("0 */6 * * *", "21600", "10800"),
            ("0 3 * * MON", "604800", "302400"),
            ("every 5 minutes", "300", "1620"),
            ("* * * * *", "60", "1620"),
        ],
    )
    def test_a_fixed_period_schedule_sets_the_expected_interval(
        self, schedule: str, expected: str, grace: str, capsys
    ) -> None:
        s = example({"SCHEDULE": schedule})
        assert s.values["SMART_RESUME_EXPECTED_EVERY_SECONDS"] == expected
        assert s.values["SMART_RESUME_GRACE_SECONDS"] == grace
        assert f"runs every {expected} s" in capsys.readouterr().err

    @pytest.mark.parametrize(
        "schedule", ["*/7 * * * *", "0 */5 * * *", "0 9 * * 1-5", "0 0 1 * *", "0,20 * * * *"]
    )
    def test_an_irregular_schedule_is_not_guessed(self, schedule: str, capsys) -> None:
        s = example({"SCHEDULE": schedule})
        assert "SMART_RESUME_EXPECTED_EVERY_SECONDS" not in s.values
        assert "SMART_RESUME_GRACE_SECONDS" not in s.values
        assert "has no fixed period, so no expected interval is guessed" in capsys.readouterr().err

    def test_an_explicit_interval_wins_and_none_turns_it_off(self) -> None:
        found = example({"SMART_RESUME_EXPECTED_EVERY_SECONDS": "5400"}).values
        assert found["SMART_RESUME_EXPECTED_EVERY_SECONDS"] == "5400"
        assert "SMART_RESUME_GRACE_SECONDS" not in found  # the function's default: half
        found = example({"SMART_RESUME_EXPECTED_EVERY_SECONDS": "none"}).values
        assert "SMART_RESUME_EXPECTED_EVERY_SECONDS" not in found
        assert "SMART_RESUME_GRACE_SECONDS" not in found
        found = example({"SMART_RESUME_GRACE_SECONDS": "60"}).values
        assert found["SMART_RESUME_EXPECTED_EVERY_SECONDS"] == "3600"
        assert found["SMART_RESUME_GRACE_SECONDS"] == "60"

    @pytest.mark.parametrize(
        ("spec", "seconds"),
        [
            ("*/15 * * * *", 900),
            ("0,15,30,45 * * * *", 900),
            ("0-59/30 * * * *", 1800),
            ("5/20 * * * *", 1200),
            ("0 0 * * 0,7", 604800),
            ("0 0 * * sun", 604800),
            ("0 12 * * *", 86400),
            ("every 2 hours", 7200),
            ("every 1 min", 60),
            ("EVERY  3   HRS", 10800),
            ("every 0 minutes", None),
            ("0 9 * * mon-fri", None),
            ("0 0 1 * *", None),
            ("0 0 * 1 *", None),
            ("60 * * * *", None),
            ("*/0 * * * *", None),
            ("5- * * * *", None),
            ("x * * * *", None),
            ("0 * * *", None),
            ("every other day", None),
        ],
    )
    def test_schedule_periods(self, spec: str, seconds: int | None) -> None:
        assert schedule.period(spec) == seconds

    def test_test_like_values_are_warned_about(self) -> None:
        """A lease or heartbeat under a minute, the outbox transport, the example's my-project
        and example.com, the demo's pipeline: one warning each, naming the setting and its
        source; deployed anyway."""
        s = example(
            {
                "SMART_RESUME_LEASE_SECONDS": "10",
                "SMART_RESUME_HEARTBEAT_SECONDS": "1",
                "EMAIL_TRANSPORT": "outbox",
            }
        )
        assert s.values["SMART_RESUME_LEASE_SECONDS"] == "10"
        expected = [
            "SMART_RESUME_LEASE_SECONDS=10 (command line) is under a minute, a test value: "
            "another run takes the lock over after one slow heartbeat (default 300)",
            "SMART_RESUME_HEARTBEAT_SECONDS=1 (command line) is under a minute, a test value: "
            "the lock is written that often for the whole run (default 60)",
            "SMART_RESUME_EMAIL_TRANSPORT=outbox (from EMAIL_TRANSPORT, command line): reports "
            "are written to the instance's temporary disk and lost with it, never emailed; set "
            "EMAIL_TRANSPORT=sendgrid (with SENDGRID_SECRET_NAME) or ses",
            f"PROJECT_ID=my-project ({example_line('PROJECT_ID')}) holds my-project",
            f"SERVICE_ACCOUNT=smart-resume@my-project.iam.gserviceaccount.com"
            f" ({example_line('SERVICE_ACCOUNT')}) holds my-project",
            f"OIDC_SERVICE_ACCOUNT=smart-resume-scheduler@my-project.iam."
            f"gserviceaccount.com ({example_line('OIDC_SERVICE_ACCOUNT')}) holds my-project",
            "SMART_RESUME_EMAIL_FROM=smart-resume@example.com (from EMAIL_FROM, "
            f"{example_line('EMAIL_FROM')}) has an example.com address",
            "SMART_RESUME_EMAIL_TO=ops@example.com,oncall@example.com (from EMAIL_TO, "
            f"{example_line('EMAIL_TO')}) has an example.com address",
            "the pipeline pipeline.toml (default) runs the demo's operations (examples/)",
        ]
        assert len(s.warnings) == len(expected), s.warnings
        for line, start in zip(s.warnings, expected, strict=True):
            assert line.startswith(start), (line, start)

    @pytest.mark.parametrize(
        ("settings", "source"),
        [
            ({"EMAIL_TRANSPORT": "LOG"}, "from EMAIL_TRANSPORT, command line"),
            (
                {
                    "EMAIL_TRANSPORT": "",
                    "SENDGRID_SECRET_NAME": "",
                    "EMAIL_FROM": "",
                    "EMAIL_TO": "",
                },
                "default without SENDGRID_SECRET_NAME",
            ),
        ],
    )
    def test_the_log_transport_is_warned_about(self, settings: dict[str, str], source: str) -> None:
        """Set, or the default without a SendGrid secret: in production reports are only logged."""
        assert [w for w in example(settings).warnings if "TRANSPORT" in w] == [
            f"SMART_RESUME_EMAIL_TRANSPORT=log ({source}): reports are only logged, never "
            "emailed; set EMAIL_TRANSPORT=sendgrid (with SENDGRID_SECRET_NAME) or ses"
        ]

    @pytest.mark.parametrize(
        ("name", "value", "warned"),
        [
            ("SMART_RESUME_LEASE_SECONDS", "3e1", True),  # read as the functions read it: 30 s
            ("SMART_RESUME_LEASE_SECONDS", " 30", True),
            ("SMART_RESUME_HEARTBEAT_SECONDS", "59.9", True),
            ("TIME_BUDGET_SECONDS", "30", True),
            ("SMART_RESUME_HEARTBEAT_SECONDS", "60", False),
            ("PROJECT_ID", "my-project-2", False),
            ("PROJECT_ID", "not-my-project", False),
            ("SERVICE_ACCOUNT", "sa@my-project.iam.gserviceaccount.com", True),
            ("EMAIL_TO", "ops@acme.io,x@Example.ORG", True),
            ("EMAIL_TO", "ops@example.community", False),
        ],
    )
    def test_what_looks_like_a_test_value(self, name: str, value: str, warned: bool) -> None:
        settings = {"PROJECT_ID": "acme", "SERVICE_ACCOUNT": "sa@acme.iam.gserviceaccount.com"}
        settings |= {"OIDC_SERVICE_ACCOUNT": "s@acme.iam.gserviceaccount.com"}
        settings |= {"EMAIL_FROM": "a@acme.io", "EMAIL_TO": "b@acme.io", name: value}
        try:
            found = example(settings).warnings
        except SettingsError as refused:  # a lease under the heartbeat: said all the same
            found = tuple(refused.warnings)
        assert any(f"={value} (" in w for w in found) == warned, found


# --- the commands, as data ----------------------------------------------------------------


class TestCommands:
    def test_the_example_s_deploy(self, tmp_path: Path) -> None:
        """Indexes, both functions, the invoker role, the job (update or create), the stale
        jobs, then the job run once and its answer read."""
        dry = Dry(tmp_path)
        trigger = dry.one("deploy the trigger")
        assert trigger.argv[:4] == ("gcloud", "functions", "deploy", "smart-resume")
        for flag_ in (
            "--gen2",
            "--runtime=python312",
            "--region=europe-west1",
            "--project=my-project",
            "--trigger-http",
            "--entry-point=smart_resume",
            f"--source={tmp_path}/smart_resume",
            "--service-account=smart-resume@my-project.iam.gserviceaccount.com",
            "--set-secrets=SMART_RESUME_WEBHOOK_SECRET=smart-resume-webhook:1,"
            "SENDGRID_API_KEY=smart-resume-sendgrid:1",
            "--timeout=1620s",
            "--max-instances=1",
            "--concurrency=4",
            "--cpu=1",
            "--memory=512Mi",
            "--no-allow-unauthenticated",
        ):
            assert flag_ in trigger.argv, flag_
        assert trigger.files == [
            tmp_path / "trigger.env.yaml",
            tmp_path / "smart_resume",
        ]
        # The variables go in a file, each value JSON-quoted: no delimiter to pick or escape.
        assert env_vars(trigger) == {
            "GOOGLE_CLOUD_PROJECT": "my-project",
            "SMART_RESUME_EMAIL_FROM": "smart-resume@example.com",
            "SMART_RESUME_EMAIL_ON": "activity",
            "SMART_RESUME_EMAIL_TO": "ops@example.com,oncall@example.com",
            "SMART_RESUME_EMAIL_TRANSPORT": "sendgrid",
            "SMART_RESUME_EXPECTED_EVERY_SECONDS": "3600",
            "SMART_RESUME_GRACE_SECONDS": "1800",
            "SMART_RESUME_LOCK_NAME": "smart-resume",
            "SMART_RESUME_TIME_BUDGET_SECONDS": "1500",
        }
        # Least privilege: the status function gets the webhook secret only, no email setting.
        status = dry.one("deploy the status function")
        assert status.argv[3] == "smart-resume-status"
        assert not any("EMAIL" in name for name in env_vars(status))
        assert flag(status, "set-secrets") == "SMART_RESUME_WEBHOOK_SECRET=smart-resume-webhook:1"
        for flag_ in (
            "--entry-point=smart_resume_status",
            f"--source={tmp_path}/smart_resume_status",
            "--no-allow-unauthenticated",
            "--max-instances=3",
            "--memory=256Mi",
        ):
            assert flag_ in status.argv, flag_
        assert not [a for a in status.argv if a.startswith(("--timeout", "--concurrency"))]
        assert flag(dry.one("grant the invoker role"), "member") == (
            "serviceAccount:smart-resume-scheduler@my-project.iam.gserviceaccount.com"
        )
        assert dry.printed[len(INDEX_COMMANDS) + 3 :] == [
            "gcloud functions describe smart-resume --gen2 --region=europe-west1 "
            "--project=my-project '--format=value(serviceConfig.uri)'",
            "gcloud secrets versions access 1 --secret=smart-resume-webhook --project=my-project",
            "gcloud scheduler jobs describe smart-resume --location=europe-west1 "
            "--project=my-project --format=none",
            "gcloud scheduler jobs update http smart-resume --location=europe-west1 "
            "--project=my-project '--schedule=0 * * * *' --time-zone=Europe/Paris "
            "--uri=https://europe-west1-my-project.cloudfunctions.net/smart-resume "
            "--http-method=POST --attempt-deadline=1620s --max-retry-attempts=0 "
            f"--flags-file={tmp_path}/job-update.flags.json "
            "--oidc-service-account-email=smart-resume-scheduler@my-project.iam.gserviceaccount.com",
            "gcloud scheduler jobs create http smart-resume --location=europe-west1 "
            "--project=my-project '--schedule=0 * * * *' --time-zone=Europe/Paris "
            "--uri=https://europe-west1-my-project.cloudfunctions.net/smart-resume "
            "--http-method=POST --attempt-deadline=1620s --max-retry-attempts=0 "
            f"--flags-file={tmp_path}/job-create.flags.json "
            "--oidc-service-account-email=smart-resume-scheduler@my-project.iam.gserviceaccount.com",
            "gcloud scheduler jobs list --location=europe-west1 --project=my-project "
            """'--filter=name~"/jobs/smart-resume(-shard-[0-9]+)?$"' '--format=value(name)'""",
            "gcloud scheduler jobs delete smart-resume-shard-0 --location=europe-west1 "
            "--project=my-project --quiet",
            "gcloud functions describe smart-resume-status --gen2 --region=europe-west1 "
            "--project=my-project '--format=value(serviceConfig.uri)'",
            "gcloud auth print-identity-token",
            "gcloud scheduler jobs run smart-resume --location=europe-west1 --project=my-project",
        ]
        # A dry run's secret header: masked, in a file only this user reads.
        for verb, header in (("update", "update-headers"), ("create", "headers")):
            job = dry.one(f"{verb} the job")
            assert flag(job, header) == "X-Webhook-Secret=***"
            assert stat.S_IMODE(job.files[0].stat().st_mode) == 0o600
        comments = [step for step in dry.steps if isinstance(step, str)]
        assert comments == [
            "dry run: these are the commands a deploy runs; none is run",
            "the job exists:",
            "the job does not exist yet:",
            "each job it lists other than smart-resume is deleted, e.g. smart-resume-shard-0:",
            "then: wait up to 300 s for that run's answer on "
            "https://europe-west1-my-project.cloudfunctions.net/smart-resume-status?runs=10",
            "dry run: nothing was deployed",
        ]
        assert dry.out.rstrip().endswith("# dry run: nothing was deployed")
        assert "monitoring" not in dry.out  # no ALERT_CHANNEL: no uptime check, no policy

    @pytest.mark.parametrize(
        ("budget", "max_run", "seconds"),
        [("60", "", 180), ("600", "", 720), ("1500", "", 1620), ("1680", "3400", 1800)],
    )
    def test_timeout_and_attempt_deadline_are_budget_plus_the_finishing_margin(
        self, tmp_path: Path, budget: str, max_run: str, seconds: int
    ) -> None:
        """The trigger may run budget + 120 s, and the Scheduler waits exactly as long."""
        settings = {"TIME_BUDGET_SECONDS": budget, "SMART_RESUME_MAX_RUN_SECONDS": max_run}
        dry = Dry(tmp_path, settings)
        assert f"--timeout={seconds}s" in dry.one("deploy the trigger").argv
        for verb in ("create", "update"):
            job = dry.one(f"{verb} the job").argv
            assert f"--attempt-deadline={seconds}s" in job and "--max-retry-attempts=0" in job

    def test_without_oidc_the_trigger_can_be_public(self, tmp_path: Path) -> None:
        """ALLOW_UNAUTHENTICATED=1 without OIDC opens only the trigger and clears the job token."""
        dry = Dry(tmp_path, {"OIDC_SERVICE_ACCOUNT": "", "ALLOW_UNAUTHENTICATED": "1"})
        assert "--allow-unauthenticated" in dry.one("deploy the trigger").argv
        assert "--no-allow-unauthenticated" in dry.one("deploy the status function").argv
        assert not dry.all("grant the invoker role")
        assert "--oidc-service-account-email" not in dry.out
        assert "--clear-auth-token" in dry.one("update the job").argv
        assert "--clear-auth-token" not in dry.one("create the job").argv

    def test_the_indexes_come_first(self, tmp_path: Path) -> None:
        """The composite indexes and exemptions of firestore.indexes.json, before the first
        function; `claim` on clients stays indexed (it is queried)."""
        dry = Dry(tmp_path)
        assert dry.printed[: len(INDEX_COMMANDS)] == INDEX_COMMANDS
        assert dry.commands[len(INDEX_COMMANDS)].purpose == "deploy the trigger"
        assert sum("firestore" in c for c in dry.printed) == len(INDEX_COMMANDS)
        assert {c.how for c in dry.all("create a composite index")} == {"index"}
        assert not [c for c in dry.printed if " claim " in f" {c} "]
        other = Dry(tmp_path, {"DATABASE": "reports-eu"})
        indexes = [c for c in other.printed if c.startswith("gcloud firestore ")]
        assert len(indexes) == len(INDEX_COMMANDS)
        assert all(" --database=reports-eu " in c for c in indexes)
        assert "(default)" not in "\n".join(other.printed)

    @pytest.mark.parametrize(
        ("concurrency", "memory"), [("2", "1Gi"), ("1000", "4Gi"), ("16", "768Mi")]
    )
    def test_trigger_concurrency_and_memory_reach_the_trigger_only(
        self, tmp_path: Path, concurrency: str, memory: str
    ) -> None:
        dry = Dry(tmp_path, {"TRIGGER_CONCURRENCY": concurrency, "TRIGGER_MEMORY": memory})
        trigger = " ".join(dry.one("deploy the trigger").argv)
        assert f" --concurrency={concurrency} --cpu=1 --memory={memory} " in trigger
        status = dry.one("deploy the status function").argv
        assert "--memory=256Mi" in status
        assert not [a for a in status if a.startswith("--concurrency")]

    def test_secrets_reach_only_the_function_that_reads_them(self, tmp_path: Path) -> None:
        """The ping URL, the AWS keys and the operations' header secrets: the trigger only."""
        dry = Dry(
            tmp_path,
            {
                "PING_SECRET_NAME": "smart-resume-ping",
                "PING_SECRET_VERSION": "3",
                "EMAIL_TRANSPORT": "ses",
                "AWS_REGION": "eu-west-1",
                "AWS_ACCESS_KEY_SECRET_NAME": "aws-id",
                "AWS_SECRET_KEY_SECRET_NAME": "aws-key",
                "HEADER_SECRETS": "LEADS_TOKEN=leads-token,OTHER=o-2,",
            },
        )
        trigger = dry.one("deploy the trigger")
        assert flag(trigger, "set-secrets").split(",") == [
            "SMART_RESUME_WEBHOOK_SECRET=smart-resume-webhook:1",
            "SENDGRID_API_KEY=smart-resume-sendgrid:1",
            "SMART_RESUME_PING_URL=smart-resume-ping:3",
            "AWS_ACCESS_KEY_ID=aws-id:latest",
            "AWS_SECRET_ACCESS_KEY=aws-key:latest",
            "LEADS_TOKEN=leads-token:latest",
            "OTHER=o-2:latest",
        ]
        assert env_vars(trigger)["AWS_REGION"] == "eu-west-1"
        status = dry.one("deploy the status function")
        assert flag(status, "set-secrets") == "SMART_RESUME_WEBHOOK_SECRET=smart-resume-webhook:1"
        assert "AWS_REGION" not in env_vars(status)

    def test_hostile_values_reach_the_functions_as_written(self, tmp_path: Path) -> None:
        """A value holding delimiters, quotes and a newline-free variable assignment deploys as
        written: the env-vars file JSON-quotes it, and the shown command quotes it for a shell."""
        hostile = "lk|x;y~z#SMART_RESUME_RELOAD_MODULE=1 'q'"
        dry = Dry(tmp_path, {"LOCK_NAME": hostile})
        for purpose in ("deploy the trigger", "deploy the status function"):
            found = env_vars(dry.one(purpose))
            assert found["SMART_RESUME_LOCK_NAME"] == hostile
            assert "SMART_RESUME_RELOAD_MODULE" not in found
        listing = settings_listing(dry.out)
        assert listing["SMART_RESUME_LOCK_NAME"][0] == hostile

    @pytest.mark.parametrize(
        ("word", "shown"),
        [
            ("--a=b,c:d/e@f%g+h^i*j", "--a=b,c:d/e@f%g+h^i*j"),
            ("", "''"),
            ("it's", "'it'\\''s'"),
            ("--schedule=0 * * * *", "'--schedule=0 * * * *'"),
            ("$HOME", "'$HOME'"),
            ("--format=value(name)", "'--format=value(name)'"),
        ],
    )
    def test_a_shown_word_reads_back_as_itself(self, word: str, shown: str) -> None:
        """Quoted only when a shell would read it otherwise, so the output can be copied."""
        assert quote(word) == shown
        assert shlex.split(shown) == [word]

    def test_run_after_deploy_0_starts_no_production_run(self, tmp_path: Path, capsys) -> None:
        dry = Dry(tmp_path, {"RUN_AFTER_DEPLOY": "0"})
        assert not dry.all("run the job once")
        assert dry.steps[-1] == "dry run: nothing was deployed"
        assert "not running the job now (RUN_AFTER_DEPLOY=0)" in capsys.readouterr().err
        assert Dry(tmp_path).all("run the job once")


class TestExample:
    def test_every_setting_is_documented(self) -> None:
        """Each setting deploy.sh reads has a line in the example."""
        documented = set(re.findall(r"^#?([A-Z][A-Z0-9_]*)=", EXAMPLE.read_text(), re.M))
        assert {*REQUIRED, *OPTIONAL, *SHORT_NAMES} - documented == set()

    def test_the_example_shows_the_defaults(self, tmp_path: Path) -> None:
        """Uncommenting the example's settings of the trigger, indexes and shards changes no
        command: they are the defaults."""
        text = EXAMPLE.read_text()
        for name in NEW_SETTINGS:
            text, n = re.subn(rf"^#({name}=)", r"\1", text, flags=re.M)
            assert n == 1, name
        uncommented = tmp_path / "uncommented.env"
        uncommented.write_text(text)
        assert Dry(tmp_path, env_file=uncommented).printed == Dry(tmp_path).printed


class TestHelp:
    def test_the_help_says_what_the_code_does(self) -> None:
        """Every option the parser takes, the settings it requires and the exit statuses."""
        assert cli("--help").stdout == HELP + "\n"
        assert cli("-h", "--force").returncode == 0
        for word in ("stage", "deploy", "--dry-run", "--build-dir", "--env-file", "KEY=VALUE"):
            assert word in HELP
        assert " ".join(REQUIRED) in " ".join(HELP.split())
        for status in ("0 done", "1 a command failed", "2 bad", "3 gcloud not installed"):
            assert status in " ".join(HELP.split())
        assert "Firestore indexes" in HELP

    @pytest.mark.parametrize(
        "args", [["--force"], ["foo"], ["--build-dir"], ["--dry"], ["deploy", "--env-file"]]
    )
    def test_a_bad_argument_is_a_usage_error(self, args: list[str]) -> None:
        result = cli(*args)
        assert result.returncode == 2
        assert result.stderr.startswith("deploy.sh: ") and "(see --help)" in result.stderr

    def test_missing_gcloud_is_a_clear_error(
        self, path_without_gcloud: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """A real deploy without gcloud on PATH stops before staging, saying how to install it."""
        monkeypatch.setenv("PATH", path_without_gcloud)
        result = cli("--env-file", str(EXAMPLE), "--build-dir", str(tmp_path / "b"))
        assert result.returncode == 3
        assert "deploy.sh: gcloud is not installed or not on PATH" in result.stderr
        assert "cloud.google.com/sdk/docs/install" in result.stderr
        assert result.stdout == "" and not (tmp_path / "b").exists()


ALERT = {"ALERT_CHANNEL": "1234567890"}
CHANNEL = "projects/my-project/notificationChannels/1234567890"
#: The Scheduler jobs of a deploy with SHARDS=3 and the example's SCHEDULER_JOB.
SHARD_JOBS = [f"smart-resume-shard-{k}" for k in range(3)]
#: The --filter of the job list: the smart-resume job and its shard jobs.
FAMILY_FILTER = 'name~"/jobs/smart-resume(-shard-[0-9]+)?$"'


class TestAlerting:
    def test_the_uptime_check_and_the_policy(self, tmp_path: Path) -> None:
        dry = Dry(tmp_path, ALERT)
        binding = dry.one("grant the invoker role", "smart-resume-status")
        assert flag(binding, "member") == (
            "serviceAccount:service-PROJECT_NUMBER@gcp-sa-monitoring-notification.iam."
            "gserviceaccount.com"
        )
        create = dry.one("create the uptime check")
        assert create.argv[4] == "smart-resume-status health"
        for name, value in (
            ("resource-type", "uptime-url"),
            (
                "resource-labels",
                "host=europe-west1-my-project.cloudfunctions.net,project_id=my-project",
            ),
            ("protocol", "https"),
            ("path", "/smart-resume-status?check=health"),
            ("headers", "X-Webhook-Secret=***"),
            ("mask-headers", "true"),
            ("service-agent-auth", "oidc-token"),
            ("status-classes", "2xx"),
        ):
            assert flag(create, name) == value, name
        update = dry.one("update the uptime check")
        assert update.argv[4] == "projects/my-project/uptimeCheckConfigs/CHECK_ID"
        assert flag(update, "update-headers") == "X-Webhook-Secret=***"
        assert flag(update, "path") == "/smart-resume-status?check=health"
        assert update.how == create.how == "masked"
        for verb in ("create", "update"):
            policy = json.loads(flag(dry.one(f"{verb} the alert policy"), "policy"))
            assert policy["displayName"] == "smart-resume-status health"
            assert policy["notificationChannels"] == [CHANNEL]
            condition = policy["conditions"][0]["conditionThreshold"]
            assert 'metric.label.check_id="CHECK_ID"' in condition["filter"]
            assert "uptime_check/check_passed" in condition["filter"]
            assert condition["duration"] == "60s" and condition["comparison"] == "COMPARISON_GT"
        # Found by display name first, so a redeploy updates instead of adding more.
        for lister in ("find the uptime check", "find the alert policy"):
            assert flag(dry.one(lister), "filter") == 'displayName="smart-resume-status health"'
        assert [s for s in dry.steps if isinstance(s, str) and "exist" in s] == [
            "the job exists:",
            "the job does not exist yet:",
            "the uptime check exists:",
            "the uptime check does not exist yet:",
            "the alert policy exists:",
            "the alert policy does not exist yet:",
        ]
        # A full channel name is taken as it is.
        full = Dry(tmp_path, {"ALERT_CHANNEL": CHANNEL})
        policy = json.loads(flag(full.one("create the alert policy"), "policy"))
        assert policy["notificationChannels"] == [CHANNEL]
        assert full.settings.alert_channel == CHANNEL

    @pytest.mark.parametrize(
        ("url", "host", "path"),
        [
            ("https://h.run.app", "h.run.app", "/"),
            ("https://h.run.app/", "h.run.app", "/"),
            ("https://r-p.cloudfunctions.net/fn/", "r-p.cloudfunctions.net", "/fn"),
        ],
    )
    def test_the_check_s_host_and_path(self, url: str, host: str, path: str) -> None:
        from deploy.commands import host_and_path

        assert host_and_path(url) == (host, path)


class TestShards:
    def test_one_job_per_shard(self, tmp_path: Path) -> None:
        """SHARDS=3: three jobs POSTing {"shard": K} as JSON with the same headers and OIDC,
        the trigger on up to three instances, SMART_RESUME_SHARDS on both functions, the stale
        jobs deleted once the wanted ones exist, and each shard's job run once."""
        dry = Dry(tmp_path, {"SHARDS": "3"})
        trigger = dry.one("deploy the trigger")
        for wanted in ("--max-instances=3", "--concurrency=4", "--cpu=1", "--memory=512Mi"):
            assert wanted in trigger.argv, wanted
        assert env_vars(trigger)["SMART_RESUME_SHARDS"] == "3"
        status = dry.one("deploy the status function")
        assert env_vars(status)["SMART_RESUME_SHARDS"] == "3"
        assert "--max-instances=3" in status.argv  # its own limit, not the trigger's
        unsharded = [c for c in dry.commands if "jobs" in c.argv and "smart-resume" in c.argv[4:6]]
        assert [c.purpose for c in unsharded] == ["delete a job no longer wanted"]
        for k, name in enumerate(SHARD_JOBS):
            dry.one("does the job exist", name)
            for verb, header in (("update", "update-headers"), ("create", "headers")):
                job = dry.one(f"{verb} the job", name)
                assert json.loads(flag(job, "message-body")) == {"shard": k}
                assert flag(job, header) == "X-Webhook-Secret=***,Content-Type=application/json"
                for same in (
                    "--schedule=0 * * * *",
                    "--uri=https://europe-west1-my-project.cloudfunctions.net/smart-resume",
                    "--http-method=POST",
                    "--attempt-deadline=1620s",
                    "--max-retry-attempts=0",
                    "--oidc-service-account-email=smart-resume-scheduler@my-project.iam."
                    "gserviceaccount.com",
                ):
                    assert same in job.argv, (verb, same)
            assert dry.one("run the job once", name).argv[4:] == (
                name,
                "--location=europe-west1",
                "--project=my-project",
            )
        lister = dry.one("list the jobs")
        assert (flag(lister, "filter"), flag(lister, "format")) == (FAMILY_FILTER, "value(name)")
        deletes = [c.argv[4] for c in dry.all("delete a job no longer wanted")]
        assert deletes == ["smart-resume", "smart-resume-shard-3"]
        assert "each job it lists other than smart-resume-shard-0..smart-resume-shard-2 is " in (
            dry.out
        )
        order = [c.purpose for c in dry.commands]
        assert order.index("list the jobs") > max(
            i for i, p in enumerate(order) if p.endswith("the job")
        )
        assert max(i for i, p in enumerate(order) if p.startswith("delete")) < order.index(
            "run the job once"
        )
        assert "# then: wait up to 300 s for one of those runs' answer" in dry.out

    @pytest.mark.parametrize("settings", [{"SHARDS": "1"}, {"SMART_RESUME_SHARDS": "1"}])
    def test_one_shard_is_an_unsharded_deploy(self, tmp_path: Path, settings: dict[str, str]):
        """SHARDS=1 prints exactly what a deploy without it prints: one job named
        SCHEDULER_JOB without a body, one instance, no SMART_RESUME_SHARDS; the shard jobs of
        an earlier deploy are deleted."""
        default, one = Dry(tmp_path), Dry(tmp_path, settings)
        assert (one.settings.values["SHARDS"], one.settings.sources["SHARDS"]) == (
            "1",
            "command line" if "SHARDS" in settings else "from SMART_RESUME_SHARDS, command line",
        )
        assert one.printed == default.printed
        assert "SMART_RESUME_SHARDS" not in env_vars(default.one("deploy the trigger"))
        assert "--max-instances=1" in default.one("deploy the trigger").argv
        assert "--message-body" not in default.out and "Content-Type" not in default.out
        jobs = ("gcloud scheduler jobs list ", "gcloud scheduler jobs delete ")
        assert "-shard-" not in "".join(c for c in default.printed if not c.startswith(jobs))
        assert flag(default.one("list the jobs"), "filter") == FAMILY_FILTER
        assert default.one("delete a job no longer wanted").argv[4] == "smart-resume-shard-0"

    def test_shards_given_twice_must_agree(self, tmp_path: Path) -> None:
        same = Dry(tmp_path, {"SHARDS": "2", "SMART_RESUME_SHARDS": "2"})
        assert "--max-instances=2" in same.one("deploy the trigger").argv
        assert same.settings.sources["SMART_RESUME_SHARDS"] == "command line"

    def test_stale_jobs_are_this_deployment_s_only(self, tmp_path: Path) -> None:
        """Of the jobs listed (full names), those of this family that are not wanted."""
        from deploy.commands import stale_jobs

        listed = "\n".join(
            f"projects/p/locations/l/jobs/{name}"
            for name in (
                "smart-resume",
                "smart-resume-shard-1",
                "smart-resume-shard-3",
                "smart-resume-other",
                "old-smart-resume",
                "smart-resume-shard-",
            )
        )
        three = example({"SHARDS": "3"})
        assert [c.argv[4] for c in stale_jobs(three, listed)] == [
            "smart-resume",
            "smart-resume-shard-3",
        ]
        assert [c.argv[4] for c in stale_jobs(example(), listed)] == [
            "smart-resume-shard-1",
            "smart-resume-shard-3",
        ]


# --- the real gcloud's parser -------------------------------------------------------------

GCLOUD = shutil.which("gcloud")
needs_gcloud = pytest.mark.skipif(GCLOUD is None, reason="the Google Cloud CLI is not installed")
#: What gcloud says when a command has parsed and passed its local checks and first needs
#: credentials. With an empty configuration and no credentials in the environment it stops
#: there, before any API call: the real parser accepted every flag and value.
PARSED = "You do not currently have an active account selected"
_parsed: dict[str, str | None] = {}
_parsed_lock = threading.Lock()


def gcloud_rejection(printed: str, scratch: Path) -> str | None:
    """None when the real gcloud parses `printed` (a command as shown), else why not. Runs
    with a fresh configuration and a minimal environment: no account, no project, no
    credentials, no metadata-server probe, no prompt, so nothing reaches the network."""
    with _parsed_lock:
        if printed in _parsed:
            return _parsed[printed]
    args = shlex.split(printed)
    assert args[0] == "gcloud", printed
    home = scratch / f"gcloud-{abs(hash(printed))}"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "CLOUDSDK_CONFIG": str(home / "config"),
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
        "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
    }
    result = subprocess.run(
        [str(GCLOUD), *args[1:]],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    why = None
    if result.returncode != 1 or PARSED not in result.stderr:
        why = f"{printed}\n  exit {result.returncode}: {result.stderr.strip()}"
    with _parsed_lock:
        _parsed[printed] = why
    return why


@pytest.fixture(scope="module")
def staged_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's bundles, staged once: the folders the printed commands name."""
    return bundle.stage(ROOT, str(tmp_path_factory.mktemp("parsed") / "build"), {})


@needs_gcloud
class TestGcloudParses:
    """Every command a deploy prints passes the real gcloud's argument parser (four at a
    time), so a flag gcloud would refuse is found here, not by a deploy."""

    def parses(self, printed: list[str], scratch: Path) -> None:
        assert printed
        with ThreadPoolExecutor(max_workers=4) as pool:
            rejected = [w for w in pool.map(lambda c: gcloud_rejection(c, scratch), printed) if w]
        assert not rejected, "\n".join(rejected)

    def test_the_check_refuses_what_gcloud_refuses(self, staged_build: Path) -> None:
        for bad in (
            "gcloud functions deploy f --gen2 --region=r --project=p --concurrency=0",
            "gcloud functions deploy f --gen2 --region=r --project=p --cpu=1",
            "gcloud firestore indexes fields update f --collection-group=g --disable-index",
        ):
            assert gcloud_rejection(bad, staged_build.parent), bad

    @pytest.mark.parametrize(
        ("settings", "count"),
        [
            ({}, 13),
            ({**ALERT, "PING_SECRET_NAME": "smart-resume-ping", "PING_SECRET_VERSION": "2"}, 21),
            # Functions and URL (4), secret, 3 x (describe, update, create), list, 2 deletes,
            # status URL, token, 3 runs.
            ({"SHARDS": "3"}, 4 + 1 + 9 + 1 + 2 + 2 + 3),
            ({"TRIGGER_CONCURRENCY": "2", "TRIGGER_MEMORY": "1Gi"}, 13),
            ({"TRIGGER_CONCURRENCY": "1000", "TRIGGER_MEMORY": "4Gi"}, 13),
            (
                {
                    "TRIGGER_MEMORY": "768Mi",
                    "OIDC_SERVICE_ACCOUNT": "",
                    "ALLOW_UNAUTHENTICATED": "1",
                },
                12,
            ),
        ],
    )
    def test_every_printed_command(
        self, staged_build: Path, settings: dict[str, str], count: int
    ) -> None:
        printed = Dry(staged_build, settings).printed
        assert len(printed) == len(INDEX_COMMANDS) + count
        self.parses(printed, staged_build.parent)

    def test_the_job_filter_selects_the_family_only(self) -> None:
        """The list's --filter, evaluated by gcloud's own filter code: this deployment's jobs,
        sharded or not, and no other job with a similar name."""
        sdk_lib = Path(GCLOUD).resolve().parent.parent / "lib"
        names = {
            "smart-resume": True,
            "smart-resume-shard-0": True,
            "smart-resume-shard-12": True,
            "smart-resume-shard-": False,
            "smart-resume-other": False,
            "old-smart-resume": False,
            "smart-resume-shard-1-copy": False,
        }
        code = textwrap.dedent(
            """\
            import json, sys
            from googlecloudsdk.core.resource import resource_filter
            f = resource_filter.Compile(sys.argv[1])
            prefix = "projects/my-project/locations/europe-west1/jobs/"
            print(json.dumps({n: f.Evaluate({"name": prefix + n}) for n in sys.argv[2:]}))
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", code, FAMILY_FILTER, *names],
            env={**os.environ, "PYTHONPATH": str(sdk_lib)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == names


# --- staging ------------------------------------------------------------------------------


def bundle_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def runtime_files(folder: Path, prefix: str) -> set[str]:
    """The files of a source folder that belong in a bundle (no caches, no tests)."""
    found = set()
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if not p.is_file() or p.suffix in (".pyc", ".pyo") or FORBIDDEN & set(rel.parts):
            continue
        if p.name.startswith("test_") or p.name.endswith("_test.py") or p.name == "conftest.py":
            continue
        found.add(f"{prefix}/{rel.as_posix()}")
    return found


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    """A repository (deploy.sh and deploy/ in it) with a python operation in examples/, caches,
    tests and a .venv around it."""
    repo = tmp_path / "repo"
    for fn in FUNCTIONS:
        (repo / "functions" / fn).mkdir(parents=True)
        shutil.copy(ROOT / "functions" / fn / "main.py", repo / "functions" / fn / "main.py")
    shutil.copy(SCRIPT, repo / "deploy.sh")
    for name in ("requirements.txt", "firestore.indexes.json"):
        shutil.copy(ROOT / name, repo / name)
    for package in ("shared", "deploy"):
        shutil.copytree(
            ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    files = {
        "pipeline.toml": """\
            fresh_hours = 24

            [[operation]]
            name = "lead_scoring"
            kind = "http"
            url = "http://127.0.0.1:9000/score"

            [[operation]]
            name = "post_scoring"
            kind = "python"
            target = "examples.ops:post_scoring"

            [[operation]]
            name = "stdlib"
            kind = "python"
            target = "json:dumps"
            """,
        "examples/__init__.py": "",
        "examples/ops.py": "def post_scoring(ctx):\n    return None\n",
        "examples/__pycache__/ops.cpython-311.pyc": "x",
        "examples/tests/test_ops.py": "",
        "examples/test_more.py": "",
        "shared/__pycache__/config.cpython-311.pyc": "x",
        "unrelated/__init__.py": "",
        "tests/test_x.py": "",
        ".venv/lib/site.py": "",
        "README.md": "",
        "deploy.env": "PROJECT_ID=p\n",
    }
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(textwrap.dedent(text))
    return repo


def stage(repo: Path, settings: dict[str, str] | None = None, env_file: str | None = None):
    """Stage `repo` in-process, as `./deploy.sh stage` there does (into repo/build)."""
    s = load("stage", as_args(settings), env_file, environ={}, root=repo)
    return bundle.stage(repo, str(repo / "build"), s.values)


class TestStage:
    def test_bundle_holds_exactly_the_runtime_files(self, fake_repo: Path, capsys) -> None:
        """Each bundle gets main.py, shared/, the pipeline, the package it names, requirements."""
        stage(fake_repo)
        expected = {"main.py", "requirements.txt", "pipeline.toml"}
        expected |= runtime_files(fake_repo / "shared", "shared")
        expected |= {"examples/__init__.py", "examples/ops.py"}
        for fn in FUNCTIONS:
            bundle_ = fake_repo / "build" / fn
            assert bundle_files(bundle_) == expected
            source = ROOT / "functions" / fn / "main.py"
            assert (bundle_ / "main.py").read_bytes() == source.read_bytes()
        assert (
            f"staged smart_resume smart_resume_status into {fake_repo / 'build'} "
            "(pipeline: pipeline.toml; with examples)"
        ) in capsys.readouterr().err

    def test_stage_replaces_a_previous_bundle_and_never_the_sources(self, fake_repo: Path):
        stale = fake_repo / "build" / "smart_resume" / "old.py"
        stale.parent.mkdir(parents=True)
        stale.write_text("")
        stage(fake_repo)
        assert not stale.exists()
        with pytest.raises(Failed, match="would overwrite the sources"):
            bundle.stage(fake_repo, str(fake_repo / "functions"), {})

    def test_a_custom_resume_module_is_staged(self, fake_repo: Path) -> None:
        """A local module named by SMART_RESUME_MODULE travels with the bundle."""
        (fake_repo / "myresume.py").write_text("def run_smart_resume(**kw):\n    pass\n")
        stage(fake_repo, {"SMART_RESUME_MODULE": "myresume"})
        assert (fake_repo / "build" / "smart_resume" / "myresume.py").is_file()
        assert not (fake_repo / "build" / "smart_resume" / "unrelated").exists()

    def test_a_custom_pipeline_bundles_only_what_it_names(self, fake_repo: Path, capsys) -> None:
        """SMART_RESUME_PIPELINE (from the settings file or an argument) is the one pipeline
        bundled, with the package its operation targets: neither pipeline.toml nor examples/,
        which it does not name."""
        files = {
            "custom/pipe.toml": (
                '[[operation]]\nname = "mine"\nkind = "python"\ntarget = "mypkg.ops:run"\n'
            ),
            "mypkg/__init__.py": "",
            "mypkg/ops.py": "def run(ctx):\n    return None\n",
            "mypkg/tests/test_ops.py": "",
        }
        for name, text in files.items():
            (fake_repo / name).parent.mkdir(parents=True, exist_ok=True)
            (fake_repo / name).write_text(text)
        custom = {"main.py", "requirements.txt", "custom/pipe.toml", "mypkg/__init__.py"}
        custom |= {"mypkg/ops.py"} | runtime_files(fake_repo / "shared", "shared")
        (fake_repo / "deploy.env").write_text("SMART_RESUME_PIPELINE=custom/pipe.toml\n")
        stage(fake_repo)
        for fn in FUNCTIONS:
            assert bundle_files(fake_repo / "build" / fn) == custom
        assert "(pipeline: custom/pipe.toml; with mypkg)" in capsys.readouterr().err
        (fake_repo / "deploy.env").write_text("PROJECT_ID=p\n")
        stage(fake_repo, {"SMART_RESUME_PIPELINE": "./custom/pipe.toml"})
        assert bundle_files(fake_repo / "build" / "smart_resume") == custom

    def test_an_invalid_pipeline_stops_the_stage(self, fake_repo: Path) -> None:
        """A pipeline file that is not TOML fails the stage with its name, before any deploy."""
        (fake_repo / "pipeline.toml").write_text("[[operation]\n")
        with pytest.raises(Failed, match=r"pipeline\.toml is not valid TOML") as failed:
            stage(fake_repo)
        assert failed.value.status == 1

    def test_without_a_pipeline_nothing_but_the_code_is_staged(self, fake_repo: Path, capsys):
        (fake_repo / "pipeline.toml").unlink()
        stage(fake_repo)
        assert "note: no pipeline.toml in" in capsys.readouterr().err
        assert "pipeline.toml" not in bundle_files(fake_repo / "build" / "smart_resume")

    def test_settings_of_a_repository_of_your_own(self, fake_repo: Path) -> None:
        """A production-like settings file and a pipeline of the user's own: no warning. The
        demo pipeline (here: an operation in examples/) and one under examples/ are warned."""
        (fake_repo / "production.env").write_text(PRODUCTION)
        found = example(env_file=fake_repo / "production.env", root=fake_repo).warnings
        assert [w for w in found if "examples" not in w and "local address" not in w] == []
        assert "the pipeline pipeline.toml (default) runs the demo's operations" in found[0]
        assert found[1] == (
            'the pipeline pipeline.toml has an operation url = "http://127.0.0.1:9000/score": '
            "a local address, which a deployed function cannot reach"
        )
        (fake_repo / "pipeline.toml").write_text(
            '[[operation]]\nname = "score"\nkind = "http"\nurl = "https://ops.acme.io/score"\n'
            '# url = "http://localhost:1/commented"\n'
        )
        assert example(env_file=fake_repo / "production.env", root=fake_repo).warnings == ()
        (fake_repo / "examples" / "demo.toml").write_text("")
        (fake_repo / "deploy.env").write_text(
            PRODUCTION + "SMART_RESUME_PIPELINE=examples/demo.toml\n"
        )
        line = len(PRODUCTION.splitlines()) + 1
        assert example(env_file=None, root=fake_repo).warnings == (
            f"SMART_RESUME_PIPELINE=examples/demo.toml (deploy.env:{line}) is under "
            "examples/, a demo pipeline: set your own (or none, for pipeline.toml)",
        )


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's own bundles, staged once for the module."""
    return bundle.stage(ROOT, str(tmp_path_factory.mktemp("build")), {})


def bundle_env(isolated_env: dict[str, str]) -> dict[str, str]:
    """The test settings, and nothing that would put the repository on the import path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, **isolated_env}


CREATE_APP = """\
import sys
root = sys.argv[2]
from functions_framework import create_app
app = create_app(sys.argv[1], "main.py")
assert not any(p.rstrip("/") == root for p in sys.path), sys.path
assert sys.modules["shared"].__file__.startswith(sys.argv[3]), sys.modules["shared"].__file__
print(app.test_client().get("/").status_code)
"""


class TestBundles:
    def test_repository_bundle_holds_only_runtime_files(self, staged: Path) -> None:
        """The repository's bundles hold its shared/ and requirements, no tests or caches."""
        expected = {"main.py", "requirements.txt"} | runtime_files(ROOT / "shared", "shared")
        if (ROOT / "pipeline.toml").exists():
            expected.add("pipeline.toml")
            pipeline = tomllib.loads((ROOT / "pipeline.toml").read_text())
            for op in pipeline.get("operation", []):
                top = str(op.get("target", "")).split(":")[0].split(".")[0]
                if top and top != "shared" and (ROOT / top).is_dir():
                    expected |= runtime_files(ROOT / top, top)
        for fn in FUNCTIONS:
            files = bundle_files(staged / fn)
            assert files == expected
            assert not any(FORBIDDEN & set(Path(f).parts) for f in files)

    @pytest.mark.parametrize("target", FUNCTIONS)
    def test_bundle_loads_through_create_app(
        self, staged: Path, target: str, isolated_env: dict[str, str]
    ) -> None:
        """Each bundle's main.py loads with only the bundle on the path and answers a request."""
        bundle_ = staged / target
        result = subprocess.run(
            [sys.executable, "-I", "-c", CREATE_APP, target, str(ROOT), str(bundle_)],
            cwd=bundle_,
            env=bundle_env(isolated_env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert int(result.stdout.strip().splitlines()[-1]) in (401, 405, 501)

    @pytest.mark.parametrize("target", FUNCTIONS)
    def test_bundle_serves_as_a_functions_framework_process(
        self, staged: Path, target: str, isolated_env: dict[str, str]
    ) -> None:
        """Each bundle runs under `functions-framework` started inside it and answers over HTTP."""
        binary = Path(sys.executable).parent / "functions-framework"
        port = free_port()
        args = ["--source", "main.py", "--target", target, "--host", "127.0.0.1"]
        proc = subprocess.Popen(
            [str(binary), *args, "--port", str(port)],
            cwd=staged / target,
            env=bundle_env(isolated_env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 30
            response = None
            while response is None and time.monotonic() < deadline:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                try:
                    response = requests.get(f"http://127.0.0.1:{port}/", timeout=2)
                except requests.ConnectionError:
                    time.sleep(0.1)
            assert response is not None, "functions-framework did not answer within 30 s"
            assert response.status_code in (401, 405, 501)
        finally:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


# --- deploys through a fake gcloud --------------------------------------------------------

FAKE_GCLOUD = """\
#!{python}
import datetime, json, os, subprocess, sys

raw = sys.argv[1:]
env = os.environ.get
# What a process listing or gcloud's own log would show: argv and the environment.
if env("FAKE_GCLOUD_SEEN"):
    with open(env("FAKE_GCLOUD_SEEN"), "a") as seen:
        seen.write(json.dumps({{"argv": raw, "env": dict(os.environ)}}) + "\\n")
# The flags a --flags-file holds (the secret header), expanded as gcloud does.
args = [a for a in raw if not a.startswith("--flags-file=")]
for a in raw:
    if a.startswith("--flags-file="):
        with open(a.split("=", 1)[1]) as held:
            args += [k + "=" + v for k, v in json.load(held).items()]
with open(env("FAKE_GCLOUD_LOG"), "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[:2] == ["functions", "describe"]:
    # The status function's URL: a local status function, or a port nobody listens on.
    print(env("FAKE_STATUS_URL") if args[2] == "smart-resume-status" else "{url}")
elif args[:3] == ["secrets", "versions", "access"]:
    sys.stdout.write("{secret},{old_secret}")
elif args[:3] == ["scheduler", "jobs", "describe"]:
    sys.exit(0 if env("FAKE_JOB_EXISTS") == "1" else 1)
elif args[:3] == ["scheduler", "jobs", "list"]:
    # The jobs there are (full names), one a line.
    for name in filter(None, env("FAKE_JOBS", "").split(",")):
        print("projects/my-project/locations/europe-west1/jobs/" + name)
elif args[:3] == ["scheduler", "jobs", "delete"]:
    pass
elif args[:3] == ["scheduler", "jobs", "run"]:
    # What the job does: POST to the trigger with the secret header, without waiting.
    if env("FAKE_TRIGGER_URL"):
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        subprocess.Popen(
            ["curl", "-sS", "-o", os.devnull, "-X", "POST",
             "-H", "X-Webhook-Secret: " + env("FAKE_JOB_SECRET", "{secret}"),
             "-H", "X-CloudScheduler-ScheduleTime: " + when,
             "-H", "X-CloudScheduler-JobName: smart-resume", env("FAKE_TRIGGER_URL")],
            start_new_session=True,
        )
elif args[:2] == ["scheduler", "jobs"]:
    # gcloud echoes the job it wrote, headers included.
    print("httpTarget:\\n  headers:\\n    " + [a for a in args if "Webhook" in a][0])
elif args[:2] == ["auth", "print-identity-token"]:
    sys.exit("ERROR: no account") if env("FAKE_NO_TOKEN") else print("fake-identity-token")
elif args[:2] == ["projects", "describe"]:
    print("123456789012")
elif args[:3] == ["monitoring", "uptime", "list-configs"]:
    print(env("FAKE_CHECK", ""))
elif args[:3] == ["monitoring", "uptime", "create"]:
    print("Created uptime check with " + [a for a in args if "Webhook" in a][0], file=sys.stderr)
    print("projects/my-project/uptimeCheckConfigs/new-check-7")
elif args[:3] == ["monitoring", "uptime", "update"]:
    print("Updated " + [a for a in args if "Webhook" in a][0])
elif args[:4] == ["alpha", "monitoring", "policies", "list"]:
    print(env("FAKE_POLICY", ""))
elif args[:4] == ["firestore", "indexes", "composite", "create"]:
    error = env("FAKE_INDEX_ERROR")
    if error:
        sys.exit("ERROR: (gcloud.firestore.indexes.composite.create) " + error)
    print("Create request issued", file=sys.stderr)
"""
#: The calls every deploy ends with: the status function's URL, an identity token, the job run.
FIRST_RUN_CALLS = [
    ["functions", "describe", "smart-resume-status"],
    ["auth", "print-identity-token"],
    ["scheduler", "jobs", "run"],
]


@pytest.fixture
def fake_gcloud(tmp_path: Path) -> tuple[str, Path]:
    """A gcloud that records its arguments and answers like the real one: (PATH, its log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(
        FAKE_GCLOUD.format(python=sys.executable, url=URL, secret=SECRET, old_secret=OLD_SECRET)
    )
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IXUSR)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", tmp_path / "gcloud.log"


@pytest.fixture
def live(fake_gcloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real deploy, in-process, through the fake gcloud, with the example settings and
    `settings` as arguments over them (`env`: the fake's FAKE_* variables): its result and
    the gcloud calls, in order."""
    path, log = fake_gcloud

    def deploy(settings=None, job_exists=True, **env: str) -> tuple[Result, list[list[str]]]:
        log.unlink(missing_ok=True)
        for key in [k for k in os.environ if k.startswith("FAKE_")]:
            monkeypatch.delenv(key)  # those of an earlier deploy of the test
        monkeypatch.setenv("PATH", path)
        monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
        monkeypatch.setenv("FAKE_JOB_EXISTS", "1" if job_exists else "0")
        monkeypatch.setenv("FAKE_STATUS_URL", f"http://127.0.0.1:{free_port()}")  # nobody answers
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        args = ["--env-file", str(EXAMPLE), "--build-dir", str(tmp_path / "build")]
        result = cli(*args, *as_args(settings))
        return result, [json.loads(line) for line in log.read_text().splitlines()]

    return deploy


class TestDeploy:
    def test_creates_the_job_with_the_secret_from_secret_manager(self, live, tmp_path) -> None:
        """A first deploy creates the job with the trigger URL and the newest secret, masked."""
        result, calls = live(job_exists=False)
        assert result.returncode == 0, result.stderr
        index_calls = [shlex.split(c)[1:] for c in INDEX_COMMANDS]
        assert calls[: len(index_calls)] == index_calls
        calls = calls[len(index_calls) :]
        assert [c[:3] for c in calls] == [
            ["functions", "deploy", "smart-resume"],
            ["functions", "deploy", "smart-resume-status"],
            ["functions", "add-invoker-policy-binding", "smart-resume"],
            ["functions", "describe", "smart-resume"],
            ["secrets", "versions", "access"],
            ["scheduler", "jobs", "describe"],
            ["scheduler", "jobs", "create"],
            ["scheduler", "jobs", "list"],
            *FIRST_RUN_CALLS,
        ]
        create = calls[-5]
        assert f"--uri={URL}" in create
        assert f"--headers=X-Webhook-Secret={SECRET}" in create
        assert not any(OLD_SECRET in arg for arg in create)
        assert SECRET not in result.stdout + result.stderr  # gcloud's echo of it is masked
        assert "--flags-file=" in result.stdout
        assert (tmp_path / "build" / "smart_resume" / "main.py").is_file()
        # A real deploy lists its settings too, as comment lines before the commands.
        assert settings_listing(result.stdout)["REGION"] == ("europe-west1", example_line("REGION"))
        assert "dry run" not in result.stdout
        assert "could not read the run's answer from the status function" in result.stderr
        assert result.stderr.rstrip().endswith(
            f"deployed smart-resume ({URL}) and smart-resume-status; Scheduler job smart-resume "
            "runs '0 * * * *' (Europe/Paris)"
        )

    def test_updates_the_job_when_it_exists(self, live) -> None:
        """A second deploy updates the existing job in place instead of creating another."""
        before = set(Path(tempfile.gettempdir()).glob("tmp*/job-update.flags.json"))
        result, calls = live(job_exists=True)
        assert result.returncode == 0, result.stderr
        # The private flags files went with the deploy.
        assert set(Path(tempfile.gettempdir()).glob("tmp*/job-update.flags.json")) == before
        update = calls[-5]
        assert update[:4] == ["scheduler", "jobs", "update", "http"]
        assert f"--update-headers=X-Webhook-Secret={SECRET}" in update
        assert "--max-retry-attempts=0" in update
        assert not any(c[:3] == ["scheduler", "jobs", "create"] for c in calls)
        assert SECRET not in result.stdout + result.stderr

    def test_an_existing_index_does_not_fail_the_deploy(self, live) -> None:
        """A repeated deploy: every composite create answers ALREADY_EXISTS, and it goes on."""
        result, calls = live(FAKE_INDEX_ERROR="ALREADY_EXISTS: index already exists")
        assert result.returncode == 0, result.stderr
        composites = sum("composite" in c for c in INDEX_COMMANDS)
        creates = sum(c[:4] == ["firestore", "indexes", "composite", "create"] for c in calls)
        assert creates == composites
        assert sum(c[:4] == ["firestore", "indexes", "fields", "update"] for c in calls) == 7
        assert calls[-5][:4] == ["scheduler", "jobs", "update", "http"]
        assert result.stderr.count("(the index exists already: kept)") == composites

    def test_a_failed_command_stops_the_deploy_with_its_status(self, live) -> None:
        """Any other answer to an index create fails the deploy, with gcloud's message."""
        result, calls = live(FAKE_INDEX_ERROR="PERMISSION_DENIED: The caller does not have it")
        assert result.returncode == 1
        assert "PERMISSION_DENIED" in result.stderr
        assert len(calls) == 1

    def test_the_first_run_unread_or_not_started(self, live) -> None:
        """Without an identity token, or RUN_WAIT_SECONDS=0, the run is not waited for (said,
        with how to follow it); RUN_AFTER_DEPLOY=0 runs no job at all."""
        watch = "python scripts/watch.py --url http://127.0.0.1:"
        result, _ = live(FAKE_NO_TOKEN="1")
        assert result.returncode == 0, result.stderr
        unread = "could not get an identity token, so the run's answer is not read: follow it with"
        assert f"{unread} {watch}" in result.stderr
        result, _ = live({"RUN_WAIT_SECONDS": "0"})
        assert result.returncode == 0, result.stderr
        assert f"not waiting for the run (RUN_WAIT_SECONDS=0): {watch}" in result.stderr
        result, calls = live({"RUN_AFTER_DEPLOY": "0"})
        assert result.returncode == 0, result.stderr
        assert not [c for c in calls if c[:3] == ["scheduler", "jobs", "run"]]
        assert "not running the job now (RUN_AFTER_DEPLOY=0)" in result.stderr
        assert result.stderr.rstrip().endswith(
            f"deployed smart-resume ({URL}) and smart-resume-status"
        )


class TestDeployAlerting:
    def test_alerting_is_created_then_updated(self, live) -> None:
        result, calls = live(ALERT)
        assert result.returncode == 0, result.stderr
        assert SECRET not in result.stdout + result.stderr  # gcloud's echo is masked too
        kinds = [c[:4] for c in calls]
        assert ["monitoring", "uptime", "create", "smart-resume-status health"] in kinds
        assert ["alpha", "monitoring", "policies", "create"] in kinds
        create = next(c for c in calls if c[:3] == ["monitoring", "uptime", "create"])
        assert f"--headers=X-Webhook-Secret={SECRET}" in create
        policy = next(c for c in calls if c[:4] == ["alpha", "monitoring", "policies", "create"])
        body = json.loads(next(a for a in policy if a.startswith("--policy="))[9:])
        assert 'check_id="new-check-7"' in body["conditions"][0]["conditionThreshold"]["filter"]
        agent = "service-123456789012@gcp-sa-monitoring-notification.iam.gserviceaccount.com"
        assert any(f"--member=serviceAccount:{agent}" in c for c in calls)
        assert "; uptime check and alert policy 'smart-resume-status health'" in result.stderr

        check = "projects/my-project/uptimeCheckConfigs/existing-3"
        existing_policy = "projects/my-project/alertPolicies/99"
        again, calls = live(ALERT, FAKE_CHECK=check, FAKE_POLICY=existing_policy)
        assert again.returncode == 0, again.stderr
        assert SECRET not in again.stdout + again.stderr
        assert not [c for c in calls if "monitoring" in c and "create" in c]
        update = next(c for c in calls if c[:3] == ["monitoring", "uptime", "update"])
        assert update[3] == check
        policy = next(c for c in calls if c[:4] == ["alpha", "monitoring", "policies", "update"])
        assert policy[4] == existing_policy
        body = json.loads(next(a for a in policy if a.startswith("--policy="))[9:])
        assert 'check_id="existing-3"' in body["conditions"][0]["conditionThreshold"]["filter"]

    def test_no_alerting_without_a_channel(self, live) -> None:
        result, calls = live()
        assert result.returncode == 0, result.stderr
        assert not [c for c in calls if "monitoring" in c]
        assert calls[-3:] == [
            [
                "functions",
                "describe",
                "smart-resume-status",
                "--gen2",
                "--region=europe-west1",
                "--project=my-project",
                "--format=value(serviceConfig.uri)",
            ],
            ["auth", "print-identity-token"],
            [
                "scheduler",
                "jobs",
                "run",
                "smart-resume",
                "--location=europe-west1",
                "--project=my-project",
            ],
        ]

    @pytest.mark.slow
    @pytest.mark.parametrize("outcome", ["completed", "failed", "refused"])
    def test_the_first_run_is_reported(
        self, live, function_process, db, pipeline_file, outcome
    ) -> None:
        """The fake job POSTs to a real trigger process; the deploy reads the run's answer from
        a real status process: a completed run passes, a failed one or none (the job's secret
        refused: a rotation gone wrong) fails the deploy."""
        from conftest import seed_clients

        pipeline_file('[[operation]]\nname = "work"\nkind = "python"\ntarget = "opfuncs:ok"\n')
        seed_clients(db, 1)
        env = {"SMART_RESUME_WEBHOOK_SECRET": f"{SECRET},{OLD_SECRET}"}
        if outcome == "failed":
            env["SMART_RESUME_MODULE"] = "no_such_resume_module"
        trigger = function_process("smart_resume", **env)
        status = function_process("smart_resume_status", **env)
        job = {"FAKE_TRIGGER_URL": trigger.url, "FAKE_STATUS_URL": status.url}
        if outcome == "refused":
            job["FAKE_JOB_SECRET"] = "an-old-secret-nobody-accepts"
        # A refused job starts no run however long the deploy waits: 3 s says so as well as 20.
        wait = "3" if outcome == "refused" else "20"
        result, calls = live({"RUN_WAIT_SECONDS": wait}, **job)
        assert calls[-1][:3] == ["scheduler", "jobs", "run"]
        if outcome == "completed":
            assert result.returncode == 0, result.stderr
            assert "ended completed (1 clients, 1 processed, 0 skipped, 0 failed)" in result.stderr
            assert "health: ok" in result.stderr
        elif outcome == "failed":
            assert result.returncode == 1
            assert "ended failed" in result.stderr and "no_such_resume_module" in result.stderr
            assert "deployed, but the first run did not end well" in result.stderr
        else:
            assert result.returncode == 1
            assert "no run started within 3 s of running the job" in result.stderr
        assert SECRET not in result.stdout + result.stderr


class TestDeployShards:
    def test_shards_create_their_jobs_and_delete_the_stale_ones(self, live) -> None:
        existing = "smart-resume,smart-resume-shard-1,smart-resume-shard-3,smart-resume-shard-7"
        result, calls = live({"SHARDS": "3"}, job_exists=False, FAKE_JOBS=existing)
        assert result.returncode == 0, result.stderr
        assert SECRET not in result.stdout + result.stderr
        creates = [c for c in calls if c[:4] == ["scheduler", "jobs", "create", "http"]]
        assert [c[4] for c in creates] == SHARD_JOBS
        for k, create in enumerate(creates):
            assert f'--message-body={{"shard": {k}}}' in create
            assert f"--headers=X-Webhook-Secret={SECRET},Content-Type=application/json" in create
        deletes = [c for c in calls if c[:3] == ["scheduler", "jobs", "delete"]]
        assert [c[3] for c in deletes] == [
            "smart-resume",
            "smart-resume-shard-3",
            "smart-resume-shard-7",
        ]
        assert all(c[-1] == "--quiet" for c in deletes)
        assert calls[-3:] == [
            ["scheduler", "jobs", "run", name, "--location=europe-west1", "--project=my-project"]
            for name in SHARD_JOBS
        ]
        assert "Scheduler jobs smart-resume-shard-0..smart-resume-shard-2 run '0 * * * *'" in (
            result.stderr
        )

    def test_back_to_one_job_deletes_the_shard_jobs(self, live) -> None:
        existing = "smart-resume,smart-resume-shard-0,smart-resume-shard-1"
        result, calls = live(FAKE_JOBS=existing)
        assert result.returncode == 0, result.stderr
        update = next(c for c in calls if c[:4] == ["scheduler", "jobs", "update", "http"])
        assert update[4] == "smart-resume" and not [a for a in update if "message-body" in a]
        deletes = [c[3] for c in calls if c[:3] == ["scheduler", "jobs", "delete"]]
        assert deletes == ["smart-resume-shard-0", "smart-resume-shard-1"]
        assert [c[3] for c in calls if c[:3] == ["scheduler", "jobs", "run"]] == ["smart-resume"]
        assert "Scheduler job smart-resume runs '0 * * * *'" in result.stderr


# --- ./deploy.sh itself -------------------------------------------------------------------


class TestDeploySh:
    """The documented entry point, run as a user runs it: a thin wrapper over deploy/."""

    def test_help(self, path_without_gcloud: str) -> None:
        result = run_deploy("--help", path=path_without_gcloud)
        assert result.returncode == 0
        assert result.stdout == HELP + "\n"

    def test_a_dry_run_needs_no_gcloud(self, path_without_gcloud: str, tmp_path: Path) -> None:
        """With the example settings, no gcloud installed and secrets in the shell: every
        command printed, the secrets nowhere, the bundles staged."""
        result = run_deploy(
            "--dry-run",
            "--env-file",
            str(EXAMPLE),
            "--build-dir",
            str(tmp_path),
            path=path_without_gcloud,
            env={"SMART_RESUME_WEBHOOK_SECRET": SECRET, "SENDGRID_API_KEY": "SG.key-value"},
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == Dry(tmp_path).out  # the in-process plan is what it prints
        assert command(result.stdout, "gcloud functions deploy smart-resume ")
        assert result.stdout.rstrip().endswith("# dry run: nothing was deployed")
        for value in (SECRET, "SG.key-value"):
            assert value not in result.stdout + result.stderr
        assert "SMART_RESUME_WEBHOOK_SECRET in the environment is not deployed" in result.stderr
        assert (tmp_path / "smart_resume" / "main.py").is_file()

    def test_a_refused_setting(self, path_without_gcloud: str, tmp_path: Path) -> None:
        result = run_deploy(
            "--dry-run",
            "--env-file",
            str(EXAMPLE),
            "--build-dir",
            str(tmp_path / "build"),
            "SHARDS=three",
            path=path_without_gcloud,
        )
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr.splitlines()[-2:] == [
            f"deploy.sh: cannot deploy, fix these settings ({EXAMPLE} or KEY=VALUE arguments):",
            "  - SHARDS=three must be a whole number from 1 to 100 (one Scheduler job and trigger "
            "instance per shard)",
        ]
        assert not (tmp_path / "build").exists()
        assert run_deploy("--force", path=path_without_gcloud).returncode == 2

    def test_in_a_repository_of_its_own(
        self, fake_repo: Path, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """deploy.sh uses the deploy/ and shared/ beside it (not the working folder's), the
        deploy.env beside it, and stages there; the shell's pipeline is not used."""
        (fake_repo / "deploy.env").write_text(EXAMPLE.read_text())
        result = run_deploy(
            "--dry-run",
            "--build-dir",
            str(tmp_path / "build"),
            path=path_without_gcloud,
            script=fake_repo / "deploy.sh",
        )
        assert result.returncode == 0, result.stderr
        line = example_line("TIME_ZONE").rsplit(":", 1)[1]
        assert settings_listing(result.stdout)["TIME_ZONE"] == (
            "Europe/Paris",
            f"deploy.env:{line}",
        )
        assert "127.0.0.1:9000" in result.stderr  # the fake repository's own pipeline
        (fake_repo / "custom.toml").write_text("")
        staged = run_deploy(
            "stage",
            path=path_without_gcloud,
            script=fake_repo / "deploy.sh",
            env={"SMART_RESUME_PIPELINE": "custom.toml"},
        )
        assert staged.returncode == 0, staged.stderr
        assert "ignored from the shell's environment: SMART_RESUME_PIPELINE " in staged.stderr
        assert (fake_repo / "build" / "smart_resume" / "pipeline.toml").is_file()
        assert not (fake_repo / "build" / "smart_resume" / "custom.toml").exists()

    def test_no_secret_value_reaches_gcloud_s_argv_or_environment(
        self, fake_gcloud: tuple[str, Path], tmp_path: Path
    ) -> None:
        """A real deploy through ./deploy.sh and a gcloud that records its argv and environment:
        the webhook secret reaches it only in a --flags-file (argv is seen by every local user,
        and gcloud's own log keeps flag values; that log is switched off too), with alerting,
        for a new job and an existing one; the flags files are gone after."""
        path, log = fake_gcloud
        seen = tmp_path / "seen.jsonl"
        for exists in ("0", "1"):
            result = run_deploy(
                "--env-file",
                str(EXAMPLE),
                "--build-dir",
                str(tmp_path / "build"),
                *as_args(ALERT),
                path=path,
                env={
                    "FAKE_GCLOUD_LOG": str(log),
                    "FAKE_GCLOUD_SEEN": str(seen),
                    "FAKE_JOB_EXISTS": exists,
                    "FAKE_STATUS_URL": f"http://127.0.0.1:{free_port()}",
                    "SMART_RESUME_WEBHOOK_SECRET": OLD_SECRET,  # the shell's: never passed on
                },
            )
            assert result.returncode == 0, result.stderr
            assert SECRET not in result.stdout + result.stderr
        records = [json.loads(line) for line in seen.read_text().splitlines()]
        assert len(records) > 40
        for record in records:
            for value in (SECRET, OLD_SECRET):
                assert not any(value in a for a in record["argv"]), record["argv"]
                assert not any(value in v for v in record["env"].values()), record["argv"]
            assert record["env"]["CLOUDSDK_CORE_DISABLE_FILE_LOGGING"] == "1"
            assert record["env"]["CLOUDSDK_CORE_LOG_HTTP"] == "false"
            assert str(ROOT) not in record["env"].get("PYTHONPATH", "")
        held = [a for r in records for a in r["argv"] if a.startswith("--flags-file=")]
        assert len(held) >= 4
        assert not [a for a in held if Path(a.split("=", 1)[1]).exists()]
