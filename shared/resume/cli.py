"""`python -m shared.resume`: the same resume module, outside any function; its commands
and what each does (what they print: `shared.resume.cli_answers`; exit codes: `EPILOG`).

`run` takes the lock itself (with heartbeat), so a cron-less local run is as safe as one from
Cloud Scheduler.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from shared import log as logging_setup
from shared.config import get_settings, unknown_variables
from shared.errors import ConfigError, LockHeld, PipelineError, SmartResumeError
from shared.exit_codes import (
    EXIT_BY_STATUS,
    EXIT_FAILED,
    EXIT_FAILURES,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_USAGE,
)
from shared.lock import NotRunning
from shared.resume import cli_answers, live

#: Bounds of --progress-every: a busy loop below, and beyond what a thread can wait above.
MIN_EVERY, MAX_EVERY = 0.1, 86400.0
EPILOG = """exit codes: 0 done, 1 failed, 2 usage, 3 locked, 4 partial or cancelled,
5 completed with failed client-operations.
Settings come from the environment (see the README); FIRESTORE_EMULATOR_HOST points at the
emulator locally. Answers go to standard output (text, or JSON with --json); log lines and
`run`'s progress go to standard error."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shared.resume",
        description="Run, plan and operate smart-resume without the HTTP functions.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--client", metavar="ID", help="only this client id")
        p.add_argument(
            "--operation",
            action="append",
            metavar="NAME",
            help="only this operation (repeat for several)",
        )
        p.add_argument("--stream", type=int, metavar="N", help="only clients of this stream")
        shard(p)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def shard(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--shard",
            type=int,
            metavar="K",
            help="with SMART_RESUME_SHARDS > 1: shard K (run and plan need it; status, "
            "cancel and unlock act on every shard without it)",
        )

    run = sub.add_parser("run", help="take the lock and run once (what the trigger does)")
    filters(run)
    run.add_argument(
        "--progress",
        choices=live.MODES,
        default="auto",
        help="while it runs, on standard error: a live bar (clients done of due, elapsed, the "
        "client and operation, failures), plain lines every --progress-every seconds, or "
        "nothing; auto (default): the bar on a terminal, lines otherwise",
    )
    run.add_argument(
        "--progress-every",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds between progress lines, 0.1 to 86400 (default 30)",
    )
    filters(sub.add_parser("plan", help="show what would be skipped or run, and why"))
    status = sub.add_parser("status", help="what is running, and how the last runs ended")
    status.add_argument("--runs", type=int, default=5, metavar="N", help="recent runs (1-50)")
    status.add_argument("--json", action="store_true", help="print JSON")
    shard(status)
    cancel = sub.add_parser("cancel", help="ask the running run to stop at its next check")
    shard(cancel)
    cancel.add_argument("--json", action="store_true", help="print JSON")
    unlock = sub.add_parser("unlock", help="release a stale lock (marks its run abandoned)")
    shard(unlock)
    unlock.add_argument("--force", action="store_true", help="release even a live lock")
    unlock.add_argument("--json", action="store_true", help="print JSON")
    retry = sub.add_parser(
        "retry",
        help="release a client's quarantined or backed-off operations (due on the next run)",
    )
    retry.add_argument("client", metavar="CLIENT", help="the client id")
    retry.add_argument(
        "--operation", metavar="NAME", help="only this operation (default: every one failing)"
    )
    retry.add_argument("--json", action="store_true", help="print JSON")
    seed = sub.add_parser("seed-demo", help="write the demo clients and leads to Firestore")
    seed.add_argument("--clients", type=int, default=5, metavar="N", help="demo clients")
    seed.add_argument("--leads", type=int, default=60, metavar="N", help="leads per client")
    seed.add_argument(
        "--delay", type=float, default=0.0, metavar="S", help="seconds per chunk, to watch a run"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code. Output to a reader that stops reading (`plan | head`)
    is dropped quietly: the command's own outcome and exit code stand."""
    stdout = sys.stdout
    sys.stdout = quiet = cli_answers.QuietPipe(stdout)
    try:
        code = _main(argv)
        quiet.flush()
        return code
    finally:
        sys.stdout = stdout


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    for warning in unknown_variables():
        print(f"warning: {warning}", file=sys.stderr)
    try:
        settings = get_settings()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging_setup.configure(settings.log_format)
    logging_setup.register_secrets(settings.secrets)
    from shared.store import get_client

    client = get_client(settings)
    try:
        with logging_setup.to_stderr():  # standard output: the answer only
            return _dispatch(args, settings, client)
    except (PipelineError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE  # a missing or broken pipeline is a configuration error, like the rest
    except SmartResumeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _options(args: argparse.Namespace, dry_run: bool):  # type: ignore[no-untyped-def]
    from shared.resume.plan import RunOptions

    return RunOptions(
        client_id=args.client,
        operations=tuple(args.operation) if args.operation else None,
        dry_run=dry_run,
        stream=args.stream,
        shard=args.shard,
    )


def _dispatch(args: argparse.Namespace, settings, client) -> int:  # type: ignore[no-untyped-def]
    from shared import status
    from shared.resume.pipeline import load_pipeline
    from shared.runner import plan_run, start_run

    shards = settings.shards
    if getattr(args, "shard", None) is not None and not 0 <= args.shard < max(shards, 1):
        raise ValueError(f"--shard must be from 0 to {shards - 1} (SMART_RESUME_SHARDS={shards})")
    if args.command in ("run", "plan") and shards > 1 and args.shard is None:
        raise ValueError(f"--shard K is required: SMART_RESUME_SHARDS is {shards}")
    if getattr(args, "shard", None) is not None and shards <= 1:
        raise ValueError("--shard is only for SMART_RESUME_SHARDS > 1")
    if args.command in ("run", "plan"):
        pipeline = load_pipeline(settings.pipeline_path)
        unknown = [o for o in (args.operation or []) if o not in pipeline.names]
        if unknown:
            raise ValueError(
                f"unknown operation(s) {', '.join(unknown)}; known: {', '.join(pipeline.names)}"
            )
        if args.command == "plan":
            outcome = plan_run(settings, client, _options(args, True), pipeline)
            if "plan" not in outcome.body:  # the module did not load, an unknown client
                if args.json:
                    print(json.dumps(outcome.body))
                if outcome.http_status == 404:
                    print(f"error: unknown client {args.client}", file=sys.stderr)
                    return EXIT_USAGE
                print(f"error: {outcome.body.get('error')}", file=sys.stderr)
                return EXIT_FAILED
            cli_answers.print_plan(outcome.body["plan"], args.json)
            if outcome.body.get("detail"):
                print(outcome.body["detail"], file=sys.stderr)
            return EXIT_OK
        if not MIN_EVERY <= args.progress_every <= MAX_EVERY:  # NaN fails both
            raise ValueError(
                f"--progress-every must be from {MIN_EVERY:g} to {MAX_EVERY:g} seconds"
            )
        outcome = start_run(
            settings,
            client,
            _options(args, False),
            trigger={"source": "cli"},
            function="cli",
            pipeline=pipeline,
            watch=live.watch(args.progress, args.progress_every),
        )
        cli_answers.print_run(outcome.body, args.json)
        code = EXIT_BY_STATUS.get(outcome.status, EXIT_FAILED)
        if code == EXIT_OK and (outcome.body.get("summary") or {}).get("failed"):
            return EXIT_FAILURES  # completed, but some client-operations failed
        return code
    if args.command == "status":
        if not 1 <= args.runs <= 50:
            raise ValueError("--runs must be from 1 to 50")
        cli_answers.print_status(
            status.snapshot(settings, client, args.runs, args.shard), args.json
        )
        return EXIT_OK
    if args.command == "cancel":
        try:
            run_id = status.cancel(settings, client, args.shard)
        except NotRunning:
            cli_answers.say(args.json, {"status": "not running"}, "nothing is running")
            return EXIT_LOCKED
        body = {"status": "cancel requested", "runId": run_id}
        cli_answers.say(args.json, body, f"cancel requested for run {run_id}")
        return EXIT_OK
    if args.command == "unlock":
        try:
            result = status.unlock_all(settings, client, args.force, args.shard)
        except LockHeld as held:
            print(f"lock is live (run {held.run_id}, {held.age_seconds:.0f}s); use --force")
            return EXIT_LOCKED
        cli_answers.print_unlock(result, args.json)
        return EXIT_OK
    if args.command == "retry":
        from shared import quarantine
        from shared.errors import InvalidRequest

        pipeline = load_pipeline(settings.pipeline_path)
        try:
            released = quarantine.release(settings, client, pipeline, args.client, args.operation)
        except quarantine.UnknownClient:
            print(f"unknown client: {args.client}", file=sys.stderr)
            return EXIT_USAGE
        except InvalidRequest as exc:
            print(f"error: {exc.detail}", file=sys.stderr)
            return EXIT_USAGE
        names = released["operations"]
        if names:
            text = f"released {', '.join(names)} of {args.client}: due on the next run"
        else:
            text = f"nothing to release: no operation of {args.client} is failing"
        cli_answers.say(args.json, released, text)
        return EXIT_OK
    if args.command == "seed-demo":
        from examples.seed import seed_demo

        count = seed_demo(client, settings, args.clients, args.leads, args.delay)
        print(f"seeded {args.clients} demo clients with {count} leads")
        return EXIT_OK
    raise AssertionError(args.command)
