"""Hostile requests to both functions, and the constant-time secret check.

Every request in the table must get its 4xx, write nothing (a snapshot of every document before
and after is compared) and never echo what it sent back in the response.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field

import pytest
from conftest import ROOT, seed_clients
from faults_helpers import snapshot
from functions_framework import create_app

from shared import auth

TRIGGER_SOURCE = str(ROOT / "functions" / "smart_resume" / "main.py")
STATUS_SOURCE = str(ROOT / "functions" / "smart_resume_status" / "main.py")
GOOD = "test-secret-1-0123456"
PIPELINE = '[[operation]]\nname = "score"\nkind = "python"\ntarget = "opfuncs:ok"\n'
MARK = "zq7echo"  # a distinctive token planted in hostile input; no response may contain it


@dataclass(frozen=True)
class Hostile:
    """One hostile request and the status it must get."""

    name: str
    target: str  # "trigger" or "status"
    status: int
    method: str = "POST"
    secret: str | None = GOOD
    path: str = "/"
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def js(value: object) -> bytes:
    return json.dumps(value).encode()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


T, S = "trigger", "status"
TABLE = [
    # wrong methods
    Hostile("trigger GET", T, 405, method="GET"),
    Hostile("trigger PUT", T, 405, method="PUT", body=b"{}"),
    Hostile("trigger DELETE", T, 405, method="DELETE"),
    Hostile("trigger PATCH", T, 405, method="PATCH", body=b"{}"),
    Hostile("trigger OPTIONS", T, 405, method="OPTIONS"),
    Hostile("status PUT", S, 405, method="PUT"),
    Hostile("status DELETE", S, 405, method="DELETE"),
    Hostile("status PATCH", S, 405, method="PATCH", body=js({"action": "unlock"})),
    # secrets: missing, empty, wrong, near misses, long, non-ASCII, in the query string
    Hostile("trigger no secret", T, 401, secret=None),
    Hostile("status no secret", S, 401, method="GET", secret=None),
    Hostile("trigger empty secret", T, 401, secret=""),
    Hostile("status empty secret", S, 401, method="GET", secret=""),
    Hostile("trigger wrong secret", T, 401, secret=MARK + "-wrong"),
    Hostile("trigger prefix of secret", T, 401, secret="test-secret-"),
    Hostile("trigger secret plus a char", T, 401, secret="test-secret-1x" + MARK),
    Hostile("trigger upper-case secret", T, 401, secret="TEST-SECRET-1"),
    Hostile("trigger unlisted rotation", T, 401, secret="test-secret-3"),
    Hostile(
        "trigger whole secret list", T, 401, secret="test-secret-1-0123456,test-secret-2-0123456"
    ),
    Hostile("trigger secret repeated", T, 401, secret=GOOD * 2),
    Hostile("trigger 10 kB secret", T, 401, secret=MARK + "x" * 10_000),
    Hostile("trigger secret + 5 kB", T, 401, secret=GOOD + "x" * 5_000),
    Hostile("trigger latin-1 secret", T, 401, secret="test-secr\xe9t-1"),
    Hostile("status latin-1 secret", S, 401, method="GET", secret="t\xebst-secret-1"),
    Hostile("trigger secret in query", T, 401, secret=None, path=f"/?secret={GOOD}"),
    Hostile("trigger header name in query", T, 401, secret=None, path=f"/?X-Webhook-Secret={GOOD}"),
    Hostile("status secret in query", S, 401, method="GET", secret=None, path=f"/?secret={GOOD}"),
    Hostile("trigger secret in body", T, 401, secret=None, body=js({"secret": GOOD})),
    # bodies the trigger must refuse
    Hostile("trigger malformed JSON", T, 400, body=b'{"clientId": "' + MARK.encode()),
    Hostile("trigger JSON array", T, 400, body=js([MARK])),
    Hostile("trigger JSON null", T, 400, body=b"null"),
    Hostile("trigger JSON number", T, 400, body=b"123"),
    Hostile("trigger JSON string", T, 400, body=js(MARK)),
    Hostile("trigger nested junk", T, 400, body=js({"clientId": {"a": [1, {"b": MARK}]}})),
    Hostile("trigger 30k-deep array", T, 400, body=nested(30_000)),
    Hostile("trigger 10k-deep object", T, 400, body=b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
    Hostile("trigger operations not a list", T, 400, body=js({"operations": MARK})),
    Hostile("trigger unknown operation", T, 400, body=js({"operations": [MARK]})),
    Hostile("trigger empty operations", T, 400, body=js({"operations": []})),
    Hostile("trigger operations of numbers", T, 400, body=js({"operations": [1, 2]})),
    Hostile("trigger dryRun string", T, 400, body=js({"dryRun": MARK})),
    Hostile("trigger stream -1", T, 400, body=js({"stream": -1})),
    Hostile("trigger stream 2**31", T, 400, body=js({"stream": 2**31})),
    Hostile("trigger stream float", T, 400, body=js({"stream": 1.5})),
    Hostile("trigger stream bool", T, 400, body=js({"stream": True})),
    Hostile("trigger stream string", T, 400, body=js({"stream": "abc"})),
    Hostile("trigger empty clientId", T, 400, body=js({"clientId": ""})),
    Hostile("trigger clientId with slash", T, 400, body=js({"clientId": MARK + "/../locks"})),
    Hostile("trigger 2000-char clientId", T, 400, body=js({"clientId": MARK * 300})),
    Hostile("trigger NaN", T, 400, body=b'{"stream": NaN}'),
    Hostile("trigger invalid UTF-8", T, 400, body=b'{"clientId": "\xff\xfe"}'),
    Hostile("trigger 100 kB body", T, 413, body=js({"clientId": MARK * 15_000})),
    Hostile("trigger 5 MB body", T, 413, body=b" " * 5_000_000),
    Hostile(
        "trigger form-encoded",
        T,
        400,
        body=f"clientId={MARK}".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    Hostile(
        "trigger XML",
        T,
        400,
        body=f"<run>{MARK}</run>".encode(),
        headers={"Content-Type": "text/xml"},
    ),
    Hostile(
        "trigger multipart",
        T,
        400,
        body=b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\n1\r\n--b--\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    ),
    # the status function's query and actions
    Hostile("status runs=-1", S, 400, method="GET", path="/?runs=-1"),
    Hostile("status runs=0", S, 400, method="GET", path="/?runs=0"),
    Hostile("status runs=51", S, 400, method="GET", path="/?runs=51"),
    Hostile("status runs=10**9", S, 400, method="GET", path=f"/?runs={10**9}"),
    Hostile("status runs=10**100", S, 400, method="GET", path=f"/?runs={10**100}"),
    Hostile("status runs=abc", S, 400, method="GET", path=f"/?runs={MARK}"),
    Hostile("status runs=1.5", S, 400, method="GET", path="/?runs=1.5"),
    Hostile("status runs=empty", S, 400, method="GET", path="/?runs="),
    Hostile("status runs=Arabic 3", S, 400, method="GET", path="/?runs=%D9%A3"),
    Hostile("status runs=+5", S, 400, method="GET", path="/?runs=%2B5"),
    Hostile("status unknown action", S, 400, body=js({"action": MARK})),
    Hostile("status no action", S, 400, body=b"{}"),
    Hostile("status empty body", S, 400),
    Hostile("status action array", S, 400, body=js({"action": ["unlock"]})),
    Hostile("status cancel with force", S, 400, body=js({"action": "cancel", "force": True})),
    Hostile("status force string", S, 400, body=js({"action": "unlock", "force": "yes"})),
    # A plain short identifier is named (a misspelling); anything else is only counted.
    Hostile("status unknown key", S, 400, body=js({"action": "unlock", f"<b>{MARK}</b>": 1})),
    Hostile("status unknown query parameter", S, 400, "GET", path=f"/?runs=1&%3Cb%3E{MARK}=1"),
    Hostile("status JSON array", S, 400, body=js([{"action": "unlock"}])),
    Hostile("status malformed JSON", S, 400, body=b'{"action": "unl'),
    Hostile("status 100 kB body", S, 413, body=js({"action": "x" * 100_000})),
    Hostile("status cancel when idle", S, 409, body=js({"action": "cancel"})),
]


@pytest.fixture
def apps(pipeline_file):
    pipeline_file(PIPELINE)
    return {
        T: create_app(target="smart_resume", source=TRIGGER_SOURCE).test_client(),
        S: create_app(target="smart_resume_status", source=STATUS_SOURCE).test_client(),
    }


@pytest.fixture
def seeded(db, settings):
    """Some state for hostile requests to (not) disturb: clients, a finished run, a free lock."""
    from shared.resume.plan import RunOptions
    from shared.runner import start_run

    seed_clients(db, 3)
    out = start_run(settings, db, RunOptions(), trigger={"source": "test"})
    assert out.status == "completed"
    return snapshot(db)


def send(client, case: Hostile):
    headers = dict(case.headers)
    if case.secret is not None:
        headers["X-Webhook-Secret"] = case.secret
    return client.open(case.path, method=case.method, data=case.body, headers=headers)


def test_table_has_40_hostile_requests() -> None:
    """The table covers both functions with at least 40 cases."""
    assert len(TABLE) >= 40
    assert {c.target for c in TABLE} == {T, S}


@pytest.mark.parametrize("case", TABLE, ids=[c.name for c in TABLE])
def test_hostile_request_gets_its_4xx_writes_nothing_echoes_nothing(apps, db, seeded, case):
    """Each hostile request: the expected 4xx, JSON error body, no write, no echo."""
    response = send(apps[case.target], case)
    assert response.status_code == case.status, response.get_data(as_text=True)[:300]
    assert response.mimetype == "application/json"
    text = response.get_data(as_text=True)
    assert len(text) < 1000
    assert MARK not in text
    assert GOOD not in text and "test-secret-2-0123456" not in text
    assert "Traceback" not in text
    assert snapshot(db) == seeded


def test_unknown_key_is_not_echoed(apps, db, seeded) -> None:
    """A hostile unknown key is refused without being reflected into the response."""
    payload = js({"<script>alert('" + MARK + "')</script>": 1})
    response = send(apps[T], Hostile("unknown key", T, 400, body=payload))
    assert response.status_code == 400
    assert MARK not in response.get_data(as_text=True)
    assert snapshot(db) == seeded


def test_cache_and_type_headers_on_refusals(apps) -> None:
    """Refusals are JSON and never cached by a proxy."""
    for case in (TABLE[0], TABLE[8], TABLE[27]):
        response = send(apps[case.target], case)
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Content-Type"].startswith("application/json")


class TestConstantTime:
    def test_secret_check_uses_compare_digest_on_bytes(self, monkeypatch) -> None:
        """`shared.auth` compares with `hmac.compare_digest`, on bytes, against every secret."""
        calls: list[tuple[object, object]] = []
        real = hmac.compare_digest

        def spy(a, b):
            calls.append((a, b))
            return real(a, b)

        monkeypatch.setattr(auth.hmac, "compare_digest", spy)
        assert auth.secret_matches(
            "test-secret-2-0123456", ("test-secret-1-0123456", "test-secret-2-0123456")
        )
        assert not auth.secret_matches("nope", ("test-secret-1-0123456", "test-secret-2-0123456"))
        assert len(calls) == 4  # every secret compared, even after a match
        assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)

    def test_the_function_path_goes_through_compare_digest(self, apps, monkeypatch) -> None:
        """A request through the trigger reaches `compare_digest`; no `==` shortcut first."""
        seen: list[bytes] = []
        real = hmac.compare_digest

        def spy(a, b):
            seen.append(a)
            return real(a, b)

        monkeypatch.setattr(auth.hmac, "compare_digest", spy)
        response = apps[T].post(
            "/", data=b"[]", headers={"X-Webhook-Secret": "test-secret-1-0123456"}
        )
        assert response.status_code == 400
        assert b"test-secret-1-0123456" in seen
        response = apps[S].get("/", headers={"X-Webhook-Secret": "guess"})
        assert response.status_code == 401
        assert b"guess" in seen
