"""Structured logging: JSON shape, severity, bound context, trace, secret masking."""

from __future__ import annotations

import json
import logging

import pytest

from shared import log


@pytest.fixture
def json_lines(capsys: pytest.CaptureFixture[str]):
    log.configure("json", level=logging.DEBUG)

    def read() -> list[dict]:
        return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]

    yield read
    log.configure("text")


class TestJson:
    def test_one_object_per_line_with_cloud_logging_fields(self, json_lines) -> None:
        """Each line parses as JSON with severity, message and time."""
        log.get_logger("lock").info("taken %s", "now")
        (entry,) = json_lines()
        assert entry["severity"] == "INFO"
        assert entry["message"] == "taken now"
        assert entry["time"].endswith("+00:00")
        assert entry["component"] == "lock"

    @pytest.mark.parametrize(
        ("method", "severity"),
        [
            ("debug", "DEBUG"),
            ("info", "INFO"),
            ("warning", "WARNING"),
            ("error", "ERROR"),
            ("critical", "CRITICAL"),
        ],
    )
    def test_severity_mapping(self, json_lines, method: str, severity: str) -> None:
        getattr(log.get_logger("x"), method)("m")
        assert json_lines()[0]["severity"] == severity

    def test_bound_context_and_trace(self, json_lines) -> None:
        """Fields bound for a run appear on every line inside the block, and not after."""
        logger = log.get_logger("engine")
        trace = log.trace_from_header("0af7651916cd43dd8448eb211c80319c/1;o=1", "proj")
        with log.bind(runId="r1", clientId="c1", operation="score", trace=trace):
            logger.info("inside", fields={"n": 3})
        logger.info("outside")
        inside, outside = json_lines()
        assert inside["runId"] == "r1"
        assert inside["clientId"] == "c1"
        assert inside["operation"] == "score"
        assert inside["n"] == 3
        assert inside[log.TRACE_KEY] == "projects/proj/traces/0af7651916cd43dd8448eb211c80319c"
        assert "runId" not in outside

    def test_secret_is_masked_everywhere(self, json_lines) -> None:
        """A registered secret never reaches the output, in the message or in fields."""
        log.register_secrets(["s3cr3t-value"])
        log.get_logger("auth").warning("got s3cr3t-value", fields={"h": "xx s3cr3t-value"})
        out = json.dumps(json_lines())
        assert "s3cr3t-value" not in out
        assert log.MASK in out


AWKWARD_SECRETS = [
    'quo"te-Secret-9d1',
    "back\\slash-Secret-4k2",
    "ünï-cödé-Secret-€7",
    "both'and\"-Secret\\-x5",
]


def strings_in(value: object) -> list[str]:
    """Every string (keys too) inside a parsed JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*strings_in(k), *strings_in(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []


def log_everywhere(secret: str) -> None:
    """The secret in the message, its arguments, nested fields, a key, and as a provider's JSON
    body echoes it (escaped)."""
    logger = log.get_logger("report")
    logger.warning("plain %s", secret, fields={"h": f"x {secret} y"})
    logger.warning("nested %s", {"k": [secret]}, fields={"deep": {"list": [secret, (secret,)]}})
    logger.warning("key", fields={"d": {secret: 1}})
    logger.warning("echo %s", json.dumps({"errors": [{"message": f"bad key {secret}"}]}))
    logger.warning(json.dumps(secret, ensure_ascii=False))
    with log.bind(runId=f"r-{secret}"):
        logger.warning("bound")


@pytest.mark.parametrize("secret", AWKWARD_SECRETS)
def test_awkward_secret_is_masked_in_json(json_lines, secret: str) -> None:
    """A secret holding `"`, `\\` or non-ASCII is masked although JSON escapes it: no line, once
    parsed, gives it back."""
    log.register_secrets([secret])
    log_everywhere(secret)
    entries = json_lines()
    assert len(entries) == 6
    found = strings_in(entries)
    escaped = json.dumps(secret)[1:-1]  # as a provider's own JSON body carries it
    assert [s for s in found if secret in s or escaped in s] == []
    assert sum(log.MASK in s for s in found) >= 6


@pytest.mark.parametrize("secret", AWKWARD_SECRETS)
def test_awkward_secret_is_masked_in_text(capsys: pytest.CaptureFixture[str], secret: str) -> None:
    """The same in the text format, where containers print through `repr()`."""
    log.configure("text")
    log.register_secrets([secret])
    log_everywhere(secret)
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 6
    escaped = {secret, json.dumps(secret)[1:-1], repr(secret)[1:-1], secret.replace("\\", "\\\\")}
    assert [form for form in escaped if form in out] == []
    assert out.count(log.MASK) >= 6


def test_text_format_is_one_readable_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Locally a line shows severity, context and message."""
    log.configure("text")
    with log.bind(runId="r9"):
        log.get_logger("engine").info("hello")
    line = capsys.readouterr().out.strip()
    assert "INFO" in line
    assert "runId=r9" in line
    assert line.endswith("hello")


def test_bad_trace_header_is_ignored() -> None:
    assert log.trace_from_header("not/a trace", "p") is None
    assert log.trace_from_header(None, "p") is None
