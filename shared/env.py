"""Reading environment variables: each value parsed on its own with every problem collected,
and the names under a prefix that nothing reads. `shared.config` says which variables there
are and what they must hold; this is how any of them is read.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


class Reader:
    """Parses variables one by one, collecting problems instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str], defaults: Mapping[str, str | None]) -> None:
        self.env = env
        self.defaults = defaults
        self.problems: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self.env.get(name, self.defaults[name])
        if value is None:
            return None
        value = value.strip()
        return value or self.defaults[name]

    def parse(self, name: str, convert: Callable[[str], T], what: str, default: T) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return convert(value)
        except ValueError:
            self.problems.append(f"{name}={value!r} is not {what}")
            return default

    def seconds(self, name: str) -> float:
        return self.positive(name, "seconds")

    def optional_seconds(self, name: str, default: T) -> float | T:
        """`default` when unset, else as `seconds`."""
        return default if self.raw(name) is None else self.seconds(name)

    def positive(self, name: str, unit: str) -> float:
        """A positive, finite number of `unit`; NaN on error, so cross-checks on it stay quiet."""
        before = len(self.problems)
        value = self.parse(name, float, f"a number of {unit}", math.nan)
        if len(self.problems) > before:
            return math.nan
        if not 0 < value < math.inf:
            self.problems.append(f"{name} must be a positive number of {unit}, got {value:g}")
            return math.nan
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = (self.raw(name) or default).lower()
        if value not in choices:
            self.problems.append(f"{name}={value!r} is not one of {', '.join(choices)}")
            return default
        return value


def flag(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def header_safe(secret: str) -> bool:
    """Whether a client can present `secret` in a header and have it match.

    WSGI hands header values over decoded as Latin-1, so a secret with any non-ASCII character
    never compares equal to what was sent, and a control character cannot travel in a header at
    all: such a secret would refuse every request, which is better found at startup.
    """
    return secret.isascii() and secret.isprintable()


def http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and value.isprintable()


def url_secrets(url: str | None) -> tuple[str, ...]:
    """A URL that carries a token, and its path on its own: an error message that names the
    path without the host must not leak the token either."""
    if not url:
        return ()
    path = urlsplit(url).path.strip("/")
    return (url, path) if len(path) >= 8 else (url,)


def unknown_names(names: Iterable[str], known: Iterable[str], prefix: str, most: int) -> list[str]:
    """One warning per name under `prefix` that is not `known`, naming the closest known one
    (at most `most` named); names only, never values (a value may be a secret)."""
    known = list(known)
    unknown = sorted(n for n in names if n.startswith(prefix) and n not in known)
    named = [n for n in unknown if n.isprintable() and len(n) <= 100][:most]
    # Compared without the shared prefix, which would make every name look close.
    shorts = [n[len(prefix) :] for n in known if n.startswith(prefix)]
    warnings = []
    for name in named:
        short = name[len(prefix) :]
        close = (
            difflib.get_close_matches(short, shorts, n=1, cutoff=0.6)
            or [
                k
                for k in shorts
                if short and k.startswith(short)  # `LEASE` for `LEASE_SECONDS`
            ][:1]
        )
        hint = f"; did you mean {prefix}{close[0]}?" if close else " (no setting is close)"
        warnings.append(f"{name} is not a smart-resume setting and is ignored{hint}")
    if len(unknown) > len(named):
        warnings.append(f"... and {len(unknown) - len(named)} more unknown {prefix}* variables")
    return warnings
