"""HTTP entry point `smart_resume` (placeholder until the functions issue lands)."""

from __future__ import annotations

import functions_framework
from flask import Request


@functions_framework.http
def smart_resume(request: Request) -> tuple[dict[str, str], int]:
    return {"error": "not implemented yet"}, 501
