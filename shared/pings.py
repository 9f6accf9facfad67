"""The dead man's switch: pings to `SMART_RESUME_PING_URL` when a run starts and ends.

healthchecks.io's convention: `{url}/start` when a run starts, `{url}` when it ends completed,
partial or cancelled, `{url}/fail` when it ends failed (and, from the run that takes over a
stale lock, for the run it abandoned). The service alerts when the success ping stops coming,
which is what catches the run that never happened. Each ping is a POST with a one-line
plain-text summary (run id, outcome, counts) and a 5 s timeout.

A ping never changes a run: every error is logged (as its type only) and swallowed. The URL is a
secret (the path holds the check's token), so it is never logged, and neither are the messages
of `requests`' exceptions, which quote the host and path.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from shared.config import Settings
from shared.documents import counts, error_line
from shared.log import get_logger

log = get_logger("pings")

#: Seconds a ping may take in all (connect and answer); a module constant so tests may shorten it.
TIMEOUT_SECONDS = 5.0
MAX_BODY_CHARS = 2000
KINDS = ("start", "success", "fail")
_SUFFIX = {"start": "/start", "success": "", "fail": "/fail"}


def url_for(base: str, kind: str) -> str:
    """`base` with the kind's suffix appended to its path (a query string stays at the end)."""
    parts = urlsplit(base)
    path = parts.path.rstrip("/") + _SUFFIX[kind] if _SUFFIX[kind] else parts.path
    return urlunsplit((parts.scheme, parts.netloc, path or "/", parts.query, parts.fragment))


def _post(url: str, body: str, result: dict[str, Any]) -> None:
    import requests  # lazy: a run without a ping URL never imports it

    try:
        answer = requests.post(
            url,
            data=body.encode("utf-8"),
            headers={"Content-Type": "text/plain; charset=utf-8"},
            timeout=TIMEOUT_SECONDS,
            allow_redirects=False,
        )
        answer.close()
        result["status"] = answer.status_code
    except Exception as exc:  # never the message: it quotes the URL
        result["error"] = type(exc).__name__


def ping(settings: Settings, kind: str, body: str) -> bool:
    """POST `body` to the `kind` ping; True when the service answered 2xx. Never raises, and
    returns within about `TIMEOUT_SECONDS` whatever the service does (a server that trickles
    its answer is cut off too: the request runs in a daemon thread that is not waited for)."""
    if not settings.ping_url:
        return False
    try:
        result: dict[str, Any] = {}
        worker = threading.Thread(
            target=_post,
            args=(url_for(settings.ping_url, kind), error_line(body, MAX_BODY_CHARS), result),
            name=f"smart-resume-ping-{kind}",
            daemon=True,
        )
        worker.start()
        worker.join(TIMEOUT_SECONDS + 0.5)
        if worker.is_alive() or "Timeout" in result.get("error", ""):
            log.warning("ping %s got no answer within %gs; the run goes on", kind, TIMEOUT_SECONDS)
            return False
        if "error" in result:
            log.warning("ping %s could not be sent (%s); the run goes on", kind, result["error"])
            return False
        status = result.get("status", 0)
        if not 200 <= status < 300:
            log.warning("ping %s answered HTTP %s; the run goes on", kind, status)
            return False
        log.info("ping %s sent", kind, fields={"pingStatus": status})
        return True
    except Exception as exc:  # the last line of defence: a ping never fails a run
        log.warning("ping %s failed unexpectedly (%s)", kind, type(exc).__name__)
        return False


def start_body(run_id: str, lock: str, token: int) -> str:
    return f"smart-resume run {run_id} started (lock {lock}, token {token})"


def end_body(run_id: str, status: str, summary: dict[str, Any] | None, error: str | None) -> str:
    seconds = (summary or {}).get("durationSeconds")
    took = f" in {float(seconds):.1f} s" if isinstance(seconds, int | float) else ""
    text = f"smart-resume run {run_id} {status}{took}: {counts(summary)}"
    return f"{text}; error: {error}" if error else text


def abandoned_body(run_id: str, held_for: float | None, taken_by: str) -> str:
    held = f" after holding the lock {held_for:.0f} s" if held_for is not None else ""
    return (
        f"smart-resume run {run_id} abandoned: lease lost{held}, its lock taken over by run "
        f"{taken_by}; counts unknown"
    )


class RunPings:
    """The pings of one run, in order: the start pings go out in the background while the run
    works (an idle run is not slowed by them), and the end ping waits for them, so the service
    always sees `/fail` for an abandoned run, then `/start`, then the end."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._started: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.settings.ping_url)

    def start(
        self,
        run_id: str,
        token: int,
        abandoned: str | None = None,
        held_for: float | None = None,
    ) -> None:
        if not self.enabled:
            return
        lock = self.settings.lock_name

        def send() -> None:
            if abandoned:
                ping(self.settings, "fail", abandoned_body(abandoned, held_for, run_id))
            ping(self.settings, "start", start_body(run_id, lock, token))

        import contextvars

        context = contextvars.copy_context()  # keep runId on the log lines
        self._started = threading.Thread(
            target=context.run, args=(send,), name="smart-resume-start-pings", daemon=True
        )
        self._started.start()

    def end(
        self, run_id: str, status: str, summary: dict[str, Any] | None, error: str | None
    ) -> None:
        """The end ping: success for completed, partial and cancelled, fail for failed."""
        if not self.enabled:
            return
        if self._started is not None:
            self._started.join(2 * (TIMEOUT_SECONDS + 0.5))
        kind = "fail" if status == "failed" else "success"
        ping(self.settings, kind, end_body(run_id, status, summary, error))
