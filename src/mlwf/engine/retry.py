"""The one retry policy: which failed calls run again, how often, and after what pause.

Only the driver retries (:meth:`mlwf.engine.driver.Run.run_calls`); backends
and transports make one attempt per submit and say, through the error's
:attr:`~mlwf.errors.MlwfError.retryable`, whether another may succeed. So a
call is attempted at most ``1 + retries`` times in all, on every backend.
Retrying is safe because a call's outputs have fixed keys and bytes: a retry
writes exactly what the first attempt would have.

A retry library (tenacity, backoff) decorates a function that retries in
place; here attempts are futures in flight together, resubmitted from the
driver's wait loop, so the policy is these few lines instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlwf.errors import retryable


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` extra attempts; pauses double from ``backoff`` seconds up to ``max_backoff``."""

    retries: int = 2
    backoff: float = 0.05
    max_backoff: float = 2.0

    @property
    def attempts(self) -> int:
        """The most attempts a call gets."""
        return 1 + self.retries

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether a call whose attempt number ``attempt`` (0 for the first) failed with ``error`` runs again."""
        return attempt < self.retries and retryable(error)

    def pause(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (1 for the first retry)."""
        return min(self.backoff * 2 ** attempt, self.max_backoff)
