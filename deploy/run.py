"""Print a deploy's commands (--dry-run) or run them, in order: indexes, functions, the
Scheduler jobs, alerting, then the job once and how that run ended.

One sequence serves both: a dry `Runner` shows each command (and both choices where a deploy
chooses by what exists) and records it in `steps`; a live one shows and runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TextIO

from deploy import ROOT, Failed, commands, note, probe
from deploy.commands import Command, gcloud, quote
from deploy.read import is_setting
from deploy.settings import Settings


class Runner:
    """Shows each command (`+ ...`) and, when `live`, runs it: with gcloud's file logging off
    (it keeps every flag value) and none of the shell's settings in its environment."""

    def __init__(
        self, build: Path, flags_dir: Path | None = None, out: TextIO | None = None
    ) -> None:
        self.build, self.flags_dir, self.out = build, flags_dir or build, out or sys.stdout
        self.live = flags_dir is not None
        self.steps: list[Command | str] = []
        self.secret = ""  # masked wherever shown: known in a live run only
        self.env = {k: v for k, v in os.environ.items() if not is_setting(k)}
        self.env["CLOUDSDK_CORE_DISABLE_FILE_LOGGING"] = "1"
        # A user's `log_http` would print every request and answer: the secret read included.
        self.env["CLOUDSDK_CORE_LOG_HTTP"] = "false"
        # deploy.sh put the repository on PYTHONPATH for this package: gcloud gets it as it was.
        paths = [p for p in self.env.pop("PYTHONPATH", "").split(os.pathsep) if p]
        if paths := [p for p in paths if Path(p).resolve() != ROOT]:
            self.env["PYTHONPATH"] = os.pathsep.join(paths)

    def say(self, comment: str) -> None:
        print(f"# {comment}", file=self.out, flush=True)
        self.steps.append(comment)

    def show(self, command: Command) -> None:
        print(command.shown(self.secret), file=self.out, flush=True)
        self.steps.append(command)

    def _exec(self, command: Command, **streams: int | None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(command.argv, env=self.env, text=True, check=False, **streams)
        if done.stderr:
            print(self._mask(done.stderr.rstrip("\n")), file=sys.stderr, flush=True)
        return done

    def _mask(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret else text

    def run(self, command: Command) -> None:
        """Run it; stop the deploy if it fails (an index that exists already is kept)."""
        self.show(command)
        if not self.live:
            return
        read = command.how != "run"
        done = self._exec(
            command, **({"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT} if read else {})
        )
        output = self._mask((done.stdout or "").rstrip("\n"))
        exists = "ALREADY_EXISTS" in output or "already exists" in output
        if done.returncode and command.how == "index" and exists:
            note("  (the index exists already: kept)")
            return
        if output:
            print(output, file=sys.stderr if command.how == "index" else sys.stdout, flush=True)
        if done.returncode:
            raise Failed(done.returncode)

    def capture(self, command: Command, placeholder: str) -> str:
        """Its output (a dry run's: the placeholder); stop the deploy if it fails."""
        self.show(command)
        if not self.live:
            return placeholder
        masked = subprocess.PIPE if command.how == "masked" else None
        done = self._exec(command, stdout=subprocess.PIPE, stderr=masked)
        if done.returncode:
            raise Failed(done.returncode)
        return done.stdout.rstrip("\n")

    def exists(self, command: Command) -> bool:
        """Whether it succeeds (a dry run does not know: False)."""
        self.show(command)
        quiet = subprocess.DEVNULL
        return self.live and self._exec(command, stdout=quiet, stderr=quiet).returncode == 0

    def either(self, found: bool, update: Command, create: Command, what: str) -> None:
        """Update what exists or create it; a dry run shows both."""
        if self.live:
            self.run(update if found else create)
            return
        for command, state in ((update, "exists"), (create, "does not exist yet")):
            self.say(f"the {what} {state}:")
            self.show(command)

    def flags_file(self, name: str, flag: str, value: str) -> Path:
        """A gcloud --flags-file holding FLAG=VALUE (a secret), readable by this user only: the
        secret never goes on a command line, which any local user sees. A dry run writes it in
        the build folder (the secret as ***) so that the printed commands parse."""
        path = self.flags_dir / f"{name}.flags.json"
        path.unlink(missing_ok=True)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(json.dumps({flag: value}) + "\n")
        return path


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def deploy(s: Settings, r: Runner) -> int:
    """Every command after staging, in order; the exit status."""
    for which, trigger in (("trigger", True), ("status", False)):
        (r.build / f"{which}.env.yaml").write_text(commands.env_yaml(s, trigger))
    print("# settings (where each value came from):", file=r.out)
    for name in s.listing():
        print(
            f"#   {quote(f'{name}={s.values[name]}')}  ({s.sources.get(name, 'default')})",
            file=r.out,
        )
    if not r.live:
        r.say("dry run: these are the commands a deploy runs; none is run")
    for command in commands.indexes(s) + commands.functions(s, r.build):
        r.run(command)
    url = url_of(s, r, s.function_name)
    # The scheduler sends the first of the accepted secrets (the newest, during a rotation).
    secret = r.capture(gcloud(s, "read the webhook secret"), "***").split(",")[0].strip()
    if not secret:
        raise Failed(
            1, f"secret {s.webhook_secret_name} version {s.webhook_secret_version} is empty"
        )
    r.secret = secret if r.live else ""
    # A shard's job POSTs a JSON body.
    headers = f"X-Webhook-Secret={secret}" + (",Content-Type=application/json" * (s.shards > 1))
    create = r.flags_file("job-create", "--headers", headers)
    update = r.flags_file("job-update", "--update-headers", headers)
    for describe, update_job, create_job in commands.jobs(s, url, create, update):
        r.either(r.exists(describe), update_job, create_job, "job")
    # Jobs no longer wanted go once the wanted ones exist, so that no tick is lost.
    listed = r.capture(gcloud(s, "list the jobs"), "")
    if not r.live:
        job, names = s.scheduler_job, commands.job_names(s)
        examples = [job, f"{job}-shard-{s.shards}"] if s.shards > 1 else [f"{job}-shard-0"]
        wanted = f"{names[0]}..{names[-1]}" if s.shards > 1 else job
        r.say(f"each job it lists other than {wanted} is deleted, e.g. {' and '.join(examples)}:")
        listed = "\n".join(examples)
    for command in commands.stale_jobs(s, listed):
        r.run(command)
    status_url = url_of(s, r, s.status_function_name)
    if s.alert_channel:
        alerting(s, r, status_url, secret)
    try:
        token = r.capture(gcloud(s, "get your identity token"), "***")
    except Failed:
        token = ""
    if not s.run_after_deploy:  # an explicit choice: the schedule starts the first run
        note("not running the job now (RUN_AFTER_DEPLOY=0): its schedule starts the first run")
        if r.live:
            note(f"deployed {s.function_name} ({url}) and {s.status_function_name}")
        else:
            r.say("dry run: nothing was deployed")
        return 0
    since = probe.server_time(status_url, secret, token) if r.live and token else None
    for name in commands.job_names(s):
        r.run(gcloud(s, "run the job once", name=name))
    if not r.live:
        which = "one of those runs'" if s.shards > 1 else "that run's"
        r.say(f"then: wait up to {s.run_wait_seconds} s for {which} answer on {status_url}?runs=10")
        r.say("dry run: nothing was deployed")
        return 0
    return probe.report(s, url, status_url, since, secret, token)


def url_of(s: Settings, r: Runner, function: str) -> str:
    shown = f"https://{s.region}-{s.project_id}.cloudfunctions.net/{function}"
    url = r.capture(gcloud(s, "read a function's URL", name=function), shown)
    if not url:
        raise Failed(1, f"could not read the URL of {function}")
    return url


def alerting(s: Settings, r: Runner, status_url: str, secret: str) -> None:
    """An uptime check that GETs ?check=health with the secret header (masked) and the
    Monitoring agent's token, and an alert policy on it; both found by display name, so that
    a redeploy updates them instead of adding more."""
    number = r.capture(gcloud(s, "read the project number"), "PROJECT_NUMBER")
    member = (
        f"serviceAccount:service-{number}@gcp-sa-monitoring-notification.iam.gserviceaccount.com"
    )
    header = f"X-Webhook-Secret={secret}"
    create = r.flags_file("check-create", "--headers", header)
    update = r.flags_file("check-update", "--update-headers", header)
    r.run(gcloud(s, "grant the invoker role", name=s.status_function_name, member=member))
    health, (host, path) = f"{s.status_function_name} health", commands.host_and_path(status_url)
    check = first_line(r.capture(gcloud(s, "find the uptime check", health=health), ""))
    if not r.live:
        check = f"projects/{s.project_id}/uptimeCheckConfigs/CHECK_ID"
    found = {"health": health, "host": host, "path": path}
    create_check = gcloud(s, "create the uptime check", flags=create, **found)
    update_check = gcloud(s, "update the uptime check", flags=update, check=check, **found)
    if r.live and not check:
        check = first_line(r.capture(create_check, ""))
        if not check:
            raise Failed(1, "the uptime check was not created")
    else:
        r.either(True, update_check, create_check, "uptime check")
    existing = first_line(r.capture(gcloud(s, "find the alert policy", health=health), ""))
    body = {"policy": commands.policy(s, check.rsplit("/", 1)[-1])}
    name = existing or f"projects/{s.project_id}/alertPolicies/POLICY_ID"
    update_policy = gcloud(s, "update the alert policy", policy_name=name, **body)
    r.either(
        bool(existing), update_policy, gcloud(s, "create the alert policy", **body), "alert policy"
    )
