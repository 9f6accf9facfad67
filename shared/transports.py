"""Email transports: SendGrid, Amazon SES, an outbox folder, and the log.

Each transport is `send(settings, message) -> None` and raises `DeliveryError` on failure. The
provider SDKs are imported inside their transport so a cold start that never mails pays nothing.

Neither SendGrid's `mail/send` nor SES's `SendEmail` takes an idempotency key, so a request that
may have been accepted is never sent again: a duplicate report is worse than a missing one (the
run record says `failed` and why). Only what certainly did not reach the provider, or what it
refused before processing, is retried: a connection that never carried the whole request
(refused, connect timeout, DNS, TLS handshake), 429 and 408. A read timeout after sending, a
connection dropped before the answer, and 5xx are "outcome unknown" and end the delivery.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from email.header import Header
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formataddr, parseaddr
from typing import TYPE_CHECKING, Any

from shared import log
from shared.config import Settings
from shared.errors import SmartResumeError

if TYPE_CHECKING:
    import tenacity

logger = log.get_logger("report")

#: Attempts (SendGrid and SES) and backoff; module constants so tests can make the waits tiny.
SENDGRID_ATTEMPTS = 3
RETRY_INITIAL_SECONDS = 1.0
RETRY_MAX_SECONDS = 8.0
#: Statuses that say the request was not processed, so another try cannot send a second email:
#: 429 (throttled before processing) and 408 (the server never received the whole request).
#: 5xx is left out on purpose: SendGrid documents a 5xx only as "an error on a SendGrid
#: server", not as "not accepted", and a 502/504 from a gateway says nothing about whether the
#: backend queued the message. Without an idempotency key, retrying one risks a duplicate.
#: Everything else (400, 401, 403, 413...) would fail the same way again.
RETRYABLE_STATUSES = frozenset({408, 429})
#: SES error codes for throttling, refused before anything is sent.
SES_THROTTLING_CODES = frozenset({"Throttling", "ThrottlingException", "TooManyRequestsException"})
NOT_RETRIED = "not retried to avoid a duplicate email"
FALLBACK_FROM = "smart-resume@localhost"


@dataclass(frozen=True)
class Message:
    """A rendered report: subject, plain text and HTML. Defined here, where it is delivered,
    so that `shared.report` imports the transports and nothing imports back."""

    subject: str
    text: str
    html: str
    run_id: str = "report"


class DeliveryError(SmartResumeError):
    """A transport could not deliver the report; carries what the provider said."""

    def __init__(
        self,
        transport: str,
        status: int | None,
        detail: str,
        retryable: bool = False,
        outcome_unknown: bool = False,
    ) -> None:
        self.transport = transport
        self.status = status
        self.detail = detail
        #: Certainly not processed by the provider: another attempt cannot duplicate the email.
        self.retryable = retryable
        #: The provider may have accepted it: the email may or may not go out.
        self.outcome_unknown = outcome_unknown
        where = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{transport}: {where}: {detail}")


def _scrub(settings: Settings, text: str) -> str:
    """One line, no secrets: what may be logged and stored on the run record."""
    for secret in settings.secrets:
        text = text.replace(secret, log.MASK)
    # The registered forms too: a provider's body may echo the key JSON-escaped.
    return " ".join(log.mask(text).split())[:500]


def _unknown(what: str) -> str:
    return f"outcome unknown: {what}; {NOT_RETRIED}"


def _after_sending(
    exc: BaseException,
    timeouts: tuple[type[BaseException], ...] = (TimeoutError,),
    closes: tuple[type[BaseException], ...] = (http.client.RemoteDisconnected,),
) -> str:
    """Why an error raised once the request was sent leaves the outcome unknown, in words.

    The exception classes differ per client library (urllib for SendGrid, botocore for SES).
    """
    if isinstance(exc, timeouts):
        return "read timeout after sending"
    if isinstance(exc, closes):
        return "connection closed after sending, without an answer"
    return f"{type(exc).__name__}, possibly after sending: {exc}".rstrip(": ")


# --- SendGrid -------------------------------------------------------------------------------


def _sendgrid_detail(body: Any) -> str:
    """SendGrid answers `{"errors": [{"message", "field"}]}`; keep the messages, readable."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        errors = json.loads(body).get("errors") or []
        messages = [
            f"{e.get('message')} (field {e['field']})" if e.get("field") else str(e.get("message"))
            for e in errors
            if isinstance(e, dict)
        ]
        if messages:
            return "; ".join(messages)
    except (ValueError, AttributeError, TypeError):
        pass
    return str(body or "").strip() or "no message"


