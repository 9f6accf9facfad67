"""HTTP entry point `smart_resume`: the trigger Cloud Scheduler POSTs to.

Thin by design: admit the request (method, configuration, secret), validate the body, hand the
run to `shared.runner`, and map its outcome to a response. The run happens inside the request,
since Cloud Functions throttles the CPU once a response is sent.
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

from shared.config import warn_unknown_variables  # noqa: E402
from shared.errors import PipelineError  # noqa: E402
from shared.resume.pipeline import Pipeline, load_pipeline  # noqa: E402
from shared.runner import plan_run, start_run  # noqa: E402
from shared.store import get_client  # noqa: E402
from shared.validation import only_params, read_json, trigger_options  # noqa: E402
from shared.web import reply, serve  # noqa: E402

# Once per instance, at start: a misspelt setting would otherwise be ignored without a word.
warn_unknown_variables("smart_resume")


@functions_framework.http
def smart_resume(request: Request) -> Response:
    """Run the resume module once, if the lock is free.

    Args:
        request: POST with `X-Webhook-Secret` and an optional JSON body
            `{"clientId", "operations", "dryRun", "stream"}`.
    Returns:
        The run's outcome as JSON (every status: docs/reference.md).
    """
    return serve(request, ("POST",), "the trigger", lambda settings: _trigger(request, settings))


def _trigger(request: Request, settings) -> Response:  # type: ignore[no-untyped-def]
    pipeline: Pipeline | None = None
    pipeline_error: PipelineError | None = None
    try:
        pipeline = load_pipeline(settings.pipeline_path)
    except PipelineError as exc:
        pipeline_error = exc  # the run records and reports it; names cannot be checked
    only_params(request.args, ())  # everything is in the body: `?dryRun=1` must not run
    body = read_json(request)
    options = trigger_options(
        body, pipeline.names if pipeline else None, settings.stream, settings.shards
    )
    client = get_client(settings)
    if options.dry_run:
        if pipeline is None:
            return reply({"status": "failed", "error": str(pipeline_error)}, 500)
        outcome = plan_run(settings, client, options, pipeline)
    else:
        schedule_time = request.headers.get("X-CloudScheduler-ScheduleTime")
        trigger = {
            "source": "scheduler" if schedule_time else "http",
            "job": request.headers.get("X-CloudScheduler-JobName"),
            "userAgent": (request.user_agent.string or "")[:200],
            "request": {k: v for k, v in body.items() if k != "dryRun"},
        }
        outcome = start_run(
            settings,
            client,
            options,
            trigger=trigger,
            schedule_time=schedule_time,
            pipeline=pipeline,
        )
    return reply(outcome.body, outcome.http_status)
