"""What people read: the console page and the report email, kept as files beside this one.

The report is rendered by Jinja2 (Flask ships it) with autoescaping on; the plain-text template
turns it off for itself, explicitly. The environment is built on first use, so a cold start
that never mails pays nothing. The console page is static (it holds no data): it is served as
it is, with a Content-Security-Policy that allows its one inline script and one inline style by
their hashes and lets it connect to its own origin only.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

FOLDER = Path(__file__).resolve().parent
CONSOLE = "console.html"


@functools.cache
def environment() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(FOLDER),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(name: str, **context: Any) -> str:
    """Render the template `name` of this folder with `context`."""
    return environment().get_template(name).render(**context)


def _hashes(page: str, tag: str) -> list[str]:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(b.encode("utf-8")).digest()).decode() + "'"
        for b in blocks
    ]


@functools.cache
def console_page() -> tuple[bytes, str]:
    """The console page and its Content-Security-Policy (read and hashed once per instance)."""
    page = (FOLDER / CONSOLE).read_text(encoding="utf-8")
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {' '.join(_hashes(page, 'script'))}",
            f"style-src {' '.join(_hashes(page, 'style'))}",
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
            "require-trusted-types-for 'script'",
        ]
    )
    return page.encode("utf-8"), policy
