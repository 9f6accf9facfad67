"""The resume module: what the trigger runs in-process (and `python -m shared.resume` runs too).

A replacement module named by SMART_RESUME_MODULE must export `run_smart_resume(run)` with the
same signature: it receives a `RunContext` and returns a `RunResult`.
"""

from __future__ import annotations

from shared.resume.engine import RunContext, RunResult, run_smart_resume
from shared.resume.pipeline import Pipeline, load_pipeline
from shared.resume.plan import RunOptions

__all__ = [
    "Pipeline",
    "RunContext",
    "RunOptions",
    "RunResult",
    "load_pipeline",
    "run_smart_resume",
]
