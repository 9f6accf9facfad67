#!/usr/bin/env bash
# Deploy smart-resume to Google Cloud: both Cloud Functions, the Cloud Scheduler job (one per
# shard), Firestore indexes and optional alerting, then one run of the job, reported.
# Run `./deploy.sh --help` for the commands and settings; deploy.env.example documents each one.
# A thin wrapper: the work is done by the Python package deploy/ beside this script.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f $ROOT/deploy/__main__.py ]] ||
    { echo "deploy.sh: $ROOT/deploy/ is missing (deploy.sh runs that package)" >&2; exit 2; }
PYTHON=python3
[[ -x $ROOT/.venv/bin/python ]] && PYTHON=$ROOT/.venv/bin/python
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
    { echo "deploy.sh: needs Python 3.11 or later: $PYTHON is not" >&2; exit 2; }
# The repository goes on the import path (deploy/ and shared/), the working folder does not (-P),
# and relative --env-file and --build-dir paths are read from where this was started.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -P -m deploy "$@"
