"""Property-based tests: whatever a request or a pipeline file holds, the answer is a clean one.

Requests go through `create_app` test clients (never a 500, never a stack trace); pipeline
data goes through `parse_pipeline` and `load_pipeline` (a `Pipeline` or a `PipelineError`,
nothing else).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
from conftest import ROOT
from functions_framework import create_app
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from shared.errors import PipelineError
from shared.resume.pipeline import OP_KEYS, Pipeline, load_pipeline, parse_pipeline

PIPELINE = '[[operation]]\nname = "score"\nkind = "python"\ntarget = "opfuncs:ok"\n'
SECRET = {"X-Webhook-Secret": "test-secret-1-0123456"}
FIXTURES_OK = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
trigger_keys = st.sampled_from(["clientId", "operations", "dryRun", "stream"]) | st.text(
    max_size=12
)
trigger_values = json_values | st.sampled_from(["score", ["score"], ["nope"], "c00000", True, 0])
trigger_bodies = st.dictionaries(trigger_keys, trigger_values, max_size=5)


@pytest.fixture
def trigger(pipeline_file):
    pipeline_file(PIPELINE)
    source = str(ROOT / "functions" / "smart_resume" / "main.py")
    return create_app(target="smart_resume", source=source).test_client()


@pytest.fixture
def status_fn():
    source = str(ROOT / "functions" / "smart_resume_status" / "main.py")
    return create_app(target="smart_resume_status", source=source).test_client()


def _reserved_id(value: object) -> bool:
    return isinstance(value, str) and (
        value in (".", "..") or (value.startswith("__") and value.endswith("__"))
    )


def _clean(response, allowed: set[int]) -> None:
    assert response.status_code in allowed, response.get_data(as_text=True)[:300]
    assert response.is_json
    assert "Traceback" not in response.get_data(as_text=True)


class TestRequestValidation:
    @FIXTURES_OK
    @given(body=trigger_bodies)
    @example(body={"stream": 2**64})
    @example(body={"clientId": "\x00"})
    @example(body={"operations": ["score", "score"]})
    def test_trigger_json_bodies_never_500(self, trigger, body) -> None:
        """Any JSON object: 200 (ran or planned), 400, or 409; never a 500."""
        assume(not _reserved_id(body.get("clientId")))  # a known bug, pinned below
        response = trigger.post("/", data=json.dumps(body), headers=SECRET)
        _clean(response, {200, 400, 404, 409})

    @pytest.mark.parametrize("client_id", [".", "..", "__reserved__"])
    def test_reserved_document_id_is_400(self, trigger, db, client_id) -> None:
        """A clientId that is not a valid Firestore document id is a 400; no run starts."""
        response = trigger.post("/", data=json.dumps({"clientId": client_id}), headers=SECRET)
        assert response.status_code == 400
        assert not list(db.collection("runs").stream())

    @FIXTURES_OK
    @given(raw=st.binary(max_size=300))
    @example(raw=b"\xef\xbb\xbf{}")
    @example(raw=b"{}\x00")
    @example(raw=b'{"stream": Infinity}')
    def test_trigger_raw_bytes_never_500(self, trigger, raw) -> None:
        """Any bytes as a body: a 2xx/4xx answer, never a 500."""
        response = trigger.post("/", data=raw, headers=SECRET)
        _clean(response, {200, 400, 404, 409})

    @FIXTURES_OK
    @given(secret=st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60))
    def test_any_wrong_secret_is_401(self, trigger, secret) -> None:
        """Any header value other than a configured secret is a 401."""
        if secret in ("test-secret-1-0123456", "test-secret-2-0123456") or secret != secret.strip():
            return
        response = trigger.post("/", headers={"X-Webhook-Secret": secret})
        _clean(response, {401})

    @FIXTURES_OK
    @given(runs=st.text(max_size=12))
    @example(runs="٣")
    @example(runs="0050")
    def test_status_runs_param_never_500(self, status_fn, runs) -> None:
        """Any `?runs=`: 200 for 1..50 written in ASCII digits, else 400."""
        response = status_fn.get("/", query_string={"runs": runs}, headers=SECRET)
        expected = 200 if runs.isascii() and runs.isdigit() and 1 <= int(runs) <= 50 else 400
        _clean(response, {expected})

    @FIXTURES_OK
    @given(
        body=st.dictionaries(
            st.sampled_from(["action", "force"]) | st.text(max_size=8),
            json_values | st.sampled_from(["cancel", "unlock", True, False]),
            max_size=3,
        )
    )
    def test_status_actions_never_500(self, status_fn, body) -> None:
        """Any action body: 200, 202, 400 or 409; never a 500."""
        response = status_fn.post("/", data=json.dumps(body), headers=SECRET)
        _clean(response, {200, 202, 400, 409})


# --- pipeline files ------------------------------------------------------------------------

toml_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.datetimes()
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
urls = st.sampled_from(
    ["http://127.0.0.1:9/op", "https://x.example/a", "ftp://x/", "http://", "/relative"]
) | st.text(max_size=25).map(lambda s: "http://" + s)
targets = st.sampled_from(
    ["opfuncs:ok", "opfuncs:nope", "no_such_module_xyz:f", "shared.resume:run_smart_resume", "x"]
)
op_fields = {
    "name": st.sampled_from(["score", "a", "1bad", "", "x" * 101, "dup"]) | st.text(max_size=12),
    "kind": st.sampled_from(["http", "python", "HTTP", ""]),
    "url": urls,
    "target": targets,
    "timeout_seconds": st.floats() | st.integers(-5, 5000) | st.booleans(),
    "max_calls": st.integers(-5, 2_000_000) | st.floats(0, 10) | st.booleans(),
    "retries": st.integers(-2, 30) | st.text(max_size=3),
    "retry_initial_seconds": st.floats() | st.integers(-1, 100),
}
operations = st.fixed_dictionaries({}, optional={**op_fields, "extra": toml_values})
raw_pipelines = st.fixed_dictionaries(
    {},
    optional={
        "fresh_hours": st.floats() | st.integers() | st.booleans() | st.text(max_size=4),
        "operation": st.lists(operations | toml_values, max_size=4) | toml_values,
        "other": toml_values,
    },
)


def _parses_or_pipeline_error(raw: dict, path: Path) -> None:
    try:
        pipeline = parse_pipeline(raw, path)
    except PipelineError as exc:
        assert str(path) in str(exc)
        return
    assert isinstance(pipeline, Pipeline)
    assert pipeline.operations
    assert 0 < pipeline.fresh_hours < 1e6
    for op in pipeline.operations:
        assert set(op.__slots__) <= OP_KEYS
        assert math.isfinite(op.timeout_seconds) and op.timeout_seconds > 0
        assert op.max_calls >= 1


class TestPipelineValidation:
    @settings(max_examples=300, deadline=None)
    @given(raw=raw_pipelines)
    def test_parse_pipeline_returns_or_raises_pipeline_error(self, raw) -> None:
        """Any parsed-TOML-shaped data: a valid `Pipeline` or a `PipelineError` naming the file."""
        _parses_or_pipeline_error(raw, Path("/p/pipeline.toml"))

    @pytest.mark.parametrize("url", ["http://[", "http://[::1", "http://a]b", "http://\u2100/"])
    def test_url_that_urlparse_rejects_is_a_pipeline_error(self, url) -> None:
        """A URL `urlparse` cannot split is a pipeline error naming the field, not a crash."""
        raw = {"operation": [{"name": "a", "kind": "http", "url": url}]}
        with pytest.raises(PipelineError, match="url"):
            parse_pipeline(raw, Path("/p/pipeline.toml"))

    @settings(max_examples=200, deadline=None)
    @given(text=st.text(max_size=200))
    @example(text="[[operation]]\nname = 'a'\nkind = 'python'\ntarget = 'opfuncs:ok'\n")
    @example(text="operation = 3")
    @example(text="fresh_hours = nan\n[[operation]]\nname='a'\nkind='python'\ntarget='opfuncs:ok'")
    def test_load_pipeline_of_any_text(self, tmp_path_factory, text) -> None:
        """Any file content: a `Pipeline` or a `PipelineError`; never another exception."""
        path = tmp_path_factory.mktemp("p") / "pipeline.toml"
        path.write_text(text, encoding="utf-8")
        try:
            load_pipeline(path)
        except PipelineError as exc:
            assert str(path) in str(exc)

    @settings(max_examples=50, deadline=None)
    @given(raw=st.binary(max_size=100))
    def test_load_pipeline_of_any_bytes(self, tmp_path_factory, raw) -> None:
        """Binary junk (bad UTF-8 included) is a `PipelineError`, not a crash."""
        path = tmp_path_factory.mktemp("p") / "pipeline.toml"
        path.write_bytes(raw)
        with contextlib.suppress(PipelineError):
            load_pipeline(path)
