"""rstpm's own errors end a data-parallel fit (ddp.py) at once instead of being retried.

Ray Train 2.60 (v2) retries every worker error up to ``FailureConfig(max_failures)`` times and
has no setting for the errors a retry cannot cure. So a worker raises rstpm's own errors (bad
data, a NaN loss, ...: ``ddp.OWN_ERRORS``) as a :class:`WorkerError`, and :class:`FailFast`, a
``UserCallback`` that Ray Train's controller runs after each poll of the workers, raises it
again there: an error raised by a callback is a ``ControllerError``, which Ray Train's default
failure policy never retries. The controller then stops every worker (also those waiting for
the failed one in a collective) and ``TrainingFailedError.controller_failure`` is the
WorkerError, which the driver turns back into rstpm's one-line error. A dead worker process,
a lost node or any other exception is retried as before.

This module imports neither torch nor the rest of rstpm: the controller loads it.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback


class WorkerError(Exception):
    """rstpm's own error on a data-parallel worker: its type's name, its one-line message and
    the worker's rank (plain strings: the controller needs no rstpm class to read it)."""

    def __init__(self, kind: str, message: str, rank: int) -> None:
        super().__init__(kind, message, rank)
        self.kind, self.message, self.rank = kind, message, rank

    def __str__(self) -> str:
        return f"{self.kind} on worker {self.rank}: {self.message}"

    @classmethod
    def of(cls, error: BaseException, rank: int) -> WorkerError:
        """The WorkerError of ``error`` (its first line) on worker ``rank``."""
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return cls(type(error).__name__, lines[0] if lines else "", rank)


def worker_error(error: BaseException) -> WorkerError | None:
    """The WorkerError behind an error as the controller or the driver sees it: a worker's
    exception wrapped by Ray Train (``UserExceptionWithTraceback``), or a ``ControllerError``
    raised from :class:`FailFast`; None for any other error."""
    for attribute in ("controller_failure", "_base_exc", "cause"):
        error = getattr(error, attribute, None) or error
    return error if isinstance(error, WorkerError) else None


class FailFast(UserCallback):
    """Raises the first (lowest rank) WorkerError among the workers' errors, so that the run
    fails at once (a ControllerError, never retried)."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        """Called by Ray Train's controller with each poll's errors, by rank."""
        del run_context
        for rank in sorted(worker_exceptions):
            own = worker_error(worker_exceptions[rank])
            if own is not None:
                raise own
