"""Finding and starting the Firestore emulator: one place for the demo, the tests and the bench.

We run the emulator binary that `gcloud emulators firestore start` wraps (ready in ~1.7 s
instead of ~3.3 s) when the SDK has it, else the wrapper; callers start it in its own process
group and kill the whole group, since the wrapper leaves Java running otherwise.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

INSTALL_HINT = (
    "install the Google Cloud CLI and its Firestore emulator "
    "(`gcloud components install cloud-firestore-emulator`, or the apt package "
    "google-cloud-cli-firestore-emulator)"
)


class ToolMissing(RuntimeError):
    """gcloud or Java is not installed; the message says what to install."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(port: int) -> list[str]:
    """The command that starts the emulator on 127.0.0.1:`port`."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        raise ToolMissing(f"gcloud is not installed: {INSTALL_HINT}")
    if shutil.which("java") is None:
        raise ToolMissing("java is not installed: the Firestore emulator needs a Java runtime")
    sdk = Path(os.path.realpath(gcloud)).parent.parent
    binary = sdk / "platform" / "cloud-firestore-emulator" / "cloud_firestore_emulator"
    if binary.exists():
        return [str(binary), "start", "--host=127.0.0.1", f"--port={port}"]
    return [gcloud, "emulators", "firestore", "start", f"--host-port=127.0.0.1:{port}"]
