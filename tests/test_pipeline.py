"""Pipeline file validation: every error names the file, the operation and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import PROJECT_ROOT
from shared.errors import PipelineError
from shared.resume.pipeline import load_pipeline


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


class TestValid:
    def test_the_shipped_pipeline_loads(self) -> None:
        pipeline = load_pipeline(PROJECT_ROOT / "pipeline.toml")
        assert pipeline.names == ("score_leads", "summarize_leads")
        assert pipeline.fresh_hours == 24

    def test_defaults_and_order(self, tmp_path: Path) -> None:
        pipeline = load_pipeline(
            write(
                tmp_path,
                'fresh_hours = 6\n[[operation]]\nname = "b"\nkind = "http"\n'
                'url = "http://127.0.0.1:9000/score"\n'
                '[[operation]]\nname = "a"\nkind = "python"\ntarget = "json:dumps"\n',
            )
        )
        assert pipeline.names == ("b", "a")
        http = pipeline.get("b")
        assert (http.timeout_seconds, http.max_calls, http.retries) == (60, 100, 3)
        assert (http.max_per_second, http.max_concurrent) == (None, None)
        assert pipeline.get("a").function()({"x": 1}) == '{"x": 1}'

    def test_call_limits_per_operation(self, tmp_path: Path) -> None:
        pipeline = load_pipeline(
            write(
                tmp_path,
                '[[operation]]\nname = "b"\nkind = "http"\nurl = "http://127.0.0.1:9000/s"\n'
                "max_per_second = 0.5\nmax_concurrent = 3\n"
                '[[operation]]\nname = "a"\nkind = "python"\ntarget = "json:dumps"\n'
                "max_per_second = 20\n",
            )
        )
        assert (pipeline.get("b").max_per_second, pipeline.get("b").max_concurrent) == (0.5, 3)
        assert (pipeline.get("a").max_per_second, pipeline.get("a").max_concurrent) == (20.0, None)


class TestInvalid:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (
                "fresh_hours = -1\n[[operation]]\nname='a'\nkind='python'\ntarget='json:dumps'",
                "fresh_hours",
            ),
            ("", "at least one [[operation]]"),
            ("[[operation]]\nname='a'\nkind='ftp'", "operation 'a': field 'kind'"),
            (
                "[[operation]]\nname='a'\nkind='http'\nurl='localhost:9000'",
                "operation 'a': field 'url'",
            ),
            (
                "[[operation]]\nname='a'\nkind='http'\nurl='http://x/'\ntimeout_seconds=0",
                "operation 'a': field 'timeout_seconds'",
            ),
            (
                "[[operation]]\nname='a'\nkind='http'\nurl='http://x/'\nmax_calls=-2",
                "operation 'a': field 'max_calls'",
            ),
            (
                "[[operation]]\nname='a'\nkind='python'\ntarget='no_such_module_x:f'",
                "operation 'a': field 'target' cannot import",
            ),
            (
                "[[operation]]\nname='a'\nkind='python'\ntarget='json:nope'",
                "'json' has no function 'nope'",
            ),
            ("[[operation]]\nname='a'\nkind='python'\ntarget='json'", "field 'target'"),
            (
                "[[operation]]\nname='a'\nkind='python'\ntarget='json:dumps'\n"
                "[[operation]]\nname='a'\nkind='python'\ntarget='json:dumps'",
                "used twice",
            ),
            ("[[operation]]\nname='a b'\nkind='python'\ntarget='json:dumps'", "field 'name'"),
            (
                "[[operation]]\nname='a'\nkind='python'\ntarget='json:dumps'\ncolour='red'",
                "field 'colour' is unknown",
            ),
            ("[[operation]]\nkind='python'\ntarget='json:dumps'", "operation #1: field 'name'"),
            ("[[operation]\n", "not valid TOML"),
            *(
                (
                    f"[[operation]]\nname='a'\nkind='http'\nurl='http://x/'\n{field}={value}",
                    f"operation 'a': field '{field}'",
                )
                for field, value in (
                    ("max_per_second", "0"),
                    ("max_per_second", "-1"),
                    ("max_per_second", "'5'"),
                    ("max_per_second", "true"),
                    ("max_per_second", "nan"),
                    ("max_per_second", "inf"),
                    ("max_concurrent", "0"),
                    ("max_concurrent", "1.5"),
                    ("max_concurrent", "'2'"),
                    ("max_concurrent", "false"),
                )
            ),
            (
                "max_per_second = 5\n[[operation]]\nname='a'\nkind='python'\ntarget='json:dumps'",
                "max_per_second is set per operation",
            ),
        ],
    )
    def test_error_names_file_operation_and_field(self, tmp_path, text, expected) -> None:
        path = write(tmp_path, text)
        with pytest.raises(PipelineError) as err:
            load_pipeline(path)
        assert str(path) in str(err.value)
        assert expected in str(err.value)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(PipelineError, match="not found"):
            load_pipeline(tmp_path / "absent.toml")

    def test_all_problems_reported_together(self, tmp_path: Path) -> None:
        text = "[[operation]]\nname='a'\nkind='ftp'\n[[operation]]\nname='b'\nkind='http'\n"
        with pytest.raises(PipelineError) as err:
            load_pipeline(write(tmp_path, text))
        assert "operation 'a'" in str(err.value)
        assert "operation 'b'" in str(err.value)
