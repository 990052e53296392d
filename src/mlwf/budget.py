"""The work an input may cause, taken from one budget per process before the work is done.

Limits on the bytes that arrive (``--max-body``) do not bound what those bytes
make mlwf allocate: a 124 KB PNG may declare 1 × 64,000,000 pixels, a 16 KB
gzip body may inflate to gigabytes, a tensor's shape may name any size. So
every decoder learns from headers how many bytes it is about to produce and
takes them from the process's :data:`MEMORY` budget first, refusing before it
allocates; a streaming decoder (inflating a body or a gzip file) takes its
output as it goes (:meth:`Reservation.grow`), never after. What is taken is
given back when the work ends, so concurrent requests share one budget: N
requests cannot each take all of it.

A refusal is a :class:`BudgetExceeded`. It says whether the input alone is
over the limit (:attr:`BudgetExceeded.busy` false: the same input is refused
again, so it is not retryable; a server answers 413) or whether other work
holds the budget at the moment (``busy``: retryable; a server answers 503).

The limit is ``MLWF_MAX_MEMORY`` (bytes, or a size such as ``512MiB``; see
:func:`parse_size`), else :data:`DEFAULT_LIMIT`; ``mlwf serve`` and ``mlwf
model serve`` also take ``--max-memory``. :func:`configure` sets it once, at a
process's start.
"""

from __future__ import annotations

import re
import threading

from mlwf.errors import MlwfError, UsageError

#: The default budget of one process: what inputs may make it allocate at once.
DEFAULT_LIMIT = 512 << 20
#: The variable that sets it (and the flag of the servers).
VARIABLE = "MLWF_MAX_MEMORY"
FLAG = "--max-memory"
#: The smallest and largest budgets accepted.
MIN_LIMIT = 16 << 20
MAX_LIMIT = 1 << 40

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 10**3, "KIB": 1 << 10, "M": 1 << 20, "MB": 10**6, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 10**9, "GIB": 1 << 30, "T": 1 << 40, "TB": 10**12, "TIB": 1 << 40}


def human(n: int) -> str:
    """``n`` bytes as a short text (``512 MiB``, ``3.2 GiB``)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) or value >= 100 else f"{value:.1f} {unit}"
    return f"{n} bytes"


def parse_size(text: str, what: str = VARIABLE) -> int:
    """A budget given as bytes or a size (``536870912``, ``512MiB``, ``1GiB``, ``2GB``).

    Raises
    ------
    UsageError
        Naming ``what`` (the variable or flag) for text that is not a size, or
        a size outside :data:`MIN_LIMIT`..:data:`MAX_LIMIT`.
    """
    m = re.fullmatch(r"\s*(\d{1,15})\s*([A-Za-z]{0,3})\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise UsageError(f"{what} {text!r} is not a size: give bytes or e.g. 512MiB or 2GiB")
    n = int(m.group(1)) * _UNITS[unit]
    if not MIN_LIMIT <= n <= MAX_LIMIT:
        raise UsageError(f"{what} {text!r} is out of range: give {human(MIN_LIMIT)} to {human(MAX_LIMIT)}")
    return n


class BudgetExceeded(MlwfError):
    """Work refused before it was done: it would take more of the process's budget than there is.

    Attributes
    ----------
    what : what the work was (``"image 3 (1x64000000 pixels)"``).
    need : bytes the work needed (at least; a streaming decoder stops at the first refusal).
    limit : the budget's limit.
    busy : True when the work alone fits the limit but other work holds the budget now
        (worth retrying); False when the input alone is over the limit (never worth retrying).
    """

    def __init__(self, what: str, need: int, limit: int, busy: bool):
        self.what, self.need, self.limit, self.busy = what, need, limit, busy
        self.retryable = busy
        if busy:
            message = (f"{what} needs {human(need)} of memory and other work holds the rest of this process's "
                       f"{human(limit)} ({FLAG} / {VARIABLE}) now: retry shortly")
        else:
            message = (f"{what} needs {human(need)} of memory, over this process's limit of {human(limit)} "
                       f"({FLAG} / {VARIABLE}): send a smaller input, or raise the limit")
        super().__init__(message)


class Reservation:
    """Bytes taken from a :class:`Budget`, given back by :meth:`release` (or leaving a ``with`` block)."""

    def __init__(self, budget: Budget, what: str):
        self.budget = budget
        self.what = what
        self.held = 0

    def grow(self, nbytes: int, what: str | None = None) -> None:
        """Take ``nbytes`` more for this work; :class:`BudgetExceeded` (nothing more taken) if they are not there.

        ``what`` names this part of the work in the refusal (default: the
        reservation's ``what``); the refusal's ``need`` is still everything
        the work would then hold, so one request's parts (its body, its
        parsed JSON, its tensors) are refused as a whole, never each as if
        it were alone.
        """
        self.budget._take(self, nbytes, what)

    def release(self) -> None:
        """Give back everything held (idempotent)."""
        self.budget._give_back(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Budget:
    """Bytes that work caused by inputs may hold at once in this process, shared by every thread.

    Parameters
    ----------
    limit : the most bytes held at once.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int, what: str) -> Reservation:
        """Take ``nbytes`` for ``what`` (use as a context manager, or call :meth:`Reservation.release`).

        Raises
        ------
        BudgetExceeded
            Before anything is taken, if ``nbytes`` is over the limit or more
            than is free now.
        """
        reservation = Reservation(self, what)
        reservation.grow(nbytes)
        return reservation

    def check(self, nbytes: int, what: str) -> None:
        """Refuse work that could never fit, without taking anything (for a size known before a
        cheaper check, e.g. a header read long before the work)."""
        if nbytes > self.limit:
            raise BudgetExceeded(what, int(nbytes), self.limit, busy=False)

    def _take(self, reservation: Reservation, nbytes: int, what: str | None = None) -> None:
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError("a reservation grows by a positive number of bytes")
        need = reservation.held + nbytes
        if need > self.limit:
            raise BudgetExceeded(what or reservation.what, need, self.limit, busy=False)
        with self._lock:
            if self.used + nbytes > self.limit:
                raise BudgetExceeded(what or reservation.what, need, self.limit, busy=True)
            self.used += nbytes
            reservation.held += nbytes

    def _give_back(self, reservation: Reservation) -> None:
        with self._lock:
            self.used -= reservation.held
            reservation.held = 0


#: This process's budget (:func:`configure` sets its limit).
MEMORY = Budget()
#: Whether :func:`configure` has set the limit in this process (forked children inherit it).
_configured = False


def configure(limit: int | str | None) -> int:
    """Set :data:`MEMORY`'s limit from a flag or ``MLWF_MAX_MEMORY`` (bytes or a size; None: the default).

    Called once at a process's start, before any work; returns the limit.
    """
    if limit is None:
        value = DEFAULT_LIMIT
    elif isinstance(limit, str):
        value = parse_size(limit)
    else:
        value = int(limit)
        if not MIN_LIMIT <= value <= MAX_LIMIT:
            raise UsageError(f"{FLAG} {value} is out of range: give {human(MIN_LIMIT)} to {human(MAX_LIMIT)}")
    global _configured
    MEMORY.limit = value
    _configured = True
    return value


def configure_once(limit: int | str | None) -> int:
    """Set :data:`MEMORY`'s limit as :func:`configure` does, unless this process has set it already.

    For a worker process, which resolves its settings at its first call: a
    server's ``--max-memory``, set at the server's start, is not undone by
    the ``MLWF_MAX_MEMORY`` its calls see. Returns the limit in force.
    """
    if _configured:
        return MEMORY.limit
    return configure(limit)
