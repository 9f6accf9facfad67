#!/usr/bin/env bash
# Deploy smart-resume: stage one self-contained bundle per function, deploy both Cloud
# Functions (gen2), create or update the Cloud Scheduler job that calls the trigger (one per
# shard with SHARDS > 1; and, with ALERT_CHANNEL, an uptime check on the status function's
# health and an alert policy on it), then run the job once and report how that run ended.
# Run `./deploy.sh --help` for the commands and settings; deploy.env.example documents each one.
set -euo pipefail
# gcloud writes every command's flag values to a log file under its configuration folder; a
# deploy handles secrets, so that log stays off for every gcloud this script runs.
export CLOUDSDK_CORE_DISABLE_FILE_LOGGING=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FUNCTIONS=(smart_resume smart_resume_status)
# Seconds a run needs after its time budget: finish the operation in flight, release the
# lock, send the report. The trigger's timeout is budget + this margin, and the Scheduler's
# attempt deadline equals that timeout so that it covers the whole run.
TIMEOUT_MARGIN_SECONDS=120
# Hard limits: an HTTP function's timeout, and Cloud Scheduler's attempt deadline (the lower,
# so it bounds budget + margin).
MAX_FUNCTION_TIMEOUT_SECONDS=3600
MAX_ATTEMPT_DEADLINE_SECONDS=1800
# The Monitoring service agent calls the status function for the uptime check (an OIDC token).
MONITORING_AGENT_DOMAIN=gcp-sa-monitoring-notification.iam.gserviceaccount.com
# Short settings names in deploy.env and the SMART_RESUME_* variable each one sets.
SHORT_NAMES=(LOCK_NAME STREAM TIME_BUDGET_SECONDS EMAIL_TRANSPORT EMAIL_FROM EMAIL_TO)
REQUIRED=(PROJECT_ID REGION SERVICE_ACCOUNT SCHEDULE TIME_ZONE WEBHOOK_SECRET_NAME
    WEBHOOK_SECRET_VERSION)
# The other settings of deploy.sh itself, in the order the settings listing shows them. Any
# SMART_RESUME_* variable that shared/config.py reads is a setting too (passed to both functions).
OPTIONAL=(SENDGRID_SECRET_NAME SENDGRID_SECRET_VERSION PING_SECRET_NAME PING_SECRET_VERSION
    OIDC_SERVICE_ACCOUNT ALLOW_UNAUTHENTICATED FUNCTION_NAME STATUS_FUNCTION_NAME SCHEDULER_JOB
    SCHEDULER_LOCATION SHARDS TRIGGER_CONCURRENCY TRIGGER_MEMORY DATABASE ALERT_CHANNEL
    RUN_WAIT_SECONDS AWS_REGION STATUS_MAX_INSTANCES HEADER_SECRETS AWS_ACCESS_KEY_SECRET_NAME
    AWS_SECRET_KEY_SECRET_NAME RUN_AFTER_DEPLOY)

usage() {
    cat <<'EOF'
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
WEBHOOK_SECRET_VERSION. See deploy.env.example for every setting.

Exit status: 0 done, 1 a command failed (or the first run failed, or none started), 2 bad
usage or settings, 3 gcloud not installed.
EOF
}

fail() { # fail STATUS MESSAGE...
    local status=$1
    shift
    printf 'deploy.sh: %s\n' "$*" >&2
    exit "$status"
}

note() { printf '%s\n' "$*" >&2; }

# --- arguments -----------------------------------------------------------------------------

COMMAND=deploy
DRY_RUN=0
BUILD_DIR="$ROOT/build"
ENV_FILE="$ROOT/deploy.env"
# How the settings file is named in messages: as given to --env-file, or deploy.env.
ENV_LABEL=deploy.env
ENV_FILE_GIVEN=0
# KEY=VALUE arguments, in order (a later one wins); applied over the settings file.
ARG_SETTINGS=()
while (($#)); do
    case $1 in
        deploy | stage) COMMAND=$1 ;;
        --dry-run) DRY_RUN=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        --build-dir | --env-file)
            (($# >= 2)) || fail 2 "$1 needs a value (see --help)"
            if [[ $1 == --build-dir ]]; then
                BUILD_DIR=$2
            else
                ENV_FILE=$2 ENV_LABEL=$2 ENV_FILE_GIVEN=1
            fi
            shift
            ;;
        --build-dir=*) BUILD_DIR=${1#*=} ;;
        --env-file=*) ENV_FILE=${1#*=} ENV_LABEL=${1#*=} ENV_FILE_GIVEN=1 ;;
        *=*)
            [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || fail 2 "unknown argument: $1 (see --help)"
            ARG_SETTINGS+=("$1")
            ;;
        *) fail 2 "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

# --- settings ------------------------------------------------------------------------------

PROBLEMS=()
problem() { PROBLEMS+=("$*"); }
WARNINGS=()
warn() { WARNINGS+=("$*"); }
# Where each setting's value came from: "deploy.env:LINE", "command line", "default",
# "derived from SCHEDULE", "from EMAIL_TO, deploy.env:LINE"; shown by a deploy, named by
# warnings. Only settings that are set have an entry.
declare -A FROM=()

# A setting of deploy.sh itself (SMART_RESUME_* variables are checked against shared/config.py).
is_deploy_setting() { [[ " ${REQUIRED[*]} ${OPTIONAL[*]} ${SHORT_NAMES[*]} " == *" $1 "* ]]; }

# Why NAME cannot be a setting in the settings file or a KEY=VALUE argument; nothing when it can.
# Secrets are refused with the settings that deploy them: their values belong in Secret Manager,
# never in a file or on a command line.
not_a_setting() {
    case $1 in
        SMART_RESUME_WEBHOOK_SECRET)
            echo "$1 is a secret, not a setting: store it in Secret Manager and set" \
                "WEBHOOK_SECRET_NAME and WEBHOOK_SECRET_VERSION"
            ;;
        SMART_RESUME_PING_URL)
            echo "$1 is a secret, not a setting: store it in Secret Manager and set" \
                "PING_SECRET_NAME and PING_SECRET_VERSION"
            ;;
        SENDGRID_API_KEY)
            echo "$1 is a secret, not a setting: store it in Secret Manager and set" \
                "SENDGRID_SECRET_NAME and SENDGRID_SECRET_VERSION"
            ;;
        SMART_RESUME_*)
            grep -q "^ *\"$1\":" "$ROOT/shared/config.py" ||
                echo "$1 is not a smart-resume setting (see shared/config.py)"
            ;;
        *) is_deploy_setting "$1" || echo "$1 is not a deploy.sh setting (see deploy.env.example)" ;;
    esac
}

# set_setting NAME VALUE SOURCE: a plain shell variable, never exported (gcloud and python get
# only what they need); an empty VALUE clears the setting.
set_setting() {
    if [[ -z $2 ]]; then
        unset "$1" "FROM[$1]"
    else
        printf -v "$1" '%s' "$2"
        FROM[$1]=$3
    fi
}

