"""The docs cannot drift: the README's configuration table, and every command the docs name."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from shared.config import VARIABLES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "local_emulator.md", "TEST-PLAN.md")
SCRIPTS = ("trigger.py", "watch.py", "e2e_check.py", "demo.py")
# Written by other parts of the project; linked before they exist.
LINKED_ELSEWHERE = {"RELIABILITY.md"}


def text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def config_table() -> dict[str, str]:
    """Variable name -> default cell, from the README's `## Configuration` table."""
    section = text("README.md").split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]):
            rows[name] = cells[1]
    return rows


def help_of(*command: str) -> str:
    done = subprocess.run(
        [sys.executable, *command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    return done.stdout


@cache
def cli_help(*sub: str) -> str:
    return help_of("-m", "shared.resume", *sub)


def subcommands() -> set[str]:
    listing = re.search(r"\{([a-z,-]+)\}", cli_help())
    if listing:
        return set(listing.group(1).split(","))
    return set(re.findall(r"^ {4}([a-z][a-z-]+)(?: |$)", cli_help(), re.MULTILINE))


def mentions(pattern: str) -> list[tuple[str, str]]:
    """(doc, match) for every match of pattern in every doc."""
    return [(doc, m) for doc in DOCS for m in re.findall(pattern, text(doc))]


class TestConfigTable:
    def test_every_setting_is_in_the_readme_table(self) -> None:
        """Each variable of shared.config.VARIABLES has a row."""
        missing = set(VARIABLES) - set(config_table())
        assert not missing, f"add to the README configuration table: {sorted(missing)}"

    def test_every_row_is_a_real_setting(self) -> None:
        """No row names a variable the code does not read."""
        unknown = set(config_table()) - set(VARIABLES)
        assert not unknown, f"not in shared.config.VARIABLES: {sorted(unknown)}"

    def test_defaults_match_the_code(self) -> None:
        """A documented default is the one in VARIABLES; none means the cell says so."""
        for name, cell in config_table().items():
            default = VARIABLES[name]
            if default is None:
                assert not cell.startswith("`") or "else" in cell, (name, cell)
            else:
                assert f"`{default}`" in cell, (name, cell, default)

    def test_every_smart_resume_variable_in_the_docs_exists(self) -> None:
        """A SMART_RESUME_* name anywhere in the docs is a real setting."""
        for doc, name in mentions(r"\bSMART_RESUME_[A-Z0-9_]*[A-Z0-9]\b"):
            assert name in VARIABLES, f"{doc} names {name}, which the code does not read"


class TestCommands:
    def test_cli_subcommands_in_the_docs_exist(self) -> None:
        """Every `python -m shared.resume <cmd>` is a subcommand, with flags its help lists."""
        known = subcommands()
        assert {"run", "plan", "status", "cancel", "unlock", "seed-demo"} <= known
        found = mentions(r"python -m shared\.resume ([a-z][a-z-]*)((?: \[?--[a-z-]+)*)")
        assert len(found) >= 10
        for doc, (command, flags) in found:
            assert command in known, f"{doc}: python -m shared.resume {command}"
            for flag in re.findall(r"--[a-z-]+", flags):
                assert flag in cli_help(command), f"{doc}: {command} {flag}"

    @pytest.mark.parametrize("script", SCRIPTS)
    def test_script_help_works(self, script: str) -> None:
        """Each operator script answers --help."""
        help_of(f"scripts/{script}")

    def test_script_flags_in_the_docs_exist(self) -> None:
        """Flags given to scripts/*.py in the docs are in that script's --help."""
        found = mentions(r"scripts/([a-z_0-9]+\.py)([^\n`]*)")
        assert found
        for doc, (script, rest) in found:
            assert (ROOT / "scripts" / script).exists(), f"{doc}: scripts/{script}"
            usage = help_of(f"scripts/{script}")
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest.split("#")[0]):
                assert flag in usage, f"{doc}: scripts/{script} {flag}"

    def test_make_targets_in_the_docs_exist(self) -> None:
        """`make X` names a Makefile target."""
        targets = set(re.findall(r"^([a-z][a-z-]*):", text("Makefile"), re.MULTILINE))
        for doc, target in mentions(r"(?m)(?:`|^)make ([a-z][a-z-]+)"):
            assert target in targets, f"{doc}: make {target}"

    def test_deploy_commands_in_the_readme_exist(self) -> None:
        """`./deploy.sh` commands and flags in the README are in its --help."""
        usage = subprocess.run(
            ["bash", "deploy.sh", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        for line in re.findall(r"\./deploy\.sh([^\n#`]*)", text("README.md")):
            for word in line.split():
                if word.startswith("--") or word in ("stage", "deploy"):
                    assert word in usage, f"./deploy.sh {word}"

    def test_local_links_resolve(self) -> None:
        """Relative links in the docs point at files (or ones another part writes)."""
        for doc, target in mentions(r"\]\(([^)#:]+)\)"):
            if target not in LINKED_ELSEWHERE:
                assert (ROOT / target).exists(), f"{doc} links to missing {target}"

    def test_readme_keeps_its_contract_sections(self) -> None:
        """The sections others rely on are there."""
        readme = text("README.md")
        for needle in (
            "make demo",
            "make test",
            "## Performance",
            "bench/RESULTS.md",
            "run_smart_resume(run: RunContext) -> RunResult",
            "local_emulator.md",
            "TEST-PLAN.md",
            "RELIABILITY.md",
        ):
            assert needle in readme, needle


def test_nothing_sends_readers_to_a_document_they_do_not_have() -> None:
    """The specification the project was built from is not in the repository: no file of it
    may send a reader there (the reference is docs/reference.md)."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    offenders = [
        name
        for name in tracked
        if name.endswith((".py", ".md", ".toml", ".sh", ".html", ".j2", ".example", ".txt"))
        and re.search(r"\bCONTRACT\b|\.\./shared/", (ROOT / name).read_text(encoding="utf-8"))
        and name != "tests/test_docs.py"
    ]
    assert offenders == []


class TestMakeTestOnAFreshMachine:
    """`make test` sets up what the suite needs, or stops at once naming the one command."""

    def make(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["make", "-s", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
        )

    def test_without_chromium_and_not_root_it_stops_at_once(self) -> None:
        """No Chromium, not root: one line naming the command, before lint or pytest run."""
        done = self.make("test", "CHROMIUM=/nonexistent/chromium", "USER_ID=1000")
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "sudo apt-get install -y chromium chromium-driver" in lines[0]
        assert done.stdout == ""  # nothing else ran: no ruff, no pytest

    def test_as_root_it_installs_chromium_and_its_driver(self, tmp_path: Path) -> None:
        """As root with apt-get, the Debian packages are installed (a stand-in apt-get here
        records what it is asked and puts the two programs in place)."""
        log = tmp_path / "apt.log"
        browser, driver = tmp_path / "chromium", tmp_path / "chromedriver"
        apt = tmp_path / "apt-get"
        apt.write_text(
            f'#!/bin/sh\necho "$*" >> {log}\n'
            f"touch {browser} {driver}\nchmod +x {browser} {driver}\n"
        )
        apt.chmod(0o755)
        done = self.make(
            "browser",
            f"CHROMIUM={browser}",
            f"CHROMEDRIVER={driver}",
            f"APT_GET={apt}",
            "USER_ID=0",
        )
        assert done.returncode == 0, done.stderr
        assert log.read_text().splitlines() == [
            "update -qq",
            "install -y -qq chromium chromium-driver",
        ]

    def test_with_chromium_present_nothing_is_installed(self, tmp_path: Path) -> None:
        """Both programs in place: apt-get is not called."""
        apt = tmp_path / "apt-get"
        apt.write_text("#!/bin/sh\nexit 9\n")
        apt.chmod(0o755)
        done = self.make("browser", "CHROMIUM=/bin/sh", "CHROMEDRIVER=/bin/sh", f"APT_GET={apt}")
        assert done.returncode == 0, done.stderr

    def test_ci_runs_exactly_the_readme_test_command(self) -> None:
        """`.ci/run` runs `make test`, the README's command, and nothing that installs."""
        commands = [
            line.strip()
            for line in text(".ci/run").splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        assert commands[-1] == "make test"
        assert "make test" in text("README.md")
        assert "apt-get" not in "\n".join(commands)

    def test_the_readme_lists_chromium(self) -> None:
        """The requirements name Chromium, its driver and the command that installs them."""
        readme = text("README.md").split("## How it works", 1)[0]
        assert "chromium-driver" in readme and "/usr/bin/chromedriver" in readme
        assert "sudo apt-get install -y chromium chromium-driver" in readme
