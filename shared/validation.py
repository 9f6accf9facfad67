"""Request validation: every field checked, every error naming the field, never echoing input."""

from __future__ import annotations

import json
import re
from typing import Any

from flask import Request

from shared.errors import InvalidRequest
from shared.resume.plan import RunOptions

MAX_BODY_BYTES = 64 * 1024
TRIGGER_KEYS = {
    "clientId": str,
    "operations": list,
    "dryRun": bool,
    "stream": int,
    "shard": int,
}


class BodyTooLarge(InvalidRequest):
    """The body is over `MAX_BODY_BYTES`."""


def read_json(request: Request, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The body as a JSON object; an empty body is `{}`."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise BodyTooLarge(f"body larger than {max_bytes} bytes")
    raw = request.stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise BodyTooLarge(f"body larger than {max_bytes} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequest("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    return body


_PLAIN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
#: Operation names are letters, digits, `_` and `-` (the pipeline's rule), up to 64 of them.
_OPERATION = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
#: At most this many misspelt names are named in one message; the rest are counted.
MAX_NAMED = 5


def unknown_names(names: list[str], what: str) -> str:
    """Name the unknown keys that are plain short identifiers (a misspelt `dryrun` is worth
    naming); anything else is caller input that is never echoed, only counted."""
    plain = [n for n in names if isinstance(n, str) and _PLAIN.match(n)]
    others = len(names) - len(plain)
    parts = [f"unknown {what} " + ", ".join(f"'{n}'" for n in plain)] if plain else []
    if others:
        parts.append(f"{others} {'other ' if plain else ''}unknown {what}(s)")
    return " and ".join(parts)


def _named(names: list[str], known: tuple[str, ...] | list[str]) -> str:
    """The unknown names that are misspellings of known ones (shaped like a name and close to
    one), quoted with the name meant, up to `MAX_NAMED`; any other name is caller input that
    is never echoed, only counted."""
    import difflib

    named: dict[str, str] = {}
    for name in names:
        if name in named or len(named) >= MAX_NAMED or not _OPERATION.match(name):
            continue
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        if close:
            named[name] = close[0]
    others = sum(1 for n in names if n not in named)
    parts = [", ".join(f"'{n}' (did you mean '{m}'?)" for n, m in named.items())] if named else []
    if others:
        other = (" others" if others != 1 else " other") if named else ""
        parts.append(f"{others}{other} not shown")
    return " and ".join(parts)


def only_params(args: Any, allowed: tuple[str, ...]) -> None:
    """Refuse query parameters this request does not read: a misspelt `?run=3` would otherwise
    be ignored without a word, and the caller would take the default for an answer."""
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        allowed_text = ", ".join(allowed) if allowed else "none"
        raise InvalidRequest(
            f"{unknown_names(unknown, 'query parameter')}; allowed here: {allowed_text}"
        )


def _type_name(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }.get(type(value), "value")


def document_id(value: str) -> bool:
    """Firestore's rules for a document id: not empty, no '/', not '.' or '..', not `__x__`,
    at most 1500 bytes."""
    return (
        bool(value)
        and "/" not in value
        and value not in (".", "..")
        and not (value.startswith("__") and value.endswith("__"))
        and len(value.encode("utf-8", "surrogatepass")) <= 1500
    )


def trigger_options(
    body: dict[str, Any],
    known_operations: tuple[str, ...] | None,
    configured_stream: int | None = None,
    shards: int = 1,
) -> RunOptions:
    """The trigger body as `RunOptions`; unknown keys, wrong types and unknown names are 400s.

    `known_operations` is None when the pipeline itself cannot be loaded: then the names are
    not checked, and the run fails on the pipeline, with its error recorded and reported.
    """
    unknown = sorted(set(body) - set(TRIGGER_KEYS))
    if unknown:
        raise InvalidRequest(
            f"{unknown_names(unknown, 'field')}; allowed: {', '.join(TRIGGER_KEYS)}"
        )
    for key, expected in TRIGGER_KEYS.items():
        if key not in body:
            continue
        value = body[key]
        wrong = not isinstance(value, expected) or (expected is int and isinstance(value, bool))
        if wrong:
            want = {str: "a string", list: "an array", bool: "true or false", int: "a whole number"}
            raise InvalidRequest(f"'{key}' must be {want[expected]}, got {_type_name(value)}")
    client_id = body.get("clientId")
    if client_id is not None and not document_id(client_id):
        raise InvalidRequest("'clientId' is not a valid Firestore document id")
    operations = body.get("operations")
    if operations is not None:
        if not all(isinstance(o, str) for o in operations):
            raise InvalidRequest("'operations' must be an array of strings")
        if not operations:
            raise InvalidRequest("'operations' must name at least one operation")
        known = known_operations if known_operations is not None else tuple(operations)
        unknown_ops = [o for o in operations if o not in known]
        if unknown_ops:
            raise InvalidRequest(
                f"'operations' has {len(unknown_ops)} unknown name(s): "
                f"{_named(unknown_ops, known)}; known: {', '.join(known)}"
            )
    stream = body.get("stream")
    if stream is not None and not 0 <= stream < 2**31:
        raise InvalidRequest("'stream' must be between 0 and 2147483647")
    if stream is not None and configured_stream is not None and stream != configured_stream:
        # The lock of this deployment covers its own stream only: another stream's clients
        # would run beside that stream's own deployment.
        raise InvalidRequest(
            f"'stream' must be {configured_stream}, the stream this deployment "
            "(SMART_RESUME_STREAM) and its lock cover"
        )
    shard = body.get("shard")
    if shards > 1 and shard is None:
        raise InvalidRequest(
            f"'shard' is required: there are {shards} shards (SMART_RESUME_SHARDS), "
            f"0 to {shards - 1}"
        )
    if shard is not None and not 0 <= shard < shards:
        raise InvalidRequest(
            f"'shard' must be from 0 to {shards - 1} (SMART_RESUME_SHARDS is {shards})"
        )
    return RunOptions(
        shard=shard if shards > 1 else None,
        client_id=client_id,
        operations=tuple(operations) if operations else None,
        dry_run=bool(body.get("dryRun", False)),
        stream=stream,
    )


def runs_param(value: str | None) -> int | None:
    """`?runs=N`: a whole number from 1 to 50."""
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= 50:
        raise InvalidRequest("'runs' must be a whole number from 1 to 50")
    return int(value)


def shard_param(value: str | None, shards: int) -> int | None:
    """`?shard=k` (or an action's `"shard"`): a whole number from 0 to SMART_RESUME_SHARDS - 1."""
    if value is None:
        return None
    if shards <= 1:
        raise InvalidRequest("'shard' is only for SMART_RESUME_SHARDS > 1")
    if not value.isascii() or not value.isdigit() or not 0 <= int(value) < shards:
        raise InvalidRequest(f"'shard' must be a whole number from 0 to {shards - 1}")
    return int(value)
