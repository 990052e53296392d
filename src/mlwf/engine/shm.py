"""Shared-memory segments for ``--transfer shm``: outputs written once, mapped read-only by their consumers.

A producer writes each output once into a file in ``/dev/shm`` (Linux's
tmpfs: memory that several processes can map); its consumers, in other worker
processes or the driver, map that file read-only and decode arrays as views of
it, so nothing is copied or deserialized on the way (:func:`open_view`).

Why files and not :mod:`multiprocessing.shared_memory`: its resource tracker
unlinks a segment when the process that made it exits, and a worker's outputs
must outlive the call (and the worker) until the run ends; plain
``open``/``posix_fallocate``/``mmap`` leave every decision here.

Names say whose a segment is, so that nothing leaks and nobody removes another
run's: ``mlwf-<pid>.<start>-<run id>-<stage>-<index>-<part>``, where ``<pid>``
is the driver's process id and ``<start>`` that process's start time (field 22
of ``/proc/<pid>/stat``, in clock ticks since boot), so a pid used again by a
later process is not taken for the driver that made them. A run removes its
own segments when it ends, success or failure (the local backend's
``end_run``); segments whose driver is no longer alive (killed with
``kill -9``) are removed by the next ``--transfer shm`` run and by
``mlwf runs gc`` (:func:`remove_orphans`). Two runs at once never touch each
other's: a run removes only its own run id's, the sweep only dead drivers'.

Writing: a segment is first created under a temporary name (``O_CREAT |
O_EXCL``, mode 0600), its memory reserved with ``posix_fallocate`` (a full
``/dev/shm`` is then an error here, not a ``SIGBUS`` in the middle of a
copy), filled, and renamed to its name. A consumer therefore never sees half a
segment, and a retried call replaces its earlier attempt's segment (the same
bytes) instead of failing on it.

Reading trusts nothing but the name's owner: the name must be one of the
run's (prefix, charset, no ``/``), the file is opened with ``O_NOFOLLOW``,
must be a regular file of this user's, exactly as long as the reference says,
and :func:`mlwf.codec.decode` checks every bound of the payload's header (its
arrays inside the segment, not overlapping, of whitelisted dtypes).

Nothing is hashed on this path, by decision. Every other transfer hashes each
payload twice on the way out (its body, then the whole) and once on the way in;
on a 26 MB edge of ``--state heavy`` that was 40 of the ~75 ms shm took, the
rest being the one copy into the segment and its pages (2026-12-07,
``benchmarks/state_transfer.py``). A checksum here would guard only against
a process of this same user rewriting a file of mode 0600 between two calls of
one run: such a process could as well rewrite the workers' memory. So a
segment's payload carries no SHA-256 (:data:`mlwf.codec.UNCHECKED`, which a
verifying decode refuses, so it can never pass for a stored payload), it is
decoded with ``verify=False``, and its :class:`~mlwf.engine.calls.Ref` names it
by a random 256-bit id instead of a digest (unique per output, as a cache key
needs; a model written as raw bytes, not as a payload, is still hashed).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
import secrets
import stat

from mlwf.errors import DataError, StageError, UsageError

#: Where segments live: Linux's shared-memory tmpfs.
DIR = "/dev/shm"
PREFIX = "mlwf-"
_OWNER = re.compile(r"[0-9]{1,10}\.[0-9]{1,20}")
_NAME = re.compile(r"mlwf-([0-9]{1,10})\.([0-9]{1,20})-[A-Za-z0-9._-]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_NAME_MAX = 255
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_owner: tuple[int, str] | None = None


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold anything, ')' included: split after its last.
    fields = text[text.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def owner() -> str:
    """This process's owner tag, ``<pid>.<start time>``: the driver puts it in every segment name."""
    global _owner
    pid = os.getpid()
    if _owner is None or _owner[0] != pid:
        _owner = (pid, f"{pid}.{start_time(pid) or 0}")
    return _owner[1]


def check_available() -> None:
    """Raise :class:`UsageError` unless shared-memory segments can be made here."""
    if not os.path.isdir(DIR) or not os.access(DIR, os.W_OK | os.X_OK):
        raise UsageError(f"--transfer shm needs a writable {DIR} (Linux's shared memory), which this machine "
                         "lacks: use --transfer direct or store")


def run_prefix(owner_tag: str, run_id: str) -> str:
    """The start of every segment name of one run."""
    if not _OWNER.fullmatch(owner_tag or ""):
        raise StageError(f"the run's shared-memory owner {owner_tag!r} is not <pid>.<start time>: the driver "
                         "and this worker are not the same mlwf")
    return f"{PREFIX}{owner_tag}-{_safe(run_id, 64)}-"


def segment_name(owner_tag: str, run_id: str, stage: str, index: int, part: int) -> str:
    """The segment of one output part of one call."""
    return f"{run_prefix(owner_tag, run_id)}{_safe(stage, 64)}-{int(index)}-{int(part)}"


def _safe(text: str, limit: int) -> str:
    """``text`` in the name's charset and at most ``limit`` long; altered text gets a digest, to stay distinct."""
    safe = _UNSAFE.sub("_", text)
    if safe == text and len(safe) <= limit:
        return safe
    return f"{safe[: limit - 9]}.{hashlib.sha256(text.encode()).hexdigest()[:8]}"


