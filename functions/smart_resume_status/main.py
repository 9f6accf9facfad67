"""HTTP entry point `smart_resume_status`: what is running, how the last runs ended, and the
operator's actions: cancel, unlock, and retry (release quarantined or backed-off work).

Thin by design: admit the request (method, configuration, secret), then call `shared.status`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import functions_framework
from flask import Request, Response

# Locally the repository root holds `shared/`; in the deployed bundle it sits beside this file.
for _root in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[2]):
    if (_root / "shared").is_dir() and str(_root) not in sys.path:
        sys.path.insert(0, str(_root))
        break

from shared import console, health, quarantine, status  # noqa: E402
from shared.config import warn_unknown_variables  # noqa: E402
from shared.errors import InvalidRequest, LockHeld  # noqa: E402
from shared.lock import NotRunning  # noqa: E402
from shared.resume.pipeline import load_pipeline  # noqa: E402
from shared.store import get_client  # noqa: E402
from shared.validation import (  # noqa: E402
    document_id,
    only_params,
    read_json,
    runs_param,
    shard_param,
    unknown_names,
)
from shared.web import reply, serve  # noqa: E402

# Once per instance, at start: a misspelt setting would otherwise be ignored without a word.
warn_unknown_variables("smart_resume_status")

ACTIONS = ("cancel", "unlock", "retry")
FIELDS = ("action", "force", "clientId", "operation", "shard")


@functions_framework.http
def smart_resume_status(request: Request) -> Response:
    """Answer the run's status (GET) or perform an action (POST).

    Args:
        request: GET, optionally `?runs=N`; `GET ?check=health` for an uptime check (200
            when healthy, else 503, with the health object); `GET ?clients=N[&after=ID]` for
            the console's client grid; a browser's GET for the console page itself (no secret
            needed: it holds no data); or POST `{"action": "cancel"}` /
            `{"action": "unlock", "force": false}` /
            `{"action": "retry", "clientId": "...", "operation": "..."}`, with
            `X-Webhook-Secret`.
    Returns:
        JSON (every answer: docs/reference.md), or the console page.
    """
    if console.wants_page(request):
        return console.page()
    return serve(request, ("GET", "POST"), "the status function", lambda s: _answer(request, s))


def _answer(request: Request, settings) -> Response:  # type: ignore[no-untyped-def]
    client = get_client(settings)
    if request.method == "GET":
        if "check" in request.args:
            only_params(request.args, ("check", "shard"))
            if request.args.get("check") != "health" or len(request.args.getlist("check")) > 1:
                raise InvalidRequest("'check' must be health")
            shard = shard_param(request.args.get("shard"), settings.shards)
            if settings.shards > 1:  # the worst shard's health, or the one asked for
                body = status.snapshot(settings, client, shard=shard)["health"]
                return reply(body, 200 if health.healthy(settings, body) else 503)
            body, code = health.check(settings, client)
            return reply(body, code)
        if "clients" in request.args:
            only_params(request.args, ("clients", "after"))
            limit, after = console.clients_params(request.args)
            return reply(console.list_clients(settings, client, limit, after), 200)
        only_params(request.args, ("runs", "shard", "check", "clients"))
        runs = runs_param(request.args.get("runs"))
        shard = shard_param(request.args.get("shard"), settings.shards)
        return reply(status.snapshot(settings, client, runs, shard), 200)
    return _action(request, settings, client)


def _action(request: Request, settings, client) -> Response:  # type: ignore[no-untyped-def]
    only_params(request.args, ())
    body = read_json(request)
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise InvalidRequest(f"{unknown_names(unknown, 'field')}; allowed: {', '.join(FIELDS)}")
    action = body.get("action")
    if action not in ACTIONS:
        raise InvalidRequest(f"'action' must be one of {', '.join(ACTIONS)}")
    if action == "retry":
        return _retry(body, settings, client)
    if "clientId" in body or "operation" in body:
        raise InvalidRequest("'clientId' and 'operation' only go with 'retry'")
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise InvalidRequest("'force' must be true or false")
    shard = body.get("shard")
    if shard is not None:
        shard = shard_param(str(shard) if isinstance(shard, int) else "x", settings.shards)
    if action == "cancel":
        if force:
            raise InvalidRequest("'force' only goes with 'unlock'")
        try:
            run_id = status.cancel(settings, client, shard)
        except NotRunning:
            return reply({"status": "not running", "error": "no run is in progress"}, 409)
        return reply({"status": "cancel requested", "runId": run_id}, 202)
    try:
        return reply(status.unlock_all(settings, client, force, shard), 200)
    except LockHeld as held:
        body = {
            "status": "locked",
            "runId": held.run_id,
            "ageSeconds": held.age_seconds,
            "error": "the lock is live; pass force to release it anyway",
        }
        return reply(body, 409)


def _retry(body: dict, settings, client) -> Response:  # type: ignore[no-untyped-def]
    client_id, operation = body.get("clientId"), body.get("operation")
    if not isinstance(client_id, str) or not document_id(client_id):
        raise InvalidRequest("'clientId' must be a client id")
    if operation is not None and not isinstance(operation, str):
        raise InvalidRequest("'operation' must be a string")
    if "force" in body:
        raise InvalidRequest("'force' only goes with 'unlock'")
    pipeline = load_pipeline(settings.pipeline_path)
    try:
        released = quarantine.release(settings, client, pipeline, client_id, operation)
    except quarantine.UnknownClient:
        return reply({"error": "unknown client"}, 404)
    return reply(released, 200)
