"""The report: message content and escaping, EMAIL_ON, and exactly one report per run."""

from __future__ import annotations

import datetime as dt
import re
import threading
import time

import pytest
from google.cloud import firestore

from shared import report as rp
from shared import transports
from shared.report import ReportInput, build_message, send_smart_resume_report, wanted

RUN = "20261128-060000-ab12"
HOSTILE = "<script>alert('x')</script> & Co"
START = dt.datetime(2026, 11, 28, 6, 0, tzinfo=dt.UTC)


def make(status: str = "completed", **overrides) -> ReportInput:
    """A small run: four selected clients, one of which has no result row."""
    fields = {
        "run_id": RUN,
        "status": status,
        "summary": {
            "clients": 4,
            "processed": 12,
            "skipped": 30,
            "failed": 0,
            "deferred": 0,
            "durationSeconds": 723.4,
            "impact": {"leads_scored": 120, "emails_queued": 3},
        },
        "results": [
            {"clientId": "c1", "operation": "lead_scoring", "outcome": "processed", "reason": ""},
            {
                "clientId": "c1",
                "operation": "post_scoring",
                "outcome": "skipped",
                "reason": "fresh",
            },
            {
                "clientId": "c2",
                "operation": "lead_scoring",
                "outcome": "skipped",
                "reason": "fresh",
            },
            {"clientId": "c3", "operation": "lead_scoring", "outcome": "processed", "reason": ""},
        ],
        "client_names": {"c1": "Acme", "c2": "Globex", "c3": "Initech", "c4": "Umbrella"},
        "started_at": START,
        "finished_at": START + dt.timedelta(seconds=723),
        "lock_name": "smart-resume",
    }
    fields.update(overrides)
    return ReportInput(**fields)


KINDS = {
    "completed": make(),
    "partial": make(
        "partial",
        summary={"clients": 4, "processed": 1, "skipped": 0, "failed": 0, "deferred": 3},
        results=[
            {"clientId": "c1", "operation": "lead_scoring", "outcome": "processed", "reason": ""},
            {
                "clientId": "c2",
                "operation": "lead_scoring",
                "outcome": "deferred",
                "reason": "time budget",
            },
        ],
    ),
    "cancelled": make(
        "cancelled",
        results=[
            {
                "clientId": "c1",
                "operation": "lead_scoring",
                "outcome": "deferred",
                "reason": "cancel",
            }
        ],
    ),
    "failed": make("failed", error="Firestore unavailable while saving", error_where="engine"),
    "takeover": make("completed", takeover={"runId": "20261128-050000-zz99", "ageSeconds": 412.7}),
    "module error": make(
        "failed",
        error="ModuleNotFoundError: No module named 'acme_resume'",
        error_where="loading module acme_resume",
        module_error=True,
        results=[],
    ),
    "abandoned": make("abandoned", error="lease lost"),
}


