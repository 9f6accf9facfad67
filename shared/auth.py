"""The shared-secret check both functions run before reading a body.

Compared in constant time (`hmac.compare_digest` on UTF-8 bytes) against every configured secret,
so two can be valid while one is rotated. A failure is logged with where it came from, never
with what was sent.
"""

from __future__ import annotations

import hmac

from flask import Request

from shared.errors import SmartResumeError
from shared.log import get_logger

HEADER = "X-Webhook-Secret"
MAX_SECRET_BYTES = 1024
log = get_logger("auth")


class Unauthorized(SmartResumeError):
    """Missing or wrong `X-Webhook-Secret`."""


def secret_matches(presented: str, secrets: tuple[str, ...]) -> bool:
    """True if `presented` equals one of `secrets`; every secret is compared, always."""
    given = presented.encode("utf-8", "surrogateescape")
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(given, secret.encode("utf-8"))
    return matched


def verify(request: Request, secrets: tuple[str, ...]) -> None:
    """Raise `Unauthorized` unless the header carries an accepted secret.

    Only the header counts: a secret in the query string would end up in access logs.
    """
    presented = request.headers.get(HEADER)
    ok = (
        presented is not None
        and len(presented.encode("utf-8", "surrogateescape")) <= MAX_SECRET_BYTES
        and secret_matches(presented, secrets)
    )
    if not ok:
        log.warning(
            "rejected request: %s",
            "missing secret header" if presented is None else "wrong secret",
            fields={
                "security": True,
                "remoteAddr": request.headers.get("X-Forwarded-For", request.remote_addr),
                "userAgent": (request.user_agent.string or "")[:200],
                "path": request.path[:200],
                "method": request.method,
            },
        )
        raise Unauthorized("unauthorized")
