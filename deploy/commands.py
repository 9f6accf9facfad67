"""The gcloud commands of a deploy, as data: a table of what each is for and its words, each
word formatted alone (a value with spaces stays one argument), from the checked settings and
the values read on the way (the trigger's URL, found resources). `deploy.run` prints them for
--dry-run and runs them. No secret is ever in an argv: it reaches gcloud in a --flags-file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from deploy import note
from deploy.settings import Settings

#: What each command is for -> its words, each formatted alone (so a value with spaces stays
#: one argument); a word that is just {name} of a tuple stands for its words (maybe none).
TEMPLATES = {
    "create a composite index": """firestore indexes composite create --collection-group={group}
        --query-scope={scope} {fields} --database={s.database} --project={s.project_id} --async""",
    "exempt a field from indexing": """firestore indexes fields update {field}
        --collection-group={group} --disable-indexes --database={s.database}
        --project={s.project_id} --async""",
    "deploy the trigger": """functions deploy {name} --gen2 --runtime=python312 {where}
        --trigger-http --service-account={s.service_account} --set-secrets={secrets}
        --env-vars-file={build}/trigger.env.yaml --entry-point=smart_resume
        --source={build}/smart_resume --timeout={s.timeout}s --max-instances={s.shards}
        --concurrency={s.trigger_concurrency} --cpu=1 --memory={s.trigger_memory} {auth}""",
    "deploy the status function": """functions deploy {name} --gen2 --runtime=python312 {where}
        --trigger-http --service-account={s.service_account} --set-secrets={secrets}
        --env-vars-file={build}/status.env.yaml --entry-point=smart_resume_status
        --source={build}/smart_resume_status --memory=256Mi
        --max-instances={s.status_max_instances} --no-allow-unauthenticated""",
    "grant the invoker role": """functions add-invoker-policy-binding {name} {where}
        --member={member}""",
    "read a function's URL": """functions describe {name} --gen2 {where}
        --format=value(serviceConfig.uri)""",
    "read the webhook secret": """secrets versions access {s.webhook_secret_version}
        --secret={s.webhook_secret_name} --project={s.project_id}""",
    "does the job exist": "scheduler jobs describe {name} {at} --format=none",
    "update the job": """scheduler jobs update http {name} {at} --schedule={s.schedule}
        --time-zone={s.time_zone} --uri={url} --http-method=POST --attempt-deadline={s.timeout}s
        --max-retry-attempts=0 --flags-file={flags} {oidc} {clear} {body}""",
    "create the job": """scheduler jobs create http {name} {at} --schedule={s.schedule}
        --time-zone={s.time_zone} --uri={url} --http-method=POST --attempt-deadline={s.timeout}s
        --max-retry-attempts=0 --flags-file={flags} {oidc} {body}""",
    "list the jobs": """scheduler jobs list {at}
        --filter=name~"/jobs/{s.scheduler_job}(-shard-[0-9]+)?$" --format=value(name)""",
    "delete a job no longer wanted": "scheduler jobs delete {name} {at} --quiet",
    "run the job once": "scheduler jobs run {name} {at}",
    "read the project number": "projects describe {s.project_id} --format=value(projectNumber)",
    "find the uptime check": """monitoring uptime list-configs --project={s.project_id}
        --filter=displayName="{health}" --format=value(name)""",
    "update the uptime check": """monitoring uptime update {check} --project={s.project_id}
        --path={path}?check=health --request-method=get --mask-headers=true
        --service-agent-auth=oidc-token --period=5 --timeout=30 --set-status-classes=2xx
        --flags-file={flags}""",
    "create the uptime check": """monitoring uptime create {health} --project={s.project_id}
        --resource-type=uptime-url --resource-labels=host={host},project_id={s.project_id}
        --protocol=https --port=443 --path={path}?check=health --request-method=get
        --mask-headers=true --service-agent-auth=oidc-token --period=5 --timeout=30
        --status-classes=2xx --flags-file={flags} --format=value(name)""",
    "find the alert policy": """alpha monitoring policies list --project={s.project_id}
        --filter=displayName="{health}" --format=value(name)""",
    "update the alert policy": """alpha monitoring policies update {policy_name}
        --project={s.project_id} --policy={policy}""",
    "create the alert policy": """alpha monitoring policies create --project={s.project_id}
        --policy={policy}""",
    "get your identity token": "auth print-identity-token",
}
#: Commands whose output is read first: it may hold the secret (masked), or an index exists.
HOW = {"update the job": "masked", "create the job": "masked", "update the uptime check": "masked"}
HOW |= {"create the uptime check": "masked", "create a composite index": "index"}
#: The status function sends no email: it gets none of the email settings.
STATUS_SKIPS = {"SMART_RESUME_EMAIL_TRANSPORT", "SMART_RESUME_EMAIL_FROM", "SMART_RESUME_EMAIL_TO"}
STATUS_SKIPS |= {"SMART_RESUME_EMAIL_ON", "SMART_RESUME_SENDGRID_HOST", "SMART_RESUME_OUTBOX"}
STATUS_SKIPS |= {"SMART_RESUME_EMAIL_TIMEOUT_SECONDS"}
SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./*^-]+")


def quote(word: str) -> str:
    """`word` as a shell reads it back, single-quoted only when needed."""
    return word if SAFE.fullmatch(word) else "'" + word.replace("'", "'\\''") + "'"


@dataclass(frozen=True)
class Command:
    """One gcloud command. `how`: run (its output shown), masked (output masked: it has the
    secret in a flags file), or index (an index that exists already is kept)."""

    argv: tuple[str, ...]
    purpose: str
    how: str = "run"

    @property
    def files(self) -> list[Path]:
        """What it reads: its flags file, env-vars file, source folder."""
        flags = ("--flags-file=", "--env-vars-file=", "--source=")
        return [Path(arg.split("=", 1)[1]) for arg in self.argv if arg.startswith(flags)]

    def shown(self, secret: str = "") -> str:
        """As printed: `+ ` and the words shell-quoted, the secret (if any) shown as ***."""
        return "+ " + " ".join(quote(a.replace(secret, "***") if secret else a) for a in self.argv)


def gcloud(s: Settings, purpose: str, **values: object) -> Command:
    """The command of TEMPLATES[purpose] with these values."""
    values.setdefault("where", (f"--region={s.region}", f"--project={s.project_id}"))
    values.setdefault("at", (f"--location={s.scheduler_location}", f"--project={s.project_id}"))
    argv = ["gcloud"]
    for word in TEMPLATES[purpose].split():
        value = values.get(word[1:-1])
        argv += value if isinstance(value, tuple) else [word.format(s=s, **values)]
    return Command(tuple(argv), purpose, HOW.get(purpose, "run"))


def secrets(s: Settings) -> tuple[str, str]:
    """--set-secrets of the trigger and of the status function (least privilege: the webhook
    secret only). The AWS keys are optional: workload identity federation needs none."""
    status = f"SMART_RESUME_WEBHOOK_SECRET={s.webhook_secret_name}:{s.webhook_secret_version}"
    pairs = [status]
    if s.sendgrid_secret_name:
        pairs.append(f"SENDGRID_API_KEY={s.sendgrid_secret_name}:{s.sendgrid_secret_version}")
    if s.ping_secret_name:
        pairs.append(f"SMART_RESUME_PING_URL={s.ping_secret_name}:{s.ping_secret_version}")
    if s.aws_access_key_secret_name:
        pairs.append(f"AWS_ACCESS_KEY_ID={s.aws_access_key_secret_name}:latest")
        pairs.append(f"AWS_SECRET_ACCESS_KEY={s.aws_secret_key_secret_name}:latest")
    headers = s.header_secrets.removesuffix(",").split(",") if s.header_secrets else []
    return ",".join(pairs + [f"{pair}:latest" for pair in headers]), status


def env_yaml(s: Settings, trigger: bool) -> str:
    """A function's --env-vars-file: one `NAME: "json"` a line, so no delimiter a value could
    hold and no variable smuggled in by a value."""
    found = {"GOOGLE_CLOUD_PROJECT": s.project_id}
    found |= {n: s.values[n] for n in s.passed if trigger or n not in STATUS_SKIPS}
    found |= {"AWS_REGION": s.aws_region} if trigger and s.aws_region else {}
    return "".join(f"{name}: {json.dumps(value)}\n" for name, value in found.items())


def functions(s: Settings, build: Path) -> list[Command]:
    """Both functions, and the Scheduler's invoker role on the trigger. The trigger runs one
    instance per shard taking several requests, so that a request during a run reaches the
    code (409) instead of Cloud Run's 429."""
    trigger, status = secrets(s)
    auth = "--allow-unauthenticated" if s.allow_unauthenticated else "--no-allow-unauthenticated"
    extra, status_function = {"build": build, "auth": auth}, s.status_function_name
    found = [
        gcloud(s, "deploy the trigger", name=s.function_name, secrets=trigger, **extra),
        gcloud(s, "deploy the status function", name=status_function, secrets=status, **extra),
    ]
    if s.oidc_service_account:
        member = f"serviceAccount:{s.oidc_service_account}"
        found.append(gcloud(s, "grant the invoker role", name=s.function_name, member=member))
    return found


