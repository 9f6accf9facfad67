"""A run's per-client results as they come, in memory bounded whatever the number of clients.

The first ~512 KiB (by Firestore's stored size) stay in memory for the run record and the
report; the rest is written to `runs/{runId}/results/{page}` as each page fills. The summary is
counted as results arrive, so it covers all of them.
"""

from __future__ import annotations

import threading
from typing import Any

from google.cloud import firestore

from shared import store
from shared.config import Settings
from shared.log import get_logger

log = get_logger("results")
RESULTS = "results"  # subcollection of a run: the results that do not fit its document
#: Bytes of results kept in the run document itself, and per page document: well under
#: Firestore's 1 MiB per document, with room for the summary and the rest of the record.
RECORD_RESULT_BYTES = 512 * 1024
PAGE_RESULT_BYTES = 768 * 1024
MAX_PAGES = 40
#: Count names the summary's `impact` keeps (the rest are summed in `impactOmitted`): a run
#: whose operations report 10,000 distinct names still records and releases.
MAX_IMPACT_NAMES = 100
#: The summary fields that always fit: the counts a bare, last-resort record keeps.
MINIMAL_FIELDS = ("clients", "processed", "skipped", "failed", "deferred", "durationSeconds")


def stored_size(value: Any) -> int:
    """Firestore's storage size of a value (strings as UTF-8 bytes + 1; see its docs)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass")) + 1
    if isinstance(value, dict):
        return sum(stored_size(k) + stored_size(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(stored_size(v) for v in value)
    if value is None or isinstance(value, bool):
        return 1
    return 8


def split_by_bytes(
    results: list[dict[str, Any]], first: int, rest: int
) -> list[list[dict[str, Any]]]:
    """Results in chunks: the first under `first` bytes, the others under `rest` each."""
    chunks: list[list[dict[str, Any]]] = [[]]
    budget, used = first, 0
    for entry in results:
        size = stored_size(entry)
        if used + size > budget and chunks[-1]:
            chunks.append([])
            budget, used = rest, 0
        chunks[-1].append(entry)
        used += size
    return chunks


def bounded_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary with its `impact` cut to the largest `MAX_IMPACT_NAMES` counts (names cut
    to 200 characters); what was cut is summed in `impactOmitted`."""
    from shared.documents import is_int, text

    out = dict(summary)
    impact = summary.get("impact")
    if not isinstance(impact, dict):
        out["impact"] = {}
        return out
    numbers = [(text(k), v) for k, v in impact.items() if is_int(v)]
    numbers.sort(key=lambda kv: -abs(kv[1]))
    kept = dict(numbers[:MAX_IMPACT_NAMES])
    out["impact"] = kept
    if len(numbers) > len(kept):
        out["impactOmitted"] = {
            "names": len(numbers) - len(kept),
            "total": sum(v for _, v in numbers[MAX_IMPACT_NAMES:]),
        }
    return out


def minimal_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The last resort when even the bounded summary was refused: plain counts only."""
    return {k: summary[k] for k in MINIMAL_FIELDS if isinstance(summary.get(k), int | float)}


class ResultSink:
    """Thread-safe: the workers add to it concurrently."""

    def __init__(self, client: firestore.Client, settings: Settings, run_id: str) -> None:
        self.client = client
        self.settings = settings
        self.run_id = run_id
        self.inline: list[dict[str, Any]] = []
        self.paged = 0
        self.omitted = 0
        self.counts = {"processed": 0, "skipped": 0, "failed": 0, "deferred": 0}
        self.impact: dict[str, int] = {}
        self.cancelled = False  # some work was deferred by a cancel
        self._inline_bytes = 0
        self._page: list[dict[str, Any]] = []
        self._page_bytes = 0
        self._pages = 0
        self._mutex = threading.Lock()

    @property
    def inline_open(self) -> bool:
        return self._inline_bytes < RECORD_RESULT_BYTES and not self._pages and not self._page

    def add(self, entry: dict[str, Any]) -> None:
        size = stored_size(entry)
        full: list[dict[str, Any]] | None = None
        with self._mutex:
            self.counts[entry["outcome"]] += 1
            for name, n in (entry.get("counts") or {}).items():
                self.impact[name] = self.impact.get(name, 0) + n
            if entry["outcome"] == "deferred" and str(entry["reason"]).startswith("cancelled"):
                self.cancelled = True
            if self.inline_open and self._inline_bytes + size <= RECORD_RESULT_BYTES:
                self.inline.append(entry)
                self._inline_bytes += size
                return
            if self._page and self._page_bytes + size > PAGE_RESULT_BYTES:
                full, self._page, self._page_bytes = self._page, [], 0
                self._pages += 1
                number = self._pages
            self._page.append(entry)
            self._page_bytes += size
        if full is not None:
            self._write(number, full)

    def close(self) -> None:
        """Write the last, partly filled page."""
        with self._mutex:
            page, self._page = self._page, []
            if page:
                self._pages += 1
            number = self._pages
        if page:
            self._write(number, page)

    def _write(self, number: int, page: list[dict[str, Any]]) -> None:
        if number > MAX_PAGES:
            with self._mutex:
                self.omitted += len(page)
            return
        ref = (
            self.client.collection(store.RUNS)
            .document(self.run_id)
            .collection(RESULTS)
            .document(f"{number:04d}")
        )
        data = {"runId": self.run_id, "page": number, "results": page}
        try:
            store.retrying(
                self.settings,
                "storing a page of results",
                lambda: ref.set(data, **store.commit_call(self.settings)),
            )
        except Exception as exc:  # a page lost is counted, never the run's end
            log.error("could not store results page %d: %s", number, exc)
            with self._mutex:
                self.omitted += len(page)
            return
        with self._mutex:
            self.paged += len(page)
