"""Errors a user can act on.

Every failure that reaches the command line is an :class:`MlwfError` whose
message is one line: what went wrong, where, and what to do about it. The CLI
prints that line and exits non-zero; only ``--debug`` shows a traceback.
"""

from __future__ import annotations


class MlwfError(Exception):
    """A failure with a one-line message meant for the user."""

    exit_code = 2


class UsageError(MlwfError):
    """The command line or a parameter is wrong."""


class StoreError(MlwfError):
    """The object store could not do what was asked."""


class TransientStoreError(StoreError):
    """The store failed in a way worth retrying (the engine retries the call)."""


class NotFoundError(StoreError):
    """A key, prefix or bucket does not exist."""


class DataError(MlwfError):
    """The input data cannot be used (no images, one class, ...)."""


class ModelError(MlwfError):
    """A model object is missing, incompatible, corrupt or tampered with."""


class StageError(MlwfError):
    """A stage call failed after its retries."""


def one_line(value: BaseException | str, limit: int = 2000) -> str:
    """An error's message (or a text) on one line of at most ``limit`` characters; an empty
    message gives the error's class name."""
    text = " ".join(str(value).split())[:limit]
    if not text and isinstance(value, BaseException):
        return type(value).__name__
    return text
