"""Run records (`runs/{runId}`): created with the lock, finalised with its release.

The record's writes ride in the lock's own commits (see `lock.Lock.acquire`/`release`), so a
run record says `running` exactly while its run holds the lock, and a taken-over run is marked
`abandoned` in the same commit that takes its lock.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from google.cloud import firestore
from google.cloud.firestore_v1.batch import WriteBatch

from shared import store
from shared.config import Settings

FINISHED = ("completed", "partial", "failed", "cancelled", "abandoned")
SAME_SECOND_SLACK = 10  # runs that may share a start second, read beyond the limit to order
MAX_STORED_RESULTS = 2000  # a Firestore document holds at most 1 MiB


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
    ) -> None:
        stored = results[:MAX_STORED_RESULTS]
        fields: dict[str, Any] = {
            "status": status,
            "finishedAt": firestore.SERVER_TIMESTAMP,
            "summary": {**summary, "resultsStored": len(stored)},
            "results": stored,
            "error": error,
        }
        if report is not None:
            fields["report"] = report
        batch.update(self.ref(run_id), fields)

    def record_failed(
        self, run_id: str, *, trigger: dict[str, Any], schedule_time: str | None, error: str
    ) -> None:
        """A run that failed before taking the lock (its module would not load)."""
        with store.translate_errors("recording the failed run"):
            self.ref(run_id).create(
                {
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
                },
                **store.commit_call(self.settings),
            )

    # -- reads ---------------------------------------------------------------------------------

    def get(self, run_id: str) -> dict[str, Any] | None:
        with store.translate_errors("reading a run"):
            snap = self.ref(run_id).get(**store.call(self.settings))
        return snap.to_dict() if snap.exists else None

    def for_schedule(self, schedule_time: str, job: str | None = None) -> dict[str, Any] | None:
        """The earlier run of this Scheduler tick (and job) on this lock that did not fail."""
        query = (
            self.collection.where(filter=firestore.FieldFilter("scheduleTime", "==", schedule_time))
            .where(filter=firestore.FieldFilter("lockName", "==", self.settings.lock_name))
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

    def _newest(self, limit: int) -> list[dict[str, Any]]:
        """This lock's runs, newest first. Run ids start with their UTC start time, so ordering
        by document id is ordering by start; an equality filter plus `__name__` order needs no
        composite index in production."""
        query = (
            self.collection.where(
                filter=firestore.FieldFilter("lockName", "==", self.settings.lock_name)
            )
            .order_by("__name__", direction="DESCENDING")
            .limit(limit + SAME_SECOND_SLACK)
        )
        with store.translate_errors("listing runs"):
            runs = [d.to_dict() for d in query.stream(**store.call(self.settings))]
        # Ids have one-second resolution; within a second, the start time decides.
        return sorted(runs, key=_started, reverse=True)[:limit]

    def recent(self, limit: int) -> list[dict[str, Any]]:
        return self._newest(limit)

    def last_finished(self) -> dict[str, Any] | None:
        """The newest run of this lock that has ended (a run in progress is skipped)."""
        return next((r for r in self._newest(10) if r.get("status") in FINISHED), None)
