"""Transports: the real SendGrid client against a local server, SES under moto, outbox, log."""

from __future__ import annotations

import email
import email.policy
import http.client
import socket
import time
from dataclasses import replace

import pytest
from fake_sendgrid import FakeSendGrid
from faults_helpers import wait_for

from shared import transports
from shared.report import Message, ReportInput, send_smart_resume_report
from shared.transports import DeliveryError

API_KEY = "SG.fake-key-that-must-never-be-logged-0123456789"
NOT_SENT_TWICE = "not retried to avoid a duplicate email"
READ_TIMEOUT = f"outcome unknown: read timeout after sending; {NOT_SENT_TWICE}"
SENDER = "reports@example.com"
RECIPIENTS = "ops@example.com,oncall@example.com"
MESSAGE = Message(
    subject="smart-resume completed: 1 processed [run r1]",
    text="plain body\n",
    html="<p>html body</p>\n",
    run_id="r1",
)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transports, "RETRY_INITIAL_SECONDS", 0.01)
    monkeypatch.setattr(transports, "RETRY_MAX_SECONDS", 0.05)


@pytest.fixture
def sendgrid(configure):
    """Settings pointing the real SendGrid client at a given host."""

    def apply(host: str):
        return configure(
            SMART_RESUME_EMAIL_TRANSPORT="sendgrid",
            SENDGRID_API_KEY=API_KEY,
            SMART_RESUME_EMAIL_FROM=SENDER,
            SMART_RESUME_EMAIL_TO=RECIPIENTS,
            SMART_RESUME_SENDGRID_HOST=host,
            SMART_RESUME_EMAIL_TIMEOUT_SECONDS="0.5",
        )

    return apply


def report_for(run_id: str) -> ReportInput:
    return ReportInput(
        run_id=run_id,
        status="completed",
        summary={"clients": 1, "processed": 1, "skipped": 0, "failed": 0, "deferred": 0},
        results=[{"clientId": "c1", "operation": "score", "outcome": "processed", "reason": ""}],
        client_names={"c1": "Acme"},
    )