def deliveries(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count what the log transport delivers (it stays the real transport underneath)."""
    sent: list[str] = []
    real = transports.TRANSPORTS["log"]

    def counting(settings, message) -> None:
        sent.append(message.subject)
        real(settings, message)

    monkeypatch.setitem(transports.TRANSPORTS, "log", counting)
    return sent


def run_doc(db, run_id: str = RUN) -> dict:
    return db.collection("runs").document(run_id).get().to_dict() or {}


class TestSubject:
    def test_completed_subject_has_outcome_counts_and_run(self) -> None:
        """The subject reads outcome, counts and run id."""
        assert build_message(make()).subject == (
            f"smart-resume completed: 12 processed, 30 skipped, 0 failed [run {RUN}]"
        )

    def test_partial_subject_counts_deferred(self) -> None:
        """A partial run's subject says how much was deferred."""
        assert "3 deferred" in build_message(KINDS["partial"]).subject

    def test_failed_subject_carries_the_short_error(self) -> None:
        """A failed run's subject is FAILED plus the one-line error."""
        subject = build_message(KINDS["failed"]).subject
        assert subject == f"smart-resume FAILED: Firestore unavailable while saving [run {RUN}]"

    def test_takeover_is_named_in_the_subject(self) -> None:
        """A stale takeover names the abandoned run in the subject."""
        assert (
            "(took over stale run 20261128-050000-zz99)" in build_message(KINDS["takeover"]).subject
        )

    def test_subject_is_one_short_line(self) -> None:
        """A multi-line, very long error still gives a one-line subject."""
        subject = build_message(make("failed", error="line one\nline two " + "x" * 1000)).subject
        assert "\n" not in subject
        assert len(subject) < 200


class TestBody:
    @pytest.mark.parametrize("kind", list(KINDS))
    def test_every_kind_renders(self, kind: str) -> None:
        """Each kind of report has a subject, a text part and an HTML part naming the run."""
        message = build_message(KINDS[kind])
        assert RUN in message.subject
        assert RUN in message.text
        assert message.html.startswith("<!DOCTYPE html>")
        assert "<style" not in message.html  # inline CSS only
        assert "Umbrella" in message.text
        assert "Umbrella" in message.html

    def test_every_selected_client_is_listed_by_name(self) -> None:
        """Clients with results and clients with none all appear, by name."""
        message = build_message(make())
        for name in ("Acme", "Globex", "Initech", "Umbrella"):
            assert name in message.text
            assert name in message.html
        assert re.search(r"Umbrella \(c4\) \| - \| not run \| no operation ran", message.text)

    def test_summary_duration_and_impact(self) -> None:
        """Duration, summary counts and impact counts are in both parts."""
        message = build_message(make())
        for part in (message.text, message.html):
            assert "12m 03s" in part
            assert "leads_scored=120" in part
            assert "4 clients" in part
            assert "2026-11-28 06:00:00 UTC" in part

    def test_failed_run_names_error_and_where(self) -> None:
        """A failed run shows its error and where it happened, plus an unlock hint."""
        message = build_message(KINDS["failed"])
        assert "Run (engine): Firestore unavailable while saving" in message.text
        assert "The run failed while engine" in message.text
        assert "unlock" in message.text

    def test_module_error_and_takeover_explain_themselves(self) -> None:
        """Module errors say no work ran; takeovers name the abandoned run and its age."""
        assert "resume module failed to load" in build_message(KINDS["module error"]).text
        text = build_message(KINDS["takeover"]).text
        assert "took over stale run 20261128-050000-zz99, silent for 413 s" in text

    def test_client_errors_are_listed(self) -> None:
        """A failed client-operation's error is in the errors list and the table."""
        report = make(
            results=[
                {
                    "clientId": "c1",
                    "operation": "lead_scoring",
                    "outcome": "failed",
                    "reason": "error",
                    "error": "HTTP 500 from scorer",
                }
            ]
        )
        message = build_message(report)
        assert "Acme (c1) / lead_scoring: HTTP 500 from scorer" in message.text
        assert "HTTP 500 from scorer" in message.html


class TestEscaping:
    def test_hostile_names_and_errors_are_escaped(self) -> None:
        """Client names, operations, reasons and errors never reach the HTML unescaped."""
        report = make(
            "failed",
            error="<img src=x onerror=alert(1)>",
            error_where="<b>engine</b>",
            results=[
                {
                    "clientId": "c1",
                    "operation": "<i>op</i>",
                    "outcome": "failed",
                    "reason": "<u>why</u>",
                    "error": "</td><script>evil()</script>",
                }
            ],
            client_names={"c1": HOSTILE, "c2": '"><svg onload=x>'},
        )
        page = build_message(report).html
        for raw in ("<script", "<img", "<svg", "<i>", "<u>", "<b>"):
            assert raw not in page
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; Co" in page
        assert "&lt;img src=x onerror=alert(1)&gt;" in page
        assert "&#34;&gt;&lt;svg onload=x&gt;" in page

    def test_long_errors_are_truncated_with_a_note(self) -> None:
        """A 20,000-character error is cut to the limit, saying how long it was."""
        message = build_message(make("failed", error="E" * 20_000))
        assert "E" * rp.MAX_ERROR_CHARS in message.text
        assert "E" * (rp.MAX_ERROR_CHARS + 1) not in message.text
        assert "E" * (rp.MAX_ERROR_CHARS + 1) not in message.html
        assert "[truncated: 20000 characters in all]" in message.text


class TestHugeRuns:
    def test_ten_thousand_clients_make_a_sane_email(self) -> None:
        """The table is capped, the urgent rows come first, and the rest is counted."""
        names = {f"c{i}": f"Client {i}" for i in range(10_000)}
        results = [
            {"clientId": f"c{i}", "operation": "score", "outcome": "skipped", "reason": "fresh"}
            for i in range(9_999)
        ]
        results.append(
            {
                "clientId": "c9999",
                "operation": "score",
                "outcome": "failed",
                "reason": "error",
                "error": "boom",
            }
        )
        started = time.monotonic()
        message = build_message(make(results=results, client_names=names))
        assert time.monotonic() - started < 5
        assert message.html.count("<tr>") <= rp.MAX_ROWS + 1 + len(rp._facts(make()))
        assert "Client 9999" in message.text.split("Clients:")[1].splitlines()[1]
        assert "9500 more rows not shown (9500 skipped)" in message.text
        assert "9500 more rows not shown" in message.html
        assert len(message.html) < 500_000


class TestWanted:
    @pytest.mark.parametrize("kind", list(KINDS))
    def test_always_sends_everything(self, settings, kind: str) -> None:
        """EMAIL_ON=always wants every kind."""
        assert wanted(settings, KINDS[kind])

    @pytest.mark.parametrize(
        ("kind", "expected"),
        [
            ("completed", False),
            ("cancelled", False),
            ("partial", True),
            ("failed", True),
            ("takeover", True),
            ("module error", True),
            ("abandoned", True),
        ],
    )
    def test_failure_sends_only_trouble(self, configure, kind: str, expected: bool) -> None:
        """EMAIL_ON=failure wants failed, partial, abandoned, takeover and module errors."""
        settings = configure(SMART_RESUME_EMAIL_ON="failure")
        assert wanted(settings, KINDS[kind]) is expected


class TestOneReportPerRun:
    def test_sends_and_records(self, settings, db, monkeypatch) -> None:
        """A report is delivered once and recorded on the run, whose other fields stay."""
        sent = deliveries(monkeypatch)
        db.collection("runs").document(RUN).set({"status": "completed", "summary": {"n": 1}})
        result = send_smart_resume_report(settings, db, make())
        assert result["status"] == "sent"
        assert result["transport"] == "log"
        assert len(sent) == 1
        doc = run_doc(db)
        assert doc["status"] == "completed"
        assert doc["summary"] == {"n": 1}
        assert doc["report"]["status"] == "sent"
        assert doc["report"]["transport"] == "log"
        assert doc["report"]["error"] is None
        assert isinstance(doc["report"]["at"], dt.datetime)

    def test_second_call_sends_nothing(self, settings, db, monkeypatch) -> None:
        """Finalising twice returns the first report and delivers nothing more."""
        sent = deliveries(monkeypatch)
        db.collection("runs").document(RUN).set({"status": "completed"})
        first = send_smart_resume_report(settings, db, make())
        second = send_smart_resume_report(settings, db, make())
        assert len(sent) == 1
        assert second["status"] == first["status"] == "sent"

    def test_concurrent_calls_deliver_once(self, settings, db, monkeypatch) -> None:
        """Eight threads finalising the same run at once produce one delivery."""
        sent = deliveries(monkeypatch)
        db.collection("runs").document(RUN).set({"status": "completed"})
        barrier = threading.Barrier(8)
        results: list[dict] = []

        def finalise() -> None:
            barrier.wait()
            results.append(send_smart_resume_report(settings, db, make()))

        threads = [threading.Thread(target=finalise) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 8
        assert len(sent) == 1
        assert run_doc(db)["report"]["status"] == "sent"

    def test_concurrent_calls_without_a_run_doc_deliver_once(self, settings, db, monkeypatch):
        """When the run record does not exist yet, racing callers still deliver once."""
        sent = deliveries(monkeypatch)
        barrier = threading.Barrier(4)

        def finalise() -> None:
            barrier.wait()
            send_smart_resume_report(settings, db, make())

        threads = [threading.Thread(target=finalise) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(sent) == 1
        assert run_doc(db) | {"report": None} == {"runId": RUN, "report": None}
        assert run_doc(db)["report"]["status"] == "sent"

    def test_claimed_skips_the_claim(self, settings, db, monkeypatch) -> None:
        """A caller that claimed the report itself gets it sent and recorded."""
        sent = deliveries(monkeypatch)
        db.collection("runs").document(RUN).set(
            {"status": "failed", "report": {"status": "sending", "at": firestore.SERVER_TIMESTAMP}}
        )
        result = send_smart_resume_report(settings, db, make("failed", error="x"), claimed=True)
        assert result["status"] == "sent"
        assert len(sent) == 1
        assert run_doc(db)["report"]["status"] == "sent"


class TestEmailOn:
    def test_completed_is_recorded_skipped(self, configure, db, monkeypatch) -> None:
        """EMAIL_ON=failure records a completed run's report as skipped and sends nothing."""
        settings = configure(SMART_RESUME_EMAIL_ON="failure")
        sent = deliveries(monkeypatch)
        result = send_smart_resume_report(settings, db, make())
        assert result["status"] == "skipped"
        assert sent == []
        assert run_doc(db)["report"]["status"] == "skipped"
        assert run_doc(db)["report"]["transport"] == "log"

    @pytest.mark.parametrize("kind", ["partial", "failed", "takeover"])
    def test_trouble_is_sent(self, configure, db, monkeypatch, kind: str) -> None:
        """EMAIL_ON=failure still sends partial, failed and takeover reports."""
        settings = configure(SMART_RESUME_EMAIL_ON="failure")
        sent = deliveries(monkeypatch)
        assert send_smart_resume_report(settings, db, KINDS[kind])["status"] == "sent"
        assert len(sent) == 1


class TestNeverRaises:
    def test_a_crashing_transport_is_recorded_failed(self, settings, db, monkeypatch) -> None:
        """An unexpected exception in delivery is caught and recorded as failed."""

        def explode(settings, message) -> None:
            raise RuntimeError("kaboom\nsecond line")

        monkeypatch.setitem(transports.TRANSPORTS, "log", explode)
        result = send_smart_resume_report(settings, db, make())
        assert result["status"] == "failed"
        assert result["error"] == "RuntimeError: kaboom second line"
        assert run_doc(db)["report"]["status"] == "failed"

    def test_unreachable_firestore_still_sends(self, configure, monkeypatch, capsys) -> None:
        """With Firestore down the report is still delivered, within the RPC deadline."""
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        settings = configure(
            FIRESTORE_EMULATOR_HOST=f"127.0.0.1:{dead}", SMART_RESUME_RPC_TIMEOUT_SECONDS="0.5"
        )
        sent = deliveries(monkeypatch)
        client = firestore.Client(project=settings.project)
        started = time.monotonic()
        result = send_smart_resume_report(settings, client, make())
        assert time.monotonic() - started < 10
        assert result["status"] == "sent"
        assert len(sent) == 1
        out = capsys.readouterr().out
        assert "could not claim the report" in out
        assert "could not record the report" in out


def history(count: int, newest: str = RUN) -> tuple[dict, ...]:
    """`count` run records of this lock, newest first (as `Runs.recent` returns them)."""
    outcomes = ["completed", "partial", "failed", "cancelled", "abandoned"]
    records = [
        {
            "runId": newest
            if i == 0
            else f"{START - dt.timedelta(hours=i):%Y%m%d-%H%M%S}-zz{i:02d}",
            "status": "running" if i == 0 else outcomes[i % len(outcomes)],
            "startedAt": START - dt.timedelta(hours=i),
            "finishedAt": None
            if i == 0
            else START - dt.timedelta(hours=i) + dt.timedelta(minutes=i),
            "summary": {} if i == 0 else {"durationSeconds": 60.0 * i},
        }
        for i in range(count)
    ]
    return tuple(records)


def strip_lines(text: str) -> list[str]:
    section = text.split("runs of this lock, oldest first:\n", 1)[1].split("\n\n", 1)[0]
    return section.splitlines()


class TestTemplates:
    def test_every_stored_string_is_escaped(self) -> None:
        """Names, ids, reasons, errors, failing work and the run history: all escaped in the
        HTML part; the plain-text part carries them as they are."""
        evil = "<script>x()</script>"
        report = make(
            "failed",
            error=evil,
            error_where=evil,
            results=[
                {
                    "clientId": evil,
                    "operation": evil,
                    "outcome": "failed",
                    "reason": evil,
                    "error": evil,
                    "counts": {evil: 1},
                }
            ],
            client_names={evil: evil, "c2": 'Tom & Jerry\'s "best"'},
            summary={"clients": 2, "failed": 1, "impact": {evil: 1}},
            quarantined=({"clientId": evil, "operation": evil, "failures": 6, "since": evil},),
            backed_off=({"clientId": evil, "operation": evil, "failures": 2, "dueAt": evil},),
            history=(*history(3), {"runId": evil, "status": evil, "summary": {}}),
            lock_name=evil,
        )
        message = build_message(report)
        assert "<script" not in message.html
        assert message.html.count("&lt;script&gt;x()&lt;/script&gt;") >= 10
        assert "Tom &amp; Jerry&#39;s &#34;best&#34;" in message.html
        assert evil in message.text  # plain text is not HTML: nothing to escape
        assert "&lt;" not in message.text and "&amp;" not in message.text

    def test_text_and_html_agree_on_the_counts(self) -> None:
        """Summary counts, client rows, failing work and the run strip: the same in both."""
        report = make(
            quarantined=tuple(
                {"clientId": f"q{i}", "operation": "op", "failures": 6, "since": "x"}
                for i in range(3)
            ),
            backed_off=({"clientId": "b", "operation": "op", "failures": 2, "dueAt": "y"},),
            history=history(12),
        )
        message = build_message(report)
        text, page = message.text, message.html
        for counts in ("4 clients, 12 processed, 30 skipped, 0 failed, 0 deferred",):
            assert counts in text and counts in page
        rows = [line for line in text.split("Clients:\n")[1].splitlines() if line.startswith("- ")]
        assert len(rows) == page.split("<h3", 99)[-1].count("<tr><td") == 5
        assert text.count("QUARANTINED ") == page.count("QUARANTINED ") == 3
        assert text.count("backing off ") == page.count("backing off ") == 1
        assert len(strip_lines(text)) == page.count('class="run"') == rp.HISTORY
        assert "Last 10 runs of this lock" in text and "Last 10 runs</h3>" in page

    def test_the_strip_shows_duration_and_outcome(self) -> None:
        """Oldest first; this run last, drawn as the report tells it; height by duration,
        colour by outcome; email-safe (tables, bgcolor, no CSS classes doing the work)."""
        report = make(history=history(12))
        lines = strip_lines(build_message(report).text)
        assert lines[-1] == f"- {RUN} completed 12m 03s (this run)"
        assert lines[0] == "- 20261127-210000-zz09 abandoned 9m 00s"
        page = build_message(report).html
        bars = re.findall(
            r'title="([^"]+)"><table[^>]*><tr valign="bottom"><td height="(\d+)" bgcolor="(#\w+)"',
            page,
        )
        assert len(bars) == 10
        assert bars[-1] == (f"{RUN}: completed, 12m 03s", str(rp.STRIP_MAX_PX), "#1b6e20")
        assert bars[0][1:] == (str(round(4 + 36 * 540 / 723.4)), "#b00020")
        assert bars[-2][1:] == (str(round(4 + 36 * 60 / 723.4)), "#a15c00")  # partial
        assert "&#9650;" in page  # this run is marked
        assert "<style" not in page and "<svg" not in page

    def test_no_history_no_strip(self) -> None:
        message = build_message(make())
        assert "runs of this lock" not in message.text
        assert 'class="run"' not in message.html

    def test_sending_reads_the_history(self, settings, db, monkeypatch) -> None:
        """The report reads this lock's last runs itself (another lock's runs are not shown)."""
        sent: list = []
        monkeypatch.setitem(transports.TRANSPORTS, "log", lambda s, m: sent.append(m))
        for record in history(4)[1:]:
            db.collection("runs").document(record["runId"]).set(
                {**record, "lockName": settings.lock_name}
            )
        db.collection("runs").document("20261127-000000-other").set(
            {"runId": "20261127-000000-other", "status": "failed", "lockName": "another"}
        )
        db.collection("runs").document(RUN).set(
            {"runId": RUN, "status": "completed", "lockName": settings.lock_name,
             "startedAt": START}
        )  # fmt: skip
        assert send_smart_resume_report(settings, db, make())["status"] == "sent"
        lines = strip_lines(sent[0].text)
        assert [line.split()[1] for line in lines] == [
            "20261128-030000-zz03",
            "20261128-040000-zz02",
            "20261128-050000-zz01",
            RUN,
        ]
        assert "other" not in sent[0].text

    def test_templates_are_autoescaping_jinja(self) -> None:
        """One Jinja2 environment with autoescaping on, built on first use."""
        from shared import templates

        env = templates.environment()
        assert env.autoescape is True
        assert templates.render("report.html.j2", **_minimal()).startswith("<!DOCTYPE html>")

    def test_report_and_transports_import_one_way(self) -> None:
        """`report` imports `transports`; nothing in `transports` imports `report`."""
        import ast
        from pathlib import Path

        tree = ast.parse(Path(transports.__file__).read_text())
        imported = {
            node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        } | {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        assert not any("report" in name for name in imported)
        assert rp.Message is transports.Message


def _minimal() -> dict:
    return {
        "subject": "s",
        "status": "completed",
        "head": "#000",
        "headline": "h",
        "facts": [("k", "v")],
        "errors": [],
        "failing": [],
        "problems": [],
        "attention": False,
        "strip": [],
        "longest": "",
        "rows": [],
        "note": None,
        "hints": [],
    }


IDLE = {"clients": 0, "processed": 0, "skipped": 0, "failed": 0, "deferred": 0}


class TestActivity:
    @pytest.mark.parametrize(
        ("report", "expected"),
        [
            (make(summary=IDLE, results=[]), False),  # an idle tick: no email
            (make(summary={**IDLE, "clients": 3, "skipped": 3}), False),  # all fresh
            (make(), True),  # processed something
            (make(summary={**IDLE, "failed": 1}), True),
            (make(summary={**IDLE, "deferred": 1}), True),
            (make("cancelled", summary=IDLE), True),  # ended other than completed
            (make("partial", summary=IDLE), True),
            (make(summary=IDLE, takeover={"runId": "r0"}), True),
            (KINDS["failed"], True),
            (KINDS["abandoned"], True),
        ],
    )
    def test_activity_sends_only_runs_that_did_something(self, configure, report, expected):
        """EMAIL_ON=activity: a report for a run that processed, failed or deferred something,
        took over a stale lock, or ended other than completed; none for an idle tick."""
        settings = configure(SMART_RESUME_EMAIL_ON="activity")
        assert wanted(settings, report) is expected

    def test_an_idle_tick_is_recorded_skipped_with_the_setting(
        self, configure, db, monkeypatch, capsys
    ) -> None:
        """The skipped report is recorded, and the log names the setting that skipped it."""
        settings = configure(SMART_RESUME_EMAIL_ON="activity")
        sent = deliveries(monkeypatch)
        db.collection("runs").document(RUN).set({"status": "completed"})
        result = send_smart_resume_report(settings, db, make(summary=IDLE, results=[]))
        assert result["status"] == "skipped" and sent == []
        assert "SMART_RESUME_EMAIL_ON=activity" in capsys.readouterr().out


class TestWhatPeopleRead:
    def test_rows_name_each_client_by_name_and_id(self) -> None:
        """Five clients called Cyberdyne are told apart by their ids, in both parts."""
        names = {f"shop-0{i}": "Cyberdyne" for i in range(1, 6)}
        results = [
            {"clientId": cid, "operation": "enrich", "outcome": "skipped", "reason": "fresh"}
            for cid in names
        ]
        message = build_message(make(results=results, client_names=names))
        for cid in names:
            assert f"Cyberdyne ({cid}) | enrich | skipped | fresh" in message.text
            assert f">{cid}</span>" in message.html
        assert message.html.count("Cyberdyne<br>") == 5

    def test_a_client_without_a_name_is_named_by_id_once(self) -> None:
        """No name: the id alone, not `c9 (c9)`."""
        results = [{"clientId": "c9", "operation": "op", "outcome": "skipped", "reason": "x"}]
        message = build_message(make(results=results, client_names={"c9": "c9"}))
        assert "- c9 | op | skipped | x" in message.text

    def test_processed_rows_say_what_happened(self) -> None:
        """A processed row reads `done` with its counts and why it was due, never just the
        reason it ran (`processed | never ran`)."""
        results = [
            {
                "clientId": "c1",
                "operation": "score",
                "outcome": "processed",
                "reason": "never ran",
                "counts": {"leads_scored": 30},
            },
            {"clientId": "c2", "operation": "score", "outcome": "processed", "reason": ""},
        ]
        message = build_message(make(results=results))
        assert "processed | never ran" not in message.text
        assert "Acme (c1) | score | processed | done, leads_scored=30 (due: never ran)" in (
            message.text
        )
        assert "Globex (c2) | score | processed | done" in message.text
        assert "done, leads_scored=30 (due: never ran)" in message.html

    def test_a_run_that_quarantined_something_needs_attention(self) -> None:
        """Completed, but it quarantined an operation: headed as needing attention (not the
        green COMPLETED), in the subject, both heads and the headline."""
        results = [
            {
                "clientId": "shop-07",
                "operation": "enrich",
                "outcome": "failed",
                "reason": "failed 2 times in a row; quarantined after 3 failures in a row",
                "error": "HTTP 500",
            }
        ]
        summary = {**IDLE, "clients": 1, "failed": 1}
        message = build_message(make(results=results, summary=summary))
        assert message.subject.startswith("smart-resume completed, NEEDS ATTENTION: ")
        assert message.text.startswith(f"smart-resume run {RUN}: COMPLETED, NEEDS ATTENTION")
        assert "this run quarantined 1 client-operation(s): shop-07 / enrich" in message.text
        assert "shop-07 | enrich | failed | due: failed 2 times in a row; quarantined" in (
            message.text
        )
        head = re.search(r"<h2[^>]*color:([^\"]+)\">([^<]*)</h2>", message.html)
        assert head and head.group(1) != rp._HEAD["completed"]
        assert "NEEDS ATTENTION" in head.group(2)

    def test_quarantined_since_this_run_started_needs_attention(self) -> None:
        """Quarantined work named by the failing list with a time after this run's start
        counts too (its result may be in a result page); older quarantines do not."""
        later = (START + dt.timedelta(seconds=5)).isoformat()
        earlier = (START - dt.timedelta(days=1)).isoformat()
        now = make(quarantined=({"clientId": "c1", "operation": "op", "since": later},))
        old = make(quarantined=({"clientId": "c1", "operation": "op", "since": earlier},))
        assert "NEEDS ATTENTION" in build_message(now).subject
        assert "NEEDS ATTENTION" not in build_message(old).subject

    def test_problems_are_listed_escaped_and_need_attention(self) -> None:
        """A run that left problems lists them (bounded, escaped) and needs attention."""
        problems = ({"clientId": "c1", "operation": "op", "problem": HOSTILE + "x" * 1000},)
        problems += tuple(
            {"clientId": f"c{i}", "operation": None, "problem": "'active' is not a boolean"}
            for i in range(150)
        )
        message = build_message(make("partial", problems=problems))
        assert "NEEDS ATTENTION" in message.subject
        assert f"Problems:\n- c1 / op: {HOSTILE}" in message.text
        assert "- ... and 51 more" in message.text
        assert message.text.count("is not a boolean") == rp.MAX_PROBLEMS - 1
        assert "[truncated: 1032 characters in all]" in message.text
        assert "<script>" not in message.html
        assert "c1 / op: &lt;script&gt;" in message.html
        assert "<h3" in message.html and ">Problems</h3>" in message.html
        assert "151 client document(s) or state(s) cannot be used" in message.text

    def test_no_problems_no_section(self) -> None:
        """Nothing to say: no Problems heading, no attention."""
        message = build_message(make())
        assert "Problems" not in message.text and "Problems" not in message.html
        assert "NEEDS ATTENTION" not in message.text
