"""Errors a user can act on.

Every failure that reaches the command line is an :class:`MlwfError` whose
message is one line: what went wrong, where, and what to do about it. The CLI
prints that line and exits non-zero; only ``--debug`` shows a traceback.

Each error says whether trying the same call again may succeed
(:attr:`MlwfError.retryable`): the driver's one retry policy
(:mod:`mlwf.engine.retry`) and the function server's replies (their
``retryable`` field) both read it, so they never disagree. Bad input, a bad
model, a wrong command line and a missing object are not retryable; a store
that failed transiently, a failed stage call and a lost worker are.
"""

from __future__ import annotations


class MlwfError(Exception):
    """A failure with a one-line message meant for the user.

    ``retryable`` (a class default an instance may override) says whether the
    same call, tried again, may succeed.
    """

    exit_code = 2
    retryable = False


class UsageError(MlwfError):
    """The command line or a parameter is wrong."""


class StoreError(MlwfError):
    """The object store could not do what was asked."""


class TransientStoreError(StoreError):
    """The store failed in a way worth retrying (the engine retries the call)."""

    retryable = True


class NotFoundError(StoreError):
    """A key, prefix or bucket does not exist."""


class DataError(MlwfError):
    """The input data cannot be used (no images, one class, ...)."""


class ModelError(MlwfError):
    """A model object is missing, incompatible, corrupt or tampered with."""


class StageError(MlwfError):
    """A stage call failed (its function raised, its worker or service failed, or it ran out of time)."""

    retryable = True


class WorkerLost(StageError):
    """The worker running a call died; a backend raises it for every call that worker took with it.

    ``restart``: the backend must be reset (:meth:`~mlwf.backends.base.Backend.cancel_all`)
    before calls can run again, as when a local process pool breaks; the driver
    then resubmits every call in flight.
    """

    def __init__(self, message: str, *, restart: bool = True):
        super().__init__(message)
        self.restart = restart


def retryable(error: BaseException) -> bool:
    """Whether a failed call may succeed if tried again: an mlwf error says so itself; any other
    exception is a failure of the machinery around the stage, worth another attempt."""
    return error.retryable if isinstance(error, MlwfError) else True


def one_line(value: BaseException | str, limit: int = 2000) -> str:
    """An error's message (or a text) on one line of at most ``limit`` characters; an empty
    message gives the error's class name."""
    text = " ".join(str(value).split())[:limit]
    if not text and isinstance(value, BaseException):
        return type(value).__name__
    return text


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) ended a run; raised by :meth:`mlwf.engine.driver.Engine.run` in place of the
    :class:`KeyboardInterrupt`, once the run's record says ``interrupted`` and its workers are gone.

    ``workflow``: the workflow it was running; ``run_id``: the run it ended, or None when the
    interrupt came before the run started (nothing was written); ``status``: the run's status as
    recorded (``interrupted``, or ``succeeded`` when the run had finished just before);
    ``resume``: the command line that resumes it, where the raiser knows it (``mlwf bench``).
    """

    def __init__(self, workflow: str, run_id: str | None, status: str | None = None,
                 resume: str | None = None):
        super().__init__(workflow, run_id)
        self.workflow = workflow
        self.run_id = run_id
        self.status = status if run_id else None
        self.resume = resume


class AlreadyDone(MlwfError):
    """``--resume`` named a run that has already succeeded: nothing is run or changed.

    :meth:`mlwf.engine.driver.Engine.run` returns the run's recorded ``report`` (with
    ``already_done``) instead of raising this.
    """

    exit_code = 0

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report
