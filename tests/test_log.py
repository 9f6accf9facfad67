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
