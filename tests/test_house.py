"""The house rules, checked: every module of `shared/` and `functions/` has a floor, imports
only its own floor or those below (lazy imports inside functions included), and stays under
400 lines. A new module must be given its floor here, which is the point: its place in the
house is a decision, not an accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

MAX_LINES = 400

#: From the ground up. A module may import its own floor and the floors below it.
FLOORS: dict[str, list[str]] = {
    "base: settings, errors, logs, the store, typed documents, templates": [
        "shared",
        "shared.env",
        "shared.config",
        "shared.errors",
        "shared.exit_codes",
        "shared.log",
        "shared.store",
        "shared.documents",
        "shared.templates",
    ],
    "coordination: the lock, its fence, the heartbeat": [
        "shared.lock_state",
        "shared.lock_actions",
        "shared.lock",
        "shared.fence",
        "shared.heartbeat",
    ],
    "the engine": [
        "shared.resume",
        "shared.resume.shards",
        "shared.resume.pipeline",
        "shared.resume.plan",
        "shared.resume.results",
        "shared.resume.limits",
        "shared.resume.live",
        "shared.resume.operations",
        "shared.resume.http_operation",
        "shared.resume.writes",
        "shared.resume.handle",
        "shared.resume.full_pass",
        "shared.resume.due",
        "shared.resume.worker",
        "shared.resume.engine",
    ],
    "records, views and what a run tells the world": [
        "shared.runs",
        "shared.quarantine",
        "shared.transports",
        "shared.pings",
        "shared.report_tables",
        "shared.report_message",
        "shared.report",
        "shared.unsent",
        "shared.warm",
        "shared.health",
        "shared.status",
    ],
    "one run": ["shared.finish", "shared.runner"],
    "admission of a request, and the console's page": [
        "shared.auth",
        "shared.validation",
        "shared.web",
        "shared.console",
    ],
    "entry points": [
        "shared.resume.cli_answers",
        "shared.resume.cli",
        "shared.resume.__main__",
        "functions.smart_resume.main",
        "functions.smart_resume_status.main",
    ],
    "deploy (run by deploy.sh)": [
        "deploy",
        "deploy.__main__",
        "deploy.bundle",
        "deploy.checks",
        "deploy.commands",
        "deploy.probe",
        "deploy.read",
        "deploy.run",
        "deploy.schedule",
        "deploy.settings",
        "deploy.testlike",
    ],
}
FLOOR = {module: n for n, modules in enumerate(FLOORS.values()) for module in modules}
NAMES = list(FLOORS)


def _modules() -> dict[str, Path]:
    found = {}
    paths = [p for top in ("shared", "functions", "deploy") for p in (ROOT / top).rglob("*.py")]
    for path in sorted(paths):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _floor(module: str) -> int | None:
    return FLOOR.get(module)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_has_a_floor_and_imports_nothing_above_it(module: str) -> None:
    """A module's imports (lazy ones too) stay on its floor or below."""
    floor = _floor(module)
    assert floor is not None, f"{module} has no floor in tests/test_house.py: give it one"
    above = {
        name: NAMES[_floor(name)]
        for name in _imports(MODULES[module])
        if (_floor(name) or 0) > floor
    }
    assert not above, f"{module} ({NAMES[floor]}) imports from above: {above}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_400_lines(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines: split it by concern"


def test_the_check_sees_an_import_from_above() -> None:
    """The rule can fail: the engine importing the runner would be caught."""
    assert _floor("shared.runner") > _floor("shared.resume.worker")
    assert "shared.runner" in _imports(MODULES["shared.resume.cli"])


def test_the_readme_map_names_every_module() -> None:
    """The README's map of the house is kept true: each module's file is named in it."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## The code", 1)[1].split("\n## ", 1)[0]
    files = {
        p.parent.name + "/" if p.name == "__init__.py" else p.name
        for m, p in MODULES.items()
        if not m.startswith("deploy")  # the map names the package
    }
    missing = sorted(
        f for f in files - {"shared/", "resume/", "__main__.py"} if f"{f}`" not in table
    )
    assert not missing, f"README's map of the house does not name: {missing}"
