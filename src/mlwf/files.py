"""Opening a file named by a user: a regular file, or a one-line refusal saying what it is instead.

A path given on the command line or to the Python API is read only if it is a
regular file (a link to one is fine: the path is the user's choice). Anything
else is refused without reading it: a FIFO would block until a writer comes, a
device such as ``/dev/zero`` never ends. The kind is read with ``os.stat``
before opening, and the open is non-blocking, so a path swapped for a FIFO in
between is refused by the ``fstat`` after it rather than waited on.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from mlwf.errors import DataError, MlwfError


def kind(mode: int) -> str:
    """What a file that is not a regular file is, for a message (``a named pipe (FIFO)``)."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def open_regular(path: str | os.PathLike[str], what: str, missing: str,
                 error: type[MlwfError] = DataError) -> BinaryIO:
    """``path`` opened for reading (binary) if it is a regular file.

    Parameters
    ----------
    path : the file.
    what : what the file is, for messages (``"IDX file"``).
    missing : what to do when it does not exist (the message's last part).
    error : the error class to raise.

    Raises
    ------
    error
        If the file does not exist, is not a regular file (naming what it is),
        or cannot be opened.
    """

    def refuse(mode: int) -> MlwfError:
        return error(f"{what} {path} is {kind(mode)}, not a regular file; give the path of a file")

    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise refuse(mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; {missing}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}; check that the file is readable") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise refuse(mode)
    return os.fdopen(fd, "rb")


def special_file(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is if it exists and is not a regular file or a directory (``a named pipe (FIFO)``), else
    None: for a caller that takes either a file or something else (a store prefix) by the same name."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else kind(mode)
