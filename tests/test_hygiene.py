"""Secret hygiene: run scenarios with distinctive secrets and an API key, then scan every log
line, response body and outbox file for them. The count of hits must be 0."""

from __future__ import annotations

import email
import email.policy
import html
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, free_port, seed_clients
from fake_sendgrid import FakeSendGrid
from faults_helpers import snapshot
from functions_framework import create_app

from shared import log, transports

SECRET_A = "hyg-Secret-A-7f3k9q"
SECRET_B = "hyg-Secret-B-x2m4zp"
API_KEY = "SG.hyg-key-q8w7e6r5t4"
#: The dead man's switch URL is a secret too: its path is the check's token. Nothing listens on
#: this port, so every ping is refused at once (and logged, without the URL).
PING_TOKEN = "hyg-ping-Token-5k2j8w0"
PING_URL = f"http://127.0.0.1:{free_port()}/{PING_TOKEN}"
SECRETS = (SECRET_A, SECRET_B, API_KEY, PING_TOKEN)
PIPELINE = """
[[operation]]
name = "score"
kind = "python"
target = "opfuncs:ok"
"""
LEAKY = PIPELINE + '[[operation]]\nname = "leaky"\nkind = "python"\ntarget = "fault_ops:leaky"\n'
EMAIL = {
    "SMART_RESUME_EMAIL_FROM": "reports@example.com",
    "SMART_RESUME_EMAIL_TO": "ops@example.com",
    "SMART_RESUME_WEBHOOK_SECRET": f"{SECRET_A},{SECRET_B}",
    "SENDGRID_API_KEY": API_KEY,
    "SMART_RESUME_PING_URL": PING_URL,
}


