"""Run records (`runs/{runId}`): created with the lock, finalised with its release.

The record's writes ride in the lock's own commits (see `lock.Lock.acquire`/`release`), so a
run record says `running` exactly while its run holds the lock, and a taken-over run is marked
`abandoned` in the same commit that takes its lock.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Callable
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore
from google.cloud.firestore_v1.batch import WriteBatch

from shared import documents, store
from shared.config import Settings
from shared.resume.results import (
    MAX_PAGES,
    PAGE_RESULT_BYTES,
    RECORD_RESULT_BYTES,
    RESULTS,
    split_by_bytes,
)
from shared.resume.results import stored_size as stored_size  # where callers have found it

FINISHED = ("completed", "partial", "failed", "cancelled", "abandoned")
#: The ends that count as the job having run: health's `lastSuccessAt`, the success ping.
SUCCEEDED = ("completed", "partial", "cancelled")
SAME_SECOND_SLACK = 10  # runs that may share a start second, read beyond the limit to order
#: What status reads of a run: everything but the per-client results.
SUMMARY_FIELDS = [
    "runId",
    "status",
    "lockName",
    "startedAt",
    "finishedAt",
    "trigger",
    "scheduleTime",
    "stream",
    "summary",
    "error",
    "report",
    "tookOver",
]


def new_run_id(now: dt.datetime | None = None) -> str:
    """Sortable and readable: `20261128-060000-ab12cd`."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def jsonable(value: Any) -> Any:
    """Firestore values as JSON: timestamps become ISO 8601 UTC strings."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _started(run: dict[str, Any]) -> tuple[str, dt.datetime]:
    started = run.get("startedAt")
    stamp = started if isinstance(started, dt.datetime) else dt.datetime.min.replace(tzinfo=dt.UTC)
    return (str(run.get("runId", ""))[:15], stamp)


class Runs:
    def __init__(self, client: firestore.Client, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.collection = client.collection(store.RUNS)

    def ref(self, run_id: str) -> firestore.DocumentReference:
        return self.collection.document(run_id)

    # -- writes that ride in the lock's commits ----------------------------------------------

    def start(
        self,
        batch: WriteBatch,
        run_id: str,
        *,
        trigger: dict[str, Any],
        schedule_time: str | None,
        stream: int | None,
        previous_run_id: str | None,
    ) -> None:
        batch.create(
            self.ref(run_id),
            {
                "runId": run_id,
                "status": "running",
                "lockName": self.settings.lock_name,
                "startedAt": firestore.SERVER_TIMESTAMP,
                "finishedAt": None,
                "trigger": trigger,
                "scheduleTime": schedule_time,
                "stream": stream,
                "summary": {},
                "results": [],
                "tookOver": previous_run_id,
            },
        )
        if previous_run_id:
            self.abandon(batch, previous_run_id, f"lease lost: taken over by run {run_id}")

    def abandon(self, batch: WriteBatch, run_id: str, reason: str) -> None:
        batch.set(
            self.ref(run_id),
            {"status": "abandoned", "finishedAt": firestore.SERVER_TIMESTAMP, "error": reason},
            merge=True,
        )

    def finish(
        self,
        batch: WriteBatch,
        run_id: str,
        *,
        status: str,
        summary: dict[str, Any],
        results: list[dict[str, Any]],
        error: str | None,
        report: dict[str, Any] | None = None,
        total: int | None = None,
        omitted: int = 0,
    ) -> None:
        """The end of the run, in the release commit. `results` are those kept in the record
        (see `store_results`); the summary counts all `total` of them."""
        total = len(results) if total is None else total
        fields: dict[str, Any] = {
            "status": status,
            "finishedAt": firestore.SERVER_TIMESTAMP,
            "summary": {
                **summary,
                "resultsStored": len(results),
                "resultsPaged": total - len(results) - omitted,
                "resultsOmitted": omitted,
            },
            "results": results,
            "error": error,
        }
        if report is not None:
            fields["report"] = report
        batch.update(self.ref(run_id), fields)

    def record_failed(
        self,
        run_id: str,
        *,
        trigger: dict[str, Any],
        schedule_time: str | None,
        error: str,
        report: dict[str, Any] | None = None,
        also: Callable[[WriteBatch], None] | None = None,
    ) -> None:
        """A run that failed before taking the lock (its module would not load), with its
        report's claim; `also` adds writes to the same commit (the lock's mark, which is left
        out when there is no lock document to mark)."""
        record = {
            "runId": run_id,
            "status": "failed",
            "lockName": self.settings.lock_name,
            "startedAt": firestore.SERVER_TIMESTAMP,
            "finishedAt": firestore.SERVER_TIMESTAMP,
            "trigger": trigger,
            "scheduleTime": schedule_time,
            "stream": self.settings.stream,
            "summary": {},
            "results": [],
            "error": error,
            **({"report": report} if report is not None else {}),
        }
        with store.translate_errors("recording the failed run"):
            for extra in [also, None] if also is not None else [None]:
                batch = self.client.batch()
                batch.create(self.ref(run_id), record)
                if extra is not None:
                    extra(batch)
                try:
                    batch.commit(**store.commit_call(self.settings))
                    return
                except gexc.NotFound:
                    if extra is None:
                        raise

    def store_results(
        self, run_id: str, results: list[dict[str, Any]], until: float | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """Keep the run record under 1 MiB whatever the results: the first ~512 KiB stay in
        it, the rest go to `runs/{runId}/results/{page}` documents. Returns the results for
        the record and how many could not be stored at all (counted as omitted)."""
        chunks = split_by_bytes(results, RECORD_RESULT_BYTES, PAGE_RESULT_BYTES)
        inline, pages = chunks[0], chunks[1:]
        omitted = sum(len(p) for p in pages[MAX_PAGES:])
        for number, page in enumerate(pages[:MAX_PAGES], start=1):
            if until is not None and time.monotonic() >= until:
                omitted += len(page)  # out of time to finish: counted, never waited for
                continue
            ref = self.ref(run_id).collection(RESULTS).document(f"{number:04d}")
            data = {"runId": run_id, "page": number, "results": page}
            try:
                store.retrying(
                    self.settings,
                    "storing a page of results",
                    lambda ref=ref, data=data: ref.set(data, **store.commit_call(self.settings)),
                )
            except Exception as exc:  # a page lost is counted, never the run's end
                omitted += len(page)
                from shared.log import get_logger

                get_logger("runs").error("could not store results page %d: %s", number, exc)
        return inline, omitted

    # -- reads ---------------------------------------------------------------------------------

    def get(self, run_id: str, fields: list[str] | None = None) -> dict[str, Any] | None:
        with store.translate_errors("reading a run"):
            snap = self.ref(run_id).get(field_paths=fields, **store.call(self.settings))
        return snap.to_dict() if snap.exists else None

    def get_many(
        self, run_ids: tuple[str, ...], fields: list[str]
    ) -> list[tuple[Any, dict[str, Any]]]:
        """The runs `run_ids` that exist, as (snapshot, record), in one round trip."""
        refs = [self.ref(run_id) for run_id in run_ids]
        with store.translate_errors("reading runs"):
            found = self.client.get_all(refs, field_paths=fields, **store.call(self.settings))
            return [(snap, snap.to_dict() or {}) for snap in found if snap.exists]

    def for_schedule(self, schedule_time: str, job: str | None = None) -> dict[str, Any] | None:
        """The earlier run of this Scheduler tick (and job) on this lock that did not fail."""
        query = (
            self.collection.where(filter=firestore.FieldFilter("scheduleTime", "==", schedule_time))
            .where(filter=firestore.FieldFilter("lockName", "==", self.settings.lock_name))
            .select(["runId", "status", "trigger"])
            .limit(20)
        )
        with store.translate_errors("looking up the schedule tick"):
            docs = [d.to_dict() for d in query.stream(**store.call(self.settings))]
        return next(
            (
                d
                for d in docs
                if d.get("status") != "failed" and (d.get("trigger") or {}).get("job") == job
            ),
            None,
        )

    def _newest(self, limit: int, fields: list[str] = SUMMARY_FIELDS) -> list[dict[str, Any]]:
        """This lock's runs, newest first. Run ids start with their UTC start time, so ordering
        by document id is ordering by start; an equality filter plus `__name__` order needs no
        composite index in production."""
        query = (
            self.collection.where(
                filter=firestore.FieldFilter("lockName", "==", self.settings.lock_name)
            )
            .order_by("__name__", direction="DESCENDING")
            .select(fields)
            .limit(limit + SAME_SECOND_SLACK)
        )
        with store.translate_errors("listing runs"):
            runs = [
                documents.run_record(d.to_dict()) for d in query.stream(**store.call(self.settings))
            ]
        # Ids have one-second resolution; within a second, the start time decides.
        return sorted(runs, key=_started, reverse=True)[:limit]

    def recent(self, limit: int, fields: list[str] = SUMMARY_FIELDS) -> list[dict[str, Any]]:
        return self._newest(limit, fields)

    def last_finished(self, newest: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """The newest run of this lock that has ended (a run in progress is skipped); from
        `newest` (this lock's newest runs, newest first) when the caller has read them."""
        newest = self._newest(10) if newest is None else newest
        return next((r for r in newest if r.get("status") in FINISHED), None)

    def last_ended(
        self, statuses: tuple[str, ...], newest: list[dict[str, Any]], complete: bool
    ) -> dict[str, Any] | None:
        """The newest run of this lock that ended in one of `statuses`.

        `newest` are this lock's newest runs, newest first; `complete` says they are all of
        them (fewer came back than were asked for). Only when they hold none and are not all is
        the store asked again: one small query per status, each an equality pair ordered by
        document id, as `_newest` (no composite index needed).
        """
        found = next((r for r in newest if r.get("status") in statuses), None)
        if found is not None or complete:
            return found
        candidates: list[dict[str, Any]] = []
        for status in statuses:
            query = (
                self.collection.where(
                    filter=firestore.FieldFilter("lockName", "==", self.settings.lock_name)
                )
                .where(filter=firestore.FieldFilter("status", "==", status))
                .order_by("__name__", direction="DESCENDING")
                .select(SUMMARY_FIELDS)
                .limit(1 + SAME_SECOND_SLACK)
            )
            with store.translate_errors("listing runs"):
                candidates += [
                    documents.run_record(d.to_dict())
                    for d in query.stream(**store.call(self.settings))
                ]
        return max(candidates, key=_started) if candidates else None

    def reports_sending(self, limit: int) -> list[tuple[Any, dict[str, Any]]]:
        """This lock's runs whose report is still `sending`, as (snapshot, record): the
        snapshot carries the server's read time and the update time to precondition on."""
        query = (
            self.collection.where(
                filter=firestore.FieldFilter("lockName", "==", self.settings.lock_name)
            )
            .where(filter=firestore.FieldFilter("report.status", "==", "sending"))
            .select([*SUMMARY_FIELDS, "results"])
            .limit(limit)
        )
        with store.translate_errors("looking for unsent reports"):
            return [(d, d.to_dict() or {}) for d in query.stream(**store.call(self.settings))]
