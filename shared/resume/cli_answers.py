"""What `python -m shared.resume` prints: each command's answer on standard output, as lines
for people or as JSON with `--json`, to a reader that may stop reading (`plan | head`).

Kept apart from the parser and the dispatch (`shared.resume.cli`) so that the words a
command prints can change without touching what it does.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any


class QuietPipe(io.TextIOBase):
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


def say(as_json: bool, body: dict[str, Any], text: str) -> None:
    """`text` for people, `body` as JSON with --json."""
    print(json.dumps(body, default=str) if as_json else text)


def print_run(body: dict[str, Any], as_json: bool) -> None:
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


def print_plan(plan: list[dict[str, Any]], as_json: bool) -> None:
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


def print_unlock(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for item in result.get("shards") or [result]:
        where = f"shard {item['shard']}: " if "shard" in item else ""
        if item.get("changed"):
            how = "stale" if item.get("wasStale") else "live, forced"
            print(f"{where}released the lock of run {item.get('runId')} ({how})")
        else:
            print(f"{where}the lock was not held: nothing to do")


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


def print_status(body: dict[str, Any], as_json: bool) -> None:
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
        _print_running(body)
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


def _print_running(body: dict[str, Any]) -> None:
    """The live run: how long, its heartbeat, and where it is."""
    print(
        f"running: run {body['runId']} for {body['ageSeconds']:.0f}s, heartbeat "
        f"{body['heartbeatAgeSeconds']:.0f}s ago, token {body['token']}"
    )
    p = body.get("progress") or {}
    if p:
        index = p.get("clientIndex")
        position = f"{index + 1} of {p.get('clientCount')}" if isinstance(index, int) else "?"
        print(f"  at client {p.get('clientId')} ({position}), operation {p.get('operation')}")
        if "clientsDone" in p:
            done, failed = p["clientsDone"], p.get("failed", 0)
            print(f"  clients done: {done}, client-operations failed so far: {failed}")