def indexes(s: Settings) -> list[Command]:
    """The composite indexes and field exemptions of firestore.indexes.json (the file the
    query-shape test checks every query against), before the functions that need them."""
    path = s.root / "firestore.indexes.json"
    if not path.is_file():
        note(f"note: no {path}: no index is created")
        return []
    spec = json.loads(path.read_text(encoding="utf-8"))
    found = []
    for index in spec.get("indexes", []):
        fields = tuple(
            f"--field-config=field-path={f['fieldPath']},order={f['order'].lower()}"
            for f in index["fields"]
        )
        scope = index.get("queryScope", "COLLECTION").lower()
        group = index["collectionGroup"]
        found.append(gcloud(s, "create a composite index", group=group, scope=scope, fields=fields))
    for field in spec.get("fieldOverrides", []):
        if not field.get("indexes"):
            args = {"group": field["collectionGroup"], "field": field["fieldPath"]}
            found.append(gcloud(s, "exempt a field from indexing", **args))
    return found


def job_names(s: Settings) -> list[str]:
    """SCHEDULER_JOB, or with SHARDS > 1 one job per shard: NAME-shard-K."""
    shards = [f"{s.scheduler_job}-shard-{k}" for k in range(s.shards)]
    return shards if s.shards > 1 else [s.scheduler_job]