def _sendgrid_attempt(settings: Settings, message: Message) -> int:
    from python_http_client.exceptions import HTTPError
    from sendgrid import SendGridAPIClient
    from sendgrid.helpers.mail import Mail

    mail = Mail(
        from_email=settings.email_from or FALLBACK_FROM,
        to_emails=list(settings.email_to),
        subject=message.subject,
        plain_text_content=message.text,
        html_content=message.html,
    )
    sg = SendGridAPIClient(api_key=settings.sendgrid_api_key, host=settings.sendgrid_host)
    # python_http_client passes timeout=None to urlopen by default: a silent server hangs forever.
    sg.client.timeout = settings.email_timeout_seconds
    try:
        response = sg.send(mail)
    except HTTPError as exc:
        status = int(exc.status_code)
        detail = _scrub(settings, _sendgrid_detail(exc.body))
        if status >= 500:
            raise DeliveryError(
                "sendgrid", status, _unknown(detail), outcome_unknown=True
            ) from None
        raise DeliveryError(
            "sendgrid", status, detail, retryable=status in RETRYABLE_STATUSES
        ) from None
    except urllib.error.URLError as exc:
        # urllib raises URLError only for an OSError while connecting or writing the request
        # (`h.request`), so SendGrid never got the whole request: refused, connect timeout, DNS,
        # TLS handshake. Safe to try again.
        raise DeliveryError(
            "sendgrid",
            None,
            _scrub(settings, f"network error before sending: {exc.reason}"),
            retryable=True,
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        # Raised by `getresponse()`, after the whole request went out: SendGrid may have
        # accepted it (a read timeout, a connection dropped before the answer).
        raise DeliveryError(
            "sendgrid",
            None,
            _scrub(settings, _unknown(_after_sending(exc))),
            outcome_unknown=True,
        ) from None
    if not 200 <= response.status_code < 300:
        raise DeliveryError("sendgrid", response.status_code, "unexpected status", retryable=False)
    return int(response.status_code)


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    logger.warning(
        "%s attempt %d failed, retrying",
        getattr(exc, "transport", "email"),
        state.attempt_number,
        fields={
            "status": getattr(exc, "status", None),
            "detail": getattr(exc, "detail", str(exc)),
            "waitSeconds": round(state.next_action.sleep, 2) if state.next_action else None,
        },
    )


def _retrying() -> tenacity.Retrying:
    """Jittered backoff, only for a `DeliveryError` that is certainly safe to repeat."""
    import tenacity  # lazy: only runs that mail through a provider pay for it

    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(SENDGRID_ATTEMPTS),
        wait=tenacity.wait_random_exponential(
            multiplier=RETRY_INITIAL_SECONDS, max=RETRY_MAX_SECONDS
        ),
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, DeliveryError) and e.retryable),
        before_sleep=_log_retry,
        reraise=True,
    )


def send_sendgrid(settings: Settings, message: Message) -> None:
    """POST /v3/mail/send; retries, with jittered backoff, only what cannot send twice."""
    if not settings.sendgrid_api_key:
        raise DeliveryError("sendgrid", None, "SENDGRID_API_KEY is not set")
    # So nothing below (our lines or a provider echo) can print the key.
    log.register_secrets(settings.secrets)
    status = _retrying()(_sendgrid_attempt, settings, message)
    logger.info(
        "sendgrid accepted the report",
        fields={"status": status, "to": ",".join(settings.email_to)},
    )


# --- Amazon SES -----------------------------------------------------------------------------


def _utf8(data: str) -> dict[str, str]:
    return {"Data": data, "Charset": "UTF-8"}


