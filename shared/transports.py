"""Email transports: SendGrid, Amazon SES, an outbox folder, and the log.

Each transport is `send(settings, message) -> None` and raises `DeliveryError` on failure. The
provider SDKs are imported inside their transport so a cold start that never mails pays nothing.
"""

from __future__ import annotations

import email.policy
import json
import re
import urllib.error
from collections.abc import Callable
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

from shared import log
from shared.config import Settings
from shared.errors import SmartResumeError

if TYPE_CHECKING:
    import tenacity

    from shared.report import Message

logger = log.get_logger("report")

#: SendGrid attempts and backoff; module constants so tests can make the waits tiny.
SENDGRID_ATTEMPTS = 3
RETRY_INITIAL_SECONDS = 1.0
RETRY_MAX_SECONDS = 8.0
#: Statuses worth another try; anything else (400, 401, 403, 413...) will fail the same way again.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
FALLBACK_FROM = "smart-resume@localhost"


class DeliveryError(SmartResumeError):
    """A transport could not deliver the report; carries what the provider said."""

    def __init__(
        self, transport: str, status: int | None, detail: str, retryable: bool = False
    ) -> None:
        self.transport = transport
        self.status = status
        self.detail = detail
        self.retryable = retryable
        where = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{transport}: {where}: {detail}")


def _scrub(settings: Settings, text: str) -> str:
    """One line, no secrets: what may be logged and stored on the run record."""
    for secret in settings.secrets:
        text = text.replace(secret, log.MASK)
    return " ".join(text.split())[:500]


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
        raise DeliveryError(
            "sendgrid",
            status,
            _scrub(settings, _sendgrid_detail(exc.body)),
            retryable=status in RETRYABLE_STATUSES,
        ) from None
    except urllib.error.URLError as exc:
        # A refused or unreachable host surfaces as URLError, not the client's HTTPError.
        raise DeliveryError(
            "sendgrid", None, _scrub(settings, f"network error: {exc.reason}"), retryable=True
        ) from None
    except OSError as exc:  # socket timeouts and resets; URLError is handled above
        raise DeliveryError(
            "sendgrid", None, _scrub(settings, f"network error: {exc!r}"), retryable=True
        ) from None
    if not 200 <= response.status_code < 300:
        raise DeliveryError("sendgrid", response.status_code, "unexpected status", retryable=False)
    return int(response.status_code)


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    logger.warning(
        "sendgrid attempt %d failed, retrying",
        state.attempt_number,
        fields={
            "status": getattr(exc, "status", None),
            "detail": getattr(exc, "detail", str(exc)),
            "waitSeconds": round(state.next_action.sleep, 2) if state.next_action else None,
        },
    )


def send_sendgrid(settings: Settings, message: Message) -> None:
    """POST /v3/mail/send; retries 429, 5xx and network errors with jittered backoff."""
    if not settings.sendgrid_api_key:
        raise DeliveryError("sendgrid", None, "SENDGRID_API_KEY is not set")
    # So nothing below (our lines or a provider echo) can print the key.
    log.register_secrets(settings.secrets)
    import tenacity  # lazy: only runs that mail through SendGrid pay for it

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(SENDGRID_ATTEMPTS),
        wait=tenacity.wait_random_exponential(
            multiplier=RETRY_INITIAL_SECONDS, max=RETRY_MAX_SECONDS
        ),
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, DeliveryError) and e.retryable),
        before_sleep=_log_retry,
        reraise=True,
    )
    status = retrying(_sendgrid_attempt, settings, message)
    logger.info(
        "sendgrid accepted the report",
        fields={"status": status, "to": ",".join(settings.email_to)},
    )


# --- Amazon SES -----------------------------------------------------------------------------


def _utf8(data: str) -> dict[str, str]:
    return {"Data": data, "Charset": "UTF-8"}


def send_ses(settings: Settings, message: Message) -> None:
    """SES v2 `send_email` with a Simple message; botocore does the retrying."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    timeout = settings.email_timeout_seconds
    client = boto3.client(
        "sesv2",
        region_name=settings.aws_region,
        config=Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": SENDGRID_ATTEMPTS, "mode": "standard"},
        ),
    )
    try:
        answer = client.send_email(
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
        detail = f"{error.get('Code', 'error')}: {error.get('Message', '')}"
        raise DeliveryError("ses", status, _scrub(settings, detail)) from None
    except BotoCoreError as exc:
        raise DeliveryError("ses", None, _scrub(settings, str(exc)), retryable=True) from None
    logger.info(
        "ses accepted the report",
        fields={"messageId": answer.get("MessageId"), "region": settings.aws_region},
    )


# --- outbox and log -------------------------------------------------------------------------


def _safe_name(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_id).lstrip(".") or "report"


def as_email(settings: Settings, message: Message) -> EmailMessage:
    """The report as a real multipart/alternative email."""
    mail = EmailMessage(policy=email.policy.default)
    mail["Subject"] = message.subject
    mail["From"] = settings.email_from or FALLBACK_FROM
    mail["To"] = ", ".join(settings.email_to) or "operator@localhost"
    mail.set_content(message.text)
    mail.add_alternative(message.html, subtype="html")
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
