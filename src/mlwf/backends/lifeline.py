"""Processes that do not outlive the process that started them, however it ends (``kill -9`` included).

The signal is a pipe whose write end only the owner (the driver, or ``mlwf
serve``) holds, close-on-exec and never handed to a child: when the owner is
gone, for any reason, the kernel closes that end and a read on the other end
returns end-of-file at once. No polling, no parent ids (a local worker's parent
is the fork server, not the driver) and no PID that could be reused.

* **Worker processes** (the local backend's pool, ``mlwf serve --workers``) get
  the read end (:func:`reader`) in their initializer and call
  :func:`exit_with_owner`: a daemon thread that ends the worker at end-of-file,
  even while its stage is stuck. With the workers gone, the fork server and
  multiprocessing's resource tracker see their own pipes close and exit too.
* **A local Ray instance** that mlwf started: Ray's gcs_server and raylet die
  with the driver (Ray sets a parent-death signal on them), and its workers
  follow, but its dashboard and runtime-env agents outlive a killed driver by a
  minute or more (they try to report the raylet's death to a GCS that is gone).
  :class:`Reaper` is a small process (``python -m mlwf.backends.lifeline``) that
  keeps track of every process Ray started and kills what is left of them when
  the owner closes its end (:meth:`Reaper.close`) or dies. Linux only (it reads
  ``/proc``); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

#: A worker's exit status when its owner is gone.
ORPHANED_EXIT = 75

_lock = threading.Lock()
_pipe: tuple[int, Connection, Connection] | None = None  # (owner pid, read end, write end)


def reader() -> Connection:
    """The read end of this process's lifeline, to hand to worker processes (made once per process)."""
    global _pipe
    from multiprocessing import Pipe

    with _lock:
        if _pipe is None or _pipe[0] != os.getpid():
            read_end, write_end = Pipe(duplex=False)
            _pipe = (os.getpid(), read_end, write_end)
        return _pipe[1]


def exit_with_owner(lifeline: Connection) -> None:
    """In a worker: end this process as soon as the process that owns ``lifeline`` is gone."""

    def watch() -> None:
        try:
            lifeline.recv_bytes()  # the owner never writes: this returns only at end-of-file
        except (EOFError, OSError):
            pass
        os._exit(ORPHANED_EXIT)

    threading.Thread(target=watch, name="mlwf-lifeline", daemon=True).start()


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (Linux; an empty set elsewhere)."""
    return {p for p, (ppid, _) in _process_table().items() if ppid == pid}


class Reaper:
    """Kills the processes started from ``roots`` (and everything they start) when the owner goes away.

    Parameters
    ----------
    roots : process ids to watch, with every descendant they get while the owner lives.
    """

    def __init__(self, roots: set[int]):
        self.proc: subprocess.Popen | None = None
        if not roots or not os.path.isdir("/proc/self"):
            return
        # Its own session: a Ctrl-C meant for the driver's process group does not stop the reaper.
        self.proc = subprocess.Popen([sys.executable, "-m", "mlwf.backends.lifeline", *map(str, sorted(roots))],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def close(self, timeout: float = 10.0) -> None:
        """Kill what is left of the watched processes now, and wait for the reaper to finish."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- the reaper process
def _process_table() -> dict[int, tuple[int, int]]:
    """``{pid: (parent pid, start time)}`` of every process we can see in /proc."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def _track(tracked: dict[int, int]) -> None:
    """Add every live descendant of a tracked process to ``tracked`` ({pid: start time})."""
    table = _process_table()
    grew = True
    while grew:
        grew = False
        for pid, (ppid, start) in table.items():
            if ppid in tracked and pid not in tracked:
                tracked[pid] = start
                grew = True


def _kill(tracked: dict[int, int]) -> None:
    table = _process_table()
    for pid, start in tracked.items():
        if table.get(pid, (0, None))[1] == start:  # the same process, not a reused id
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _reap(roots: list[int]) -> None:
    import select

    table = _process_table()
    tracked = {pid: table[pid][1] for pid in roots if pid in table}
    while True:
        _track(tracked)
        ready, _, _ = select.select([sys.stdin.buffer], [], [], 0.5)
        if ready and not os.read(sys.stdin.fileno(), 1):
            break  # end-of-file: the owner closed its end, or died
    _track(tracked)
    _kill(tracked)


if __name__ == "__main__":
    _reap([int(a) for a in sys.argv[1:]])
