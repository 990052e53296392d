"""What /proc says about processes (Linux): a process group's live members, a process tree's listening sockets."""

from __future__ import annotations

import os
import socket
import time


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3, the state, first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return None


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def group_members(pgid: int) -> dict[int, str]:
    """The processes of process group ``pgid`` still running (zombies, already ended, left out): pid → command."""
    found = {}
    for pid in _pids():
        fields = _stat(pid)
        if fields is None or fields[0] == "Z" or int(fields[2]) != pgid:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found[pid] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
    return found


def wait_for_empty_group(pgid: int, timeout: float) -> dict[int, str]:
    """Wait up to ``timeout`` seconds for process group ``pgid`` to have no live member; return what is left."""
    deadline = time.monotonic() + timeout
    while True:
        left = group_members(pgid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it."""
    parents = {}
    for p in _pids():
        fields = _stat(p)
        if fields is not None:
            parents[p] = int(fields[1])
    tree, grew = {pid}, True
    while grew:
        grew = False
        for p, parent in parents.items():
            if parent in tree and p not in tree:
                tree.add(p)
                grew = True
    return tree


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int]]:
    """Every TCP socket in LISTEN state held by one of ``pids``: (address, port, pid)."""
    owner = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[len("socket:["):-1]] = pid
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in owner:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            # /proc writes each 32-bit word of the address in host (little-endian) order.
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((socket.inet_ntop(family, words), int(port, 16), owner[inode]))
    return found


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4 loopback address mapped into IPv6 (``::ffff:127.0.0.1``)."""
    return address.startswith("127.") or address == "::1" or address.startswith("::ffff:127.")