def jobs(s: Settings, url: str, create: Path, update: Path) -> list[tuple[Command, ...]]:
    """Each job's lookup, update and creation (with flags files holding the headers). With
    shards each POSTs {"shard": K}, all on the same schedule (Cloud Scheduler has minute
    resolution and no per-job delay)."""
    oidc = (f"--oidc-service-account-email={s.oidc_service_account}",)
    auth = {"oidc": oidc, "clear": ()} if s.oidc_service_account else {"oidc": ()}
    found = []
    for k, name in enumerate(job_names(s)):
        body = (f'--message-body={{"shard": {k}}}',) if s.shards > 1 else ()
        job = {"clear": ("--clear-auth-token",), **auth, "name": name, "url": url, "body": body}
        update_job = gcloud(s, "update the job", flags=update, **job)
        create_job = gcloud(s, "create the job", flags=create, **job)
        found.append((gcloud(s, "does the job exist", name=name), update_job, create_job))
    return found


def stale_jobs(s: Settings, listed: str) -> list[Command]:
    """Deletions of the listed jobs no longer wanted: the unsharded job once there are shards,
    the shard jobs beyond SHARDS, or all of them back to one job."""
    family = re.compile(re.escape(s.scheduler_job) + "(-shard-[0-9]+)?")
    names = [line.rsplit("/", 1)[-1] for line in listed.splitlines()]
    stale = [name for name in names if family.fullmatch(name) and name not in job_names(s)]
    return [gcloud(s, "delete a job no longer wanted", name=name) for name in stale]


def policy(s: Settings, check_id: str) -> str:
    """The alert policy: the uptime check fails (503: stuck, overdue, failing; or no answer)
    from more than one of its regions for a minute."""
    aggregation = {"alignmentPeriod": "1200s", "perSeriesAligner": "ALIGN_NEXT_OLDER"}
    aggregation |= {"crossSeriesReducer": "REDUCE_COUNT_FALSE"}
    aggregation["groupByFields"] = ["resource.label.project_id", "resource.label.host"]
    watched = 'metric.type="monitoring.googleapis.com/uptime_check/check_passed" AND '
    watched += f'metric.label.check_id="{check_id}" AND resource.type="uptime_url"'
    threshold = {"filter": watched, "comparison": "COMPARISON_GT", "thresholdValue": 1}
    threshold |= {"duration": "60s", "trigger": {"count": 1}, "aggregations": [aggregation]}
    fn = s.status_function_name
    condition = {
        "displayName": f"{fn} answers 503 to ?check=health",
        "conditionThreshold": threshold,
    }
    why = (
        f"smart-resume is not healthy: its status function ({fn}) answers 503 to ?check=health. "
        "GET it with the X-Webhook-Secret header, or run python -m shared.resume status, for the "
        "state (stuck, overdue, failing) and its reasons."
    )
    return json.dumps(
        {
            "displayName": f"{fn} health",
            "combiner": "OR",
            "conditions": [condition],
            "notificationChannels": [s.alert_channel],
            "documentation": {"mimeType": "text/markdown", "content": why},
        }
    )


def host_and_path(url: str) -> tuple[str, str]:
    """A URL's host and path (without a trailing slash, unless it is `/`)."""
    host, _, path = url.partition("://")[2].partition("/")
    return host, "/" + path.removesuffix("/") if path else "/"
