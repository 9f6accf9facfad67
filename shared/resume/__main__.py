"""Entry for `python -m shared.resume`."""

from __future__ import annotations

import sys

from shared.resume.cli import main

sys.exit(main())
