"""docs/reference.md stays true to the code: every pipeline field, setting and command."""

from __future__ import annotations

import re

from conftest import ROOT

from shared.config import VARIABLES
from shared.resume.pipeline import OP_KEYS, TOP_KEYS

REFERENCE = (ROOT / "docs" / "reference.md").read_text()


def _section(title: str) -> str:
    start = REFERENCE.index(f"## {title}")
    end = REFERENCE.find("\n## ", start + 1)
    return REFERENCE[start : end if end > 0 else None]


def _table_fields(text: str) -> set[str]:
    return set(re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.M))


def test_every_pipeline_field_is_documented_and_every_documented_one_accepted() -> None:
    documented = _table_fields(_section("The pipeline file"))
    assert documented == (TOP_KEYS | OP_KEYS)


def test_every_command_is_listed() -> None:
    from shared.resume.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command")
    listed = set(re.findall(r"^\| `([a-z-]+)[ `]", _section("Command line"), flags=re.M))
    assert listed == set(sub.choices)


def test_settings_point_at_the_checked_table() -> None:
    """The settings live in the README's table (checked against `VARIABLES` by test_docs);
    the reference links there rather than keeping a second copy that could drift."""
    assert "README.md#configuration" in _section("Settings")
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in VARIABLES)


def test_every_command_option_is_listed_with_its_command() -> None:
    from shared.resume.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command")
    rows = dict(re.findall(r"^\| `([a-z-]+)(.*)$", _section("Command line"), re.M))
    for name, parser in sub.choices.items():
        options = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
        options -= {"--help"}
        missing = {o for o in options if o not in rows[name]}
        assert not missing, f"{name}: {sorted(missing)} not in docs/reference.md"
