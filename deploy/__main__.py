"""The command line of deploy.sh: arguments, then settings, staging and the deploy, with
deploy.sh's exit statuses and messages."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from deploy import ROOT, Failed, bundle, note, run
from deploy.read import KEY_VALUE
from deploy.settings import SettingsError, load

HELP = """\
Usage: ./deploy.sh [deploy|stage] [--dry-run] [--build-dir DIR] [--env-file FILE] [KEY=VALUE...]

Commands:
  deploy   (default) stage, create the Firestore indexes (an existing one is kept), deploy
           both functions, create or update the Scheduler job (with SHARDS > 1 one job per
           shard; jobs of shards no longer wanted are deleted) and, with ALERT_CHANNEL, the
           uptime check on ?check=health and its alert policy; then run the job (each shard's)
           once and report the run's answer (the deployment proven end to end)
  stage    only build build/smart_resume/ and build/smart_resume_status/: each bundle holds
           its main.py, shared/, the configured pipeline file (SMART_RESUME_PIPELINE, else
           pipeline.toml), the local packages its python operations name, and requirements.txt

Options:
  --dry-run         print every gcloud command it would run (secrets as ***) and run none;
                    needs neither gcloud nor network (the bundles are still staged)
  --build-dir DIR   where to stage the bundles (default: build/ beside this script)
  --env-file FILE   settings file (default: deploy.env beside this script)
  KEY=VALUE         a setting for this run, over the settings file's (KEY= clears it), e.g.
                    ./deploy.sh --dry-run REGION=us-central1 SMART_RESUME_EMAIL_ON=failure
  -h, --help        this help

Settings come only from the settings file and KEY=VALUE arguments. Variables of the shell are
ignored (a note names those set, never their values), so a shell set up for local tests
(local_emulator.md) cannot deploy its test values. A key that is not a setting is refused, and
so is a value the functions would refuse at startup (their own checks run on it first).
A deploy lists every setting and where it came from (comment lines before the commands) and
warns about values that look like test settings: a lease, heartbeat or time budget under a
minute, the log or outbox email transport, the example's my-project or example.com, a
pipeline under examples/ or one that runs the demo's operations (pipeline.toml does).
Required: PROJECT_ID REGION SERVICE_ACCOUNT SCHEDULE TIME_ZONE WEBHOOK_SECRET_NAME
WEBHOOK_SECRET_VERSION. See deploy.env.example for every setting. deploy.sh is a thin
wrapper over the Python package deploy/ beside it (python -m deploy).

Exit status: 0 done, 1 a command failed (or the first run failed, or none started), 2 bad
usage or settings, 3 gcloud not installed."""
NO_GCLOUD = (
    "gcloud is not installed or not on PATH: install the Google Cloud CLI "
    "(https://cloud.google.com/sdk/docs/install), or use --dry-run to see the commands"
)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise Failed(2, f"{message} (see --help)")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="deploy.sh", add_help=False, allow_abbrev=False)
    p.add_argument("words", nargs="*")
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--build-dir", default=str(ROOT / "build"))
    p.add_argument("--env-file")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args, unknown = parser().parse_known_intermixed_args(argv)
        if args.help:
            print(HELP)
            return 0
        command, settings = "deploy", []
        for word in args.words + unknown:
            if word in ("deploy", "stage"):
                command = word
            elif KEY_VALUE.match(word):
                settings.append(word)
            else:
                raise Failed(2, f"unknown argument: {word} (see --help)")
        s = load(command, settings, args.env_file)
        for warning in s.warnings:
            note(f"warning: {warning}")
        if command == "deploy" and not args.dry_run and not shutil.which("gcloud"):
            raise Failed(3, NO_GCLOUD)
        build = bundle.stage(s.root, args.build_dir, s.values)
        if command == "stage":
            return 0
        if args.dry_run:
            return run.deploy(s, run.Runner(build))
        flags_dir = Path(tempfile.mkdtemp())  # removed when the deploy ends
        try:
            return run.deploy(s, run.Runner(build, flags_dir))
        finally:
            shutil.rmtree(flags_dir, ignore_errors=True)
    except SettingsError as e:
        for line in [f"warning: {w}" for w in e.warnings] + [f"deploy.sh: {e.heading}"]:
            note(line)
        note("\n".join(f"  - {problem}" for problem in e.problems))
        return 2
    except Failed as e:
        if e.message:
            note(f"deploy.sh: {e.message}")
        return e.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `./deploy.sh --dry-run | head`: quietly
    sys.exit(main())
