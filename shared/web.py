"""What both HTTP entry points do before their own work: method, configuration, secret.

Checks run in the contract's order and each failure maps to one status here, so the two
`main.py` files stay thin and answer alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Request, Response, jsonify

from shared import log as logging_setup
from shared.auth import Unauthorized, verify
from shared.config import Settings, get_settings
from shared.errors import ConfigError, InvalidRequest, StoreUnavailable
from shared.log import bind, get_logger
from shared.validation import BodyTooLarge

log = get_logger("http")


def reply(body: dict[str, Any], status: int, **headers: str) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    for key, value in headers.items():
        response.headers[key.replace("_", "-")] = value
    return response


def admit(request: Request, methods: tuple[str, ...]) -> Settings | Response:
    """Settings if the request may go on, else the response that refuses it."""
    if request.method not in methods:
        return reply({"error": "method not allowed"}, 405, Allow=", ".join(methods))
    try:
        settings = get_settings()
    except ConfigError as exc:
        logging_setup.configure()
        log.error("server misconfigured: %s", exc)
        return reply({"error": "server misconfigured"}, 500)
    logging_setup.configure(settings.log_format)
    logging_setup.register_secrets(settings.secrets)
    if not settings.webhook_secrets:
        log.error("server misconfigured: SMART_RESUME_WEBHOOK_SECRET is not set; refusing all")
        return reply({"error": "server misconfigured"}, 500)
    try:
        verify(request, settings.webhook_secrets)
    except Unauthorized:
        return reply({"error": "unauthorized"}, 401)
    return settings


def serve(
    request: Request,
    methods: tuple[str, ...],
    what: str,
    handle: Callable[[Settings], Response],
) -> Response:
    """Admit the request, then run `handle` with named errors mapped to statuses here, once
    for both functions: invalid input 400/413, store unreachable 503, anything else a 500
    without a trace."""
    settings = admit(request, methods)
    if isinstance(settings, Response):
        return settings
    with bind(trace=trace_of(request, settings)):
        try:
            return handle(settings)
        except InvalidRequest as exc:
            return invalid(exc)
        except StoreUnavailable as exc:
            log.error("store unavailable: %s", exc)
            return reply({"error": "store unavailable"}, 503)
        except Exception:
            log.exception("unexpected error in %s", what)
            return reply({"error": "internal error"}, 500)


def invalid(exc: InvalidRequest) -> Response:
    """400 (413 for a body too large), logged like a refused secret: the reason, never input."""
    status = 413 if isinstance(exc, BodyTooLarge) else 400
    log.warning("refused request (%d): %s", status, exc.detail, fields={"status": status})
    return reply({"error": "invalid request", "detail": exc.detail}, status)


def trace_of(request: Request, settings: Settings) -> str | None:
    return logging_setup.trace_from_header(
        request.headers.get("X-Cloud-Trace-Context"), settings.project
    )
