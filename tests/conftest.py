"""Test harness: the real Firestore emulator for the whole session, clean data for every test.

The emulator is started here unless FIRESTORE_EMULATOR_HOST already points at a running one.
We run the emulator binary that `gcloud emulators firestore start` wraps (ready in ~1.7 s
instead of ~3.3 s) in its own process group and kill the whole group at the end, since the
gcloud wrapper leaves Java running otherwise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

import firestore_emulator  # noqa: E402
import query_shapes  # noqa: E402

query_shapes.install()  # every query the code builds is checked against its index at the end

PROJECT = "smart-resume-test"


def free_port() -> int:
    return firestore_emulator.free_port()


def _emulator_command(port: int) -> list[str]:
    try:
        return firestore_emulator.command(port)
    except firestore_emulator.ToolMissing as exc:
        pytest.exit(str(exc), returncode=3)
        raise


class Emulator:
    """A running emulator: its host, and how to stop and restart it (for outage tests)."""

    def __init__(self, host: str, proc: subprocess.Popen[bytes] | None) -> None:
        self.host = host
        self.proc = proc

    @classmethod
    def start(cls, port: int | None = None) -> Emulator:
        port = port or free_port()
        log = open(Path(tempfile.gettempdir()) / f"firestore-emulator-{port}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            _emulator_command(port), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        emulator = cls(f"127.0.0.1:{port}", proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.exit(f"the Firestore emulator exited early; see {log.name}", returncode=3)
            try:
                if requests.get(f"http://{emulator.host}/", timeout=1).text.strip() == "Ok":
                    return emulator
            except requests.RequestException:
                pass
            time.sleep(0.1)
        emulator.stop()
        pytest.exit(f"the Firestore emulator did not answer within 60 s; see {log.name}", 3)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def clear(self, project: str = PROJECT) -> None:
        url = f"http://{self.host}/emulator/v1/projects/{project}/databases/(default)/documents"
        requests.delete(url, timeout=10).raise_for_status()


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    existing = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if existing:
        yield Emulator(existing, None)
        return
    emu = Emulator.start()
    try:
        yield emu
    finally:
        emu.stop()


BASE_ENV = {
    "GOOGLE_CLOUD_PROJECT": PROJECT,
    "SMART_RESUME_WEBHOOK_SECRET": "test-secret-1-0123456,test-secret-2-0123456",
    "SMART_RESUME_EMAIL_TRANSPORT": "log",
    "SMART_RESUME_LOG_FORMAT": "text",
}

_SCRUB_PREFIXES = ("SMART_RESUME_", "SENDGRID_", "AWS_", "K_SERVICE", "GCLOUD_PROJECT")


@pytest.fixture(autouse=True)
def isolated_env(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """Every test starts from the same environment and an empty database."""
    for key in list(os.environ):
        if key.startswith(_SCRUB_PREFIXES):
            monkeypatch.delenv(key)
    env = {
        **BASE_ENV,
        "FIRESTORE_EMULATOR_HOST": emulator.host,
        "SMART_RESUME_OUTBOX": str(tmp_path / "outbox"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from shared.config import get_settings

    get_settings.cache_clear()
    emulator.clear()
    yield env
    get_settings.cache_clear()


@pytest.fixture
def settings():
    from shared.config import get_settings

    return get_settings()


@pytest.fixture
def db(settings):
    from shared.store import get_client

    return get_client(settings)


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch):
    """Set variables and rebuild the settings: `settings = configure(SMART_RESUME_X="1")`."""
    from shared.config import get_settings
    from shared.errors import ConfigError

    def apply(**env: object):
        for key, value in env.items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, str(value))
        get_settings.cache_clear()
        try:
            return get_settings()
        except ConfigError:
            return None  # tests of bad settings see the error where the code reads them

    return apply


@pytest.fixture
def ops():
    """A local operations service; routes are added per test."""
    from ops_server import OpsServer

    server = OpsServer()
    yield server
    server.close()


@pytest.fixture
def pipeline_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a pipeline file and point SMART_RESUME_PIPELINE at it."""
    from shared.config import get_settings

    def write(text: str) -> Path:
        path = tmp_path / "pipeline.toml"
        path.write_text(text)
        monkeypatch.setenv("SMART_RESUME_PIPELINE", str(path))
        get_settings.cache_clear()
        return path

    return write


@pytest.fixture(autouse=True)
def _reset_opfuncs() -> Iterator[None]:
    """The test operations' shared record and behaviour start empty for every test."""
    import opfuncs

    opfuncs.reset()
    yield
    opfuncs.reset()


def run_once(settings, db, **options):
    """One run through `runner.start_run`, as the trigger starts it."""
    from shared.resume.plan import RunOptions
    from shared.runner import start_run

    return start_run(settings, db, RunOptions(**options), trigger={"source": "test"})


def seed_clients(db, count: int, *, prefix: str = "c", **fields) -> list[str]:
    """Create `count` active clients in batches; returns their ids."""
    ids = [f"{prefix}{i:05d}" for i in range(count)]
    for start in range(0, count, 400):
        batch = db.batch()
        for client_id in ids[start : start + 400]:
            data = {"name": f"Client {client_id}", "active": True, **fields}
            batch.set(db.collection("clients").document(client_id), data)
        batch.commit()
    return ids


@pytest.fixture
def function_process(isolated_env, tmp_path: Path):
    """Start real function processes with the test environment (plus overrides)."""
    from procs import FunctionProcess

    started: list[FunctionProcess] = []

    def start(target: str, **env: str) -> FunctionProcess:
        port = free_port()
        merged = {
            k: v for k, v in os.environ.items() if k.startswith(("SMART_RESUME_", "SENDGRID_"))
        }
        merged.update({**isolated_env, **{k: str(v) for k, v in env.items()}})
        proc = FunctionProcess(target, port, merged, tmp_path / f"{target}-{port}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(scope="session")
def chromium() -> tuple[Path, Path]:
    """Debian's Chromium and its driver, for the console's browser tests. Like the emulator,
    they are required, never skipped: without them the test run stops with one line."""
    missing = [p.name for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.exit(
            f"{' and '.join(missing)} not found in /usr/bin: install the Debian packages "
            "chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
            returncode=3,
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.exit("selenium is not installed: run `make install`", returncode=3)
    return CHROMIUM, CHROMEDRIVER
