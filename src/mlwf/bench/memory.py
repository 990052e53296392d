"""The memory a run holds on this machine: the sum of its processes' PSS, sampled while it runs.

Resident set sizes cannot be added up: pages that several processes map (the
fork server's imports that every worker shares, a shared-memory segment that
a producer wrote and its consumers read) would count once per process. The
proportional set size (``Pss`` in ``/proc/PID/smaps_rollup``) charges each
shared page to its processes in equal parts, so the sum over the processes is
the memory they hold together, shared pages once. The sampler reads it every
``interval`` seconds for this process and every process descending from it
(the local backend's fork server and workers, a Ray instance this process
started, a cold ``mlwf run`` and its children), and of every function server
behind an ``--endpoint`` on this machine's loopback interface (the process
listening on that port, and its workers: :func:`listening_pids`), so that a
Knative run on one machine counts its functions' memory too. Processes on
other machines (a Ray cluster's nodes, a real Knative service) are not seen.

Also sampled: the bytes held by mlwf's shared-memory segments (``/dev/shm/mlwf-*``,
``--transfer shm``). Pages of a segment that a process maps are already in
its PSS; a segment no process maps at that instant (written, not yet read) is
in none, so the two figures are kept apart rather than added.

Linux only: elsewhere the figures are None.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "mlwf-"


def _children() -> dict[int, list[int]]:
    """Parent pid → child pids, for every process in /proc."""
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(name))
    return tree


#: Loopback host names: a function server behind one of these runs on this machine.
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def listening_pids(urls: list[str]) -> list[int]:
    """The processes (readable by this user) listening on the port of each loopback URL in ``urls``.

    The listening socket's inode is found in ``/proc/net/tcp`` and ``tcp6``
    (state ``0A``, LISTEN), then the processes holding a descriptor of it.
    """
    from urllib.parse import urlsplit

    ports = set()
    for url in urls:
        try:
            parts = urlsplit(url)
            if parts.hostname in LOOPBACK or f"[{parts.hostname}]" in LOOPBACK:
                ports.add(parts.port or (443 if parts.scheme == "https" else 80))
        except ValueError:
            continue
    if not ports:
        return []
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) in ports:
                        inodes.add(f"socket:[{fields[9]}]")
        except (OSError, ValueError, IndexError):
            continue
    found = []
    for name in os.listdir("/proc") if inodes else []:
        if not name.isdigit():
            continue
        try:
            links = {os.readlink(f"/proc/{name}/fd/{fd}") for fd in os.listdir(f"/proc/{name}/fd")}
        except OSError:
            continue
        if links & inodes:
            found.append(int(name))
    return found


def process_tree(root: int) -> list[int]:
    """``root`` and every process descending from it."""
    tree = _children()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def pss_kb(pid: int) -> int:
    """The proportional set size of ``pid`` in KiB (0 if it is gone or not readable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def shm_bytes() -> int:
    """Bytes allocated to mlwf's shared-memory segments now (0 without /dev/shm)."""
    total = 0
    try:
        with os.scandir(SHM_DIR) as it:
            for entry in it:
                if entry.name.startswith(SHM_PREFIX):
                    try:
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        continue
    except OSError:
        return 0
    return total


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc


def return_large_buffers() -> None:
    """Have this process's allocator give every buffer of 1 MiB or more back to the system when it is
    freed (glibc: a fixed ``M_MMAP_THRESHOLD``).

    By default glibc raises that threshold after the first large buffer is freed, and serves later
    ones from per-thread arenas whose top it never trims: after one ``--transfer direct`` heavy run
    the benchmark's driver kept ~75 MB it had freed (the inline state its result thread unpickled),
    which the next configuration's peak would have counted as its own.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def release_freed() -> None:
    """Give the memory this process has freed back to the system (the garbage collector, then glibc's
    ``malloc_trim``), so a configuration measured after another does not carry its leftovers in the
    driver's PSS."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def supported() -> bool:
    """Whether this machine says what a process's PSS is (Linux 4.14 and later)."""
    return os.path.exists(f"/proc/{os.getpid()}/smaps_rollup")


class PeakMemory:
    """The peak, over a ``with`` block, of the PSS summed over this process's tree (and ``also``'s), and of the
    shared-memory segments' bytes; sampled every ``interval`` seconds in a thread (and once at
    each end of the block, so a block shorter than the interval is still measured).

    ``pss_mb`` and ``shm_mb`` are None where the machine cannot say (not Linux).
    """

    def __init__(self, interval: float = 0.05, root: int | None = None, also: list[int] = ()):
        self.interval = interval
        self.root = root or os.getpid()
        #: Other processes whose trees are counted too (function servers on this machine).
        self.also = list(also)
        self.enabled = supported()
        self._peak_pss_kb = 0
        self._peak_shm = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        pids = set(process_tree(self.root))
        for root in self.also:
            pids.update(process_tree(root))
        pss = sum(pss_kb(pid) for pid in pids)
        self._peak_pss_kb = max(self._peak_pss_kb, pss)
        self._peak_shm = max(self._peak_shm, shm_bytes())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakMemory:
        if self.enabled:
            self.sample()
            self._thread = threading.Thread(target=self._loop, name="mlwf-bench-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.sample()

    @property
    def pss_mb(self) -> float | None:
        return round(self._peak_pss_kb / 1024, 1) if self.enabled else None

    @property
    def shm_mb(self) -> float | None:
        return round(self._peak_shm / 2**20, 1) if self.enabled else None
