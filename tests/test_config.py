"""Settings: every variable, every default, every bad value named."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import (
    FINISH_MARGIN_SECONDS,
    MAX_UNKNOWN_NAMED,
    PLATFORM_TIMEOUT_SECONDS,
    PROJECT_ROOT,
    VARIABLES,
    describe,
    load_settings,
    unknown_variables,
)
from shared.errors import ConfigError

BASE = {"GOOGLE_CLOUD_PROJECT": "p"}


class TestDefaults:
    def test_defaults_match_the_contract(self) -> None:
        """With nothing set, every documented default applies."""
        s = load_settings(BASE)
        assert s.webhook_secrets == ()
        assert s.lock_name == "smart-resume"
        assert (s.heartbeat_seconds, s.lease_seconds) == (60, 300)
        assert (s.max_run_seconds, s.time_budget_seconds) == (1800, 1500)
        assert s.reconcile_hours == 24
        assert s.pipeline_path == PROJECT_ROOT / "pipeline.toml"
        assert s.module == "shared.resume"
        assert s.reload_module is False
        assert s.concurrency == 1
        assert s.stream is None
        assert s.email_transport == "log"
        assert s.email_on == "always"
        assert s.sendgrid_host == "https://api.sendgrid.com"
        assert s.outbox == Path("outbox")
        assert s.log_format == "text"
        assert (s.expected_every_seconds, s.grace_seconds) == (None, 0.0)
        assert s.stuck_seconds == 900
        assert s.ping_url is None

    def test_sendgrid_is_the_default_transport_with_a_key(self) -> None:
        """A SendGrid key alone switches the default transport to sendgrid."""
        s = load_settings(
            {
                **BASE,
                "SENDGRID_API_KEY": "SG.k",
                "SMART_RESUME_EMAIL_FROM": "a@x.io",
                "SMART_RESUME_EMAIL_TO": "b@x.io, c@x.io",
            }
        )
        assert s.email_transport == "sendgrid"
        assert s.email_to == ("b@x.io", "c@x.io")

    def test_json_logs_on_cloud_functions(self) -> None:
        """K_SERVICE (set by Cloud Functions) turns on JSON logs."""
        assert load_settings({**BASE, "K_SERVICE": "smart-resume"}).log_format == "json"


class TestParsing:
    def test_every_variable_parsed(self, tmp_path: Path) -> None:
        """Each variable reaches its field."""
        s = load_settings(
            {
                **BASE,
                "SMART_RESUME_WEBHOOK_SECRET": " one-0123456789ab , two-0123456789ab ,",
                "SMART_RESUME_LOCK_NAME": "stream-2",
                "SMART_RESUME_HEARTBEAT_SECONDS": "0.5",
                "SMART_RESUME_LEASE_SECONDS": "2",
                "SMART_RESUME_MAX_RUN_SECONDS": "100",
                "SMART_RESUME_TIME_BUDGET_SECONDS": "90",
                "SMART_RESUME_RECONCILE_HOURS": "1.5",
                "SMART_RESUME_PIPELINE": str(tmp_path / "p.toml"),
                "SMART_RESUME_MODULE": "examples.custom",
                "SMART_RESUME_RELOAD_MODULE": "1",
                "SMART_RESUME_CONCURRENCY": "8",
                "SMART_RESUME_STREAM": "2",
                "SMART_RESUME_EMAIL_TRANSPORT": "outbox",
                "SMART_RESUME_EMAIL_ON": "failure",
                "SMART_RESUME_OUTBOX": str(tmp_path),
                "SMART_RESUME_SENDGRID_HOST": "http://127.0.0.1:9/",
                "SMART_RESUME_RPC_TIMEOUT_SECONDS": "3",
            }
        )
        assert s.webhook_secrets == ("one-0123456789ab", "two-0123456789ab")
        assert s.lock_name == "stream-2"
        assert (s.heartbeat_seconds, s.lease_seconds, s.max_run_seconds) == (0.5, 2, 100)
        assert s.time_budget_seconds == 90
        assert s.reconcile_hours == 1.5
        assert s.pipeline_path == tmp_path / "p.toml"
        assert s.module == "examples.custom"
        assert s.reload_module is True
        assert s.concurrency == 8
        assert s.stream == 2
        assert s.email_transport == "outbox"
        assert s.email_on == "failure"
        assert s.outbox == tmp_path
        assert s.sendgrid_host == "http://127.0.0.1:9"
        assert s.rpc_timeout_seconds == 3

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("SMART_RESUME_HEARTBEAT_SECONDS", "soon"),
            ("SMART_RESUME_HEARTBEAT_SECONDS", "-1"),
            ("SMART_RESUME_LEASE_SECONDS", "0"),
            ("SMART_RESUME_MAX_RUN_SECONDS", "nan"),
            ("SMART_RESUME_TIME_BUDGET_SECONDS", "inf"),
            ("SMART_RESUME_CONCURRENCY", "2.5"),
            ("SMART_RESUME_CONCURRENCY", "0"),
            ("SMART_RESUME_STREAM", "blue"),
            ("SMART_RESUME_STREAM", "-3"),
            ("SMART_RESUME_RELOAD_MODULE", "maybe"),
            ("SMART_RESUME_EMAIL_TRANSPORT", "pigeon"),
            ("SMART_RESUME_EMAIL_ON", "sometimes"),
            ("SMART_RESUME_MODULE", "not a module"),
            ("SMART_RESUME_LOCK_NAME", "a/b"),
            ("SMART_RESUME_SENDGRID_HOST", "api.sendgrid.com"),
            ("SMART_RESUME_RPC_TIMEOUT_SECONDS", "x"),
            ("SMART_RESUME_LOG_FORMAT", "xml"),
            ("SMART_RESUME_RECONCILE_HOURS", "daily"),
            ("SMART_RESUME_RECONCILE_HOURS", "0"),
            ("SMART_RESUME_RECONCILE_HOURS", "-2"),
            ("SMART_RESUME_RECONCILE_HOURS", "inf"),
            ("SMART_RESUME_EXPECTED_EVERY_SECONDS", "hourly"),
            ("SMART_RESUME_EXPECTED_EVERY_SECONDS", "0"),
            ("SMART_RESUME_GRACE_SECONDS", "-1"),
            ("SMART_RESUME_GRACE_SECONDS", "a bit"),
            ("SMART_RESUME_STUCK_SECONDS", "0"),
            ("SMART_RESUME_STUCK_SECONDS", "30"),  # not longer than the 60 s heartbeat
            ("SMART_RESUME_PING_URL", "hc-ping.com/abc"),
        ],
    )
    def test_bad_value_names_the_variable(self, name: str, value: str) -> None:
        """A bad value is an error naming the variable, never a silent default."""
        with pytest.raises(ConfigError) as err:
            load_settings({**BASE, name: value})
        assert name in str(err.value)

    def test_health_settings(self) -> None:
        """The expected interval brings a grace of half of it unless one is set (0 allowed)."""
        s = load_settings({**BASE, "SMART_RESUME_EXPECTED_EVERY_SECONDS": "900"})
        assert (s.expected_every_seconds, s.grace_seconds) == (900, 450)
        s = load_settings(
            {
                **BASE,
                "SMART_RESUME_EXPECTED_EVERY_SECONDS": "3600",
                "SMART_RESUME_GRACE_SECONDS": "0",
                "SMART_RESUME_STUCK_SECONDS": "120",
                "SMART_RESUME_PING_URL": "https://hc-ping.com/0f9e8d7c-6b5a",
            }
        )
        assert (s.expected_every_seconds, s.grace_seconds, s.stuck_seconds) == (3600, 0, 120)
        assert s.ping_url == "https://hc-ping.com/0f9e8d7c-6b5a"
        assert {"https://hc-ping.com/0f9e8d7c-6b5a", "0f9e8d7c-6b5a"} <= set(s.secrets)
        assert "0f9e8d7c" not in repr(s)

    def test_a_bad_ping_url_is_not_echoed(self) -> None:
        """The ping URL is a secret: a bad one is named, never shown."""
        with pytest.raises(ConfigError) as err:
            load_settings({**BASE, "SMART_RESUME_PING_URL": "ftp://secret-token-value"})
        assert "SMART_RESUME_PING_URL" in str(err.value)
        assert "secret-token-value" not in str(err.value)

    def test_every_problem_is_reported_at_once(self) -> None:
        """Several bad variables are all named in one error."""
        with pytest.raises(ConfigError) as err:
            load_settings(
                {
                    **BASE,
                    "SMART_RESUME_CONCURRENCY": "x",
                    "SMART_RESUME_EMAIL_ON": "y",
                    "SMART_RESUME_LEASE_SECONDS": "z",
                }
            )
        assert len(err.value.problems) == 3

    def test_lease_must_outlast_the_heartbeat(self) -> None:
        """A lease no longer than the heartbeat would expire between beats."""
        with pytest.raises(ConfigError, match="SMART_RESUME_LEASE_SECONDS"):
            load_settings(
                {**BASE, "SMART_RESUME_HEARTBEAT_SECONDS": "60", "SMART_RESUME_LEASE_SECONDS": "60"}
            )

    def test_budget_must_end_before_max_run(self) -> None:
        """A budget past max-run would let a healthy run look stale."""
        with pytest.raises(ConfigError, match="SMART_RESUME_TIME_BUDGET_SECONDS"):
            load_settings({**BASE, "SMART_RESUME_TIME_BUDGET_SECONDS": "1800"})

    def test_budget_plus_finish_margin_fits_the_platform_timeout(self) -> None:
        """A budget that leaves under 120 s before the 3600 s function timeout is refused."""
        limit = PLATFORM_TIMEOUT_SECONDS - FINISH_MARGIN_SECONDS
        fits = {"SMART_RESUME_MAX_RUN_SECONDS": "3600"}
        assert load_settings({**BASE, **fits, "SMART_RESUME_TIME_BUDGET_SECONDS": str(limit)})
        with pytest.raises(ConfigError) as err:
            load_settings({**BASE, **fits, "SMART_RESUME_TIME_BUDGET_SECONDS": str(limit + 1)})
        (problem,) = err.value.problems
        assert "SMART_RESUME_TIME_BUDGET_SECONDS" in problem
        assert "3600 s" in problem

    def test_max_run_fits_the_platform_timeout(self) -> None:
        """No run outlives the 3600 s limit of an HTTP function, so a longer max run is refused."""
        assert load_settings({**BASE, "SMART_RESUME_MAX_RUN_SECONDS": "3600"})
        with pytest.raises(ConfigError) as err:
            load_settings({**BASE, "SMART_RESUME_MAX_RUN_SECONDS": "3601"})
        (problem,) = err.value.problems
        assert "SMART_RESUME_MAX_RUN_SECONDS" in problem
        assert "3600 s" in problem

    def test_platform_limits_are_reported_together(self) -> None:
        """Both variables over the limit: one error naming both."""
        with pytest.raises(ConfigError) as err:
            load_settings(
                {
                    **BASE,
                    "SMART_RESUME_TIME_BUDGET_SECONDS": "3500",
                    "SMART_RESUME_MAX_RUN_SECONDS": "7200",
                }
            )
        text = str(err.value)
        assert len(err.value.problems) == 2
        assert "SMART_RESUME_TIME_BUDGET_SECONDS" in text
        assert "SMART_RESUME_MAX_RUN_SECONDS" in text

    @pytest.mark.parametrize("transport", ["sendgrid", "ses"])
    def test_real_transport_needs_sender_and_recipients(self, transport: str) -> None:
        """A real transport without FROM/TO fails at startup, not at the end of a run."""
        with pytest.raises(ConfigError) as err:
            load_settings({**BASE, "SMART_RESUME_EMAIL_TRANSPORT": transport})
        text = str(err.value)
        assert "SMART_RESUME_EMAIL_FROM" in text
        assert "SMART_RESUME_EMAIL_TO" in text

    def test_sendgrid_transport_needs_a_key(self) -> None:
        with pytest.raises(ConfigError, match="SENDGRID_API_KEY"):
            load_settings(
                {
                    **BASE,
                    "SMART_RESUME_EMAIL_TRANSPORT": "sendgrid",
                    "SMART_RESUME_EMAIL_FROM": "a@x.io",
                    "SMART_RESUME_EMAIL_TO": "b@x.io",
                }
            )

    def test_ses_transport_needs_a_region(self) -> None:
        with pytest.raises(ConfigError, match="AWS_REGION"):
            load_settings(
                {
                    **BASE,
                    "SMART_RESUME_EMAIL_TRANSPORT": "ses",
                    "SMART_RESUME_EMAIL_FROM": "a@x.io",
                    "SMART_RESUME_EMAIL_TO": "b@x.io",
                }
            )


class TestSecrets:
    def test_secrets_are_not_in_repr(self) -> None:
        """Neither webhook secrets nor the API key appear when settings are printed."""
        s = load_settings(
            {
                **BASE,
                "SMART_RESUME_WEBHOOK_SECRET": "hunter2-secret-xyz",
                "SENDGRID_API_KEY": "SG.very-secret",
                "SMART_RESUME_EMAIL_FROM": "a@x.io",
                "SMART_RESUME_EMAIL_TO": "b@x.io",
            }
        )
        assert "hunter2-secret-xyz" not in repr(s)
        assert "SG.very-secret" not in repr(s)
        assert set(s.secrets) == {"hunter2-secret-xyz", "SG.very-secret"}

    @pytest.mark.parametrize(
        "bad",
        ["pässwort-secret", "geheim\u2011secret", "tab\tsecret", "bell\x07secret", "del\x7fsecret"],
    )
    def test_webhook_secret_a_header_cannot_carry_is_refused(self, bad: str) -> None:
        """A non-ASCII or control character could never match (WSGI decodes headers as Latin-1):
        refused at startup, naming the variable but never printing the secret."""
        with pytest.raises(ConfigError) as err:
            load_settings(
                {**BASE, "SMART_RESUME_WEBHOOK_SECRET": f"good-secret-01234,{bad}-0123456789"}
            )
        text = str(err.value) + repr(err.value)
        assert "SMART_RESUME_WEBHOOK_SECRET" in text
        assert "#2 of 2" in text
        assert bad not in text
        assert bad.strip() not in text
        assert "shorter" not in text  # long enough: refused for its characters only
        assert "secret" not in text.replace("SMART_RESUME_WEBHOOK_SECRET", "")

    def test_printable_ascii_webhook_secrets_are_accepted(self) -> None:
        """Punctuation and inner spaces are fine in a header."""
        secrets = 'a b"c\\d~!-0123456789,x=y/z+0123456789ab'
        s = load_settings({**BASE, "SMART_RESUME_WEBHOOK_SECRET": secrets})
        assert s.webhook_secrets == ('a b"c\\d~!-0123456789', "x=y/z+0123456789ab")

    def test_limits_description_has_no_secret(self) -> None:
        s = load_settings({**BASE, "SMART_RESUME_WEBHOOK_SECRET": "abcd-secret-01234"})
        assert describe(s)["leaseSeconds"] == 300
        assert "abcd-secret-01234" not in repr(describe(s))


def test_variables_table_lists_every_contract_variable() -> None:
    """The mapping the README is checked against holds every documented variable."""
    for name in (
        "SMART_RESUME_WEBHOOK_SECRET",
        "SMART_RESUME_CONCURRENCY",
        "AWS_REGION",
        "SMART_RESUME_OUTBOX",
        "SENDGRID_API_KEY",
        "FIRESTORE_EMULATOR_HOST",
    ):
        assert name in VARIABLES


def test_activity_is_an_email_on_choice() -> None:
    """`SMART_RESUME_EMAIL_ON=activity` is accepted (the report decides what it sends)."""
    assert load_settings({**BASE, "SMART_RESUME_EMAIL_ON": "activity"}).email_on == "activity"


class TestUnknownVariables:
    """A misspelt `SMART_RESUME_*` name is warned about, naming the closest known one."""

    def test_a_misspelling_names_the_closest_setting(self) -> None:
        """`SMART_RESUME_CONCURENCY` points at `SMART_RESUME_CONCURRENCY`; known names and
        other prefixes are not warned about; values are never shown."""
        warnings = unknown_variables(
            {
                "SMART_RESUME_CONCURENCY": "4",
                "SMART_RESUME_LEASE": "s3cr3t-value",
                "SMART_RESUME_PIPELINE": "x.toml",
                "SENDGRID_KEY": "k",
            }
        )
        assert warnings == [
            "SMART_RESUME_CONCURENCY is not a smart-resume setting and is ignored; "
            "did you mean SMART_RESUME_CONCURRENCY?",
            "SMART_RESUME_LEASE is not a smart-resume setting and is ignored; "
            "did you mean SMART_RESUME_LEASE_SECONDS?",
        ]
        assert unknown_variables({"SMART_RESUME_QQQ": "1"}) == [
            "SMART_RESUME_QQQ is not a smart-resume setting and is ignored (no setting is close)"
        ]

    def test_the_list_is_bounded(self) -> None:
        """Hundreds of unknown names give a bounded list."""
        env = {f"SMART_RESUME_JUNK_{i:03d}": "1" for i in range(300)}
        warnings = unknown_variables(env)
        assert len(warnings) == MAX_UNKNOWN_NAMED + 1
        assert warnings[-1] == "... and 290 more unknown SMART_RESUME_* variables"

    @pytest.mark.parametrize("target", ["smart_resume", "smart_resume_status"])
    def test_each_function_warns_once_at_start(self, target, monkeypatch, capsys) -> None:
        """Each function logs the warning when it starts, once, not per request."""
        from conftest import ROOT
        from functions_framework import create_app

        monkeypatch.setenv("SMART_RESUME_CONCURENCY", "4")
        app = create_app(target=target, source=str(ROOT / "functions" / target / "main.py"))
        client = app.test_client()
        for _ in range(2):
            client.post("/", json={"dryRun": True}, headers={"X-Webhook-Secret": "wrong"})
        logged = capsys.readouterr().out
        assert logged.count("SMART_RESUME_CONCURENCY") == 1, logged
        assert "did you mean SMART_RESUME_CONCURRENCY?" in logged
        assert f"{target} at start" in logged