def hits(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def requests_of_a_day(trigger, status_fn) -> list[str]:
    """Good and bad requests to both functions; returns every response body."""
    good = {"X-Webhook-Secret": SECRET_A}
    bodies = []
    for client, method, path, headers, data in [
        (trigger, "POST", "/", {"X-Webhook-Secret": SECRET_A + "x"}, b"{}"),
        (trigger, "POST", "/", {"X-Webhook-Secret": SECRET_A[:-1]}, b"{}"),
        (trigger, "POST", f"/?secret={SECRET_B}", {}, b"{}"),
        (trigger, "POST", "/", good, json.dumps({"clientId": "no/such"})),
        (trigger, "POST", "/", good, json.dumps({"clientId": 7, "note": "x"})),
        (trigger, "POST", "/", good, json.dumps({"operations": [API_KEY]})),
        (trigger, "POST", "/", good, json.dumps({"dryRun": True})),
        (trigger, "POST", "/", {"X-Webhook-Secret": SECRET_B}, b""),
        (trigger, "POST", "/", good, b""),  # fresh: skipped
        (status_fn, "GET", "/", {"X-Webhook-Secret": SECRET_B}, None),
        (status_fn, "GET", "/?runs=50", good, None),
        (status_fn, "GET", "/?check=health", good, None),
        (status_fn, "GET", f"/?check={PING_URL}", good, None),
        (status_fn, "GET", "/", {"X-Webhook-Secret": API_KEY}, None),
        (status_fn, "POST", "/", good, json.dumps({"action": "cancel"})),
        (status_fn, "POST", "/", good, json.dumps({"action": "unlock", "force": True})),
        (status_fn, "POST", "/", good, json.dumps({"action": SECRET_A})),
    ]:
        response = client.open(path, method=method, headers=headers, data=data)
        assert response.status_code < 500 or response.get_json().get("status") == "failed"
        bodies.append(response.get_data(as_text=True) + json.dumps(dict(response.headers)))
    return bodies


@pytest.fixture
def apps():
    def make():
        trigger = create_app("smart_resume", str(ROOT / "functions/smart_resume/main.py"))
        status = create_app(
            "smart_resume_status", str(ROOT / "functions/smart_resume_status/main.py")
        )
        return trigger.test_client(), status.test_client()

    return make


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_outbox_scenario_has_no_secret_anywhere(
    db, configure, pipeline_file, apps, capsys, tmp_path, log_format
) -> None:
    """Runs, refusals, status and actions with the outbox transport: logs, responses and the
    written emails hold none of the secrets."""
    pipeline_file(PIPELINE)
    outbox = tmp_path / "outbox"
    configure(
        **EMAIL,
        SMART_RESUME_EMAIL_TRANSPORT="outbox",
        SMART_RESUME_OUTBOX=str(outbox),
        SMART_RESUME_LOG_FORMAT=log_format,
    )
    seed_clients(db, 3)
    bodies = requests_of_a_day(*apps())
    captured = capsys.readouterr()
    files = list(outbox.glob("*"))
    assert files, "the outbox transport wrote nothing"
    assert "rejected request" in captured.out
    assert hits(captured.out + captured.err) == []
    assert [b for b in bodies if hits(b)] == []
    assert [f.name for f in files if hits(f.read_text(errors="replace"))] == []


def test_sendgrid_failure_scenario_has_no_secret_in_logs_or_record(
    db, configure, pipeline_file, apps, capsys, monkeypatch
) -> None:
    """SendGrid refusing the key (401) and throttling (429): nothing logged or stored shows it."""
    monkeypatch.setattr(transports, "RETRY_INITIAL_SECONDS", 0.01)
    monkeypatch.setattr(transports, "RETRY_MAX_SECONDS", 0.05)
    pipeline_file(PIPELINE)
    seed_clients(db, 2)
    with FakeSendGrid([429, 401]) as fake:
        configure(
            **EMAIL,
            SMART_RESUME_EMAIL_TRANSPORT="sendgrid",
            SMART_RESUME_SENDGRID_HOST=fake.host,
            SMART_RESUME_EMAIL_TIMEOUT_SECONDS="0.5",
        )
        bodies = requests_of_a_day(*apps())
        assert fake.requests, "the report never reached the provider"
    captured = capsys.readouterr()
    assert hits(captured.out + captured.err) == []
    assert [b for b in bodies if hits(b)] == []
    stored = json.dumps(snapshot(db), default=str)
    assert '"status": "failed"' in stored  # the report's failure is recorded...
    assert hits(stored) == []  # ...without the key


def test_operation_error_quoting_a_secret_is_masked_in_report_and_record(
    db, configure, pipeline_file, apps, capsys, tmp_path
) -> None:
    """A careless operation puts the key in its exception; the log masks it, and so must the
    state document, the run record, the response and the outbox email."""
    pipeline_file(LEAKY)
    outbox = tmp_path / "outbox"
    configure(**EMAIL, SMART_RESUME_EMAIL_TRANSPORT="outbox", SMART_RESUME_OUTBOX=str(outbox))
    seed_clients(db, 1)
    trigger, _ = apps()
    response = trigger.post("/", headers={"X-Webhook-Secret": SECRET_A})
    assert response.status_code == 200
    assert response.get_json()["summary"]["failed"] == 1
    assert hits(capsys.readouterr().out) == []  # the log filter masks it
    files = "".join(f.read_text(errors="replace") for f in outbox.glob("*"))
    stored = json.dumps(snapshot(db), default=str)
    assert (hits(files), hits(stored)) == ([], [])


@pytest.mark.slow
def test_function_process_stdout_has_no_secret(function_process, pipeline_file, db) -> None:
    """A real functions-framework process (JSON logs, as deployed): its whole stdout and
    stderr, access log included, holds none of the secrets after good and bad requests."""
    import requests

    pipeline_file(PIPELINE)
    seed_clients(db, 2)
    env = {**EMAIL, "SMART_RESUME_EMAIL_TRANSPORT": "log", "SMART_RESUME_LOG_FORMAT": "json"}
    trigger = function_process("smart_resume", **env)
    status_fn = function_process("smart_resume_status", **env)
    answers = [
        trigger.post({}, secret=SECRET_A),
        trigger.post({}, secret=SECRET_A + "!"),
        trigger.post({"stream": SECRET_B}, secret=SECRET_B),
        trigger.post({"dryRun": True}, secret=SECRET_B),
        trigger.post(None, secret=None, headers={"Authorization": f"Bearer {API_KEY}"}),
        status_fn.get("/?runs=5", secret=SECRET_A),
        status_fn.get("/", secret=API_KEY),
        requests.post(
            status_fn.url, json={"action": "cancel"}, headers={"X-Webhook-Secret": SECRET_B}
        ),
    ]
    assert answers[0].status_code == 200
    assert [a.status_code for a in answers[1:3]] == [401, 400]
    logs = trigger.log() + status_fn.log()
    assert "report email" in logs and "rejected request" in logs
    assert hits(logs) == []
    assert [a.text for a in answers if hits(a.text + json.dumps(dict(a.headers)))] == []


@pytest.mark.slow
def test_ping_url_never_appears_with_a_real_process_pair(
    function_process, pipeline_file, db, tmp_path
) -> None:
    """A ping server that answers (so pings are sent and logged) and real processes in JSON
    logs: the ping URL, or its token, is in no log line, response, outbox file or document."""
    from test_pings import TOKEN, PingServer

    pipeline_file(PIPELINE)
    seed_clients(db, 2)
    outbox = tmp_path / "pings-outbox"
    hc = PingServer()
    try:
        env = {
            **EMAIL,
            "SMART_RESUME_PING_URL": hc.url,
            "SMART_RESUME_EMAIL_TRANSPORT": "outbox",
            "SMART_RESUME_OUTBOX": str(outbox),
            "SMART_RESUME_LOG_FORMAT": "json",
        }
        trigger = function_process("smart_resume", **env)
        status_fn = function_process("smart_resume_status", **env)
        answers = [
            trigger.post({}, secret=SECRET_A),
            trigger.post({"dryRun": True}, secret=SECRET_A),
            status_fn.get("/?runs=5", secret=SECRET_B),
            status_fn.get("/?check=health", secret=SECRET_B),
        ]
    finally:
        hc.close()
    assert answers[0].status_code == 200
    assert hc.kinds() == ["start", "success"]
    logs = trigger.log() + status_fn.log()
    assert "ping start sent" in logs
    texts = [a.text + json.dumps(dict(a.headers)) for a in answers]
    texts += [f.read_text(errors="replace") for f in outbox.glob("*")]
    texts.append(json.dumps(snapshot(db), default=str))
    assert [t for t in [logs, *texts] if TOKEN in t or hits(t)] == []


def test_settings_repr_hides_secrets(configure) -> None:
    """`repr(settings)` (what a careless log line would print) shows no secret."""
    settings = configure(**EMAIL, SMART_RESUME_EMAIL_TRANSPORT="log")
    assert hits(repr(settings)) == []
    assert hits(str(Path(settings.outbox))) == []


AWKWARD_SECRET = 'hyg"Quote\\Back-Secret-3v'
AWKWARD_KEY = 'SG.hyg"kéy\\-ünï-9p'


CARELESS = PIPELINE + (
    '[[operation]]\nname = "careless"\nkind = "python"\ntarget = "test_hygiene:careless"\n'
)


def careless(ctx: Any) -> None:
    """An operation that logs the secrets itself, in its message, arguments and fields, then
    fails quoting them: the log formatters are the only thing between them and the sink."""
    key = os.environ["SENDGRID_API_KEY"]
    header = os.environ["SMART_RESUME_WEBHOOK_SECRET"]
    log.get_logger("careless").warning(
        "calling with key %s and %s", key, {"header": header}, fields={"auth": [key, header]}
    )
    raise ValueError(f"auth failed with key {key} and header {header}")


def awkward_hits(text: str) -> list[str]:
    """The awkward secrets as written, or as JSON or repr() would escape them."""
    forms = {
        form
        for secret in (AWKWARD_SECRET, AWKWARD_KEY)
        for form in (
            secret,
            json.dumps(secret)[1:-1],
            json.dumps(secret, ensure_ascii=False)[1:-1],
            repr(secret)[1:-1],
        )
    }
    return sorted(form for form in forms if form in text)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secrets_with_quotes_backslashes_and_unicode_are_masked(
    db, configure, pipeline_file, apps, capsys, tmp_path, log_format
) -> None:
    """Secrets holding `"`, `\\` and non-ASCII, logged and quoted by a careless operation: JSON
    escaping and repr() must not hide them from the mask, in either log format, nor in what is
    stored or mailed."""
    pipeline_file(CARELESS)
    outbox = tmp_path / "outbox"
    configure(
        SMART_RESUME_WEBHOOK_SECRET=AWKWARD_SECRET,
        SENDGRID_API_KEY=AWKWARD_KEY,
        SMART_RESUME_EMAIL_TRANSPORT="outbox",
        SMART_RESUME_OUTBOX=str(outbox),
        SMART_RESUME_LOG_FORMAT=log_format,
    )
    seed_clients(db, 1)
    trigger, _ = apps()
    response = trigger.post("/", headers={"X-Webhook-Secret": AWKWARD_SECRET})
    assert response.status_code == 200
    assert response.get_json()["summary"]["failed"] == 1
    out = capsys.readouterr().out
    assert "auth failed with key" in out
    assert "calling with key" in out
    assert awkward_hits(out) == []
    if log_format == "json":
        decoded = json.dumps([json.loads(line) for line in out.splitlines()], ensure_ascii=False)
        assert awkward_hits(decoded) == []
    mailed = [html.unescape(f.read_text()) for f in outbox.glob("*.html")]
    for eml in outbox.glob("*.eml"):  # decoded: non-ASCII parts travel base64 or QP-encoded
        parsed = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        mailed += [part.get_content() for part in parsed.walk() if not part.is_multipart()]
    assert len(mailed) == 3
    stored = json.dumps(snapshot(db), default=str, ensure_ascii=False)
    assert (awkward_hits("".join(mailed)), awkward_hits(stored), awkward_hits(response.text)) == (
        [],
        [],
        [],
    )
