"""deploy.sh: the dry run, the settings checks, the gcloud calls, and the staged bundles."""

from __future__ import annotations

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

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy.sh"
EXAMPLE = ROOT / "deploy.env.example"
BASH = shutil.which("bash") or "/bin/bash"
FUNCTIONS = ("smart_resume", "smart_resume_status")
REQUIRED = (
    "PROJECT_ID",
    "REGION",
    "SERVICE_ACCOUNT",
    "SCHEDULE",
    "TIME_ZONE",
    "WEBHOOK_SECRET_NAME",
    "WEBHOOK_SECRET_VERSION",
)
SECRET = "s3cr3t-new-value"
OLD_SECRET = "s3cr3t-old-value"
URL = "https://smart-resume-abc123-ew.a.run.app"
#: Path parts that must never reach a deployed bundle.
FORBIDDEN = {"__pycache__", ".venv", "tests", ".pytest_cache", ".git", "build"}
#: The settings this change added to deploy.sh, each documented in deploy.env.example.
NEW_SETTINGS = ("TRIGGER_CONCURRENCY", "TRIGGER_MEMORY", "DATABASE", "SHARDS")


#: The Firestore index commands a deploy with the default settings runs, in order.
def _index_commands() -> list[str]:
    """The index commands a deploy runs: one per index and field override declared in
    firestore.indexes.json (the file the query-shape test checks the code against)."""
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
    """deploy.sh with `args`; `env` is the shell's environment over a minimal one (settings
    there are ignored by deploy.sh: give them as KEY=VALUE arguments, see `as_args`)."""
    base = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    return subprocess.run(
        [BASH, str(script), *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ gcloud ")]


def command(stdout: str, start: str) -> str:
    found = [c for c in commands(stdout) if c.startswith(start)]
    assert len(found) == 1, f"expected one {start!r} in:\n{stdout}"
    return found[0]


def as_args(settings: dict[str, str] | None) -> list[str]:
    """Settings as deploy.sh's KEY=VALUE arguments (over the settings file; `KEY=` clears)."""
    return [f"{key}={value}" for key, value in (settings or {}).items()]


def example_run(
    path: str,
    build: Path,
    settings: dict[str, str] | None = None,
    *,
    dry: bool = True,
    env_file: Path = EXAMPLE,
) -> subprocess.CompletedProcess[str]:
    """deploy.sh with the example settings file (or `env_file`) and `settings` as arguments
    over it."""
    args = ["--dry-run"] if dry else []
    args += ["--env-file", str(env_file), "--build-dir", str(build), *as_args(settings)]
    return run_deploy(*args, path=path)


def example_plus(tmp_path: Path, name: str, line: str) -> tuple[Path, int]:
    """A settings file `name`: the example with `line` added at its end; and that line's
    number, as deploy.sh names it."""
    settings = tmp_path / name
    settings.write_text(EXAMPLE.read_text() + line + "\n")
    return settings, len(EXAMPLE.read_text().splitlines()) + 1


def dry_run(path: str, build: Path, settings: dict[str, str] | None = None) -> str:
    """The dry run's output with the example settings (and `settings` over them); it must
    succeed."""
    result = example_run(path, build, settings)
    assert result.returncode == 0, result.stderr
    return result.stdout


def example_line(name: str) -> str:
    """Where the example sets `name`, as deploy.sh names it: FILE:LINE."""
    lines = EXAMPLE.read_text().splitlines()
    return f"{EXAMPLE}:{next(i for i, x in enumerate(lines, 1) if x.startswith(f'{name}='))}"


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


def without_listing(stdout: str) -> list[str]:
    """The output but the settings listing's lines."""
    return [line for line in stdout.splitlines() if not line.startswith("#   ")]


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


# --- the real gcloud parser ----------------------------------------------------------------

GCLOUD = shutil.which("gcloud")
needs_gcloud = pytest.mark.skipif(GCLOUD is None, reason="the Google Cloud CLI is not installed")
#: What gcloud says when a command has parsed and passed its local checks and first needs
#: credentials. With an empty configuration and no credentials in the environment it stops
#: there, before any API call: the real parser accepted every flag and value.
PARSED = "You do not currently have an active account selected"
_parsed: dict[str, str | None] = {}
_parsed_lock = threading.Lock()


def gcloud_rejection(printed: str, scratch: Path) -> str | None:
    """None when the real gcloud parses `printed` (a command as deploy.sh prints it), else why
    not. Runs with a fresh configuration and a minimal environment: no account, no project, no
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
def gcloud_scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One build folder and gcloud homes for the parser checks, so that a command printed the
    same way by several tests is parsed once."""
    return tmp_path_factory.mktemp("gcloud-parser")


def assert_gcloud_parses(printed: list[str], scratch: Path) -> None:
    """Every command passes the real gcloud argument parser (checked four at a time)."""
    assert printed
    with ThreadPoolExecutor(max_workers=4) as pool:
        rejected = [w for w in pool.map(lambda c: gcloud_rejection(c, scratch), printed) if w]
    assert not rejected, "\n".join(rejected)


class TestDryRun:
    def test_example_config_shows_both_functions_and_the_job(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """With the example settings and no gcloud installed, the dry run prints every command."""
        result = run_deploy(
            "--dry-run",
            "--env-file",
            str(EXAMPLE),
            "--build-dir",
            str(tmp_path),
            path=path_without_gcloud,
        )
        assert result.returncode == 0, result.stderr
        out = result.stdout
        trigger = command(out, "gcloud functions deploy smart-resume ")
        for flag in (
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
            assert f" {flag} " in f" {trigger} ", flag
        # The variables go in a file, each value JSON-quoted: no delimiter to pick or escape.
        assert env_vars(out) == {
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
        status_env = env_vars(out, "smart-resume-status")
        assert not any("EMAIL" in name for name in status_env)

        status = command(out, "gcloud functions deploy smart-resume-status ")
        assert "--entry-point=smart_resume_status" in status
        assert f"--source={tmp_path}/smart_resume_status" in status
        assert "--no-allow-unauthenticated" in status
        assert "--max-instances=3" in status and "--timeout" not in status

        assert "--member=serviceAccount:smart-resume-scheduler@" in command(
            out, "gcloud functions add-invoker-policy-binding smart-resume "
        )
        assert "--format=value(serviceConfig.uri)" in command(
            out, "gcloud functions describe smart-resume "
        )
        assert "--secret=smart-resume-webhook" in command(out, "gcloud secrets versions access 1")
        command(out, "gcloud scheduler jobs describe smart-resume ")
        for verb in ("update", "create"):
            job = command(out, f"gcloud scheduler jobs {verb} http smart-resume ")
            for flag in (
                "--location=europe-west1",
                "'--schedule=0 * * * *'",
                "--time-zone=Europe/Paris",
                "--uri=https://europe-west1-my-project.cloudfunctions.net/smart-resume",
                "--http-method=POST",
                "--attempt-deadline=1620s",
                "--max-retry-attempts=0",
                "--oidc-service-account-email=smart-resume-scheduler@my-project.iam."
                "gserviceaccount.com",
            ):
                assert f" {flag} " in f" {job} ", (verb, flag)
        # The end of every deploy: the job run once, its answer read from the status function.
        command(out, "gcloud functions describe smart-resume-status ")
        command(out, "gcloud auth print-identity-token")
        assert command(out, "gcloud scheduler jobs run smart-resume ") == (
            "gcloud scheduler jobs run smart-resume --location=europe-west1 --project=my-project"
        )
        assert "# then: wait up to 300 s for that run's answer" in out
        assert "monitoring" not in out  # no ALERT_CHANNEL: no uptime check, no policy
        assert out.rstrip().endswith("nothing was deployed")

    def test_secret_values_are_never_printed(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """Secret values lying in the shell's environment reach neither the output nor the
        commands (nor the functions: they come from Secret Manager)."""
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
        for value in (SECRET, "SG.key-value"):
            assert value not in result.stdout + result.stderr
        assert "--flags-file=" in result.stdout  # the secret header is read from a file
        assert "SMART_RESUME_WEBHOOK_SECRET in the environment is not deployed" in result.stderr
        assert "SMART_RESUME_WEBHOOK_SECRET" not in env_vars(result.stdout)

    def test_arguments_win_over_the_file(self, path_without_gcloud: str, tmp_path: Path) -> None:
        """A KEY=VALUE argument overrides the same setting of the settings file; `KEY=` clears
        one."""
        result = example_run(
            path_without_gcloud,
            tmp_path,
            {"REGION": "us-central1", "SMART_RESUME_EMAIL_ON": "failure", "LOCK_NAME": ""},
        )
        assert result.returncode == 0, result.stderr
        trigger = command(result.stdout, "gcloud functions deploy smart-resume ")
        assert "--region=us-central1" in trigger
        assert env_vars(result.stdout)["SMART_RESUME_EMAIL_ON"] == "failure"
        assert "SMART_RESUME_LOCK_NAME" not in env_vars(result.stdout)
        assert "europe-west1" not in "\n".join(commands(result.stdout))

    @pytest.mark.parametrize(
        ("budget", "max_run", "seconds"),
        [("60", "", 180), ("600", "", 720), ("1500", "", 1620), ("1680", "3400", 1800)],
    )
    def test_timeout_and_attempt_deadline_are_budget_plus_the_finishing_margin(
        self, path_without_gcloud: str, tmp_path: Path, budget: str, max_run: str, seconds: int
    ) -> None:
        """The trigger may run budget + 120 s, and the Scheduler waits exactly as long."""
        out = dry_run(
            path_without_gcloud,
            tmp_path,
            {"TIME_BUDGET_SECONDS": budget, "SMART_RESUME_MAX_RUN_SECONDS": max_run},
        )
        trigger = command(out, "gcloud functions deploy smart-resume ")
        assert f" --timeout={seconds}s " in f" {trigger} "
        for verb in ("create", "update"):
            job = command(out, f"gcloud scheduler jobs {verb} http")
            assert f" --attempt-deadline={seconds}s " in f" {job} "
            assert " --max-retry-attempts=0 " in f" {job} "

    @pytest.mark.parametrize("name", ["TIME_BUDGET_SECONDS", "SMART_RESUME_TIME_BUDGET_SECONDS"])
    @pytest.mark.parametrize("budget", ["1681", "3000", "99999999999999999999"])
    def test_a_budget_beyond_the_attempt_deadline_limit_is_refused(
        self, path_without_gcloud: str, tmp_path: Path, name: str, budget: str
    ) -> None:
        """Budget + 120 s over Cloud Scheduler's 1800 s: one line naming the setting and both
        limits, and no command, in a dry run as in a deploy."""
        for dry in (True, False):
            # The example sets TIME_BUDGET_SECONDS: cleared, unless it is the one tested.
            settings = {"TIME_BUDGET_SECONDS": "", name: budget}
            settings["SMART_RESUME_MAX_RUN_SECONDS"] = "99999"
            result = example_run(path_without_gcloud, tmp_path, settings, dry=dry)
            assert result.returncode == 2, result.stderr
            assert "gcloud" not in result.stdout
            lines = [line for line in result.stderr.splitlines() if "1800 s" in line]
            assert len(lines) == 1, result.stderr
            for word in ("TIME_BUDGET_SECONDS", "SMART_RESUME_TIME_BUDGET_SECONDS", "3600 s"):
                assert word in lines[0]

    @needs_gcloud
    def test_the_trigger_lets_a_second_request_reach_the_code(
        self, path_without_gcloud: str, gcloud_scratch: Path
    ) -> None:
        """One instance, but concurrency 4 with 1 vCPU and 512Mi, which gcloud accepts with
        --gen2: a request during a run gets the code's 409, not Cloud Run's 429."""
        trigger = command(
            dry_run(path_without_gcloud, gcloud_scratch / "build"),
            "gcloud functions deploy smart-resume ",
        )
        flags = trigger.split()
        for flag in ("--gen2", "--max-instances=1", "--concurrency=4", "--cpu=1", "--memory=512Mi"):
            assert flag in flags, flag
        assert not [f for f in flags if f.startswith("--concurrency=") and f != "--concurrency=4"]
        assert_gcloud_parses([trigger], gcloud_scratch)

    @needs_gcloud
    @pytest.mark.parametrize(
        ("concurrency", "memory"), [("2", "1Gi"), ("1000", "4Gi"), ("16", "768Mi")]
    )
    def test_trigger_concurrency_and_memory_are_settings(
        self, path_without_gcloud: str, gcloud_scratch: Path, concurrency: str, memory: str
    ) -> None:
        """TRIGGER_CONCURRENCY and TRIGGER_MEMORY reach the trigger only, and gcloud takes them."""
        out = dry_run(
            path_without_gcloud,
            gcloud_scratch / "build",
            {"TRIGGER_CONCURRENCY": concurrency, "TRIGGER_MEMORY": memory},
        )
        trigger = command(out, "gcloud functions deploy smart-resume ")
        assert f" --concurrency={concurrency} --cpu=1 --memory={memory} " in trigger
        status = command(out, "gcloud functions deploy smart-resume-status ")
        assert "--concurrency" not in status and "--memory=256Mi" in status
        assert_gcloud_parses([trigger], gcloud_scratch)

    @needs_gcloud
    def test_every_printed_command_passes_the_real_gcloud_parser(
        self, path_without_gcloud: str, gcloud_scratch: Path
    ) -> None:
        """Each command of the dry run (indexes, functions, job) parses with the real gcloud."""
        # The check itself refuses what the real parser refuses.
        for bad in (
            "gcloud functions deploy f --gen2 --region=r --project=p --concurrency=0",
            "gcloud functions deploy f --gen2 --region=r --project=p --cpu=1",
            "gcloud firestore indexes fields update f --collection-group=g --disable-index",
        ):
            assert gcloud_rejection(bad, gcloud_scratch), bad
        out = dry_run(path_without_gcloud, gcloud_scratch / "build")
        printed = commands(out)
        assert len(printed) == len(INDEX_COMMANDS) + 13
        assert_gcloud_parses(printed, gcloud_scratch)

    def test_without_oidc_the_trigger_can_be_public(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """ALLOW_UNAUTHENTICATED=1 without OIDC opens only the trigger and clears the job token."""
        result = example_run(
            path_without_gcloud,
            tmp_path,
            {"OIDC_SERVICE_ACCOUNT": "", "ALLOW_UNAUTHENTICATED": "1"},
        )
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert "--allow-unauthenticated" in command(out, "gcloud functions deploy smart-resume ")
        status = command(out, "gcloud functions deploy smart-resume-status ")
        assert "--no-allow-unauthenticated" in status
        assert "add-invoker-policy-binding" not in out
        assert "--oidc-service-account-email" not in out
        assert "--clear-auth-token" in command(out, "gcloud scheduler jobs update http")


class TestIndexes:
    def test_dry_run_prints_the_indexes_before_the_functions(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """Three composite indexes on clients and seven exemptions, all before the first deploy;
        `claim` on clients stays indexed (it is queried)."""
        printed = commands(dry_run(path_without_gcloud, tmp_path))
        assert printed[: len(INDEX_COMMANDS)] == INDEX_COMMANDS
        assert printed[len(INDEX_COMMANDS)].startswith("gcloud functions deploy smart-resume ")
        assert sum("firestore" in c for c in printed) == len(INDEX_COMMANDS)
        assert not [c for c in printed if " claim " in f" {c} "]

    @needs_gcloud
    def test_index_commands_pass_the_real_gcloud_parser(
        self, path_without_gcloud: str, gcloud_scratch: Path
    ) -> None:
        """The composite creates and the exemption updates are what gcloud accepts."""
        printed = commands(dry_run(path_without_gcloud, gcloud_scratch / "build"))
        indexes = [c for c in printed if c.startswith("gcloud firestore ")]
        assert len(indexes) == len(INDEX_COMMANDS)
        assert_gcloud_parses(indexes, gcloud_scratch)

    def test_the_database_setting_applies_to_every_index(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """DATABASE names the database of all index commands."""
        printed = commands(dry_run(path_without_gcloud, tmp_path, {"DATABASE": "reports-eu"}))
        indexes = [c for c in printed if c.startswith("gcloud firestore ")]
        assert len(indexes) == len(INDEX_COMMANDS)
        assert all(" --database=reports-eu " in c for c in indexes)
        assert "(default)" not in "\n".join(printed)


class TestSettingsErrors:
    def test_missing_settings_are_all_named_in_one_message(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """With no settings, one message names every missing variable and no gcloud command runs."""
        empty = tmp_path / "empty.env"
        empty.write_text("# nothing\n")
        result = run_deploy(
            "--dry-run",
            "--env-file",
            str(empty),
            "--build-dir",
            str(tmp_path / "build"),
            path=path_without_gcloud,
        )
        assert result.returncode == 2
        assert "gcloud" not in result.stdout
        assert result.stderr.count("cannot deploy") == 1
        missing = next(line for line in result.stderr.splitlines() if "missing settings" in line)
        for name in REQUIRED:
            assert name in missing
        assert "OIDC_SERVICE_ACCOUNT" in result.stderr
        assert not (tmp_path / "build").exists()

    def test_bad_values_are_refused_before_any_gcloud_call(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """An unpinned secret version, a typo'd variable and a bad budget are all reported."""
        result = example_run(
            path_without_gcloud,
            tmp_path,
            {
                "WEBHOOK_SECRET_VERSION": "latest",
                "SMART_RESUME_TIME_BUDGET": "100",
                "TIME_BUDGET_SECONDS": "1900",
            },
        )
        assert result.returncode == 2
        assert "gcloud" not in result.stdout
        assert "WEBHOOK_SECRET_VERSION=latest" in result.stderr
        assert "SMART_RESUME_TIME_BUDGET is not a smart-resume setting" in result.stderr
        assert "must be shorter than SMART_RESUME_MAX_RUN_SECONDS (1800)" in result.stderr

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
        ],
    )
    def test_bad_trigger_and_database_settings_are_refused(
        self, path_without_gcloud: str, tmp_path: Path, name: str, value: str
    ) -> None:
        """A concurrency of 1 (Cloud Run's 429 again), too little memory for 1 vCPU, or a
        database id Firestore would refuse stop the deploy before any command."""
        result = example_run(path_without_gcloud, tmp_path, {name: value})
        assert result.returncode == 2
        assert "gcloud" not in result.stdout
        assert f"{name}={value} must be" in result.stderr

    def test_missing_gcloud_is_a_clear_error(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """A real deploy without gcloud on PATH stops with a message saying how to install it."""
        result = run_deploy(
            "--env-file",
            str(EXAMPLE),
            "--build-dir",
            str(tmp_path),
            path=path_without_gcloud,
        )
        assert result.returncode == 3
        assert "gcloud is not installed" in result.stderr
        assert "+ gcloud" not in result.stdout

    def test_unknown_arguments_are_refused(self, path_without_gcloud: str) -> None:
        """An unknown option is a usage error, and --help describes the commands."""
        assert run_deploy("--force", path=path_without_gcloud).returncode == 2
        help_text = run_deploy("--help", path=path_without_gcloud)
        assert help_text.returncode == 0
        assert "stage" in help_text.stdout and "--dry-run" in help_text.stdout
        assert "Firestore indexes" in help_text.stdout


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
    """Settings come from the settings file and KEY=VALUE arguments only, each value listed
    with its source, and values that look like test settings are warned about."""

    def test_the_shell_s_settings_are_not_deployed(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """A shell set up for local tests deploys none of its values; one note names the
        variables it ignored, without their values; other variables are left alone."""
        shell = {
            **LOCAL_SHELL,
            "SMART_RESUME_PIPELINE": "examples/local-only.toml",  # no such file: unused
            "SHARDS": "",  # set, but empty: nothing was ignored
            "CLOUDSDK_CORE_PROJECT": "gcloud-s-own",  # not a setting
        }
        result = run_deploy(
            "--dry-run",
            "--env-file",
            str(EXAMPLE),
            "--build-dir",
            str(tmp_path),
            path=path_without_gcloud,
            env=shell,
        )
        assert result.returncode == 0, result.stderr
        found = env_vars(result.stdout)
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
        assert "--region=europe-west1" in command(
            result.stdout, "gcloud functions deploy smart-resume "
        )
        notes = [line for line in result.stderr.splitlines() if "ignored from the shell" in line]
        assert notes == [
            "note: ignored from the shell's environment: REGION, SMART_RESUME_EMAIL_TRANSPORT, "
            "SMART_RESUME_HEARTBEAT_SECONDS, SMART_RESUME_LEASE_SECONDS, SMART_RESUME_OUTBOX, "
            f"SMART_RESUME_PIPELINE (deploy.sh takes settings from {EXAMPLE} and KEY=VALUE "
            "arguments only)"
        ]
        for value in ("local-only", "us-central1", "local-secret", "gcloud-s-own"):
            assert value not in result.stdout + result.stderr, value
        assert not [w for w in warnings(result.stderr) if "SECONDS" in w or "outbox" in w]

    def test_a_named_settings_file_must_exist_and_a_repeated_key_takes_its_last_value(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        missing = run_deploy(
            "--dry-run", "--env-file", str(tmp_path / "nope.env"), path=path_without_gcloud
        )
        assert missing.returncode == 2
        assert f"--env-file {tmp_path / 'nope.env'}: no such file" in missing.stderr
        twice, last = example_plus(tmp_path, "twice.env", "REGION=us-east1")
        result = example_run(path_without_gcloud, tmp_path / "build", env_file=twice)
        assert result.returncode == 0, result.stderr
        assert settings_listing(result.stdout)["REGION"] == ("us-east1", f"{twice}:{last}")
        assert f"{twice}:{last}: REGION is set again; this value wins" in result.stderr

    def test_values_the_functions_would_refuse_are_refused_before_deploying(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """The functions' own startup checks run on the values they would be deployed with:
        otherwise every request after the deploy answers 500."""
        result = example_run(
            path_without_gcloud,
            tmp_path,
            {"SMART_RESUME_LEASE_SECONDS": "soon", "SMART_RESUME_CONCURRENCY": "100"},
        )
        assert result.returncode == 2
        assert "the functions would refuse this at startup: SMART_RESUME_LEASE_SECONDS" in (
            result.stderr
        )
        assert "SMART_RESUME_CONCURRENCY must be between 1 and 64, got 100" in result.stderr
        assert commands(result.stdout) == []

    def test_a_comment_after_a_value_is_refused_not_deployed(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        settings, _ = example_plus(tmp_path, "deploy.env", "EMAIL_TO=ops@x.example # on call")
        result = example_run(path_without_gcloud, tmp_path / "b", env_file=settings)
        assert result.returncode == 2
        assert "EMAIL_TO: a comment after the value would be part of it" in result.stderr
        quoted, _ = example_plus(tmp_path, "quoted.env", 'EMAIL_FROM="Ops #1 <ops@x.example>"')
        result = example_run(path_without_gcloud, tmp_path / "b", env_file=quoted)
        assert result.returncode == 0, result.stderr  # a quoted value may hold " #"
        assert env_vars(result.stdout)["SMART_RESUME_EMAIL_FROM"] == "Ops #1 <ops@x.example>"

    def test_odd_inputs_are_named(self, path_without_gcloud: str, tmp_path: Path) -> None:
        folder = run_deploy("--dry-run", "--env-file", str(tmp_path), path=path_without_gcloud)
        assert folder.returncode == 2 and "is a folder, not a settings file" in folder.stderr
        outside = example_run(
            path_without_gcloud,
            tmp_path,
            {"SMART_RESUME_PIPELINE": f"../{ROOT.name}/pipeline.toml"},
        )
        assert outside.returncode == 2
        assert "must not go through '..'" in outside.stderr
        # Read as the functions read it (3e1 is 30 s): still a test value.
        sneaky = example_run(path_without_gcloud, tmp_path, {"SMART_RESUME_LEASE_SECONDS": "3e1"})
        assert any("SMART_RESUME_LEASE_SECONDS=3e1" in w for w in warnings(sneaky.stderr))

    def test_an_argument_wins_over_the_file_under_either_name(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """The file says EMAIL_TRANSPORT=sendgrid; SMART_RESUME_EMAIL_TRANSPORT=ses as an
        argument wins (not a conflict); the two names on the command line at once are."""
        out = dry_run(
            path_without_gcloud,
            tmp_path,
            {"SMART_RESUME_EMAIL_TRANSPORT": "ses", "AWS_REGION": "eu-west-1"},
        )
        assert env_vars(out)["SMART_RESUME_EMAIL_TRANSPORT"] == "ses"
        both = example_run(
            path_without_gcloud,
            tmp_path,
            {"EMAIL_TRANSPORT": "log", "SMART_RESUME_EMAIL_TRANSPORT": "ses"},
        )
        assert both.returncode == 2
        assert "both set, to different values (command line and command line)" in both.stderr

    def test_the_deploy_lists_each_setting_and_where_it_came_from(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """Before the commands, as comment lines: the file's line, the command line, a default,
        a value derived from SCHEDULE, a short name's; every value passed to the functions."""
        result = example_run(
            path_without_gcloud,
            tmp_path,
            {"REGION": "us-central1", "SMART_RESUME_EMAIL_ON": "failure"},
        )
        assert result.returncode == 0, result.stderr
        listing = settings_listing(result.stdout)
        assert listing["PROJECT_ID"] == ("my-project", example_line("PROJECT_ID"))
        assert listing["SCHEDULE"] == ("0 * * * *", example_line("SCHEDULE"))
        assert listing["REGION"] == ("us-central1", "command line")
        assert listing["SMART_RESUME_EMAIL_ON"] == ("failure", "command line")
        assert listing["FUNCTION_NAME"] == ("smart-resume", "default")
        assert listing["TRIGGER_CONCURRENCY"] == ("4", "default")
        assert listing["SCHEDULER_LOCATION"] == ("us-central1", "default: REGION")
        assert listing["SMART_RESUME_EMAIL_TO"] == (
            "ops@example.com,oncall@example.com",
            f"from EMAIL_TO, {example_line('EMAIL_TO')}",
        )
        assert listing["SMART_RESUME_EXPECTED_EVERY_SECONDS"] == ("3600", "derived from SCHEDULE")
        assert listing["SMART_RESUME_GRACE_SECONDS"][1].startswith("derived from SCHEDULE")
        assert set(REQUIRED) <= set(listing)
        passed = env_vars(result.stdout)
        del passed["GOOGLE_CLOUD_PROJECT"]  # PROJECT_ID's
        assert {name: listing[name][0] for name in passed} == passed
        # Comment lines before the first command (which the command helpers skip).
        lines = result.stdout.splitlines()
        start = lines.index("# settings (where each value came from):")
        assert start < min(i for i, line in enumerate(lines) if line.startswith("+ "))
        assert "ALERT_CHANNEL" not in listing and "SENDGRID_API_KEY" not in listing

    def test_the_default_settings_file_is_named_deploy_env(
        self, fake_repo: Path, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """Without --env-file, sources say deploy.env:LINE."""
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

    def test_test_like_values_are_warned_about(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """A lease or heartbeat under a minute, the outbox transport, the example's my-project
        and example.com: one warning each, naming the setting and its source; deployed anyway."""
        result = example_run(
            path_without_gcloud,
            tmp_path,
            {
                "SMART_RESUME_LEASE_SECONDS": "10",
                "SMART_RESUME_HEARTBEAT_SECONDS": "1",
                "EMAIL_TRANSPORT": "outbox",
            },
        )
        assert result.returncode == 0, result.stderr
        assert env_vars(result.stdout)["SMART_RESUME_LEASE_SECONDS"] == "10"
        found = warnings(result.stderr)
        expected = [
            "warning: SMART_RESUME_LEASE_SECONDS=10 (command line) is under a minute",
            "warning: SMART_RESUME_HEARTBEAT_SECONDS=1 (command line) is under a minute",
            "warning: SMART_RESUME_EMAIL_TRANSPORT=outbox (from EMAIL_TRANSPORT, command line):"
            " reports are written to the instance's temporary disk",
            f"warning: PROJECT_ID=my-project ({example_line('PROJECT_ID')}) holds my-project",
            f"warning: SERVICE_ACCOUNT=smart-resume@my-project.iam.gserviceaccount.com"
            f" ({example_line('SERVICE_ACCOUNT')}) holds my-project",
            f"warning: OIDC_SERVICE_ACCOUNT=smart-resume-scheduler@my-project.iam."
            f"gserviceaccount.com ({example_line('OIDC_SERVICE_ACCOUNT')}) holds my-project",
            "warning: SMART_RESUME_EMAIL_FROM=smart-resume@example.com (from EMAIL_FROM, "
            f"{example_line('EMAIL_FROM')}) has an example.com address",
            "warning: SMART_RESUME_EMAIL_TO=ops@example.com,oncall@example.com (from EMAIL_TO, "
            f"{example_line('EMAIL_TO')}) has an example.com address",
            # The repository's pipeline.toml is the demo's.
            "warning: the pipeline pipeline.toml (default) runs the demo's operations (examples/)",
        ]
        assert len(found) == len(expected), result.stderr
        for line, start in zip(found, expected, strict=True):
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
    def test_the_log_transport_is_warned_about(
        self, path_without_gcloud: str, tmp_path: Path, settings: dict[str, str], source: str
    ) -> None:
        """Set, or the default without a SendGrid secret: in production reports are only logged."""
        result = example_run(path_without_gcloud, tmp_path, settings)
        assert result.returncode == 0, result.stderr
        found = [w for w in warnings(result.stderr) if "TRANSPORT" in w]
        assert found == [
            f"warning: SMART_RESUME_EMAIL_TRANSPORT=log ({source}): reports are only logged, "
            "never emailed; set EMAIL_TRANSPORT=sendgrid (with SENDGRID_SECRET_NAME) or ses"
        ]

    def test_a_production_like_file_gets_no_warning(
        self, fake_repo: Path, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """Nothing to warn about, even from a shell set up by local_emulator.md, with a
        pipeline of the user's own (the repository's pipeline.toml is the demo's)."""
        (fake_repo / "pipeline.toml").write_text(
            '[[operation]]\nname = "score"\nkind = "http"\nurl = "https://ops.acme.io/score"\n'
        )
        settings = tmp_path / "production.env"
        settings.write_text(PRODUCTION)
        result = run_deploy(
            "--dry-run",
            "--env-file",
            str(settings),
            "--build-dir",
            str(tmp_path / "build"),
            path=path_without_gcloud,
            env=LOCAL_SHELL,
            script=fake_repo / "deploy.sh",
        )
        assert result.returncode == 0, result.stderr
        assert warnings(result.stderr) == []
        assert "warning" not in result.stderr

    def test_a_pipeline_under_examples_is_warned_about(
        self, fake_repo: Path, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        (fake_repo / "examples" / "demo.toml").write_text("")
        (fake_repo / "deploy.env").write_text(
            PRODUCTION + "SMART_RESUME_PIPELINE=examples/demo.toml\n"
        )
        result = run_deploy(
            "--dry-run",
            "--build-dir",
            str(tmp_path / "build"),
            path=path_without_gcloud,
            script=fake_repo / "deploy.sh",
        )
        assert result.returncode == 0, result.stderr
        line = len(PRODUCTION.splitlines()) + 1
        assert warnings(result.stderr) == [
            f"warning: SMART_RESUME_PIPELINE=examples/demo.toml (deploy.env:{line}) is under "
            "examples/, a demo pipeline: set your own (or none, for pipeline.toml)"
        ]

    def test_an_unknown_key_is_refused_with_where_it_is(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """A typo in the file or on the command line stops the deploy, naming it and where."""
        settings, line = example_plus(tmp_path, "typo.env", "REGOIN=us-central1")
        result = example_run(
            path_without_gcloud,
            tmp_path / "build",
            {"SMART_RESUME_LEASE": "60", "region": "us-central1"},
            env_file=settings,
        )
        assert result.returncode == 2
        assert "gcloud" not in result.stdout
        for problem in (
            f"  - {settings}:{line}: REGOIN is not a deploy.sh setting",
            "  - command line: SMART_RESUME_LEASE is not a smart-resume setting",
            "  - command line: region is not a deploy.sh setting",
        ):
            assert problem in result.stderr, problem
        assert not (tmp_path / "build").exists()

    def test_a_secret_is_never_a_setting(self, path_without_gcloud: str, tmp_path: Path) -> None:
        """A secret's value in the file or on the command line is refused (it comes from Secret
        Manager), by name only."""
        settings, line = example_plus(
            tmp_path, "secret.env", f"SMART_RESUME_WEBHOOK_SECRET={SECRET}"
        )
        result = example_run(
            path_without_gcloud,
            tmp_path / "build",
            {
                "SMART_RESUME_PING_URL": "https://hc-ping.com/0f9e-deploy-token",
                "SENDGRID_API_KEY": "SG.key-value",
            },
            env_file=settings,
        )
        assert result.returncode == 2
        for problem in (
            f"{settings}:{line}: SMART_RESUME_WEBHOOK_SECRET is a secret, not a setting: store it"
            " in Secret Manager and set WEBHOOK_SECRET_NAME and WEBHOOK_SECRET_VERSION",
            "command line: SMART_RESUME_PING_URL is a secret, not a setting",
            "command line: SENDGRID_API_KEY is a secret, not a setting",
        ):
            assert problem in result.stderr, problem
        for value in (SECRET, "0f9e-deploy-token", "SG.key-value"):
            assert value not in result.stdout + result.stderr


class TestExample:
    def test_every_setting_is_documented(self) -> None:
        """Each setting deploy.sh reads (the new ones included) has a line in the example."""
        from deploy.read import OPTIONAL, REQUIRED, SHORT_NAMES

        read = {*REQUIRED, *OPTIONAL, *SHORT_NAMES, *NEW_SETTINGS}
        documented = set(re.findall(r"^#?([A-Z][A-Z0-9_]*)=", EXAMPLE.read_text(), re.M))
        assert read - documented == set()

    def test_the_example_shows_the_defaults(self, path_without_gcloud: str, tmp_path: Path) -> None:
        """Uncommenting the example's new settings changes no command: they are the defaults."""
        text = EXAMPLE.read_text()
        for name in NEW_SETTINGS:
            text, n = re.subn(rf"^#({name}=)", r"\1", text, flags=re.M)
            assert n == 1, name
        uncommented = tmp_path / "uncommented.env"
        uncommented.write_text(text)
        build = tmp_path / "build"
        result = run_deploy(
            "--dry-run",
            "--env-file",
            str(uncommented),
            "--build-dir",
            str(build),
            path=path_without_gcloud,
        )
        assert result.returncode == 0, result.stderr
        assert commands(result.stdout) == commands(dry_run(path_without_gcloud, build))


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
    print("fake-identity-token")
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


def make_fake_gcloud(tmp_path: Path) -> tuple[str, Path]:
    """A gcloud that records its arguments and answers like the real one: (PATH, its log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(
        FAKE_GCLOUD.format(python=sys.executable, url=URL, secret=SECRET, old_secret=OLD_SECRET)
    )
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IXUSR)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", tmp_path / "gcloud.log"


def fake_deploy(
    fake_gcloud: tuple[str, Path],
    tmp_path: Path,
    job_exists: bool,
    env: dict[str, str] | None = None,
    settings: dict[str, str] | None = None,
):
    """A real deploy through the fake gcloud, with the example settings and `settings` as
    arguments over them (`env`: the fake's FAKE_* variables): its result and the gcloud calls,
    in order."""
    path, log = fake_gcloud
    if log.exists():
        log.unlink()
    result = run_deploy(
        "deploy",
        "--env-file",
        str(EXAMPLE),
        "--build-dir",
        str(tmp_path / "build"),
        *as_args(settings),
        path=path,
        env={
            "FAKE_GCLOUD_LOG": str(log),
            "FAKE_JOB_EXISTS": "1" if job_exists else "0",
            "FAKE_STATUS_URL": f"http://127.0.0.1:{free_port()}",  # nobody answers
            **(env or {}),
        },
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return result, calls


class TestDeploy:
    @pytest.fixture
    def fake_gcloud(self, tmp_path: Path) -> tuple[str, Path]:
        return make_fake_gcloud(tmp_path)

    def deploy(
        self,
        fake_gcloud: tuple[str, Path],
        tmp_path: Path,
        job_exists: bool,
        env: dict[str, str] | None = None,
    ):
        return fake_deploy(fake_gcloud, tmp_path, job_exists, env)

    def test_creates_the_job_with_the_secret_from_secret_manager(
        self, fake_gcloud: tuple[str, Path], tmp_path: Path
    ) -> None:
        """A first deploy creates the job with the trigger URL and the newest secret, masked."""
        result, calls = self.deploy(fake_gcloud, tmp_path, job_exists=False)
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
        assert SECRET not in result.stdout + result.stderr
        assert "--flags-file=" in result.stdout  # the secret header is read from a file
        assert (tmp_path / "build" / "smart_resume" / "main.py").is_file()
        # A real deploy lists its settings too, as comment lines before the commands.
        assert settings_listing(result.stdout)["REGION"] == ("europe-west1", example_line("REGION"))

    def test_no_secret_value_reaches_gcloud_s_argv_or_environment(
        self, fake_gcloud: tuple[str, Path], tmp_path: Path
    ) -> None:
        """The real deploy path, through a gcloud that records its argv and environment: the
        webhook secret reaches it only in a --flags-file (argv is seen by every local user, and
        gcloud's own log keeps flag values; that log is switched off too)."""
        seen = tmp_path / "seen.jsonl"
        for exists in (False, True):
            result, _ = self.deploy(
                fake_gcloud,
                tmp_path,
                job_exists=exists,
                env={"FAKE_GCLOUD_SEEN": str(seen), "ALERT_CHANNEL": ""},
            )
            assert result.returncode == 0, result.stderr
        records = [json.loads(line) for line in seen.read_text().splitlines()]
        assert len(records) > 20
        for record in records:
            for value in (SECRET, OLD_SECRET):
                assert not any(value in a for a in record["argv"]), record["argv"]
                assert not any(value in v for v in record["env"].values())
            assert record["env"]["CLOUDSDK_CORE_DISABLE_FILE_LOGGING"] == "1"
        assert any(a.startswith("--flags-file=") for r in records for a in r["argv"])
        assert not list(Path(tempfile.gettempdir()).glob("tmp*/job-create.flags.json"))

    def test_an_existing_index_does_not_fail_the_deploy(
        self, fake_gcloud: tuple[str, Path], tmp_path: Path
    ) -> None:
        """A repeated deploy: every composite create answers ALREADY_EXISTS, and it goes on."""
        result, calls = self.deploy(
            fake_gcloud,
            tmp_path,
            job_exists=True,
            env={"FAKE_INDEX_ERROR": "ALREADY_EXISTS: index already exists"},
        )
        assert result.returncode == 0, result.stderr
        composites = sum("composite" in c for c in INDEX_COMMANDS)
        creates = sum(c[:4] == ["firestore", "indexes", "composite", "create"] for c in calls)
        assert creates == composites
        assert sum(c[:4] == ["firestore", "indexes", "fields", "update"] for c in calls) == 7
        assert calls[-5][:4] == ["scheduler", "jobs", "update", "http"]
        assert result.stderr.count("exists already") == composites

    def test_an_index_error_stops_the_deploy_before_the_functions(
        self, fake_gcloud: tuple[str, Path], tmp_path: Path
    ) -> None:
        """Any other answer to an index create fails the deploy, with gcloud's message."""
        result, calls = self.deploy(
            fake_gcloud,
            tmp_path,
            job_exists=True,
            env={"FAKE_INDEX_ERROR": "PERMISSION_DENIED: The caller does not have permission"},
        )
        assert result.returncode != 0
        assert "PERMISSION_DENIED" in result.stderr
        assert len(calls) == 1
        assert not any(c[:2] == ["functions", "deploy"] for c in calls)

    def test_updates_the_job_when_it_exists(
        self, fake_gcloud: tuple[str, Path], tmp_path: Path
    ) -> None:
        """A second deploy updates the existing job in place instead of creating another."""
        result, calls = self.deploy(fake_gcloud, tmp_path, job_exists=True)
        assert result.returncode == 0, result.stderr
        update = calls[-5]
        assert update[:4] == ["scheduler", "jobs", "update", "http"]
        assert f"--update-headers=X-Webhook-Secret={SECRET}" in update
        assert "--max-retry-attempts=0" in update
        assert not any(c[:3] == ["scheduler", "jobs", "create"] for c in calls)
        assert SECRET not in result.stdout + result.stderr


ALERT = {"ALERT_CHANNEL": "1234567890"}
CHANNEL = "projects/my-project/notificationChannels/1234567890"


def flag(cmd: str, name: str) -> str:
    """The value of `--name=value` in a printed command, or in the --flags-file it names (the
    secret header is read from one, never passed on the command line)."""
    args = shlex.split(cmd)
    found = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    for held in [a.split("=", 1)[1] for a in args if a.startswith("--flags-file=")]:
        found += [v for k, v in json.loads(Path(held).read_text()).items() if k == f"--{name}"]
    assert len(found) == 1, (name, cmd)
    return found[0]


def env_vars(stdout: str, function: str = "smart-resume") -> dict[str, str]:
    """A function's variables, read from its --env-vars-file (one `NAME: "json"` a line)."""
    path = flag(command(stdout, f"gcloud functions deploy {function} "), "env-vars-file")
    pairs = (line.split(": ", 1) for line in Path(path).read_text().splitlines() if line)
    return {name: json.loads(value) for name, value in pairs}


class TestHealthSettings:
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
        self, path_without_gcloud: str, tmp_path: Path, schedule: str, expected: str, grace: str
    ) -> None:
        result = example_run(path_without_gcloud, tmp_path, {"SCHEDULE": schedule})
        assert result.returncode == 0, result.stderr
        found = env_vars(result.stdout)
        assert found["SMART_RESUME_EXPECTED_EVERY_SECONDS"] == expected
        assert found["SMART_RESUME_GRACE_SECONDS"] == grace
        assert f"runs every {expected} s" in result.stderr

    @pytest.mark.parametrize(
        "schedule", ["*/7 * * * *", "0 */5 * * *", "0 9 * * 1-5", "0 0 1 * *", "0,20 * * * *"]
    )
    def test_an_irregular_schedule_is_not_guessed(
        self, path_without_gcloud: str, tmp_path: Path, schedule: str
    ) -> None:
        out = example_run(path_without_gcloud, tmp_path, {"SCHEDULE": schedule})
        assert out.returncode == 0, out.stderr
        assert "SMART_RESUME_EXPECTED_EVERY_SECONDS" not in env_vars(out.stdout)
        assert "SMART_RESUME_GRACE_SECONDS" not in env_vars(out.stdout)
        assert "has no fixed period, so no expected interval is guessed" in out.stderr

    def test_an_explicit_interval_wins_and_none_turns_it_off(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        found = env_vars(
            dry_run(path_without_gcloud, tmp_path, {"SMART_RESUME_EXPECTED_EVERY_SECONDS": "5400"})
        )
        assert found["SMART_RESUME_EXPECTED_EVERY_SECONDS"] == "5400"
        assert "SMART_RESUME_GRACE_SECONDS" not in found  # the function's default: half
        found = env_vars(
            dry_run(path_without_gcloud, tmp_path, {"SMART_RESUME_EXPECTED_EVERY_SECONDS": "none"})
        )
        assert "SMART_RESUME_EXPECTED_EVERY_SECONDS" not in found
        found = env_vars(
            dry_run(path_without_gcloud, tmp_path, {"SMART_RESUME_GRACE_SECONDS": "60"})
        )
        assert (
            found["SMART_RESUME_EXPECTED_EVERY_SECONDS"],
            found["SMART_RESUME_GRACE_SECONDS"],
        ) == (
            "3600",
            "60",
        )

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("SMART_RESUME_EXPECTED_EVERY_SECONDS", "hourly"),
            ("SMART_RESUME_EXPECTED_EVERY_SECONDS", "0"),
            ("RUN_WAIT_SECONDS", "soon"),
            ("RUN_WAIT_SECONDS", "3601"),
            ("ALERT_CHANNEL", "projects/p/channels/1"),
            ("ALERT_CHANNEL", "my channel"),
            ("PING_SECRET_VERSION", "latest"),
        ],
    )
    def test_bad_health_settings_are_refused(
        self, path_without_gcloud: str, tmp_path: Path, name: str, value: str
    ) -> None:
        settings = {name: value}
        if name == "PING_SECRET_VERSION":
            settings["PING_SECRET_NAME"] = "smart-resume-ping"
        result = example_run(path_without_gcloud, tmp_path, settings)
        assert result.returncode == 2
        assert "gcloud" not in result.stdout
        assert f"{name}={value} must be" in result.stderr

    def test_the_ping_url_comes_from_secret_manager_only(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """SMART_RESUME_PING_URL is a secret: from the environment it is not deployed (nor
        shown); PING_SECRET_NAME and its pinned version pass it as a secret."""
        url = "https://hc-ping.com/0f9e-deploy-token"
        result = run_deploy(
            "--dry-run",
            "--env-file",
            str(EXAMPLE),
            "--build-dir",
            str(tmp_path),
            path=path_without_gcloud,
            env={"SMART_RESUME_PING_URL": url},
        )
        assert result.returncode == 0, result.stderr
        assert "0f9e-deploy-token" not in result.stdout + result.stderr
        assert "SMART_RESUME_PING_URL in the environment is not deployed" in result.stderr
        missing = example_run(
            path_without_gcloud, tmp_path, {"PING_SECRET_NAME": "smart-resume-ping"}
        )
        assert missing.returncode == 2 and "PING_SECRET_VERSION" in missing.stderr
        out = dry_run(
            path_without_gcloud,
            tmp_path,
            {"PING_SECRET_NAME": "smart-resume-ping", "PING_SECRET_VERSION": "3"},
        )
        secrets = flag(command(out, "gcloud functions deploy smart-resume "), "set-secrets")
        assert secrets.endswith(",SMART_RESUME_PING_URL=smart-resume-ping:3")
        # Least privilege: the status function never pings, so it never holds the URL.
        status = flag(command(out, "gcloud functions deploy smart-resume-status "), "set-secrets")
        assert status == "SMART_RESUME_WEBHOOK_SECRET=smart-resume-webhook:1"


class TestAlerting:
    def test_dry_run_shows_the_uptime_check_and_the_policy(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        out = dry_run(path_without_gcloud, tmp_path, ALERT)
        binding = command(out, "gcloud functions add-invoker-policy-binding smart-resume-status ")
        assert flag(binding, "member") == (
            "serviceAccount:service-PROJECT_NUMBER@gcp-sa-monitoring-notification.iam."
            "gserviceaccount.com"
        )
        create = command(out, "gcloud monitoring uptime create ")
        assert shlex.split(create)[4] == "smart-resume-status health"
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
        update = command(out, "gcloud monitoring uptime update ")
        assert flag(update, "update-headers") == "X-Webhook-Secret=***"
        assert flag(update, "path") == "/smart-resume-status?check=health"
        for verb in ("create", "update"):
            policy = json.loads(
                flag(command(out, f"gcloud alpha monitoring policies {verb} "), "policy")
            )
            assert policy["displayName"] == "smart-resume-status health"
            assert policy["notificationChannels"] == [CHANNEL]
            condition = policy["conditions"][0]["conditionThreshold"]
            assert 'metric.label.check_id="CHECK_ID"' in condition["filter"]
            assert "uptime_check/check_passed" in condition["filter"]
        # Found by display name first, so a redeploy updates instead of adding more.
        for lister in (
            "gcloud monitoring uptime list-configs ",
            "gcloud alpha monitoring policies list ",
        ):
            assert (
                flag(command(out, lister), "filter") == 'displayName="smart-resume-status health"'
            )
        # A full channel name is taken as it is.
        full = dry_run(path_without_gcloud, tmp_path, {"ALERT_CHANNEL": CHANNEL})
        policy = json.loads(
            flag(command(full, "gcloud alpha monitoring policies create "), "policy")
        )
        assert policy["notificationChannels"] == [CHANNEL]

    @needs_gcloud
    def test_every_alerting_command_passes_the_real_gcloud_parser(
        self, path_without_gcloud: str, gcloud_scratch: Path
    ) -> None:
        out = dry_run(
            path_without_gcloud,
            gcloud_scratch / "build",
            {**ALERT, "PING_SECRET_NAME": "smart-resume-ping", "PING_SECRET_VERSION": "2"},
        )
        printed = commands(out)
        assert len(printed) == len(INDEX_COMMANDS) + 13 + 8
        assert_gcloud_parses(printed, gcloud_scratch)


class TestDeployHealth:
    """Real deploys with a fake gcloud: alerting idempotent, the first run reported."""

    @pytest.fixture
    def fake(self, tmp_path: Path) -> tuple[str, Path]:
        return make_fake_gcloud(tmp_path)

    def deploy(self, fake, tmp_path: Path, settings: dict[str, str], env=None):
        return fake_deploy(fake, tmp_path, job_exists=True, env=env, settings=settings)

    def test_alerting_is_created_then_updated(self, fake, tmp_path: Path) -> None:
        result, calls = self.deploy(fake, tmp_path, ALERT)
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

        check = "projects/my-project/uptimeCheckConfigs/existing-3"
        existing_policy = "projects/my-project/alertPolicies/99"
        again, calls = self.deploy(
            fake, tmp_path, ALERT, env={"FAKE_CHECK": check, "FAKE_POLICY": existing_policy}
        )
        assert again.returncode == 0, again.stderr
        assert SECRET not in again.stdout + again.stderr
        assert not [c for c in calls if "monitoring" in c and "create" in c]
        update = next(c for c in calls if c[:3] == ["monitoring", "uptime", "update"])
        assert update[3] == check
        policy = next(c for c in calls if c[:4] == ["alpha", "monitoring", "policies", "update"])
        assert policy[4] == existing_policy
        body = json.loads(next(a for a in policy if a.startswith("--policy="))[9:])
        assert 'check_id="existing-3"' in body["conditions"][0]["conditionThreshold"]["filter"]

    def test_no_alerting_without_a_channel(self, fake, tmp_path: Path) -> None:
        result, calls = self.deploy(fake, tmp_path, {})
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
        # Nobody answers at FAKE_STATUS_URL: said, and the deploy still succeeds.
        assert "could not read the run's answer from the status function" in result.stderr

    @pytest.mark.slow
    @pytest.mark.parametrize("outcome", ["completed", "failed", "refused"])
    def test_the_first_run_is_reported(
        self, fake, tmp_path: Path, function_process, db, pipeline_file, configure, outcome
    ) -> None:
        """The fake job POSTs to a real trigger process; deploy.sh reads the run's answer from
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
        # A refused job starts no run however long deploy.sh waits: 3 s says so as well as 20.
        wait = "3" if outcome == "refused" else "20"
        result, calls = self.deploy(fake, tmp_path, {"RUN_WAIT_SECONDS": wait}, env=job)
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


#: The Scheduler jobs of a deploy with SHARDS=3 and the example's SCHEDULER_JOB.
SHARD_JOBS = [f"smart-resume-shard-{k}" for k in range(3)]
#: The --filter of the job list: the smart-resume job and its shard jobs.
FAMILY_FILTER = 'name~"/jobs/smart-resume(-shard-[0-9]+)?$"'


class TestShards:
    def test_dry_run_with_shards_prints_one_job_per_shard(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """SHARDS=3: three jobs POSTing {"shard": K} as JSON with today's headers and OIDC, the
        trigger on up to three instances, SMART_RESUME_SHARDS on both functions, the stale
        jobs deleted, and each shard's job run once."""
        out = dry_run(path_without_gcloud, tmp_path, {"SHARDS": "3"})
        trigger = command(out, "gcloud functions deploy smart-resume ")
        flags = trigger.split()
        for wanted in ("--max-instances=3", "--concurrency=4", "--cpu=1", "--memory=512Mi"):
            assert wanted in flags, wanted
        assert env_vars(out)["SMART_RESUME_SHARDS"] == "3"
        status = command(out, "gcloud functions deploy smart-resume-status ")
        assert env_vars(out, "smart-resume-status")["SMART_RESUME_SHARDS"] == "3"
        assert "--max-instances=3" in status  # its own limit, not the trigger's

        printed = commands(out)
        assert not [
            c
            for c in printed
            if re.match(r"gcloud scheduler jobs \w+ (http )?smart-resume ", c)
            and " delete " not in c
        ]
        for k, name in enumerate(SHARD_JOBS):
            command(out, f"gcloud scheduler jobs describe {name} ")
            for verb, header in (("update", "update-headers"), ("create", "headers")):
                job = command(out, f"gcloud scheduler jobs {verb} http {name} ")
                assert json.loads(flag(job, "message-body")) == {"shard": k}
                assert flag(job, header) == "X-Webhook-Secret=***,Content-Type=application/json"
                for same in (
                    "'--schedule=0 * * * *'",
                    "--uri=https://europe-west1-my-project.cloudfunctions.net/smart-resume",
                    "--http-method=POST",
                    "--attempt-deadline=1620s",
                    "--max-retry-attempts=0",
                    "--oidc-service-account-email=smart-resume-scheduler@my-project.iam."
                    "gserviceaccount.com",
                ):
                    assert f" {same} " in f" {job} ", (verb, same)
            assert command(out, f"gcloud scheduler jobs run {name} ") == (
                f"gcloud scheduler jobs run {name} --location=europe-west1 --project=my-project"
            )
        lister = command(out, "gcloud scheduler jobs list ")
        assert flag(lister, "filter") == FAMILY_FILTER
        assert flag(lister, "format") == "value(name)"
        deletes = [c for c in printed if c.startswith("gcloud scheduler jobs delete ")]
        assert deletes == [
            f"gcloud scheduler jobs delete {name} --location=europe-west1 --project=my-project "
            "--quiet"
            for name in ("smart-resume", "smart-resume-shard-3")
        ]
        # The stale jobs go only once the wanted ones exist; the runs come last.
        assert printed.index(lister) > max(i for i, c in enumerate(printed) if " http " in c)
        assert printed.index(deletes[-1]) < printed.index(
            command(out, "gcloud scheduler jobs run smart-resume-shard-0 ")
        )

    @pytest.mark.parametrize("settings", [{"SHARDS": "1"}, {"SMART_RESUME_SHARDS": "1"}])
    def test_one_shard_is_today_s_deploy(
        self, path_without_gcloud: str, tmp_path: Path, settings: dict[str, str]
    ) -> None:
        """SHARDS=1 prints exactly what a deploy without it prints: one job named
        SCHEDULER_JOB without a body, one instance, no SMART_RESUME_SHARDS."""
        default = dry_run(path_without_gcloud, tmp_path)
        out = dry_run(path_without_gcloud, tmp_path, settings)
        # The same, but for where the settings listing says SHARDS came from.
        assert settings_listing(out)["SHARDS"] == (
            "1",
            "command line" if "SHARDS" in settings else "from SMART_RESUME_SHARDS, command line",
        )
        assert without_listing(out) == without_listing(default)
        assert "SMART_RESUME_SHARDS" not in env_vars(default)
        assert "--max-instances=1" in command(default, "gcloud functions deploy smart-resume ")
        assert "--message-body" not in default and "Content-Type" not in default
        assert "-shard-" not in "".join(
            c
            for c in commands(default)
            if not c.startswith(("gcloud scheduler jobs list ", "gcloud scheduler jobs delete "))
        )
        # Back to one job, the shard jobs are deleted.
        assert flag(command(default, "gcloud scheduler jobs list "), "filter") == FAMILY_FILTER
        assert command(default, "gcloud scheduler jobs delete ").startswith(
            "gcloud scheduler jobs delete smart-resume-shard-0 "
        )

    @pytest.mark.parametrize(
        "value", ["0", "101", "-1", "05", "1.5", "three", "3 ", "99999999999999999999"]
    )
    def test_a_bad_shard_count_is_refused(
        self, path_without_gcloud: str, tmp_path: Path, value: str
    ) -> None:
        """One line naming SHARDS and its range, exit 2, and no command."""
        result = example_run(path_without_gcloud, tmp_path, {"SHARDS": value})
        assert result.returncode == 2
        assert "gcloud" not in result.stdout
        lines = [line for line in result.stderr.splitlines() if "SHARDS" in line]
        assert len(lines) == 1, result.stderr
        assert f"SHARDS={value} must be a whole number from 1 to 100" in lines[0]

    def test_shards_and_smart_resume_shards_must_agree(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        result = example_run(
            path_without_gcloud, tmp_path, {"SHARDS": "2", "SMART_RESUME_SHARDS": "3"}
        )
        assert result.returncode == 2
        assert "SHARDS and SMART_RESUME_SHARDS are both set, to different values" in result.stderr
        same = dry_run(path_without_gcloud, tmp_path, {"SHARDS": "2", "SMART_RESUME_SHARDS": "2"})
        assert "--max-instances=2" in command(same, "gcloud functions deploy smart-resume ")

    @needs_gcloud
    def test_every_sharded_command_passes_the_real_gcloud_parser(
        self, path_without_gcloud: str, gcloud_scratch: Path
    ) -> None:
        out = dry_run(path_without_gcloud, gcloud_scratch / "build", {"SHARDS": "3"})
        printed = commands(out)
        # Indexes, functions and URL (4), secret, 3 x (describe, update, create), list,
        # 2 deletes, status URL, token, 3 runs.
        assert len(printed) == len(INDEX_COMMANDS) + 4 + 1 + 9 + 1 + 2 + 2 + 3
        assert_gcloud_parses(printed, gcloud_scratch)

    @needs_gcloud
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


class TestDeployShards:
    """Real deploys with a fake gcloud: the shard jobs written, the stale ones deleted."""

    @pytest.fixture
    def fake(self, tmp_path: Path) -> tuple[str, Path]:
        return make_fake_gcloud(tmp_path)

    def test_shards_create_their_jobs_and_delete_the_stale_ones(self, fake, tmp_path) -> None:
        existing = "smart-resume,smart-resume-shard-1,smart-resume-shard-3,smart-resume-shard-7"
        result, calls = fake_deploy(
            fake, tmp_path, job_exists=False, env={"FAKE_JOBS": existing}, settings={"SHARDS": "3"}
        )
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
        runs = [c[3] for c in calls if c[:3] == ["scheduler", "jobs", "run"]]
        assert runs == SHARD_JOBS
        assert calls[-3:] == [
            ["scheduler", "jobs", "run", name, "--location=europe-west1", "--project=my-project"]
            for name in SHARD_JOBS
        ]
        assert "Scheduler jobs smart-resume-shard-0..smart-resume-shard-2 run '0 * * * *'" in (
            result.stderr
        )

    def test_back_to_one_job_deletes_the_shard_jobs(self, fake, tmp_path) -> None:
        existing = "smart-resume,smart-resume-shard-0,smart-resume-shard-1"
        result, calls = fake_deploy(fake, tmp_path, job_exists=True, env={"FAKE_JOBS": existing})
        assert result.returncode == 0, result.stderr
        update = next(c for c in calls if c[:4] == ["scheduler", "jobs", "update", "http"])
        assert update[4] == "smart-resume" and not [a for a in update if "message-body" in a]
        deletes = [c[3] for c in calls if c[:3] == ["scheduler", "jobs", "delete"]]
        assert deletes == ["smart-resume-shard-0", "smart-resume-shard-1"]
        assert [c[3] for c in calls if c[:3] == ["scheduler", "jobs", "run"]] == ["smart-resume"]
        assert "Scheduler job smart-resume runs '0 * * * *'" in result.stderr


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
    """A repository with a python operation in examples/, caches, tests and a .venv around it."""
    repo = tmp_path / "repo"
    for fn in FUNCTIONS:
        (repo / "functions" / fn).mkdir(parents=True)
        shutil.copy(ROOT / "functions" / fn / "main.py", repo / "functions" / fn / "main.py")
    shutil.copy(SCRIPT, repo / "deploy.sh")
    shutil.copytree(ROOT / "deploy", repo / "deploy", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "requirements.txt", repo / "requirements.txt")
    shutil.copytree(ROOT / "shared", repo / "shared", ignore=shutil.ignore_patterns("__pycache__"))
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


class TestStage:
    def test_bundle_holds_exactly_the_runtime_files(
        self, fake_repo: Path, path_without_gcloud: str
    ) -> None:
        """Each bundle gets main.py, shared/, the pipeline, the package it names, requirements."""
        result = run_deploy("stage", path=path_without_gcloud, script=fake_repo / "deploy.sh")
        assert result.returncode == 0, result.stderr
        expected = {"main.py", "requirements.txt", "pipeline.toml"}
        expected |= runtime_files(fake_repo / "shared", "shared")
        expected |= {"examples/__init__.py", "examples/ops.py"}
        for fn in FUNCTIONS:
            bundle = fake_repo / "build" / fn
            assert bundle_files(bundle) == expected
            source = ROOT / "functions" / fn / "main.py"
            assert (bundle / "main.py").read_bytes() == source.read_bytes()

    def test_stage_replaces_a_previous_bundle(
        self, fake_repo: Path, path_without_gcloud: str
    ) -> None:
        """A file left from an earlier stage does not survive the next one."""
        stale = fake_repo / "build" / "smart_resume" / "old.py"
        stale.parent.mkdir(parents=True)
        stale.write_text("")
        result = run_deploy("stage", path=path_without_gcloud, script=fake_repo / "deploy.sh")
        assert result.returncode == 0, result.stderr
        assert not stale.exists()

    def test_a_custom_resume_module_is_staged(
        self, fake_repo: Path, path_without_gcloud: str
    ) -> None:
        """A local package named by SMART_RESUME_MODULE travels with the bundle."""
        (fake_repo / "myresume.py").write_text("def run_smart_resume(**kw):\n    pass\n")
        result = run_deploy(
            "stage",
            "SMART_RESUME_MODULE=myresume",
            path=path_without_gcloud,
            script=fake_repo / "deploy.sh",
        )
        assert result.returncode == 0, result.stderr
        assert (fake_repo / "build" / "smart_resume" / "myresume.py").is_file()
        assert not (fake_repo / "build" / "smart_resume" / "unrelated").exists()

    def test_a_custom_pipeline_bundles_only_what_it_names(
        self, fake_repo: Path, path_without_gcloud: str
    ) -> None:
        """SMART_RESUME_PIPELINE (from the settings file or an argument) is the one pipeline
        bundled, with the package its operation targets: neither pipeline.toml nor examples/,
        which it does not name. The shell's SMART_RESUME_PIPELINE is ignored."""
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
        default = {"main.py", "requirements.txt", "pipeline.toml", "examples/__init__.py"}
        default |= {"examples/ops.py"} | runtime_files(fake_repo / "shared", "shared")
        script = fake_repo / "deploy.sh"

        (fake_repo / "deploy.env").write_text("SMART_RESUME_PIPELINE=custom/pipe.toml\n")
        result = run_deploy("stage", path=path_without_gcloud, script=script)
        assert result.returncode == 0, result.stderr
        for fn in FUNCTIONS:
            assert bundle_files(fake_repo / "build" / fn) == custom
        assert "(pipeline: custom/pipe.toml; with mypkg)" in result.stderr

        (fake_repo / "deploy.env").write_text("PROJECT_ID=p\n")
        by_argument = run_deploy(
            "stage",
            "SMART_RESUME_PIPELINE=./custom/pipe.toml",
            path=path_without_gcloud,
            script=script,
        )
        assert by_argument.returncode == 0, by_argument.stderr
        assert bundle_files(fake_repo / "build" / "smart_resume") == custom

        from_the_shell = run_deploy(
            "stage",
            path=path_without_gcloud,
            script=script,
            env={"SMART_RESUME_PIPELINE": "custom/pipe.toml"},
        )
        assert from_the_shell.returncode == 0, from_the_shell.stderr
        assert bundle_files(fake_repo / "build" / "smart_resume") == default
        assert "ignored from the shell's environment: SMART_RESUME_PIPELINE " in (
            from_the_shell.stderr
        )

    def test_an_invalid_pipeline_stops_the_stage(
        self, fake_repo: Path, path_without_gcloud: str
    ) -> None:
        """A pipeline file that is not TOML fails the stage with its name, before any deploy."""
        (fake_repo / "pipeline.toml").write_text("[[operation]\n")
        result = run_deploy("stage", path=path_without_gcloud, script=fake_repo / "deploy.sh")
        assert result.returncode != 0
        assert "pipeline.toml is not valid TOML" in result.stderr


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's own bundles, staged once for the module."""
    build = tmp_path_factory.mktemp("build")
    result = run_deploy("stage", "--build-dir", str(build), path=os.environ["PATH"])
    assert result.returncode == 0, result.stderr
    return build


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
        bundle = staged / target
        result = subprocess.run(
            [sys.executable, "-I", "-c", CREATE_APP, target, str(ROOT), str(bundle)],
            cwd=bundle,
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


class TestPartThree:
    def test_run_after_deploy_0_starts_no_production_run(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """Before: every deploy ran the job, with no way to skip it (RUN_WAIT_SECONDS=0 only
        skipped the wait)."""
        out = dry_run(path_without_gcloud, tmp_path, {"RUN_AFTER_DEPLOY": "0"})
        assert not [c for c in commands(out) if c.startswith("gcloud scheduler jobs run")]
        default = dry_run(path_without_gcloud, tmp_path / "b")
        assert [c for c in commands(default) if c.startswith("gcloud scheduler jobs run")]
        bad = example_run(path_without_gcloud, tmp_path / "c", {"RUN_AFTER_DEPLOY": "maybe"})
        assert bad.returncode == 2 and "RUN_AFTER_DEPLOY=maybe" in bad.stderr

    def test_a_pipeline_url_on_loopback_is_warned_about(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        pipeline = ROOT / "build" / "loopback-test.toml"
        pipeline.parent.mkdir(exist_ok=True)
        pipeline.write_text(
            '[[operation]]\nname = "work"\nkind = "http"\nurl = "http://127.0.0.1:9000/x"\n'
        )
        try:
            rel = str(pipeline.relative_to(ROOT))
            result = example_run(path_without_gcloud, tmp_path, {"SMART_RESUME_PIPELINE": rel})
        finally:
            pipeline.unlink()
        assert "a local address, which a deployed function cannot reach" in result.stderr

    def test_hostile_values_reach_the_functions_as_written(
        self, path_without_gcloud: str, tmp_path: Path
    ) -> None:
        """Before: `#` was the fallback delimiter even when a value held one, so this lock name
        deployed SMART_RESUME_RELOAD_MODULE=1 and a truncated lock name."""
        hostile = "lk|x;y~z#SMART_RESUME_RELOAD_MODULE=1"
        out = dry_run(path_without_gcloud, tmp_path, {"LOCK_NAME": hostile})
        for function in ("smart-resume", "smart-resume-status"):
            found = env_vars(out, function)
            assert found["SMART_RESUME_LOCK_NAME"] == hostile
            assert "SMART_RESUME_RELOAD_MODULE" not in found