def run_doc(db, run_id: str) -> dict:
    return db.collection("runs").document(run_id).get().to_dict() or {}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestSendGrid:
    def test_accepted_payload_and_auth(self, sendgrid) -> None:
        """A 202 is success, and the request carries from, to, subject, both parts and the key."""
        with FakeSendGrid([202]) as fake:
            transports.send(sendgrid(fake.host), MESSAGE)
        (request,) = fake.requests
        assert request.path == "/v3/mail/send"
        assert request.headers["Authorization"] == f"Bearer {API_KEY}"
        body = request.body
        assert body["from"]["email"] == SENDER
        tos = [to["email"] for p in body["personalizations"] for to in p["to"]]
        assert tos == RECIPIENTS.split(",")
        assert body["subject"] == MESSAGE.subject
        content = {c["type"]: c["value"] for c in body["content"]}
        assert content == {"text/plain": MESSAGE.text, "text/html": MESSAGE.html}

    @pytest.mark.parametrize("status", [400, 401, 403])
    def test_client_errors_are_not_retried(self, sendgrid, status: int) -> None:
        """400, 401 and 403 fail after one request, carrying the provider's message."""
        with FakeSendGrid([status, 202]) as fake, pytest.raises(DeliveryError) as caught:
            transports.send(sendgrid(fake.host), MESSAGE)
        assert len(fake.requests) == 1
        assert caught.value.status == status
        assert not caught.value.retryable

    def test_unverified_sender_message_is_logged(self, sendgrid, db, capsys) -> None:
        """A 403 is recorded failed and its provider message appears in the log, the key never."""
        with FakeSendGrid([403]) as fake:
            result = send_smart_resume_report(sendgrid(fake.host), db, report_for("r-403"))
        assert len(fake.requests) == 1
        assert result["status"] == "failed"
        assert "verified Sender Identity" in result["error"]
        recorded = run_doc(db, "r-403")["report"]
        assert recorded["status"] == "failed"
        assert recorded["transport"] == "sendgrid"
        assert "403" in recorded["error"]
        out = capsys.readouterr().out
        assert "verified Sender Identity" in out
        assert "403" in out
        assert API_KEY not in out
        assert API_KEY not in str(recorded)

    @pytest.mark.parametrize("status", [429, 408])
    def test_refusals_before_processing_are_retried(self, sendgrid, status: int) -> None:
        """429 (throttled) and 408 (request never complete) were not processed: retried."""
        with FakeSendGrid([status, 202]) as fake:
            transports.send(sendgrid(fake.host), MESSAGE)
        assert len(fake.requests) == 2

    @pytest.mark.parametrize("status", [500, 502, 503, 504])
    def test_server_errors_are_not_retried(self, sendgrid, status: int) -> None:
        """A 5xx does not say the message was refused, and mail/send has no idempotency key: one
        request, an error saying the outcome is unknown."""
        with FakeSendGrid([status, 202]) as fake, pytest.raises(DeliveryError) as caught:
            transports.send(sendgrid(fake.host), MESSAGE)
        assert len(fake.requests) == 1
        assert caught.value.status == status
        assert caught.value.outcome_unknown and not caught.value.retryable
        assert str(caught.value).startswith(f"sendgrid: HTTP {status}: outcome unknown: ")
        assert str(caught.value).endswith(NOT_SENT_TWICE)

    def test_retries_are_bounded(self, sendgrid) -> None:
        """A server that keeps answering 429 gets a few attempts, then the error is raised."""
        with FakeSendGrid([429]) as fake, pytest.raises(DeliveryError) as caught:
            transports.send(sendgrid(fake.host), MESSAGE)
        assert len(fake.requests) == transports.SENDGRID_ATTEMPTS
        assert caught.value.status == 429

    def test_retried_then_sent_is_recorded_sent(self, sendgrid, db, capsys) -> None:
        """A 429 followed by a 202 ends as a sent report, with the retry logged without the key."""
        with FakeSendGrid([429, 202]) as fake:
            result = send_smart_resume_report(sendgrid(fake.host), db, report_for("r-429"))
        assert result["status"] == "sent"
        assert run_doc(db, "r-429")["report"]["status"] == "sent"
        out = capsys.readouterr().out
        assert "retrying" in out
        assert API_KEY not in out

    def test_connection_refused_is_bounded_and_recorded(self, sendgrid, db, capsys) -> None:
        """No server listening: a few quick attempts, then recorded failed."""
        settings = sendgrid(f"http://127.0.0.1:{closed_port()}")
        started = time.monotonic()
        result = send_smart_resume_report(settings, db, report_for("r-refused"))
        assert time.monotonic() - started < 10
        assert result["status"] == "failed"
        assert "network error" in result["error"]
        assert run_doc(db, "r-refused")["report"]["status"] == "failed"
        assert API_KEY not in capsys.readouterr().out

    def test_silent_server_times_out_once(self, sendgrid, db) -> None:
        """A server that takes the request but never answers may have accepted it: one request,
        a bounded time, recorded failed with the outcome unknown."""
        with FakeSendGrid(silent=True) as fake:
            started = time.monotonic()
            result = send_smart_resume_report(sendgrid(fake.host), db, report_for("r-silent"))
            elapsed = time.monotonic() - started
        assert elapsed < 10
        assert len(fake.requests) == 1
        assert result["status"] == "failed"
        assert READ_TIMEOUT in result["error"]
        recorded = run_doc(db, "r-silent")["report"]
        assert recorded["status"] == "failed"
        assert READ_TIMEOUT in recorded["error"]

    def test_late_acceptance_is_not_sent_twice(self, sendgrid, db) -> None:
        """SendGrid accepts (202) but answers after the client's timeout: the email went out, so
        it must not be sent again; the record says failed, outcome unknown."""
        with FakeSendGrid([202], delay=1.5) as fake:
            result = send_smart_resume_report(sendgrid(fake.host), db, report_for("r-late"))
            time.sleep(0.2)  # a retry, had there been one, would have arrived by now
        assert len(fake.requests) == 1
        assert result["status"] == "failed"
        assert READ_TIMEOUT in run_doc(db, "r-late")["report"]["error"]

    def test_connection_closed_without_an_answer_is_not_retried(
        self, sendgrid, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The connection drops after the request went out (no status line): outcome unknown."""

        def closed(self: http.client.HTTPConnection, *args: object, **kwargs: object) -> None:
            raise http.client.RemoteDisconnected("Remote end closed connection without response")

        monkeypatch.setattr(http.client.HTTPConnection, "getresponse", closed)
        with FakeSendGrid([202]) as fake:
            with pytest.raises(DeliveryError) as caught:
                transports.send(sendgrid(fake.host), MESSAGE)
            # The client gave up before the fake's thread finished recording the request.
            wait_for(lambda: fake.requests, timeout=5)
            time.sleep(0.3)  # time for a retry to arrive, were there one
            assert len(fake.requests) == 1
        assert caught.value.outcome_unknown and not caught.value.retryable
        assert "connection closed after sending" in str(caught.value)

    def test_connect_timeout_is_retried(self, sendgrid, monkeypatch: pytest.MonkeyPatch) -> None:
        """A connect timeout means nothing was sent: retried, bounded, then a network error."""
        with FakeSendGrid([202]) as fake:
            port = int(fake.host.rsplit(":", 1)[1])
            real = socket.create_connection
            tries: list[object] = []

            def connect(address: tuple[str, int], *args: object, **kwargs: object) -> object:
                if address[1] == port:
                    tries.append(address)
                    raise TimeoutError("timed out")
                return real(address, *args, **kwargs)  # type: ignore[arg-type]

            monkeypatch.setattr(socket, "create_connection", connect)
            with pytest.raises(DeliveryError) as caught:
                transports.send(sendgrid(fake.host), MESSAGE)
        assert len(tries) == transports.SENDGRID_ATTEMPTS
        assert fake.requests == []
        assert caught.value.retryable and not caught.value.outcome_unknown
        assert "network error before sending" in str(caught.value)


class TestSes:
    @pytest.fixture
    def ses(self, configure, monkeypatch: pytest.MonkeyPatch):
        from moto import mock_aws

        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
        }.items():
            monkeypatch.setenv(key, value)
        settings = configure(
            SMART_RESUME_EMAIL_TRANSPORT="ses",
            AWS_REGION="eu-west-1",
            SMART_RESUME_EMAIL_FROM=SENDER,
            SMART_RESUME_EMAIL_TO=RECIPIENTS,
        )
        with mock_aws():
            yield settings

    def test_verified_sender_reaches_the_backend(self, ses, db) -> None:
        """With a verified sender the message lands in moto's SES backend with subject and HTML."""
        import boto3
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.ses.models import ses_backends

        boto3.client("sesv2", region_name="eu-west-1").create_email_identity(EmailIdentity=SENDER)
        result = send_smart_resume_report(ses, db, report_for("r-ses"))
        assert result["status"] == "sent"
        assert run_doc(db, "r-ses")["report"] | {"at": None} == {
            "status": "sent",
            "transport": "ses",
            "error": None,
            "at": None,
        }
        (sent,) = ses_backends[DEFAULT_ACCOUNT_ID]["eu-west-1"].sent_messages
        assert sent.subject.startswith("smart-resume completed:")
        assert "[run r-ses]" in sent.subject
        assert "Acme" in sent.body
        assert sent.source == SENDER

    def test_unverified_sender_is_recorded_failed(self, ses, db) -> None:
        """SES rejects an unverified sender; the report is recorded failed with the reason."""
        result = send_smart_resume_report(ses, db, report_for("r-unverified"))
        assert result["status"] == "failed"
        assert "not verified" in result["error"]
        assert run_doc(db, "r-unverified")["report"]["status"] == "failed"

    @pytest.fixture
    def sent(self, ses):
        """A verified sender; returns what moto's backend has sent so far."""
        import boto3
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.ses.models import ses_backends

        boto3.client("sesv2", region_name="eu-west-1").create_email_identity(EmailIdentity=SENDER)
        return lambda: list(ses_backends[DEFAULT_ACCOUNT_ID]["eu-west-1"].sent_messages)

    @pytest.fixture
    def hook(self, monkeypatch: pytest.MonkeyPatch):
        """Install `fault(call_number)` on every SES client send_ses creates: before moto (the
        request never reaches SES) or after it (SES accepted it, then the answer is lost)."""
        import boto3

        calls: list[int] = []

        def install(fault, *, after_acceptance: bool = False) -> list[int]:
            real = boto3.client

            def handler(event_name: str = "", **kwargs: object) -> None:
                if event_name.endswith(".SendEmail"):
                    calls.append(len(calls) + 1)
                    fault(len(calls))

            def client(*args: object, **kwargs: object) -> object:
                made = real(*args, **kwargs)
                if after_acceptance:  # moto answers on `before-send`; run after it
                    made.meta.events.register_last("before-send", handler)
                else:
                    made.meta.events.register_first("before-send.sesv2.SendEmail", handler)
                return made

            monkeypatch.setattr(boto3, "client", client)
            return calls

        return install

    def test_read_timeout_after_acceptance_is_not_sent_twice(self, ses, db, sent, hook) -> None:
        """SES accepted the email but the answer timed out: not retried (botocore's own retries
        included), one email, recorded failed with the outcome unknown."""
        from botocore.exceptions import ReadTimeoutError

        def lost(_: int) -> None:
            raise ReadTimeoutError(endpoint_url="https://email.eu-west-1.amazonaws.com")

        calls = hook(lost, after_acceptance=True)
        result = send_smart_resume_report(ses, db, report_for("r-ses-late"))
        assert len(calls) == 1
        assert len(sent()) == 1
        assert result["status"] == "failed"
        assert READ_TIMEOUT in run_doc(db, "r-ses-late")["report"]["error"]

    def test_throttling_is_retried(self, ses, db, sent, hook) -> None:
        """TooManyRequestsException (429) was refused before processing: retried, sent once."""
        from botocore.exceptions import ClientError

        def throttle(call: int) -> None:
            if call == 1:
                raise ClientError(
                    {
                        "Error": {"Code": "TooManyRequestsException", "Message": "slow down"},
                        "ResponseMetadata": {"HTTPStatusCode": 429},
                    },
                    "SendEmail",
                )

        calls = hook(throttle)
        result = send_smart_resume_report(ses, db, report_for("r-ses-429"))
        assert result["status"] == "sent"
        assert len(calls) == 2
        assert len(sent()) == 1

    def test_server_error_is_not_retried(self, ses, db, sent, hook) -> None:
        """A 5xx leaves the outcome unknown: one request, recorded failed."""
        from botocore.exceptions import ClientError

        def broken(_: int) -> None:
            raise ClientError(
                {
                    "Error": {"Code": "InternalFailure", "Message": "oops"},
                    "ResponseMetadata": {"HTTPStatusCode": 500},
                },
                "SendEmail",
            )

        calls = hook(broken)
        result = send_smart_resume_report(ses, db, report_for("r-ses-500"))
        assert len(calls) == 1
        assert result["status"] == "failed"
        assert "outcome unknown: InternalFailure: oops" in result["error"]
        assert NOT_SENT_TWICE in result["error"]

    def test_connect_timeout_is_retried(self, ses, db, sent, hook) -> None:
        """A connect timeout never reached SES: retried a bounded number of times, then failed."""
        from botocore.exceptions import ConnectTimeoutError

        def unreachable(_: int) -> None:
            raise ConnectTimeoutError(endpoint_url="https://email.eu-west-1.amazonaws.com")

        calls = hook(unreachable)
        result = send_smart_resume_report(ses, db, report_for("r-ses-connect"))
        assert len(calls) == transports.SENDGRID_ATTEMPTS
        assert sent() == []
        assert result["status"] == "failed"
        assert "network error before sending" in result["error"]


class TestOutbox:
    def test_writes_a_parseable_eml_and_html(self, configure) -> None:
        """The outbox gets `<runId>.eml` (text and HTML alternatives) and `<runId>.html`."""
        settings = configure(
            SMART_RESUME_EMAIL_TRANSPORT="outbox", SMART_RESUME_EMAIL_TO=RECIPIENTS
        )
        transports.send(settings, MESSAGE)
        eml = settings.outbox / "r1.eml"
        parsed = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        assert parsed["Subject"] == MESSAGE.subject
        assert parsed["To"] == "ops@example.com, oncall@example.com"
        assert parsed.get_content_type() == "multipart/alternative"
        assert parsed.get_body(("plain",)).get_content() == MESSAGE.text
        assert parsed.get_body(("html",)).get_content() == MESSAGE.html
        assert (settings.outbox / "r1.html").read_text() == MESSAGE.html

    def test_names_and_subject_beyond_ascii_survive(self, configure) -> None:
        """A sender's display name and a subject that are not ASCII are encoded, and parse
        back as written."""
        settings = configure(
            SMART_RESUME_EMAIL_TRANSPORT="outbox",
            SMART_RESUME_EMAIL_FROM="Jürgen Über <ops@example.com>",
            SMART_RESUME_EMAIL_TO="Équipe <team@example.com>",
        )
        transports.send(settings, replace(MESSAGE, subject="smart-resume: Zürich ✓"))
        raw = (settings.outbox / "r1.eml").read_bytes()
        assert raw.isascii()
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert parsed["From"] == "Jürgen Über <ops@example.com>"
        assert parsed["To"] == "Équipe <team@example.com>"
        assert parsed["Subject"] == "smart-resume: Zürich ✓"

    def test_run_id_cannot_escape_the_folder(self, configure) -> None:
        """A run id with path separators is flattened into a file name inside the outbox."""
        settings = configure(SMART_RESUME_EMAIL_TRANSPORT="outbox")
        transports.send(settings, Message("s", "t", "h", run_id="../../evil"))
        assert sorted(p.name for p in settings.outbox.iterdir()) == [
            "_.._evil.eml",
            "_.._evil.html",
        ]


class TestLog:
    def test_one_structured_line_with_subject_and_text(self, configure, capsys) -> None:
        """The log transport writes one JSON entry holding the subject and the text."""
        import json

        from shared import log

        settings = configure(SMART_RESUME_EMAIL_TRANSPORT="log")
        log.configure("json")
        try:
            transports.send(settings, MESSAGE)
        finally:
            log.configure("text")
        (line,) = capsys.readouterr().out.splitlines()
        entry = json.loads(line)
        assert entry["message"] == "report email"
        assert entry["subject"] == MESSAGE.subject
        assert entry["text"] == MESSAGE.text
        assert entry["severity"] == "INFO"
        assert entry["component"] == "report"
