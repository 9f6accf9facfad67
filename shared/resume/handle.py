"""What an operation holds while it runs (`IO`): its checkpoint, its counts, the stop signal,
and the gate its calls pass. Everything an operation hands back is checked here, as untrusted
as a document: a checkpoint must fit its document, a count must be a whole number under a
name Firestore can store.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from shared import documents
from shared.errors import OperationFailed
from shared.log import get_logger
from shared.resume import limits
from shared.resume.plan import ClientPlan
from shared.resume.results import stored_size
from shared.resume.writes import ClientWrites

if TYPE_CHECKING:
    from shared.resume.worker import Worker

log = get_logger("engine")
#: Distinct count names one operation may report (the rest are dropped, with one warning).
MAX_COUNT_NAMES = 100
MAX_COUNT_NAME = 200
#: A checkpoint must fit in its state document (Firestore: 1 MiB per document).
MAX_CHECKPOINT_BYTES = 900 * 1024
_RESERVED = re.compile(r"^__.*__$")


class IO:
    """The checkpoint, counts and stop signal of one client-operation, and the gate its calls
    pass: the operation's limiter, shared by the run's workers, on the run's clock."""

    def __init__(
        self,
        worker: Worker,
        plan: ClientPlan,
        operation: str,
        checkpoint: dict[str, Any] | None,
        writes: ClientWrites,
    ) -> None:
        self.worker = worker
        self.plan = plan
        self.operation = operation
        self.checkpoint = checkpoint
        self.writes = writes
        self.saved = False  # a checkpoint was saved in this run (maybe only staged so far)
        self.counts: dict[str, int] = {}
        self._dropped = False
        run = worker.run
        self.gate = limits.Gate(
            limits.for_run(run.run_id, run.settings.shards).limiter(run.pipeline.get(operation)),
            limits.Budget.of(
                run.deadline, run.settings.time_budget_seconds, run.settings.max_run_seconds
            ),
            self.should_stop,
            run.heartbeat.touch,  # waiting out a Retry-After is progress
        )

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        size = stored_size(checkpoint)
        if size > MAX_CHECKPOINT_BYTES:
            raise OperationFailed(
                f"checkpoint of {size} bytes is over the {MAX_CHECKPOINT_BYTES} byte limit "
                "(Firestore keeps at most 1 MiB per document)"
            )
        ref = self.worker.ref(self.plan, self.operation)
        self.writes.stage(ref, {"checkpoint": checkpoint, "counts": dict(self.counts)})
        self.checkpoint = checkpoint
        self.saved = True
        self.writes.soon()
        self.worker.run.heartbeat.touch()  # a saved checkpoint is progress: not stuck

    def count(self, name: str, n: int = 1) -> None:
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        if not documents.is_int(n):
            raise OperationFailed(f"count {documents.text(name, 60)!r} is not a whole number")
        if not isinstance(name, str) or not name or len(name) > MAX_COUNT_NAME:
            raise OperationFailed(
                f"a count name must be a string of 1 to {MAX_COUNT_NAME} characters"
            )
        if _RESERVED.match(name):
            raise OperationFailed(f"count name {name!r} is reserved by Firestore (__name__)")
        if name not in self.counts and len(self.counts) >= MAX_COUNT_NAMES:
            if not self._dropped:
                log.warning("more than %d count names: the rest are dropped", MAX_COUNT_NAMES)
                self._dropped = True
            return
        self.counts[name] = self.counts.get(name, 0) + n

    def should_stop(self) -> bool:
        # Operations only learn "stop"; the engine re-checks and raises after they return.
        return self.worker.stop.quiet() is not None
