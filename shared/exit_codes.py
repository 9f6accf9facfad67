"""Exit codes of `python -m shared.resume` and the operator scripts, by run outcome.

Kept free of heavy imports so the scripts can use it without loading Firestore.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_PARTIAL = 0, 1, 2, 3, 4
#: The run completed, but some client-operations failed: cron and CI should notice.
EXIT_FAILURES = 5
EXIT_BY_STATUS = {
    "completed": EXIT_OK,
    "duplicate": EXIT_OK,
    "planned": EXIT_OK,
    "partial": EXIT_PARTIAL,
    "cancelled": EXIT_PARTIAL,
    "locked": EXIT_LOCKED,
    "failed": EXIT_FAILED,
    "not found": EXIT_USAGE,
    "abandoned": EXIT_FAILED,
}
EXIT_HELP = (
    "exit codes: 0 done, 1 failed, 2 usage, 3 locked, 4 partial or cancelled, "
    "5 completed with failed client-operations."
)
