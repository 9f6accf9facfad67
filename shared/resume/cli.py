"""`python -m shared.resume`: the same resume module, outside any function.

`run` takes the lock itself (with heartbeat), so a cron-less local run is as safe as one from
Cloud Scheduler. Exit codes: 0 done, 1 failed, 2 usage, 3 locked, 4 partial or cancelled,
5 completed with failed client-operations.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from shared import log as logging_setup
from shared.config import get_settings, unknown_variables
from shared.errors import ConfigError, LockHeld, PipelineError, SmartResumeError, StoreUnavailable
from shared.exit_codes import (
    EXIT_BY_STATUS,
    EXIT_FAILED,
    EXIT_FAILURES,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_USAGE,
)
from shared.lock import NotRunning
from shared.resume import live
from shared.resume.live import MODES

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
        choices=MODES,
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
    sys.stdout = quiet = _QuietPipe(stdout)
    try:
        code = _main(argv)
        quiet.flush()
        return code
    finally:
        sys.stdout = stdout


class _QuietPipe(io.TextIOBase):
    """Standard output that goes silent once its reader has gone (a closed pipe)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.gone = False

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return bool(self.stream.isatty())

    def fileno(self) -> int:
        return int(self.stream.fileno())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self.stream, "encoding", None) or "utf-8")

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        """From now on write nowhere, also what the interpreter flushes at exit."""
        self.gone = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd = self.stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)


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
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
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
            _print_plan(outcome.body["plan"], args.json)
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
        _print(outcome.body, args.json)
        code = EXIT_BY_STATUS.get(outcome.status, EXIT_FAILED)
        if code == EXIT_OK and (outcome.body.get("summary") or {}).get("failed"):
            return EXIT_FAILURES  # completed, but some client-operations failed
        return code
    if args.command == "status":
        if not 1 <= args.runs <= 50:
            raise ValueError("--runs must be from 1 to 50")
        _print_status(status.snapshot(settings, client, args.runs, args.shard), args.json)
        return EXIT_OK
    if args.command == "cancel":
        try:
            run_id = status.cancel(settings, client, args.shard)
        except NotRunning:
            _say(args, {"status": "not running"}, "nothing is running")
            return EXIT_LOCKED
        body = {"status": "cancel requested", "runId": run_id}
        _say(args, body, f"cancel requested for run {run_id}")
        return EXIT_OK
    if args.command == "unlock":
        try:
            result = status.unlock_all(settings, client, args.force, args.shard)
        except LockHeld as held:
            print(f"lock is live (run {held.run_id}, {held.age_seconds:.0f}s); use --force")
            return EXIT_LOCKED
        if args.json:
            print(json.dumps(result))
        else:
            for item in result.get("shards") or [result]:
                where = f"shard {item['shard']}: " if "shard" in item else ""
                if item.get("changed"):
                    how = "stale" if item.get("wasStale") else "live, forced"
                    print(f"{where}released the lock of run {item.get('runId')} ({how})")
                else:
                    print(f"{where}the lock was not held: nothing to do")
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
        _say(args, released, text)
        return EXIT_OK
    if args.command == "seed-demo":
        from examples.seed import seed_demo

        count = seed_demo(client, settings, args.clients, args.leads, args.delay)
        print(f"seeded {args.clients} demo clients with {count} leads")
        return EXIT_OK
    raise AssertionError(args.command)


def _say(args: argparse.Namespace, body: dict[str, Any], text: str) -> None:
    """`text` for people, `body` as JSON with --json."""
    print(json.dumps(body, default=str) if args.json else text)


def _print(body: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(body, indent=2, default=str))
        return
    print(f"status: {body.get('status')}  run: {body.get('runId')}")
    for key, value in (body.get("summary") or {}).items():
        if isinstance(value, dict):  # impact, calls: name=value pairs, not a Python dict
            value = ", ".join(f"{k}={_flat(v)}" for k, v in value.items()) or "none"
        print(f"  {key}: {value}")
    for key in ("error", "detail"):
        if body.get(key):
            print(f"  {key}: {body[key]}")


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _print_plan(plan: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(plan, indent=2))
        return
    rows = [("CLIENT", "OPERATION", "DECISION", "REASON")]
    for client in plan:
        for op in client["operations"]:
            rows.append((client["clientId"], op["operation"], op["decision"], op["reason"]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    print(f"{len(plan)} clients")


def health_lines(health: dict[str, Any] | None) -> list[str]:
    """The health state first, in capitals, then each reason and the last success."""
    if not health:
        return []
    lines = [f"health: {str(health.get('state')).upper()}"]
    lines += [f"  - {reason}" for reason in health.get("reasons") or []]
    expected = health.get("expectedEverySeconds")
    every = f" (expected every {expected:g} s)" if isinstance(expected, int | float) else ""
    lines.append(f"  last success: {health.get('lastSuccessAt') or 'never'}{every}")
    return lines


def _print_status(body: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(body, indent=2))
        return
    for line in health_lines(body.get("health")):
        print(line)
    for item in body.get("shards") or []:
        progress = item.get("progress") or {}
        where = f", client {progress.get('clientId')}" if item.get("running") and progress else ""
        print(
            f"  shard {item['shard']}: {item['health']['state']}"
            + (f", running {item['runId']}{where}" if item.get("running") else "")
        )
    if body["running"]:
        p = body.get("progress") or {}
        print(
            f"running: run {body['runId']} for {body['ageSeconds']:.0f}s, heartbeat "
            f"{body['heartbeatAgeSeconds']:.0f}s ago, token {body['token']}"
        )
        if p:
            index = p.get("clientIndex")
            position = f"{index + 1} of {p.get('clientCount')}" if isinstance(index, int) else "?"
            print(f"  at client {p.get('clientId')} ({position}), operation {p.get('operation')}")
            if "clientsDone" in p:
                done, failed = p["clientsDone"], p.get("failed", 0)
                print(f"  clients done: {done}, client-operations failed so far: {failed}")
    elif body["stale"]:
        print(
            f"STALE lock held by run {body['runId']} (heartbeat {body['heartbeatAgeSeconds']}s"
            " ago): the next trigger takes it over, or run `unlock`"
        )
    else:
        print("not running")
    last = body.get("lastRun")
    if last:
        summary = last.get("summary") or {}
        counts = ", ".join(
            f"{summary[k]} {k}"
            for k in ("processed", "skipped", "failed", "deferred")
            if k in summary
        )
        print(
            f"last run: {last.get('runId')} {last.get('status')} at {last.get('finishedAt')}"
            + (f" ({counts})" if counts else "")
        )
    for item in body.get("quarantined") or []:
        print(
            f"QUARANTINED: {item['clientId']} {item['operation']} after {item['failures']} "
            f"failures (since {item['since']}); release: retry {item['clientId']}"
        )
    for item in body.get("backedOff") or []:
        print(
            f"backing off: {item['clientId']} {item['operation']} after {item['failures']} "
            f"failures, due at {item['dueAt']}"
        )
    for run in body.get("runs") or []:
        print(f"  {run.get('runId')}  {run.get('status'):<10} {run.get('startedAt')}")