# The shell's variables are not settings: a shell set up by local_emulator.md exports a 10 s
# lease, the outbox transport and perhaps a local pipeline, which must not reach production.
# Every variable named like a setting (deploy.sh's own, any SMART_RESUME_*) is dropped here; a
# note names those that were set, never their values (one could be a secret). PATH, HOME,
# CLOUDSDK_*, credentials and the like are not settings and stay.
ignore_shell_settings() {
    local name ignored=() list
    while IFS= read -r name; do
        [[ $name == SMART_RESUME_* ]] || is_deploy_setting "$name" || continue
        if [[ -n ${!name} ]]; then
            case $name in
                SMART_RESUME_WEBHOOK_SECRET)
                    note "note: SMART_RESUME_WEBHOOK_SECRET in the environment is not deployed;" \
                        "the functions read it from Secret Manager (WEBHOOK_SECRET_NAME)"
                    ;;
                SMART_RESUME_PING_URL)
                    note "note: SMART_RESUME_PING_URL in the environment is not deployed (it is a" \
                        "secret); the functions read it from Secret Manager (PING_SECRET_NAME)"
                    ;;
                *) ignored+=("$name") ;;
            esac
        fi
        unset "$name"
    done < <(compgen -e | sort)
    if ((${#ignored[@]})); then
        printf -v list '%s, ' "${ignored[@]}"
        note "note: ignored from the shell's environment: ${list%, } (deploy.sh takes settings" \
            "from $ENV_LABEL and KEY=VALUE arguments only)"
    fi
}

# KEY=VALUE lines, read as data (never executed). A key that is not a setting is a problem
# named with its line; a key set twice takes its last value, as a shell would (a note says so).
# A settings file named with --env-file must exist; without deploy.env a note says where the
# settings would come from.
load_env_file() {
    local file=$1 line key value n=0 where why
    local -A line_of=()
    if [[ -d $file ]]; then
        fail 2 "--env-file $file is a folder, not a settings file"
    elif [[ ! -r $file ]]; then  # a named pipe (<(sops -d ...)) is readable: fine
        ((ENV_FILE_GIVEN)) && fail 2 "--env-file $file: no such file, or not readable"
        note "note: no $ENV_LABEL beside deploy.sh: copy deploy.env.example to deploy.env and" \
            "fill it in (or pass every setting as KEY=VALUE)"
        return 0
    fi
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=${line#"${line%%[![:space:]]*}"}
        line=${line%"${line##*[![:space:]]}"}
        [[ -z $line || $line == \#* ]] && continue
        line=${line#export }
        where="$ENV_LABEL:$n"
        [[ $line =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || fail 2 "$where: expected KEY=VALUE"
        key=${BASH_REMATCH[1]}
        value=${BASH_REMATCH[2]}
        if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then
            value=${BASH_REMATCH[1]}
        elif [[ $value == *[[:space:]]#* ]]; then
            # `KEY=value  # why` would deploy the comment as part of the value.
            problem "$where: $key: a comment after the value would be part of it; put it on a" \
                "line of its own (or quote the whole value)"
            continue
        fi
        if [[ -n ${line_of[$key]:-} ]]; then
            note "note: $where: $key is set again; this value wins over line ${line_of[$key]}'s"
        fi
        line_of[$key]=$n
        why=$(not_a_setting "$key")
        if [[ -n $why ]]; then
            problem "$where: $why"
        else
            set_setting "$key" "$value" "$where"
        fi
    done <"$file"
}

# KEY=VALUE arguments, over the file's settings (KEY= clears one).
apply_arguments() {
    local arg why
    for arg in "${ARG_SETTINGS[@]}"; do
        why=$(not_a_setting "${arg%%=*}")
        # One line per setting, as in the file (and in the settings listing).
        [[ $arg == *$'\n'* ]] && why="${arg%%=*}: a value cannot hold a line break"
        if [[ -n $why ]]; then
            problem "command line: $why"
        else
            set_setting "${arg%%=*}" "${arg#*=}" "command line"
        fi
    done
}

# default_setting NAME VALUE [SOURCE]: NAME's value unless it is set ("default" by default).
default_setting() {
    [[ -n ${!1:-} ]] || set_setting "$1" "$2" "${3:-default}"
}

# The default documented in shared/config.py VARIABLES, so the two cannot drift.
config_default() {
    sed -n "s/^ *\"$1\": \"\\([^\"]*\\)\",\$/\\1/p" "$ROOT/shared/config.py"
}

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

python_bin() {
    if [[ -x $ROOT/.venv/bin/python ]]; then
        echo "$ROOT/.venv/bin/python"
    else
        echo python3
    fi
}

# The fixed period in seconds of a Cloud Scheduler schedule, or nothing when it has none.
# The rule: unix-cron with day-of-month and month `*`; the firing times of a week (minutes x
# hours x days of the week) must be evenly spaced, so `*/15 * * * *` is 900, `0 */6 * * *`
# 21600, `30 2 * * *` 86400, `0 3 * * 1` 604800; `*/7 * * * *`, `0 */5 * * *` (a 4-hour gap at
# midnight) and `0 9 * * 1-5` are irregular. The English form `every N minutes|hours` is N
# minutes or hours. Anything else is not guessed.
schedule_period() {
    "$(python_bin)" - "$1" <<'PY'
import re
import sys

spec = " ".join(sys.argv[1].lower().split())
NAMES = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}


def number(text, lo, hi, names):
    value = names.get(text) if names else None
    if value is None:
        if not text.isdigit():
            raise ValueError(text)
        value = int(text)
    if not lo <= value <= hi:
        raise ValueError(text)
    return value


def values(field, lo, hi, names=None):
    found = set()
    for part in field.split(","):
        step = 1
        if "/" in part:
            part, raw = part.split("/", 1)
            step = int(raw) if raw.isdigit() and int(raw) > 0 else 0
            if not step:
                raise ValueError(raw)
        if part == "*":
            first, last = lo, hi
        elif "-" in part:
            first, last = (number(x, lo, hi, names) for x in part.split("-", 1))
        else:
            first = number(part, lo, hi, names)
            last = hi if step > 1 else first
        if first > last:
            raise ValueError(part)
        found.update(range(first, last + 1, step))
    return found


def period():
    english = re.fullmatch(r"every (\d+) (minutes?|mins?|hours?|hrs?)", spec)
    if english:
        n = int(english.group(1))
        return n * (60 if english.group(2).startswith("m") else 3600) if n else None
    fields = spec.split(" ")
    if len(fields) != 5 or fields[2] != "*" or fields[3] != "*":
        return None
    minutes, hours = values(fields[0], 0, 59), values(fields[1], 0, 23)
    days = set(range(7)) if fields[4] == "*" else {d % 7 for d in values(fields[4], 0, 7, NAMES)}
    times = sorted(d * 1440 + h * 60 + m for d in days for h in hours for m in minutes)
    gaps = {b - a for a, b in zip(times, times[1:])} | {times[0] + 7 * 1440 - times[-1]}
    return gaps.pop() * 60 if len(gaps) == 1 else None


try:
    found = period()
except ValueError:
    found = None
print(found or "")
PY
}

# Top-level names of the modules that the pipeline's python operations target (arguments:
# pipeline files, relative to ROOT).
pipeline_targets() {
    (($#)) || return 0
    (cd "$ROOT" && "$(python_bin)" - "$@") <<'PY'
import sys

try:
    import tomllib
except ModuleNotFoundError:
    sys.exit("deploy.sh: reading the pipeline file needs Python 3.11 or later")

for path in sys.argv[1:]:
    with open(path, "rb") as f:
        try:
            pipeline = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            sys.exit(f"deploy.sh: {path} is not valid TOML: {e}")
    for op in pipeline.get("operation", []):
        target = op.get("target") if isinstance(op, dict) else None
        if isinstance(target, str) and target.strip():
            print(target.strip().split(":")[0].split(".")[0])
PY
}

# said NAME: NAME=VALUE and where the value came from, for messages.
said() { printf '%s=%s (%s)' "$1" "${!1}" "${FROM[$1]:-default}"; }

# under_a_minute VALUE: a number of seconds below 60, read as the functions read it (Python's
# float: `3e1` and ` 30` are 30 s too); a bad number is the functions' check to refuse.
under_a_minute() {
    [[ -n $1 ]] || return 1
    "$(python_bin)" -c 'import sys; sys.exit(0 if float(sys.argv[1]) < 60 else 1)' "$1" \
        2>/dev/null
}

# Values that look like test settings (local_emulator.md's, deploy.env.example's placeholders):
# deployed all the same, but each is said, with where it came from and what it does in
# production. Uses `transport` and `transport_from` of the checks above.
warn_test_like_settings() {
    local name value
    if under_a_minute "${SMART_RESUME_LEASE_SECONDS:-}"; then
        warn "$(said SMART_RESUME_LEASE_SECONDS) is under a minute, a test value: another run" \
            "takes the lock over after one slow heartbeat" \
            "(default $(config_default SMART_RESUME_LEASE_SECONDS))"
    fi
    if under_a_minute "${SMART_RESUME_HEARTBEAT_SECONDS:-}"; then
        warn "$(said SMART_RESUME_HEARTBEAT_SECONDS) is under a minute, a test value: the lock" \
            "is written that often for the whole run" \
            "(default $(config_default SMART_RESUME_HEARTBEAT_SECONDS))"
    fi
    if under_a_minute "${SMART_RESUME_TIME_BUDGET_SECONDS:-}"; then
        warn "$(said SMART_RESUME_TIME_BUDGET_SECONDS) is under a minute, a test value: each run" \
            "stops that soon and leaves the rest to the next tick" \
            "(default $(config_default SMART_RESUME_TIME_BUDGET_SECONDS))"
    fi
    case $transport in
        log)
            warn "SMART_RESUME_EMAIL_TRANSPORT=log ($transport_from): reports are only logged," \
                "never emailed; set EMAIL_TRANSPORT=sendgrid (with SENDGRID_SECRET_NAME) or ses"
            ;;
        outbox)
            warn "SMART_RESUME_EMAIL_TRANSPORT=outbox ($transport_from): reports are written to" \
                "the instance's temporary disk and lost with it, never emailed; set" \
                "EMAIL_TRANSPORT=sendgrid (with SENDGRID_SECRET_NAME) or ses"
            ;;
    esac
    for name in PROJECT_ID SERVICE_ACCOUNT OIDC_SERVICE_ACCOUNT; do
        if [[ ${!name:-} =~ (^|[@.])my-project($|[.]) ]]; then
            warn "$(said "$name") holds my-project, the placeholder of deploy.env.example:" \
                "set your project"
        fi
    done
    for name in SMART_RESUME_EMAIL_FROM SMART_RESUME_EMAIL_TO; do
        value=$(printf '%s' "${!name:-}" | tr '[:upper:]' '[:lower:]')
        if [[ $value =~ [@.]example[.](com|org|net)([^a-z0-9.-]|$) ]]; then
            warn "$(said "$name") has an example.com address, the placeholder of" \
                "deploy.env.example: set real addresses"
        fi
    done
    # The repository's own pipeline.toml runs the demo's operations: fine locally, a surprise
    # in production (the demo's "leads" of every client scored by examples/leads.py).
    local pipeline=${SMART_RESUME_PIPELINE:-pipeline.toml} demo
    if [[ -f $ROOT/$pipeline && /$pipeline/ != */../* ]]; then
        demo=$(pipeline_targets "$pipeline" 2>/dev/null | grep -x examples | head -1) || true
        if [[ -n $demo ]]; then
            warn "the pipeline $pipeline (${FROM[SMART_RESUME_PIPELINE]:-default}) runs the" \
                "demo's operations (examples/): write your own pipeline (edit pipeline.toml, or set" \
                "SMART_RESUME_PIPELINE)"
        fi
    fi
    # An http operation on this machine's own address cannot be what production calls.
    if [[ -f $ROOT/$pipeline && /$pipeline/ != */../* ]]; then
        local loopback
        loopback=$(grep -Ev '^[[:space:]]*#' "$ROOT/$pipeline" |
            grep -Eo 'url *= *"https?://(localhost|127\.[0-9.]+|\[::1\])[^"]*"' | head -1) || true
        if [[ -n $loopback ]]; then
            warn "the pipeline $pipeline has an operation $loopback: a local address, which" \
                "a deployed function cannot reach"
        fi
    fi
    if [[ ${SMART_RESUME_PIPELINE:-} == examples/* || ${SMART_RESUME_PIPELINE:-} == ./examples/* ]]; then
        warn "$(said SMART_RESUME_PIPELINE) is under examples/, a demo pipeline: set your own" \
            "(or none, for pipeline.toml)"
    fi
}

ignore_shell_settings
load_env_file "$ENV_FILE"
apply_arguments

# Short names set their SMART_RESUME_* variable; both set to different values is ambiguous.
for short in "${SHORT_NAMES[@]}"; do
    long="SMART_RESUME_$short"
    if [[ -n ${!short:-} ]]; then
        if [[ -n ${!long:-} && ${!long} != "${!short}" ]]; then
            # A KEY=VALUE argument wins over the file, whichever of the two names it uses;
            # two of the same kind are ambiguous.
            long_arg=0 short_arg=0
            [[ ${FROM[$long]} == "command line" ]] && long_arg=1
            [[ ${FROM[$short]} == "command line" ]] && short_arg=1
            ((long_arg && !short_arg)) && continue
            if ((long_arg == short_arg)); then
                problem "$short and $long are both set, to different values" \
                    "(${FROM[$short]} and ${FROM[$long]})"
            fi
        fi
        set_setting "$long" "${!short}" "from $short, ${FROM[$short]}"
    fi
done

if [[ -n ${SMART_RESUME_PIPELINE:-} ]]; then
    if [[ $SMART_RESUME_PIPELINE == /* ]]; then
        problem "SMART_RESUME_PIPELINE must be a path relative to the repository (it is staged)"
    elif [[ /$SMART_RESUME_PIPELINE/ == */../* ]]; then
        # Staged at this same path inside each bundle: `..` would land outside it.
        problem "SMART_RESUME_PIPELINE=$SMART_RESUME_PIPELINE must not go through '..': give" \
            "its path inside the repository"
    elif [[ ! -f $ROOT/$SMART_RESUME_PIPELINE ]]; then
        problem "SMART_RESUME_PIPELINE=$SMART_RESUME_PIPELINE: no such file in $ROOT"
    fi
fi

if [[ $COMMAND == deploy ]]; then
    missing=()
    for name in "${REQUIRED[@]}"; do
        [[ -n ${!name:-} ]] || missing+=("$name")
    done
    if [[ -n ${SENDGRID_SECRET_NAME:-} && -z ${SENDGRID_SECRET_VERSION:-} ]]; then
        missing+=(SENDGRID_SECRET_VERSION)
    fi
    if [[ -n ${PING_SECRET_NAME:-} && -z ${PING_SECRET_VERSION:-} ]]; then
        missing+=(PING_SECRET_VERSION)
    fi
    if ((${#missing[@]})); then
        problem "missing settings: ${missing[*]}"
    fi

    default_setting FUNCTION_NAME smart-resume
    default_setting STATUS_FUNCTION_NAME smart-resume-status
    default_setting STATUS_MAX_INSTANCES 3
    default_setting RUN_AFTER_DEPLOY 1
    default_setting SCHEDULER_JOB smart-resume
    default_setting SCHEDULER_LOCATION "${REGION:-}" "default: REGION"
    default_setting ALLOW_UNAUTHENTICATED 0
    default_setting TRIGGER_CONCURRENCY 4
    default_setting TRIGGER_MEMORY 512Mi
    default_setting DATABASE "(default)"
    default_setting RUN_WAIT_SECONDS 300
    # SHARDS (or SMART_RESUME_SHARDS; both set to different values is refused like the short
    # names): one Scheduler job per shard, and as many trigger instances.
    if [[ -n ${SHARDS:-} && -n ${SMART_RESUME_SHARDS:-} && $SHARDS != "$SMART_RESUME_SHARDS" ]]; then
        problem "SHARDS and SMART_RESUME_SHARDS are both set, to different values" \
            "(${FROM[SHARDS]} and ${FROM[SMART_RESUME_SHARDS]})"
    fi
    if [[ -n ${SMART_RESUME_SHARDS:-} ]]; then
        default_setting SHARDS "$SMART_RESUME_SHARDS" \
            "from SMART_RESUME_SHARDS, ${FROM[SMART_RESUME_SHARDS]}"
    fi
    default_setting SHARDS 1

    # Pinned versions only: `latest` would change what runs without a deploy.
    for name in WEBHOOK_SECRET_VERSION SENDGRID_SECRET_VERSION PING_SECRET_VERSION; do
        if [[ -n ${!name:-} ]] && ! is_count "${!name}"; then
            problem "$name=${!name} must be a version number (pin it; 'latest' is refused)"
        fi
    done
    [[ $ALLOW_UNAUTHENTICATED =~ ^[01]$ ]] ||
        problem "ALLOW_UNAUTHENTICATED=$ALLOW_UNAUTHENTICATED must be 0 or 1"
    if [[ $ALLOW_UNAUTHENTICATED == 0 && -z ${OIDC_SERVICE_ACCOUNT:-} ]]; then
        problem "OIDC_SERVICE_ACCOUNT is required unless ALLOW_UNAUTHENTICATED=1:" \
            "without it Cloud Run refuses the Scheduler's calls"
    fi

    # Concurrency >= 2 lets a second request reach the code (409 while a run holds the lock)
    # instead of Cloud Run's own 429; Cloud Functions gen2 needs 1 vCPU for it.
    if [[ ! $TRIGGER_CONCURRENCY =~ ^[1-9][0-9]{0,3}$ ]] ||
        ((TRIGGER_CONCURRENCY < 2 || TRIGGER_CONCURRENCY > 1000)); then
        problem "TRIGGER_CONCURRENCY=$TRIGGER_CONCURRENCY must be a whole number from 2 to 1000" \
            "(with 1, Cloud Run answers a second request with 429 before the code sees it)"
    fi
    memory_mi=0
    if [[ $TRIGGER_MEMORY =~ ^([1-9][0-9]{0,5})(Mi|Gi)$ ]]; then
        memory_mi=${BASH_REMATCH[1]}
        [[ ${BASH_REMATCH[2]} == Gi ]] && memory_mi=$((memory_mi * 1024))
    fi
    if ((memory_mi < 512 || memory_mi > 4096)); then
        problem "TRIGGER_MEMORY=$TRIGGER_MEMORY must be from 512Mi to 4Gi, written like 512Mi" \
            "or 1Gi (the trigger runs with 1 vCPU)"
    fi
    if [[ ! $DATABASE =~ ^(\(default\)|[a-z][a-z0-9-]{2,61}[a-z0-9])$ ]]; then
        problem "DATABASE=$DATABASE must be (default) or a Firestore database id" \
            "(4 to 63 lowercase letters, digits and hyphens, starting with a letter)"
    fi

    budget=${SMART_RESUME_TIME_BUDGET_SECONDS:-$(config_default SMART_RESUME_TIME_BUDGET_SECONDS)}
    max_run=${SMART_RESUME_MAX_RUN_SECONDS:-$(config_default SMART_RESUME_MAX_RUN_SECONDS)}
    if ! is_count "$budget"; then
        problem "SMART_RESUME_TIME_BUDGET_SECONDS=$budget must be a whole number of seconds"
        budget=0
    else
        # The Scheduler's attempt deadline (at most 1800 s) must cover budget + margin; the
        # function timeout (at most 3600 s) is then within its limit too.
        longest=$((MAX_ATTEMPT_DEADLINE_SECONDS - TIMEOUT_MARGIN_SECONDS))
        if ((${#budget} > 6 || budget > longest)); then
            problem "TIME_BUDGET_SECONDS (SMART_RESUME_TIME_BUDGET_SECONDS)=$budget is too long:" \
                "budget + ${TIMEOUT_MARGIN_SECONDS} s to finish must fit Cloud Scheduler's" \
                "${MAX_ATTEMPT_DEADLINE_SECONDS} s attempt deadline (and the function's" \
                "${MAX_FUNCTION_TIMEOUT_SECONDS} s timeout), so at most $longest"
        fi
        if is_count "$max_run" && ((budget >= max_run)); then
            problem "SMART_RESUME_TIME_BUDGET_SECONDS ($budget) must be shorter than" \
                "SMART_RESUME_MAX_RUN_SECONDS ($max_run), or a running lock would look stale"
        fi
    fi
    if [[ -n ${SMART_RESUME_STREAM:-} && ! $SMART_RESUME_STREAM =~ ^[0-9]+$ ]]; then
        problem "SMART_RESUME_STREAM=$SMART_RESUME_STREAM must be a whole number"
    fi
    if [[ ! $SHARDS =~ ^[1-9][0-9]{0,2}$ ]] || ((SHARDS > 100)); then
        problem "SHARDS=$SHARDS must be a whole number from 1 to 100 (one Scheduler job and" \
            "trigger instance per shard)"
        SHARDS=1
    fi
    # Passed to both functions only with shards: with 1, the deployed settings stay as they were.
    if ((SHARDS > 1)); then
        [[ ${SMART_RESUME_SHARDS:-} == "$SHARDS" ]] ||
            set_setting SMART_RESUME_SHARDS "$SHARDS" "from SHARDS, ${FROM[SHARDS]}"
    else
        set_setting SMART_RESUME_SHARDS "" ""
    fi
    if [[ $RUN_AFTER_DEPLOY != 0 && $RUN_AFTER_DEPLOY != 1 ]]; then
        problem "RUN_AFTER_DEPLOY=$RUN_AFTER_DEPLOY must be 1 (run the job once after the deploy) or 0"
    fi
    if [[ ! $RUN_WAIT_SECONDS =~ ^[0-9]{1,4}$ ]] || ((10#$RUN_WAIT_SECONDS > 3600)); then
        problem "RUN_WAIT_SECONDS=$RUN_WAIT_SECONDS must be a whole number of seconds from 0 to 3600"
    fi
    if [[ -n ${ALERT_CHANNEL:-} ]]; then
        if [[ $ALERT_CHANNEL =~ ^[A-Za-z0-9_-]+$ && -n ${PROJECT_ID:-} ]]; then
            ALERT_CHANNEL="projects/$PROJECT_ID/notificationChannels/$ALERT_CHANNEL"
        elif [[ ! $ALERT_CHANNEL =~ ^projects/[a-z0-9:.-]+/notificationChannels/[A-Za-z0-9_-]+$ ]]; then
            problem "ALERT_CHANNEL=$ALERT_CHANNEL must be a notification channel id or" \
                "projects/PROJECT/notificationChannels/ID (gcloud beta monitoring channels list)"
        fi
    fi

    # How often a run should end well, for the status function's `overdue` health: set, or
    # derived from SCHEDULE when the cron expression has a fixed period; `none` turns it off.
    if [[ ${SMART_RESUME_EXPECTED_EVERY_SECONDS:-} == none ]]; then
        set_setting SMART_RESUME_EXPECTED_EVERY_SECONDS "" ""
    elif [[ -n ${SMART_RESUME_EXPECTED_EVERY_SECONDS:-} ]]; then
        if [[ ! $SMART_RESUME_EXPECTED_EVERY_SECONDS =~ ^[0-9]+([.][0-9]+)?$ ||
            $SMART_RESUME_EXPECTED_EVERY_SECONDS =~ ^0+([.]0+)?$ ]]; then
            problem "SMART_RESUME_EXPECTED_EVERY_SECONDS=$SMART_RESUME_EXPECTED_EVERY_SECONDS" \
                "must be a positive number of seconds (or none)"
        fi
    elif [[ -n ${SCHEDULE:-} ]]; then
        period=$(schedule_period "$SCHEDULE") || fail 2 "could not read SCHEDULE (python needed)"
        if [[ -n $period ]]; then
            set_setting SMART_RESUME_EXPECTED_EVERY_SECONDS "$period" "derived from SCHEDULE"
            # A run may start up to a period after the last one ended and take its whole
            # budget and margin: the grace covers that, or a long run would look overdue.
            if [[ -z ${SMART_RESUME_GRACE_SECONDS:-} ]] && is_count "$budget"; then
                grace=$((period / 2))
                ((budget + TIMEOUT_MARGIN_SECONDS > grace)) && grace=$((budget + TIMEOUT_MARGIN_SECONDS))
                set_setting SMART_RESUME_GRACE_SECONDS "$grace" \
                    "derived from SCHEDULE and the time budget"
            fi
            note "note: SCHEDULE '$SCHEDULE' runs every $period s:" \
                "SMART_RESUME_EXPECTED_EVERY_SECONDS=$period," \
                "SMART_RESUME_GRACE_SECONDS=${SMART_RESUME_GRACE_SECONDS:-$((period / 2))}"
        else
            note "note: SCHEDULE '$SCHEDULE' has no fixed period, so no expected interval is" \
                "guessed: runs are never reported overdue unless you set" \
                "SMART_RESUME_EXPECTED_EVERY_SECONDS"
        fi
    fi

    # The same cross-checks the functions make at startup, found before a deploy, not after.
    transport=log transport_from="default without SENDGRID_SECRET_NAME"
    if [[ -n ${SENDGRID_SECRET_NAME:-} ]]; then
        transport=sendgrid transport_from="default with SENDGRID_SECRET_NAME"
    fi
    if [[ -n ${SMART_RESUME_EMAIL_TRANSPORT:-} ]]; then
        transport=$SMART_RESUME_EMAIL_TRANSPORT transport_from=${FROM[SMART_RESUME_EMAIL_TRANSPORT]}
    fi
    transport=$(printf '%s' "$transport" | tr '[:upper:]' '[:lower:]')
    case $transport in
        sendgrid | ses)
            [[ -n ${SMART_RESUME_EMAIL_FROM:-} ]] ||
                problem "EMAIL_FROM is required for the $transport transport"
            [[ -n ${SMART_RESUME_EMAIL_TO:-} ]] ||
                problem "EMAIL_TO is required for the $transport transport"
            ;;
        log | outbox) ;;
        *) problem "EMAIL_TRANSPORT=$transport is not one of sendgrid, ses, log, outbox" ;;
    esac
    if [[ $transport == sendgrid && -z ${SENDGRID_SECRET_NAME:-} ]]; then
        problem "SENDGRID_SECRET_NAME is required for the sendgrid transport"
    fi
    if [[ $transport == ses && -z ${AWS_REGION:-} ]]; then
        problem "AWS_REGION is required for the ses transport"
    fi

    # The SMART_RESUME_* settings, passed to both functions (each name was checked against
    # shared/config.py when read, and the secrets refused).
    PASS_THROUGH=()
    for name in $(printf '%s\n' "${!FROM[@]}" | sort); do
        if [[ $name == SMART_RESUME_* ]]; then PASS_THROUGH+=("$name"); fi
    done

    warn_test_like_settings
fi

# The functions' own startup checks (shared/config.py) on the values they will be deployed with:
# a value they would refuse (`SMART_RESUME_LEASE_SECONDS=soon`) is found here, not by every
# request after the deploy answering 500. Secrets stand in as placeholders (Secret Manager's).
function_settings_problems() {
    local pairs=("GOOGLE_CLOUD_PROJECT=${PROJECT_ID:-}") name
    for name in "${PASS_THROUGH[@]}"; do pairs+=("$name=${!name}"); done
    [[ -n ${AWS_REGION:-} ]] && pairs+=("AWS_REGION=$AWS_REGION")
    [[ -n ${SENDGRID_SECRET_NAME:-} ]] && pairs+=("SENDGRID_API_KEY=placeholder")
    [[ -n ${PING_SECRET_NAME:-} ]] && pairs+=("SMART_RESUME_PING_URL=https://ping.invalid/x")
    pairs+=("SMART_RESUME_WEBHOOK_SECRET=placeholder-of-16-chars-or-more")
    (cd "$ROOT" && "$(python_bin)" - "${pairs[@]}") <<'PY'
import sys

from shared.config import load_settings
from shared.errors import ConfigError

try:
    load_settings(dict(pair.split("=", 1) for pair in sys.argv[1:]))
except ConfigError as exc:
    print("\n".join(exc.problems))
PY
}

if [[ $COMMAND == deploy ]] && ((${#PROBLEMS[@]} == 0)); then
    while IFS= read -r line; do
        [[ -z $line ]] || problem "the functions would refuse this at startup: $line"
    done < <(function_settings_problems)
fi

if ((${#WARNINGS[@]})); then
    printf 'warning: %s\n' "${WARNINGS[@]}" >&2
fi
if ((${#PROBLEMS[@]})); then
    {
        printf 'deploy.sh: cannot %s, fix these settings (%s or KEY=VALUE arguments):\n' \
            "$COMMAND" "$ENV_FILE"
        printf '  - %s\n' "${PROBLEMS[@]}"
    } >&2
    exit 2
fi

if [[ $COMMAND == deploy && $DRY_RUN == 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
    fail 3 "gcloud is not installed or not on PATH: install the Google Cloud CLI" \
        "(https://cloud.google.com/sdk/docs/install), or use --dry-run to see the commands"
fi

# --- stage ---------------------------------------------------------------------------------

# Copy a folder without caches or tests: the deployed source holds only what runs.
copy_tree() {
    mkdir -p "$2"
    tar -C "$1" -cf - --exclude=__pycache__ --exclude='*.py[co]' --exclude=.pytest_cache \
        --exclude=tests --exclude='test_*.py' --exclude='*_test.py' --exclude=conftest.py \
        --exclude=.DS_Store . | tar -C "$2" -xf -
}

# Each bundle holds what the functions will load, and nothing else: the pipeline they read
# (SMART_RESUME_PIPELINE, else the default pipeline.toml; not both, nor the demo's examples/ when
# the pipeline does not name them), the local packages its python operations target, and a
# custom SMART_RESUME_MODULE's.
stage() {
    local fn dest pkg pipelines=() packages=()
    if [[ -n ${SMART_RESUME_PIPELINE:-} ]]; then
        pipelines+=("${SMART_RESUME_PIPELINE#./}")
    elif [[ -f $ROOT/pipeline.toml ]]; then
        pipelines+=(pipeline.toml)
    else
        note "note: no pipeline.toml in $ROOT; staging without one"
    fi
    local names
    names=$(pipeline_targets "${pipelines[@]}")
    for pkg in $names ${SMART_RESUME_MODULE:+"${SMART_RESUME_MODULE%%.*}"}; do
        case $pkg in shared | functions | tests | build) continue ;; esac
        [[ -d $ROOT/$pkg || -f $ROOT/$pkg.py ]] || continue
        [[ " ${packages[*]} " == *" $pkg "* ]] || packages+=("$pkg")
    done

    mkdir -p "$BUILD_DIR"
    BUILD_DIR="$(cd "$BUILD_DIR" && pwd)"
    for fn in "${FUNCTIONS[@]}"; do
        dest="$BUILD_DIR/$fn"
        if [[ $dest/main.py -ef $ROOT/functions/$fn/main.py ]]; then
            fail 2 "--build-dir $BUILD_DIR would overwrite the sources"
        fi
        rm -rf -- "$dest"
        mkdir -p "$dest"
        cp "$ROOT/functions/$fn/main.py" "$ROOT/requirements.txt" "$dest/"
        copy_tree "$ROOT/shared" "$dest/shared"
        for pkg in "${pipelines[@]}"; do
            mkdir -p "$(dirname "$dest/$pkg")"
            cp "$ROOT/$pkg" "$dest/$pkg"
        done
        for pkg in "${packages[@]}"; do
            if [[ -d $ROOT/$pkg ]]; then
                copy_tree "$ROOT/$pkg" "$dest/$pkg"
            else
                cp "$ROOT/$pkg.py" "$dest/"
            fi
        done
    done
    note "staged ${FUNCTIONS[*]} into $BUILD_DIR" \
        "(pipeline: ${pipelines[*]:-none}${packages[*]:+; with ${packages[*]}})"
}

stage
[[ $COMMAND == stage ]] && exit 0

# --- deploy --------------------------------------------------------------------------------

SECRET_VALUE=""

# quote VAR WORD: VAR gets WORD as the shell reads it back (single quotes only when needed).
quote() {
    if [[ $2 =~ ^[A-Za-z0-9_@%+=:,./*^-]+$ ]]; then
        printf -v "$1" '%s' "$2"
    else
        printf -v "$1" "'%s'" "${2//\'/\'\\\'\'}"
    fi
}

# Shell-quoted for copying, with the secret shown as ***.
show() {
    local arg word out=()
    for arg in "$@"; do
        [[ -n $SECRET_VALUE ]] && arg=${arg//"$SECRET_VALUE"/***}
        quote word "$arg"
        out+=("$word")
    done
    printf '+ %s\n' "${out[*]}"
}

# Every setting in effect and where its value came from, as comment lines (told apart from the
# commands, which start with `+ `): the required ones, deploy.sh's others that are set or
# defaulted, then the SMART_RESUME_* ones passed to both functions. Each line is KEY=VALUE as a
# KEY=VALUE argument takes it. No secret is a setting, so no value here needs masking.
show_settings() {
    local name word
    echo "# settings (where each value came from):"
    for name in "${REQUIRED[@]}" "${OPTIONAL[@]}" "${PASS_THROUGH[@]}"; do
        [[ -n ${!name:-} ]] || continue
        quote word "$name=${!name}"
        printf '#   %s  (%s)\n' "$word" "${FROM[$name]:-default}"
    done
}

run() {
    show "$@"
    ((DRY_RUN)) || "$@"
}

# flags_file NAME FLAG VALUE: a gcloud --flags-file holding FLAG=VALUE (a secret), readable by
# this user only; prints the --flags-file argument. A dry run writes it into the build folder
# with the secret masked, so the printed commands can be parsed as they are.
# (Called in $(...): the folder is made, and its removal set, by the script itself.)
FLAGS_DIR=""
flags_file() {
    local name=$1 flag=$2 value=$3 file
    if ((DRY_RUN)); then
        mkdir -p "$BUILD_DIR"
        file="$BUILD_DIR/$name.flags.json"
    else
        file="$FLAGS_DIR/$name.flags.json"
    fi
    # The value reaches python on standard input (printf is a builtin): never on an argv.
    (
        umask 077
        printf '%s' "$value" |
            python3 -c 'import json, sys; print(json.dumps({sys.argv[1]: sys.stdin.read()}))' \
                "$flag" >"$file"
    )
    echo "--flags-file=$file"
}

# run_masked COMMAND...: for commands that carry the secret; their output is masked too.
run_masked() {
    local output status=0
    show "$@"
    ((DRY_RUN)) && return 0
    output=$("$@" 2>&1) || status=$?
    [[ -z $output ]] || printf '%s\n' "${output//"$SECRET_VALUE"/***}"
    return "$status"
}

# create_index COMMAND...: an index that exists already (or is still being built) is kept, so
# a deploy can be repeated.
create_index() {
    local output status=0
    show "$@"
    ((DRY_RUN)) && return 0
    output=$("$@" 2>&1) || status=$?
    if ((status)) && [[ $output == *ALREADY_EXISTS* || $output == *"already exists"* ]]; then
        note "  (the index exists already: kept)"
        return 0
    fi
    [[ -z $output ]] || printf '%s\n' "$output" >&2
    return "$status"
}

# capture VAR DRY_RUN_VALUE COMMAND...: VAR gets the command's output (a placeholder in a dry run).
capture() {
    local var=$1 placeholder=$2
    shift 2
    show "$@"
    if ((DRY_RUN)); then
        printf -v "$var" '%s' "$placeholder"
    else
        local output
        output=$("$@")
        printf -v "$var" '%s' "$output"
    fi
}

# capture_masked VAR DRY_RUN_VALUE COMMAND...: capture, for commands that carry the secret
# (their messages are masked too).
capture_masked() {
    local var=$1 placeholder=$2 output status=0 errors
    shift 2
    show "$@"
    if ((DRY_RUN)); then
        printf -v "$var" '%s' "$placeholder"
        return 0
    fi
    errors=$(mktemp)
    output=$("$@" 2>"$errors") || status=$?
    if [[ -s $errors ]]; then
        local text
        text=$(<"$errors")
        printf '%s\n' "${text//"$SECRET_VALUE"/***}" >&2
    fi
    rm -f "$errors"
    printf -v "$var" '%s' "$output"
    return "$status"
}

# The functions' variables go in a YAML file (--env-vars-file), each value JSON-quoted: no
# delimiter a value could contain, no variable smuggled in by a value. The status function gets
# only what it reads: none of the email settings (it sends nothing).
STATUS_SKIPS=(SMART_RESUME_EMAIL_TRANSPORT SMART_RESUME_EMAIL_FROM SMART_RESUME_EMAIL_TO
    SMART_RESUME_EMAIL_ON SMART_RESUME_SENDGRID_HOST SMART_RESUME_OUTBOX
    SMART_RESUME_EMAIL_TIMEOUT_SECONDS)
env_vars_file() {
    local which=$1 file="$BUILD_DIR/$1.env.yaml" name skip pairs=()
    pairs+=("GOOGLE_CLOUD_PROJECT" "$PROJECT_ID")
    for name in "${PASS_THROUGH[@]}"; do
        skip=0
        if [[ $which == status ]]; then
            for s in "${STATUS_SKIPS[@]}"; do [[ $name == "$s" ]] && skip=1; done
        fi
        ((skip)) || pairs+=("$name" "${!name}")
    done
    [[ $which == trigger && -n ${AWS_REGION:-} ]] && pairs+=("AWS_REGION" "$AWS_REGION")
    mkdir -p "$BUILD_DIR"
    python3 -c 'import json, sys
a = sys.argv[1:]
print("\n".join(f"{a[i]}: {json.dumps(a[i + 1])}" for i in range(0, len(a), 2)))' \
        "${pairs[@]}" >"$file"
    echo "--env-vars-file=$file"
}

# Least privilege: the status function holds the webhook secret only; the email key, the
# ping URL and the operations' header secrets go to the trigger alone.
status_secrets="SMART_RESUME_WEBHOOK_SECRET=$WEBHOOK_SECRET_NAME:$WEBHOOK_SECRET_VERSION"
secrets=$status_secrets
if [[ -n ${SENDGRID_SECRET_NAME:-} ]]; then
    secrets+=",SENDGRID_API_KEY=$SENDGRID_SECRET_NAME:$SENDGRID_SECRET_VERSION"
fi
if [[ -n ${PING_SECRET_NAME:-} ]]; then
    secrets+=",SMART_RESUME_PING_URL=$PING_SECRET_NAME:$PING_SECRET_VERSION"
fi
# SES deployed: the AWS keys from Secret Manager (or leave them unset and use workload identity
# federation, see the README).
if [[ -n ${AWS_ACCESS_KEY_SECRET_NAME:-} ]]; then
    secrets+=",AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_SECRET_NAME:latest"
    secrets+=",AWS_SECRET_ACCESS_KEY=${AWS_SECRET_KEY_SECRET_NAME:?AWS_SECRET_KEY_SECRET_NAME goes with AWS_ACCESS_KEY_SECRET_NAME}:latest"
fi
# Header secrets of http operations (headers = {"Authorization" = "env:NAME"}): NAME=secret,...
if [[ -n ${HEADER_SECRETS:-} ]]; then
    IFS=, read -ra header_secrets <<<"$HEADER_SECRETS"
    for pair in "${header_secrets[@]}"; do
        [[ $pair =~ ^[A-Za-z_][A-Za-z0-9_]*=[A-Za-z0-9_-]+$ ]] ||
            fail 2 "HEADER_SECRETS: '$pair' is not VARIABLE=secret-name"
        secrets+=",$pair:latest"
    done
fi
auth_flag=--no-allow-unauthenticated
[[ $ALLOW_UNAUTHENTICATED == 1 ]] && auth_flag=--allow-unauthenticated
common=(--gen2 --runtime=python312 "--region=$REGION" "--project=$PROJECT_ID" --trigger-http
    "--service-account=$SERVICE_ACCOUNT")
trigger_env=$(env_vars_file trigger)
status_env=$(env_vars_file status)
# Checked above: budget + margin <= the attempt deadline limit <= the function timeout limit.
timeout=$((budget + TIMEOUT_MARGIN_SECONDS))
deadline=$timeout

show_settings
((DRY_RUN)) && echo "# dry run: these are the commands a deploy runs; none is run"

# Firestore indexes first, so the functions never query without them. Creating an index that
# exists is kept as success and an exemption update is idempotent: a deploy can be repeated.
# The composite indexes and field overrides are declared in firestore.indexes.json (the
# Firebase CLI's format; tests/test_zz_indexes.py checks every query of the code against it).
index_commands() {
    python3 - "$ROOT/firestore.indexes.json" <<'PY'
import json, shlex, sys
spec = json.load(open(sys.argv[1]))
for index in spec.get("indexes", []):
    fields = " ".join(
        shlex.quote(f"--field-config=field-path={f['fieldPath']},order={f['order'].lower()}")
        for f in index["fields"]
    )
    print(f"composite {index['collectionGroup']} {index.get('queryScope', 'COLLECTION').lower()} {fields}")
for override in spec.get("fieldOverrides", []):
    if not override.get("indexes"):
        print(f"exempt {override['collectionGroup']} {override['fieldPath']}")
PY
}
while read -r kind group rest; do
    eval "extra=($rest)"
    if [[ $kind == composite ]]; then
        create_index gcloud firestore indexes composite create "--collection-group=$group" \
            "--query-scope=${extra[0]}" "${extra[@]:1}" "--database=$DATABASE" \
            "--project=$PROJECT_ID" --async
    else
        run gcloud firestore indexes fields update "${extra[0]}" \
            "--collection-group=$group" --disable-indexes "--database=$DATABASE" \
            "--project=$PROJECT_ID" --async
    fi
done < <(index_commands)

# The trigger: one instance per shard (one run at a time each, each shard its own lock), but
# several requests per instance, so that a request during a run reaches the code (409) instead
# of Cloud Run's 429. (With concurrency above 1, Cloud Run may still put two shards' runs on
# one instance; they then share its vCPU.)
run gcloud functions deploy "$FUNCTION_NAME" "${common[@]}" "--set-secrets=$secrets" \
    "$trigger_env" --entry-point=smart_resume \
    "--source=$BUILD_DIR/smart_resume" "--timeout=${timeout}s" "--max-instances=$SHARDS" \
    "--concurrency=$TRIGGER_CONCURRENCY" --cpu=1 "--memory=$TRIGGER_MEMORY" "$auth_flag"
run gcloud functions deploy "$STATUS_FUNCTION_NAME" "${common[@]}" \
    "--set-secrets=$status_secrets" "$status_env" \
    --entry-point=smart_resume_status "--source=$BUILD_DIR/smart_resume_status" \
    --memory=256Mi "--max-instances=$STATUS_MAX_INSTANCES" --no-allow-unauthenticated

if [[ -n ${OIDC_SERVICE_ACCOUNT:-} ]]; then
    run gcloud functions add-invoker-policy-binding "$FUNCTION_NAME" "--region=$REGION" \
        "--project=$PROJECT_ID" "--member=serviceAccount:$OIDC_SERVICE_ACCOUNT"
fi

capture url "https://$REGION-$PROJECT_ID.cloudfunctions.net/$FUNCTION_NAME" \
    gcloud functions describe "$FUNCTION_NAME" --gen2 "--region=$REGION" \
    "--project=$PROJECT_ID" '--format=value(serviceConfig.uri)'
[[ -n $url ]] || fail 1 "could not read the URL of $FUNCTION_NAME"

# The scheduler sends the first of the accepted secrets (the newest, during a rotation).
capture secret '***' gcloud secrets versions access "$WEBHOOK_SECRET_VERSION" \
    "--secret=$WEBHOOK_SECRET_NAME" "--project=$PROJECT_ID"
secret=${secret%%,*}
secret=${secret#"${secret%%[![:space:]]*}"}
secret=${secret%"${secret##*[![:space:]]}"}
[[ -n $secret ]] || fail 1 "secret $WEBHOOK_SECRET_NAME version $WEBHOOK_SECRET_VERSION is empty"
((DRY_RUN)) || SECRET_VALUE=$secret

if ! ((DRY_RUN)); then
    FLAGS_DIR=$(mktemp -d)
    trap 'rm -rf "$FLAGS_DIR"' EXIT
fi
job=(--location="$SCHEDULER_LOCATION" "--project=$PROJECT_ID" "--schedule=$SCHEDULE"
    "--time-zone=$TIME_ZONE" "--uri=$url" --http-method=POST "--attempt-deadline=${deadline}s"
    --max-retry-attempts=0)
headers="X-Webhook-Secret=$secret"
# A shard's job POSTs a JSON body.
((SHARDS > 1)) && headers+=",Content-Type=application/json"
# The secret never goes on a command line (any local user sees argv): gcloud reads the header
# flag from a file only this user can read, removed when the deploy ends.
job_create=("${job[@]}" "$(flags_file job-create --headers "$headers")")
job_update=("${job[@]}" "$(flags_file job-update --update-headers "$headers")")
if [[ -n ${OIDC_SERVICE_ACCOUNT:-} ]]; then
    job_create+=("--oidc-service-account-email=$OIDC_SERVICE_ACCOUNT")
    job_update+=("--oidc-service-account-email=$OIDC_SERVICE_ACCOUNT")
else
    job_update+=(--clear-auth-token)
fi

# One job without a body, or with SHARDS > 1 one job per shard, `NAME-shard-K`, POSTing
# {"shard": K}. Cloud Scheduler's cron has minute resolution and no per-job delay, so the shard
# jobs share the schedule and fire together (the trigger's instances run them side by side).
JOBS=("$SCHEDULER_JOB")
if ((SHARDS > 1)); then
    JOBS=()
    for ((k = 0; k < SHARDS; k++)); do JOBS+=("$SCHEDULER_JOB-shard-$k"); done
fi

# upsert_job NAME [FLAG...]: create the job, or update it when it exists; FLAGs go to both.
upsert_job() {
    local name=$1 describe
    shift
    describe=(gcloud scheduler jobs describe "$name" --location="$SCHEDULER_LOCATION"
        "--project=$PROJECT_ID" --format=none)
    if ((DRY_RUN)); then
        show "${describe[@]}"
        echo "# the job exists:"
        show gcloud scheduler jobs update http "$name" "${job_update[@]}" "$@"
        echo "# the job does not exist yet:"
        show gcloud scheduler jobs create http "$name" "${job_create[@]}" "$@"
    else
        show "${describe[@]}"
        if "${describe[@]}" >/dev/null 2>&1; then
            run_masked gcloud scheduler jobs update http "$name" "${job_update[@]}" "$@"
        else
            run_masked gcloud scheduler jobs create http "$name" "${job_create[@]}" "$@"
        fi
    fi
}

for ((k = 0; k < ${#JOBS[@]}; k++)); do
    if ((SHARDS > 1)); then
        upsert_job "${JOBS[k]}" "--message-body={\"shard\": $k}"
    else
        upsert_job "${JOBS[k]}"
    fi
done

# Jobs of this deployment that are no longer wanted: the unsharded job once there are shards,
# the shard jobs beyond SHARDS, or all of them back to one job. Deleted after the wanted ones
# exist, so that no tick is lost.
job_family="/jobs/$SCHEDULER_JOB(-shard-[0-9]+)?\$"
capture listed "" gcloud scheduler jobs list --location="$SCHEDULER_LOCATION" \
    "--project=$PROJECT_ID" "--filter=name~\"$job_family\"" '--format=value(name)'
if ((DRY_RUN)); then
    if ((SHARDS > 1)); then
        echo "# each job it lists other than ${JOBS[0]}..${JOBS[SHARDS - 1]} is deleted," \
            "e.g. $SCHEDULER_JOB and $SCHEDULER_JOB-shard-$SHARDS:"
        listed="$SCHEDULER_JOB"$'\n'"$SCHEDULER_JOB-shard-$SHARDS"
    else
        echo "# each job it lists other than $SCHEDULER_JOB is deleted, e.g. $SCHEDULER_JOB-shard-0:"
        listed="$SCHEDULER_JOB-shard-0"
    fi
fi
while IFS= read -r name; do
    name=${name##*/}
    [[ $name =~ ^"$SCHEDULER_JOB"(-shard-[0-9]+)?$ ]] || continue
    [[ " ${JOBS[*]} " == *" $name "* ]] && continue
    run gcloud scheduler jobs delete "$name" --location="$SCHEDULER_LOCATION" \
        "--project=$PROJECT_ID" --quiet
done <<<"$listed"

capture status_url "https://$REGION-$PROJECT_ID.cloudfunctions.net/$STATUS_FUNCTION_NAME" \
    gcloud functions describe "$STATUS_FUNCTION_NAME" --gen2 "--region=$REGION" \
    "--project=$PROJECT_ID" '--format=value(serviceConfig.uri)'
[[ -n $status_url ]] || fail 1 "could not read the URL of $STATUS_FUNCTION_NAME"

# --- alerting: an uptime check on ?check=health and an alert policy on it ------------------

# Found by display name, so a redeploy updates them instead of adding more.
HEALTH_NAME="$STATUS_FUNCTION_NAME health"

# The policy: the check fails (503: stuck, overdue, failing; or no answer) from more than one
# of its regions for a minute.
alert_policy() { # alert_policy CHECK_ID
    local filter
    filter='metric.type=\"monitoring.googleapis.com/uptime_check/check_passed\" AND'
    filter+=' metric.label.check_id=\"'"$1"'\" AND resource.type=\"uptime_url\"'
    printf '{"displayName": "%s", "combiner": "OR", ' "$HEALTH_NAME"
    printf '"conditions": [{"displayName": "%s answers 503 to ?check=health", ' \
        "$STATUS_FUNCTION_NAME"
    printf '"conditionThreshold": {"filter": "%s", "comparison": "COMPARISON_GT", ' "$filter"
    printf '"thresholdValue": 1, "duration": "60s", "trigger": {"count": 1}, '
    printf '"aggregations": [{"alignmentPeriod": "1200s", "perSeriesAligner": '
    printf '"ALIGN_NEXT_OLDER", "crossSeriesReducer": "REDUCE_COUNT_FALSE", "groupByFields": '
    printf '["resource.label.project_id", "resource.label.host"]}]}}], '
    printf '"notificationChannels": ["%s"], ' "$ALERT_CHANNEL"
    printf '"documentation": {"mimeType": "text/markdown", "content": "smart-resume is not'
    printf ' healthy: its status function (%s) answers 503 to ?check=health. GET it with' \
        "$STATUS_FUNCTION_NAME"
    printf ' the X-Webhook-Secret header, or run python -m shared.resume status, for the'
    printf ' state (stuck, overdue, failing) and its reasons."}}'
}

if [[ -n ${ALERT_CHANNEL:-} ]]; then
    status_host=${status_url#*://}
    status_path=/
    [[ $status_host == */* ]] && status_path=/${status_host#*/}
    [[ $status_path == / ]] || status_path=${status_path%/}
    status_host=${status_host%%/*}
    capture project_number PROJECT_NUMBER gcloud projects describe "$PROJECT_ID" \
        '--format=value(projectNumber)'
    # The check calls the status function with the Monitoring service agent's identity token.
    run gcloud functions add-invoker-policy-binding "$STATUS_FUNCTION_NAME" "--region=$REGION" \
        "--project=$PROJECT_ID" \
        "--member=serviceAccount:service-$project_number@$MONITORING_AGENT_DOMAIN"
    check_flags=("--path=${status_path}?check=health" --request-method=get --mask-headers=true
        --service-agent-auth=oidc-token --period=5 --timeout=30)
    check_create=(gcloud monitoring uptime create "$HEALTH_NAME" "--project=$PROJECT_ID"
        --resource-type=uptime-url "--resource-labels=host=$status_host,project_id=$PROJECT_ID"
        --protocol=https --port=443 "${check_flags[@]}" --status-classes=2xx
        "$(flags_file check-create --headers "X-Webhook-Secret=$secret")" '--format=value(name)')
    check_update=(gcloud monitoring uptime update CHECK "--project=$PROJECT_ID"
        "${check_flags[@]}" --set-status-classes=2xx
        "$(flags_file check-update --update-headers "X-Webhook-Secret=$secret")")
    capture check_name "" gcloud monitoring uptime list-configs "--project=$PROJECT_ID" \
        "--filter=displayName=\"$HEALTH_NAME\"" '--format=value(name)'
    check_name=${check_name%%$'\n'*}
    if ((DRY_RUN)); then
        check_name="projects/$PROJECT_ID/uptimeCheckConfigs/CHECK_ID"
        echo "# the uptime check exists:"
        show "${check_update[@]/#CHECK/$check_name}"
        echo "# the uptime check does not exist yet:"
        show "${check_create[@]}"
    elif [[ -n $check_name ]]; then
        check_update[4]=$check_name
        run_masked "${check_update[@]}"
    else
        capture_masked check_name "" "${check_create[@]}"
        check_name=${check_name%%$'\n'*}
        [[ -n $check_name ]] || fail 1 "the uptime check was not created"
    fi
    policy=$(alert_policy "${check_name##*/}")
    capture policy_name "" gcloud alpha monitoring policies list "--project=$PROJECT_ID" \
        "--filter=displayName=\"$HEALTH_NAME\"" '--format=value(name)'
    policy_name=${policy_name%%$'\n'*}
    if ((DRY_RUN)); then
        echo "# the alert policy exists:"
        show gcloud alpha monitoring policies update \
            "projects/$PROJECT_ID/alertPolicies/POLICY_ID" "--project=$PROJECT_ID" \
            "--policy=$policy"
        echo "# the alert policy does not exist yet:"
        show gcloud alpha monitoring policies create "--project=$PROJECT_ID" "--policy=$policy"
    elif [[ -n $policy_name ]]; then
        run gcloud alpha monitoring policies update "$policy_name" "--project=$PROJECT_ID" \
            "--policy=$policy"
    else
        run gcloud alpha monitoring policies create "--project=$PROJECT_ID" "--policy=$policy"
    fi
fi

# --- the first run: the Scheduler job once, and how that run ended ---------------------------

# first_run_probe MODE URL [SINCE WAIT]: reads the status function with SR_SECRET and SR_TOKEN.
# `since` prints the status function's server time; `wait` waits for a run that started after
# SINCE to end and reports it (exit 0: it ended well, or its answer could not be read; 1: it
# failed, or no run started).
first_run_probe() {
    "$(python_bin)" - "$@" <<'PY'
import datetime as dt
import json
import os
import sys
import time
import urllib.error
import urllib.request

mode, url = sys.argv[1], sys.argv[2].rstrip("/")
headers = {
    "X-Webhook-Secret": os.environ["SR_SECRET"],
    "Authorization": "Bearer " + os.environ["SR_TOKEN"],
}


def get(query):
    request = urllib.request.Request(f"{url}/?{query}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (OSError, ValueError) as exc:
        return None, {"error": type(exc).__name__}


def when(text):
    try:
        return dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def say(text):
    print(text, file=sys.stderr, flush=True)


if mode == "since":
    status, body = get("runs=1")
    print(body.get("serverTime") or "" if status == 200 else "")
    sys.exit(0)

# Without the server's time, a minute of slack on this machine's clock.
since = when(sys.argv[3]) or dt.datetime.now(dt.UTC) - dt.timedelta(seconds=60)
wait = float(sys.argv[4])
deadline = time.monotonic() + wait
while True:
    status, body = get("runs=10")
    if status != 200:
        why = f"HTTP {status}" if status else body.get("error", "no answer")
        hint = " (your account needs the invoker role on it)" if status in (401, 403) else ""
        say(f"could not read the run's answer from the status function: {why}{hint}")
        sys.exit(0)
    new = [r for r in body.get("runs") or [] if (when(r.get("startedAt")) or since) > since]
    run = new[-1] if new else None
    health = body.get("health") or {}
    if run and run.get("status") not in (None, "running"):
        summary = run.get("summary") or {}
        counts = ", ".join(
            f"{summary.get(k, 0)} {k}" for k in ("clients", "processed", "skipped", "failed")
        )
        error = f"; error: {run['error']}" if run.get("error") else ""
        say(f"first run {run.get('runId')} ended {run.get('status')} ({counts}){error}")
        say(f"health: {health.get('state')}: {'; '.join(health.get('reasons') or [])}")
        sys.exit(1 if run.get("status") in ("failed", "abandoned") else 0)
    if time.monotonic() >= deadline:
        if run:
            say(f"first run {run.get('runId')} is still running after {wait:g} s;"
                " follow it with: python scripts/watch.py --url STATUS_URL --gcloud")
            sys.exit(0)
        if body.get("running"):
            say(f"run {body.get('runId')} was already running, so the job's run was refused"
                " (409); the deployment answers")
            sys.exit(0)
        say(f"no run started within {wait:g} s of running the job: check its last attempt"
            " (gcloud scheduler jobs describe), the trigger's logs, the secret and the OIDC"
            " account")
        sys.exit(1)
    time.sleep(max(0.2, min(5.0, deadline - time.monotonic())))
PY
}

# With shards, every shard's job is run; the wait below is the same as for one job: it reports
# one run that started after them (not each shard's; follow the others with scripts/watch.py).
run_jobs() {
    local name
    for name in "${JOBS[@]}"; do
        run gcloud scheduler jobs run "$name" --location="$SCHEDULER_LOCATION" \
            "--project=$PROJECT_ID"
    done
}
# Your identity token, to read the status function (which refuses unauthenticated calls).
capture token '***' gcloud auth print-identity-token || token=""
if [[ $RUN_AFTER_DEPLOY == 0 ]]; then
    # An explicit choice (RUN_AFTER_DEPLOY=0): no production run now; the schedule starts it.
    note "not running the job now (RUN_AFTER_DEPLOY=0): its schedule starts the first run"
    ((DRY_RUN)) && echo "# dry run: nothing was deployed"
    ((DRY_RUN)) && exit 0
    note "deployed $FUNCTION_NAME ($url) and $STATUS_FUNCTION_NAME"
    exit 0
fi
if ((DRY_RUN)); then
    run_jobs
    which="that run's"
    ((SHARDS > 1)) && which="one of those runs'"
    echo "# then: wait up to ${RUN_WAIT_SECONDS} s for $which answer on $status_url?runs=10"
    echo "# dry run: nothing was deployed"
    exit 0
fi

since=""
if [[ -n $token ]]; then
    since=$(SR_SECRET=$secret SR_TOKEN=$token first_run_probe since "$status_url")
fi
run_jobs
first_run=0
if [[ -z $token ]]; then
    note "could not get an identity token, so the run's answer is not read: follow it with" \
        "python scripts/watch.py --url $status_url --gcloud"
elif ((RUN_WAIT_SECONDS > 0)); then
    SR_SECRET=$secret SR_TOKEN=$token first_run_probe wait "$status_url" "$since" \
        "$RUN_WAIT_SECONDS" || first_run=$?
else
    note "not waiting for the run (RUN_WAIT_SECONDS=0): python scripts/watch.py --url" \
        "$status_url --gcloud"
fi

jobs_said="Scheduler job $SCHEDULER_JOB runs"
((SHARDS > 1)) && jobs_said="Scheduler jobs ${JOBS[0]}..${JOBS[SHARDS - 1]} run"
note "deployed $FUNCTION_NAME ($url) and $STATUS_FUNCTION_NAME;" \
    "$jobs_said '$SCHEDULE' ($TIME_ZONE)" \
    "${ALERT_CHANNEL:+; uptime check and alert policy '$HEALTH_NAME'}"
((first_run == 0)) || fail 1 "deployed, but the first run did not end well (see above)"
