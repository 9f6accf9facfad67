"""What a warm instance knows after releasing a lock, so its next tick does not read it again.

Every run of a lock, and every report claim, writes the lock document: a run takes and releases
it, a report is claimed in the release commit, and a run that fails before taking the lock
(its module or pipeline would not load) writes it in the commit that records the run and
claims its report. So while the lock document is unchanged since this process released it
(the next take's precondition proves exactly that), the last runs are the ones this process
saw, and the reports left `sending` are the ones it left: the next tick reads neither.

Anything else invalidates it: the take falls back to a read (another writer), or the release
is not remembered (the lock document changed under the run: a cancel, a run that failed
before starting). A claim written by hand without touching the lock is found by the next take
that reads the lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from shared.report_tables import HISTORY


@dataclass
class Known:
    """The last runs (the report's strip, newest first) and the unsettled report claims of
    one lock, as of its release by this process. `history` is None until the run's report
    has what it read (a cold run reads its history beside the release)."""

    unsent: set[str]
    history: tuple[dict[str, Any], ...] | None = None
    _mutex: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def settled(self, run_id: str) -> None:
        """`run_id`'s report was recorded (sent, failed or skipped): no longer unsettled."""
        with self._mutex:
            self.unsent.discard(run_id)

    def claims(self) -> tuple[str, ...]:
        with self._mutex:
            return tuple(sorted(self.unsent))


def strip_record(
    run_id: str, status: str, started_at: Any, finished_at: Any, seconds: Any
) -> dict[str, Any]:
    """A run as the report's strip reads it (the fields `report.STRIP_FIELDS` names)."""
    return {
        "runId": run_id,
        "status": status,
        "startedAt": started_at,
        "finishedAt": finished_at,
        "summary": {"durationSeconds": seconds},
    }


def next_history(
    own: dict[str, Any], before: tuple[dict[str, Any], ...]
) -> tuple[dict[str, Any], ...]:
    """The strip after this run: its own record first, then the runs before it."""
    rest = tuple(r for r in before if r.get("runId") != own["runId"])
    return (own, *rest)[:HISTORY]
