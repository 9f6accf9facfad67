"""Deploy smart-resume to Google Cloud: the package behind `./deploy.sh` (run `--help`).

Python rather than bash, so that the gcloud commands are data (`commands.Command`) built from
checked, typed settings (`settings.Settings`): tests read them without bash or gcloud.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: The repository: what is staged, and where deploy.env is looked for.
ROOT = Path(__file__).resolve().parent.parent


class Failed(Exception):
    """Stop with this exit status, saying `deploy.sh: MESSAGE` when there is a message."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status, self.message = status, message


def note(text: str) -> None:
    """A note, warning or progress line for the person deploying (standard error)."""
    print(text, file=sys.stderr, flush=True)
