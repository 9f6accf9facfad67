"""`python` operations for the hygiene tests: one that puts configured secrets in its error."""

from __future__ import annotations

import os
from typing import Any


def leaky(ctx: Any) -> None:
    """Fails with a message quoting the webhook secret and the API key, as careless code does."""
    raise ValueError(
        f"auth failed with key {os.environ.get('SENDGRID_API_KEY')} "
        f"and header {os.environ.get('SMART_RESUME_WEBHOOK_SECRET', '').split(',')[0]}"
    )
