"""The project's few named errors; entry points map them to HTTP statuses in one place."""

from __future__ import annotations


class SmartResumeError(Exception):
    """Base of every error smart-resume raises on purpose."""


class ConfigError(SmartResumeError):
    """One or more settings are missing or malformed; names every offending variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class StoreUnavailable(SmartResumeError):
    """Firestore could not be reached within the configured deadline."""


class StoreRejected(SmartResumeError):
    """Firestore refused a write as invalid (too large, a value it cannot store)."""


class LockHeld(SmartResumeError):
    """Another live run holds the lock."""

    def __init__(
        self,
        run_id: str | None,
        age_seconds: float,
        heartbeat_age_seconds: float | None = None,
        stale_in_seconds: float | None = None,
    ) -> None:
        self.run_id = run_id
        self.age_seconds = age_seconds
        self.heartbeat_age_seconds = heartbeat_age_seconds
        self.stale_in_seconds = stale_in_seconds  # when the lock goes stale unless renewed
        super().__init__(f"lock held by run {run_id} for {age_seconds:.0f}s")


class LeaseLost(SmartResumeError):
    """This run no longer owns the lock (taken over as stale, or force-unlocked)."""


class PipelineError(SmartResumeError):
    """The pipeline file is missing or invalid; the message names file, operation and field."""


class InvalidRequest(SmartResumeError):
    """A request body or parameter failed validation; `detail` names the field."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)


class ModuleLoadError(SmartResumeError):
    """The resume module could not be imported or does not export `run_smart_resume`."""


class OperationFailed(SmartResumeError):
    """A client-operation failed; the run goes on with the next client."""


class ClientTrouble(SmartResumeError):
    """One client cannot be worked on now (deleted, claimed by a live run of another lock,
    its document kept changing, a write the store refused): that client only is skipped or
    failed, and the run goes on."""

    def __init__(self, client_id: str, reason: str) -> None:
        self.client_id = client_id
        self.reason = reason
        super().__init__(f"client {client_id}: {reason}")


class ClientGone(ClientTrouble):
    """The client document was deleted while the run worked on it."""

    def __init__(self, client_id: str) -> None:
        super().__init__(client_id, "its document was deleted during the run")