class Segment:
    """A segment being written: :meth:`write` its pieces, then :meth:`publish` (or :meth:`discard`).

    The pieces go in with ``write(2)``, the kernel copying each array's
    buffer straight into the segment's pages: on a 26 MB payload 19 ms,
    against 31 ms to reserve the pages with ``posix_fallocate`` and copy
    through a mapping (42 ms faulting them in through ``ftruncate``), and a
    full ``/dev/shm`` is an ``ENOSPC`` from ``write``, not a ``SIGBUS`` in a
    copy.
    """

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size
        self._tmp = f"{name}.{secrets.token_hex(4)}.tmp"
        self._fd = os.open(os.path.join(DIR, self._tmp),
                           os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._written = 0

    def write(self, pieces) -> None:
        """Append ``pieces`` (bytes-like, each contiguous) to the segment, each copied once by the kernel."""
        try:
            for piece in pieces:
                view = memoryview(piece).cast("B")
                while len(view):
                    n = os.write(self._fd, view)
                    view = view[n:]
                    self._written += n
        except OSError as e:
            raise StageError(f"cannot write a {self.size:,}-byte shared-memory segment in {DIR}: {e.strerror}; "
                             f"free memory there (or 'mlwf runs gc'), or run with --transfer store") from None

    def publish(self) -> None:
        """Close it and give it its name (replacing an earlier attempt's), for consumers to map."""
        if self._written != self.size:
            raise StageError(f"shared-memory segment {self.name}: {self._written:,} bytes written, not the "
                             f"{self.size:,} planned")
        os.close(self._fd)
        self._fd = -1
        os.rename(os.path.join(DIR, self._tmp), os.path.join(DIR, self.name))

    def discard(self) -> None:
        """Give it up (a failed write): nothing is left under its temporary name."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(DIR, self._tmp))


def open_view(name: str, nbytes: int, *, owner_tag: str, run_id: str, what: str) -> memoryview:
    """Map the segment ``name`` of run ``run_id`` read-only; its bytes as a read-only memoryview.

    The mapping lasts as long as the view or anything made from it (arrays
    that :func:`mlwf.codec.decode` returns view it), even after the segment
    is removed. ``what`` names the input in errors.

    Raises
    ------
    DataError
        If ``name`` is not one of the run's segments, is a link or not a
        regular file of this user's, is gone, or is not ``nbytes`` long.
    """
    prefix = run_prefix(owner_tag, run_id)
    shown = repr(name)[:120]
    if not isinstance(name, str) or len(name) > _NAME_MAX or not name.startswith(prefix) \
            or not _NAME.fullmatch(name):
        raise DataError(f"{what} names the shared-memory segment {shown}, which is not one of this run's "
                        f"({prefix}…): refused; run again")
    path = os.path.join(DIR, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise DataError(f"{what}: shared-memory segment {path} is gone (removed when its run ended, or by "
                        "'mlwf runs gc'): run again") from None
    except OSError as e:
        why = "is a symbolic link" if os.path.islink(path) else f"cannot be opened ({e.strerror})"
        raise DataError(f"{what}: shared-memory segment {path} {why}: refused; run again") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise DataError(f"{what}: {path} is not a segment this user made (not a regular file of uid "
                            f"{os.geteuid()}): refused; run again")
        if st.st_size != nbytes:
            raise DataError(f"{what}: shared-memory segment {path} holds {st.st_size:,} bytes, not the "
                            f"{nbytes:,} its producer handed on: it was changed since; run again")
        if not nbytes:
            return memoryview(b"")
        return memoryview(mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ))
    finally:
        os.close(fd)


def _ours() -> list[tuple[str, int, int]]:
    """``(name, pid, start)`` of every segment in :data:`DIR` named as mlwf names them and owned by this user."""
    try:
        entries = list(os.scandir(DIR))
    except OSError:
        return []
    found = []
    for entry in entries:
        m = _NAME.fullmatch(entry.name)
        if m is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
            found.append((entry.name, int(m.group(1)), int(m.group(2))))
    return found


def _unlink(name: str) -> int:
    try:
        os.unlink(os.path.join(DIR, name))
        return 1
    except FileNotFoundError:
        return 0


def remove_run(owner_tag: str, run_id: str) -> int:
    """Remove every segment of one run (its temporary ones too); how many were removed."""
    prefix = run_prefix(owner_tag, run_id)
    return sum(_unlink(name) for name, _, _ in _ours() if name.startswith(prefix))


def remove_orphans() -> int:
    """Remove the segments of every driver that is no longer alive (its pid gone, or now another
    process's: a different start time); how many were removed."""
    removed = 0
    alive: dict[tuple[int, int], bool] = {}
    for name, pid, start in _ours():
        if (pid, start) not in alive:
            alive[(pid, start)] = start_time(pid) == start
        if not alive[(pid, start)]:
            removed += _unlink(name)
    return removed


def listed(owner_tag: str | None = None) -> list[str]:
    """The names of this user's mlwf segments (of one driver, given its owner tag), sorted."""
    start = f"{PREFIX}{owner_tag}-" if owner_tag else PREFIX
    return sorted(name for name, _, _ in _ours() if name.startswith(start))
