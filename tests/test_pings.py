"""The dead man's switch: `/start`, success and `/fail` pings received by a local server, in
order, with one-line bodies; a server that hangs or refuses changes nothing about the run; the
URL never shows."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import ROOT, free_port, seed_clients
from faults_helpers import snapshot
from functions_framework import create_app

from shared import pings
from shared.lock import Lock
from shared.resume.plan import RunOptions
from shared.runner import start_run
from shared.runs import Runs

#: The check's token, as healthchecks.io puts it in the URL path: the secret part.
TOKEN = "6f1b2c3d-ping-token-9a8b7c"
OK = '[[operation]]\nname = "work"\nkind = "python"\ntarget = "opfuncs:ok"\n'
STOPS = '[[operation]]\nname = "work"\nkind = "python"\ntarget = "opfuncs:wait_for_stop"\n'
TRIGGER = str(ROOT / "functions" / "smart_resume" / "main.py")
STATUS = str(ROOT / "functions" / "smart_resume_status" / "main.py")
SECRET = {"X-Webhook-Secret": "test-secret-1-0123456"}


@dataclass
class Ping:
    method: str
    path: str
    body: str
    content_type: str
    at: float


class PingServer:
    """A healthchecks.io stand-in on 127.0.0.1: records every request; answers `status`, or
    never answers (`hang`), until closed."""

    def __init__(self, status: int = 200, hang: bool = False) -> None:
        self.status = status
        self.hang = hang
        self.pings: list[Ping] = []
        self._release = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with server._lock:
                    server.pings.append(
                        Ping(
                            "POST",
                            self.path,
                            raw.decode(),
                            self.headers.get("Content-Type", ""),
                            time.monotonic(),
                        )
                    )
                if server.hang:
                    server._release.wait(30)
                    return
                self.send_response(server.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{TOKEN}"

    def kinds(self) -> list[str]:
        base = f"/{TOKEN}"
        return [
            {base: "success", f"{base}/start": "start", f"{base}/fail": "fail"}.get(p.path, p.path)
            for p in self.pings
        ]

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def server():
    made: list[PingServer] = []

    def make(**kw: Any) -> PingServer:
        made.append(PingServer(**kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def quick(monkeypatch):
    """Pings time out after 0.5 s instead of 5, so a hanging server costs the tests little."""
    monkeypatch.setattr(pings, "TIMEOUT_SECONDS", 0.5)


def run(settings, db, **options: Any):
    return start_run(settings, db, RunOptions(**options), trigger={"source": "test"})


def leaks(text: str) -> bool:
    return TOKEN in text


class TestUrl:
    @pytest.mark.parametrize(
        ("base", "kind", "expected"),
        [
            ("https://hc-ping.com/abc", "start", "https://hc-ping.com/abc/start"),
            ("https://hc-ping.com/abc/", "fail", "https://hc-ping.com/abc/fail"),
            ("https://hc-ping.com/abc", "success", "https://hc-ping.com/abc"),
            ("https://h.io/k/slug?create=1", "start", "https://h.io/k/slug/start?create=1"),
            ("https://h.io", "fail", "https://h.io/fail"),
        ],
    )
    def test_suffix_goes_on_the_path(self, base: str, kind: str, expected: str) -> None:
        assert pings.url_for(base, kind) == expected

    def test_the_url_is_a_secret(self, configure) -> None:
        settings = configure(SMART_RESUME_PING_URL=f"https://hc-ping.com/{TOKEN}")
        assert f"https://hc-ping.com/{TOKEN}" in settings.secrets
        assert TOKEN in settings.secrets  # its path alone, as an error message might name it
        assert TOKEN not in repr(settings)

    @pytest.mark.parametrize("value", ["hc-ping.com/x", "ftp://h/x", "https://", "http:///x"])
    def test_a_bad_url_is_named_without_its_value(self, value: str) -> None:
        from shared.config import load_settings
        from shared.errors import ConfigError

        with pytest.raises(ConfigError) as caught:
            load_settings({"SMART_RESUME_PING_URL": value})
        assert "SMART_RESUME_PING_URL is not an http(s) URL" in str(caught.value)
        assert value not in str(caught.value)


class TestOrderAndBodies:
    def test_completed(self, server, db, configure, pipeline_file) -> None:
        pipeline_file(OK)
        seed_clients(db, 2)
        hc = server()
        settings = configure(SMART_RESUME_PING_URL=hc.url)
        outcome = run(settings, db)
        assert outcome.status == "completed"
        assert hc.kinds() == ["start", "success"]
        start, end = hc.pings
        assert (
            start.body == f"smart-resume run {outcome.run_id} started (lock smart-resume, token 1)"
        )
        assert end.body.startswith(f"smart-resume run {outcome.run_id} completed in ")
        assert end.body.endswith(": 2 clients, 2 processed, 0 skipped, 0 failed, 0 deferred")
        assert all(p.method == "POST" and "\n" not in p.body for p in hc.pings)
        assert all(p.content_type.startswith("text/plain") for p in hc.pings)

    def test_partial(self, server, db, configure, pipeline_file) -> None:
        """The time budget ends the run partial: that is a success ping (the job ran)."""
        pipeline_file(STOPS)
        seed_clients(db, 1)
        hc = server()
        settings = configure(
            SMART_RESUME_PING_URL=hc.url,
            SMART_RESUME_TIME_BUDGET_SECONDS="1",
            SMART_RESUME_MAX_RUN_SECONDS="60",
        )
        outcome = run(settings, db)
        assert outcome.status == "partial"
        assert hc.kinds() == ["start", "success"]
        assert f"run {outcome.run_id} partial in " in hc.pings[1].body
        assert hc.pings[1].body.endswith("1 clients, 0 processed, 0 skipped, 0 failed, 1 deferred")

    def test_cancelled(self, server, db, configure, pipeline_file) -> None:
        import opfuncs

        pipeline_file(STOPS)
        seed_clients(db, 1)
        hc = server()
        settings = configure(
            SMART_RESUME_PING_URL=hc.url,
            SMART_RESUME_HEARTBEAT_SECONDS="0.1",
            SMART_RESUME_LEASE_SECONDS="2",
        )
        opfuncs.reset()
        opfuncs.BEHAVIOUR["started"] = started = threading.Event()
        try:
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(run, settings, db)
                assert started.wait(10)
                Lock(db, settings).request_cancel()
                outcome = future.result(timeout=30)
        finally:
            opfuncs.reset()
        assert outcome.status == "cancelled"
        assert hc.kinds() == ["start", "success"]
        assert f"run {outcome.run_id} cancelled in " in hc.pings[1].body

    def test_failed(self, server, db, configure, pipeline_file) -> None:
        """The resume module raises: start, then fail with the error in the body."""
        pipeline_file(OK)
        hc = server()
        settings = configure(SMART_RESUME_PING_URL=hc.url, SMART_RESUME_MODULE="test_health")
        outcome = run(settings, db)
        assert outcome.status == "failed"
        assert hc.kinds() == ["start", "fail"]
        assert hc.pings[1].body == (
            f"smart-resume run {outcome.run_id} failed in "
            + hc.pings[1].body.split(" failed in ")[1].split(":")[0]
            + ": 0 clients, 0 processed, 0 skipped, 0 failed, 0 deferred; "
            "error: engine broke on purpose"
        )

    def test_failed_before_start(self, server, db, configure, pipeline_file) -> None:
        """A module that does not load: no lock, no start, one fail ping."""
        pipeline_file(OK)
        hc = server()
        settings = configure(SMART_RESUME_PING_URL=hc.url, SMART_RESUME_MODULE="no_such_module_x")
        outcome = run(settings, db)
        assert outcome.status == "failed"
        assert hc.kinds() == ["fail"]
        assert f"run {outcome.run_id} failed" in hc.pings[0].body
        assert "cannot import no_such_module_x" in hc.pings[0].body

    def test_abandoned(self, server, db, configure, pipeline_file) -> None:
        """The run that takes over a stale lock pings fail for the one it abandoned, then its
        own start and end."""
        pipeline_file(OK)
        seed_clients(db, 1)
        hc = server()
        settings = configure(SMART_RESUME_PING_URL=hc.url)
        runs = Runs(db, settings)
        Lock(db, settings).acquire(
            "run-dead",
            {"host": "h", "pid": 1, "function": "t"},
            extra=lambda batch, previous: runs.start(
                batch,
                "run-dead",
                trigger={"source": "test"},
                schedule_time=None,
                stream=None,
                previous_run_id=previous,
            ),
        )
        old = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=settings.lease_seconds + 30)
        db.document("locks/smart-resume").update({"heartbeatAt": old})
        outcome = run(settings, db)
        assert outcome.status == "completed"
        assert db.document("runs/run-dead").get().to_dict()["status"] == "abandoned"
        assert hc.kinds() == ["fail", "start", "success"]
        assert hc.pings[0].body.startswith("smart-resume run run-dead abandoned: lease lost")
        assert f"taken over by run {outcome.run_id}" in hc.pings[0].body
        assert f"run {outcome.run_id} started" in hc.pings[1].body

    def test_no_ping_without_a_url_and_none_for_a_409(self, server, db, configure) -> None:
        hc = server()
        settings = configure(SMART_RESUME_PING_URL=hc.url)
        Lock(db, settings).acquire("run-live", {"host": "h", "pid": 1, "function": "t"})
        assert run(settings, db).status == "locked"
        assert hc.pings == []


class TestNeverAffectsTheRun:
    @pytest.mark.parametrize("how", ["hang", "refuse", "500"])
    def test_a_bad_ping_server(self, how, server, quick, db, configure, pipeline_file) -> None:
        """A server that never answers, a port nobody listens on, a 500: the run completes
        with the same answer and record, within the ping timeout per ping."""
        pipeline_file(OK)
        seed_clients(db, 1)
        if how == "refuse":
            url = f"http://127.0.0.1:{free_port()}/{TOKEN}"
        else:
            hc = server(hang=how == "hang", status=500)
            url = hc.url
        settings = configure(SMART_RESUME_PING_URL=url)
        started = time.monotonic()
        outcome = run(settings, db)
        took = time.monotonic() - started
        assert outcome.status == "completed"
        assert outcome.http_status == 200
        record = db.document(f"runs/{outcome.run_id}").get().to_dict()
        assert (record["status"], record["report"]["status"]) == ("completed", "sent")
        # Start (in the background) and end: at most two timeouts of 0.5 s, plus the run.
        assert took < 2 * (pings.TIMEOUT_SECONDS + 0.5) + 5
        if how == "hang":
            assert hc.kinds() == ["start", "success"]  # the end waited for the start

    def test_one_ping_is_bounded_even_if_the_server_trickles(self, server, quick) -> None:
        from shared.config import load_settings

        hc = server(hang=True)
        settings = load_settings({"SMART_RESUME_PING_URL": hc.url})
        started = time.monotonic()
        assert pings.ping(settings, "start", "x") is False
        assert time.monotonic() - started < pings.TIMEOUT_SECONDS + 1.5

    @pytest.mark.slow
    def test_hanging_server_with_a_real_function_process(
        self, server, function_process, db, pipeline_file
    ) -> None:
        """The real 5 s timeout in a real trigger process: the run answers 200 completed, the
        pings cost at most about two timeouts, and the process log never holds the URL."""
        pipeline_file(OK)
        seed_clients(db, 1)
        hc = server(hang=True)
        trigger = function_process(
            "smart_resume", SMART_RESUME_PING_URL=hc.url, SMART_RESUME_LOG_FORMAT="json"
        )
        started = time.monotonic()
        answer = trigger.post({}, timeout=60)
        took = time.monotonic() - started
        print(f"FIGURE pings: a ping server that never answers: run answered 200 in {took:.1f} s")
        assert answer.status_code == 200, answer.text + trigger.log()[-3000:]
        assert answer.json()["status"] == "completed"
        assert 5 <= took < 2 * 5.5 + 8
        assert hc.kinds() == ["start", "success"]
        log = trigger.log()
        assert "ping start got no answer within 5s" in log
        assert not leaks(log + answer.text)


class TestNeverShown:
    def test_url_in_no_log_response_report_or_document(
        self, server, db, configure, pipeline_file, capsys, tmp_path
    ) -> None:
        """Pings answered, refused and 500, through both functions in JSON and text logs: the
        URL (or its token) is nowhere: not in a log line, a response, a report, a document."""
        pipeline_file(OK)
        seed_clients(db, 1)
        outbox = tmp_path / "outbox"
        bodies: list[str] = []
        for log_format, url in (
            ("json", server().url),
            ("text", server(status=500).url),
            ("json", f"http://127.0.0.1:{free_port()}/{TOKEN}"),
        ):
            configure(
                SMART_RESUME_PING_URL=url,
                SMART_RESUME_LOG_FORMAT=log_format,
                SMART_RESUME_EMAIL_TRANSPORT="outbox",
                SMART_RESUME_OUTBOX=str(outbox),
            )
            trigger = create_app("smart_resume", TRIGGER).test_client()
            status = create_app("smart_resume_status", STATUS).test_client()
            db.document("clients/c00000").update({"nextDueAt": dt.datetime.now(dt.UTC)})
            for response in (
                trigger.post("/", headers=SECRET),
                trigger.post("/", headers=SECRET, data=json.dumps({"dryRun": True})),
                status.get("/?runs=5", headers=SECRET),
                status.get("/?check=health", headers=SECRET),
            ):
                assert response.status_code < 500
                bodies.append(response.get_data(as_text=True) + json.dumps(dict(response.headers)))
        out = capsys.readouterr()
        assert "ping start sent" in out.out and "answered HTTP 500" in out.out
        assert "could not be sent (ConnectionError)" in out.out
        assert not leaks(out.out + out.err)
        assert [b for b in bodies if leaks(b)] == []
        files = list(outbox.glob("*"))
        assert files and not [f.name for f in files if leaks(f.read_text(errors="replace"))]
        assert not leaks(json.dumps(snapshot(db), default=str))

    def test_a_log_line_quoting_the_url_is_masked(self, configure, capsys) -> None:
        from shared import log

        settings = configure(SMART_RESUME_PING_URL=f"https://hc-ping.com/{TOKEN}")
        log.register_secrets(settings.secrets)
        log.get_logger("careless").warning(
            "pinging %s, then %s", settings.ping_url, f"/{TOKEN}/fail"
        )
        out = capsys.readouterr().out
        assert "pinging" in out and not leaks(out)