def _ses_attempt(settings: Settings, client: Any, message: Message) -> dict[str, Any]:
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        HTTPClientError,
        ProxyConnectionError,
        ReadTimeoutError,
        SSLError,
    )

    try:
        answer: dict[str, Any] = client.send_email(
            FromEmailAddress=settings.email_from or FALLBACK_FROM,
            Destination={"ToAddresses": list(settings.email_to)},
            Content={
                "Simple": {
                    "Subject": _utf8(message.subject),
                    "Body": {"Text": _utf8(message.text), "Html": _utf8(message.html)},
                }
            },
        )
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error.get("Code", "error")
        detail = _scrub(settings, f"{code}: {error.get('Message', '')}")
        if isinstance(status, int) and status >= 500:
            raise DeliveryError("ses", status, _unknown(detail), outcome_unknown=True) from None
        throttled = status == 429 or code in SES_THROTTLING_CODES
        raise DeliveryError("ses", status, detail, retryable=throttled) from None
    except (EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError) as exc:
        # Refused, unresolvable, connect timeout, proxy unreachable: no connection carried the
        # request. Safe to try again.
        raise DeliveryError(
            "ses", None, _scrub(settings, f"network error before sending: {exc}"), retryable=True
        ) from None
    except (HTTPClientError, SSLError) as exc:
        # A read timeout, a connection closed before the answer, a TLS error mid-exchange: the
        # request may have arrived and been accepted.
        what = _after_sending(exc, (ReadTimeoutError,), (ConnectionClosedError,))
        raise DeliveryError(
            "ses", None, _scrub(settings, _unknown(what)), outcome_unknown=True
        ) from None
    except BotoCoreError as exc:
        # Raised before anything is sent (no credentials, bad parameters): it would fail again.
        raise DeliveryError("ses", None, _scrub(settings, str(exc))) from None
    return answer


def send_ses(settings: Settings, message: Message) -> None:
    """SES v2 `send_email` with a Simple message; retries only what cannot send twice.

    botocore's own retries are off: its standard mode repeats read timeouts and 5xx, which may
    already have sent the email.
    """
    import boto3
    from botocore.config import Config

    timeout = settings.email_timeout_seconds
    client = boto3.client(
        "sesv2",
        region_name=settings.aws_region,
        config=Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
        ),
    )
    answer = _retrying()(_ses_attempt, settings, client, message)
    logger.info(
        "ses accepted the report",
        fields={"messageId": answer.get("MessageId"), "region": settings.aws_region},
    )


# --- outbox and log -------------------------------------------------------------------------


def _safe_name(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_id).lstrip(".") or "report"


def _addresses(values: list[str]) -> str:
    """Addresses for a header, a display name that is not ASCII encoded as RFC 2047 says."""
    return ", ".join(formataddr(parseaddr(v), "utf-8") for v in values)


def as_email(settings: Settings, message: Message) -> MIMEMultipart:
    """The report as a real multipart/alternative email. Built with the plain MIME classes:
    a third of the time `EmailMessage` takes to fold and check headers it does not need."""
    mail = MIMEMultipart("alternative")
    mail["Subject"] = Header(message.subject, "utf-8")
    mail["From"] = _addresses([settings.email_from or FALLBACK_FROM])
    mail["To"] = _addresses(list(settings.email_to) or ["operator@localhost"])
    mail.attach(MIMEText(message.text, "plain", "utf-8"))
    mail.attach(MIMEText(message.html, "html", "utf-8"))
    return mail


def send_outbox(settings: Settings, message: Message) -> None:
    """Write `<runId>.eml` and `<runId>.html` under the outbox folder (the demo opens these)."""
    name = _safe_name(message.run_id)
    try:
        settings.outbox.mkdir(parents=True, exist_ok=True)
        eml = settings.outbox / f"{name}.eml"
        eml.write_bytes(as_email(settings, message).as_bytes())
        (settings.outbox / f"{name}.html").write_text(message.html, encoding="utf-8")
    except OSError as exc:
        raise DeliveryError("outbox", None, _scrub(settings, str(exc))) from None
    logger.info("report written to the outbox", fields={"path": str(eml)})


def send_log(settings: Settings, message: Message) -> None:
    """One structured log entry with the subject and the plain text."""
    logger.info(
        "report email",
        fields={
            "subject": message.subject,
            "to": ",".join(settings.email_to),
            "text": message.text,
        },
    )


TRANSPORTS: dict[str, Callable[[Settings, Message], None]] = {
    "sendgrid": send_sendgrid,
    "ses": send_ses,
    "outbox": send_outbox,
    "log": send_log,
}


def send(settings: Settings, message: Message) -> None:
    """Deliver through the configured transport; raises `DeliveryError`."""
    transport = TRANSPORTS.get(settings.email_transport)
    if transport is None:
        raise DeliveryError(settings.email_transport, None, "unknown transport")
    transport(settings, message)
