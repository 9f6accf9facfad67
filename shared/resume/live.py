"""What `python -m shared.resume run` shows while the run holds the lock.

On a terminal, a live progress bar (tqdm): clients done of due, elapsed time, the client and
operation being run, failures so far. Elsewhere (cron mail, CI logs) a plain line every so
often, which a log file keeps readable. Both read the heartbeat's in-memory progress, the same
`progress` the status function shows, so they cost the run nothing: no read, no write. tqdm is
imported only here, and only for a bar, so the functions' cold start never pays for it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

from shared.heartbeat import Heartbeat

MODES = ("auto", "bar", "lines", "off")
#: How often the bar redraws: smooth enough to read, cheap enough to ignore.
BAR_REFRESH_SECONDS = 0.25
FALLBACK_WIDTH = 100


def choose(mode: str) -> str:
    """`auto` is a bar when both standard streams are a terminal (someone is watching), and
    lines otherwise; a bar without tqdm installed falls back to lines."""
    if mode == "auto":
        mode = "bar" if _is_terminal(sys.stdout) and _is_terminal(sys.stderr) else "lines"
    if mode == "bar":
        try:
            import tqdm  # noqa: F401
        except ImportError:
            return "lines"
    return mode


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _width(stream: Any) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def describe(progress: dict[str, Any], elapsed: float) -> str:
    """One plain line: `0:01:05 12 of 40 clients done, 1 operation failed; at acme score_leads`.

    A client is done when its turn in the run ended: run, skipped, or deferred by a cancel or
    the time budget."""
    clock = _clock(elapsed)
    total = progress.get("clientCount")
    if total is None:
        return f"{clock} selecting the due clients"
    done = progress.get("clientsDone", 0)
    line = f"{clock} {done} of {total} clients done, {failed_text(progress.get('failed', 0))}"
    where = _where(progress)
    return line + (f"; at {where}" if where else "")


def failed_text(failed: int) -> str:
    """`failed` counts client-operations, not clients: say so."""
    return f"{failed} operation{'' if failed == 1 else 's'} failed"


def _where(progress: dict[str, Any]) -> str:
    client, operation = progress.get("clientId"), progress.get("operation")
    return " ".join(str(x) for x in (client, operation) if x)


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def watch(mode: str, every: float) -> Any:
    """A `start_run` watch for `mode` (see `choose`), or None for `off`."""
    mode = choose(mode)
    if mode == "off":
        return None
    if mode == "bar":
        return _bar
    return lambda heartbeat: _lines(heartbeat, every)


@contextlib.contextmanager
def _lines(heartbeat: Heartbeat, every: float, stream: TextIO | None = None) -> Iterator[None]:
    started = time.monotonic()
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            line = describe(heartbeat.progress, time.monotonic() - started)
            try:  # one write: a log line from another thread cannot split it
                (stream or sys.stderr).write(f"progress: {line}\n")
                (stream or sys.stderr).flush()
            except (OSError, ValueError):  # a closed or broken stream: show nothing more
                return

    thread = threading.Thread(target=loop, name="smart-resume-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def _bar(heartbeat: Heartbeat) -> Iterator[None]:
    """The bar, drawn by a thread of its own. Whatever goes wrong with the terminal (a broken
    pipe, a full disk) stops the bar, never the run: every draw holds tqdm's lock only inside
    a `with`, so a failed write cannot leave it held for the log lines that go through it."""
    from tqdm import tqdm
    from tqdm.contrib import DummyTqdmFile

    terminal = sys.stderr
    # A terminal that reports no width (some CI pseudo-terminals) gets a fixed one: at width 0
    # tqdm would drop the format altogether.
    sized = _width(terminal) > 0
    bar = tqdm(
        total=None,
        file=terminal,
        unit="client",
        dynamic_ncols=sized,
        ncols=None if sized else FALLBACK_WIDTH,
        bar_format="{n_fmt}/{total_fmt} clients |{bar}| {elapsed}{postfix}",
    )
    stop = threading.Event()
    broken = threading.Event()

    def draw() -> None:
        if broken.is_set():
            return
        progress = heartbeat.progress
        parts = [_where(progress) or "selecting the due clients"]
        failed = progress.get("failed", 0)
        if failed:
            parts.append(failed_text(failed))
        try:
            with tqdm.get_lock():
                total = progress.get("clientCount")
                if total is not None and total != bar.total:
                    bar.total = total
                bar.n = progress.get("clientsDone", 0)
                bar.set_postfix_str(", ".join(parts), refresh=False)
                bar.refresh(nolock=True)
        except Exception:  # the display must never break the run
            broken.set()
            sys.stderr = terminal  # log lines straight to the stream again

    def loop() -> None:
        while not stop.wait(BAR_REFRESH_SECONDS) and not broken.is_set():
            draw()

    thread = threading.Thread(target=loop, name="smart-resume-progress", daemon=True)
    # Log lines (written to standard error) go through tqdm, above the bar, not through it.
    sys.stderr = DummyTqdmFile(terminal)  # type: ignore[assignment]
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        draw()  # the final state stays on screen
        sys.stderr = terminal
        with contextlib.suppress(Exception):
            bar.close()
