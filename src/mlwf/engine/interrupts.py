"""Ctrl-C during the few steps of a run that are better not cut in two.

A Ctrl-C (SIGINT) reaches a Python program as :class:`KeyboardInterrupt`,
raised wherever its main thread happens to be. Publishing a model is safe
against that by itself (the manifest is replaced by one compare-and-swap: a
reader sees the old model or the new one), but a run whose model was
published and whose record was then interrupted would say ``interrupted``
of a model that is out. :func:`deferred` holds a Ctrl-C for the length of
such a step (milliseconds) and raises it as the step ends; a second Ctrl-C
raises at once, for a step that hangs.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a Ctrl-C until the block ends, then raise it as the handler in place would have.

    A second Ctrl-C within the block raises at once. Python delivers signals
    to the main thread only: in any other thread, and when SIGINT is not
    handled by Python code (ignored, or left to the system), this changes
    nothing. If the block raises, its exception goes on and a held Ctrl-C is
    dropped (the run has failed anyway).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    held: list[tuple[int, object]] = []

    def hold(signum, frame) -> None:
        if held:  # pressed again: the user means it now
            signal.signal(signal.SIGINT, previous)
            previous(signum, frame)
            return
        held.append((signum, frame))

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is hold:
            signal.signal(signal.SIGINT, previous)
    if held:
        previous(*held[0])
