"""Calls out: an `http` operation never follows a redirect, never stores or logs the
credentials of its URL, and can authenticate with a header read from the environment (each
case failed on the code before part three)."""

from __future__ import annotations

from conftest import run_once, seed_clients

from shared.resume.http_operation import shown
from shared.resume.pipeline import load_pipeline


def pipe(url: str, extra: str = "") -> str:
    return f'[[operation]]\nname = "work"\nkind = "http"\nurl = "{url}"\n{extra}'


def state(db) -> dict:
    return db.document("clients/c00000/operations/work").get().to_dict()


def test_a_redirect_fails_the_call_and_goes_nowhere(db, configure, pipeline_file, ops):
    """Before: a 307 to another host got the client's request body POSTed there."""
    elsewhere = ops.route("/elsewhere", lambda payload: (200, {"done": True}))
    elsewhere = elsewhere.replace("127.0.0.1", "localhost")
    url = ops.route("/start", lambda payload: (307, {}, {"Location": elsewhere}))
    pipeline_file(pipe(url))
    settings = configure()
    seed_clients(db, 1)
    out = run_once(settings, db)
    assert out.body["summary"]["failed"] == 1
    assert "answered 307, a redirect to localhost" in state(db)["error"]
    assert ops.calls("/elsewhere") == []


def test_url_credentials_never_stored_logged_or_mailed(
    db, configure, pipeline_file, ops, capsys, tmp_path
):
    """Before: `http://opuser:OPPASS@.../score?api_key=TOKEN123 answered 404: ...` in the
    state's error, the logs and the report."""
    url = ops.route("/score", lambda payload: (404, {"error": "no"}))
    url = url.replace("http://", "http://opuser:OPPASS@") + "?api_key=TOKEN123&v=2"
    pipeline_file(pipe(url))
    settings = configure(
        SMART_RESUME_EMAIL_TRANSPORT="outbox", SMART_RESUME_OUTBOX=str(tmp_path / "out")
    )
    seed_clients(db, 1)
    out = run_once(settings, db)
    assert out.body["summary"]["failed"] == 1
    error = state(db)["error"]
    assert "answered 404" in error and "api_key=***" in error
    mail = (tmp_path / "out" / f"{out.run_id}.eml").read_text()
    logged = capsys.readouterr()
    for where in (error, mail, logged.out + logged.err):
        assert "OPPASS" not in where and "TOKEN123" not in where and "opuser" not in where


def test_a_header_from_the_environment_authenticates(
    db, configure, pipeline_file, ops, monkeypatch, capsys
):
    url = ops.route("/auth", lambda payload: (200, {"done": True}))
    pipeline_file(pipe(url, 'headers = {"Authorization" = "env:LEADS_TOKEN"}\n'))
    settings = configure()
    seed_clients(db, 2)
    monkeypatch.setenv("LEADS_TOKEN", "Bearer s3cret-value-123")
    assert run_once(settings, db).body["summary"]["processed"] == 2
    sent = ops.received("/auth")
    assert {r.headers.get("Authorization") for r in sent} == {"Bearer s3cret-value-123"}
    assert "s3cret-value-123" not in capsys.readouterr().out


def test_a_missing_header_variable_fails_naming_it(db, configure, pipeline_file, ops):
    url = ops.route("/auth", lambda payload: (200, {"done": True}))
    pipeline_file(pipe(url, 'headers = {"Authorization" = "env:NOT_SET_ANYWHERE"}\n'))
    settings = configure()
    seed_clients(db, 1)
    assert run_once(settings, db).body["summary"]["failed"] == 1
    assert "NOT_SET_ANYWHERE, which is not set" in state(db)["error"]
    assert ops.calls("/auth") == []


def test_headers_are_checked_when_the_pipeline_loads(tmp_path):
    import pytest

    from shared.errors import PipelineError

    path = tmp_path / "p.toml"
    for bad, words in [
        ('headers = {"Idempotency-Key" = "x"}', "cannot set the header"),
        ('headers = {"Authorization" = "env:1BAD"}', "variable name"),
        ('headers = {"X-Key" = "env:SMART_RESUME_WEBHOOK_SECRET"}', "smart-resume's own"),
        ('headers = {"X-Key" = "env:SENDGRID_API_KEY"}', "never sent to a service"),
        ('headers = ["x"]', "table of header names"),
    ]:
        path.write_text(pipe("http://127.0.0.1:1/x", bad + "\n"))
        with pytest.raises(PipelineError, match=words):
            load_pipeline(path)


def test_shown_masks_user_info_and_query_values():
    assert shown("https://u:p@h.example:8443/a/b?key=v&flag") == (
        "https://h.example:8443/a/b?key=***&flag"
    )


def test_the_demo_operation_honours_the_budget(db, configure, monkeypatch):
    """Before: `demoDelaySeconds: 25` ran 25 s past a 5 s budget."""
    import time

    from examples import leads

    class Ctx:
        client = {"demoDelaySeconds": 25}
        checkpoint = None

        def __init__(self) -> None:
            self.stop_at = time.monotonic() + 0.3

        def should_stop(self) -> bool:
            return time.monotonic() >= self.stop_at

    ctx = Ctx()
    started = time.monotonic()
    leads._pause(ctx, leads._delay(ctx.client["demoDelaySeconds"]))
    assert time.monotonic() - started < 1.0
    assert leads._delay("25") == 0.0 and leads._delay(25) == leads.MAX_DELAY_SECONDS
