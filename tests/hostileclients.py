"""Hostile clients for the tests of mlwf's two HTTP servers: body tricklers that reconnect, and the
server's peak memory as the kernel saw it."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (``VmHWM``), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def compress(data: bytes, encoding: str) -> bytes:
    """``data`` as a body with ``Content-Encoding: encoding`` (gzip, or deflate: zlib's format)."""
    return gzip.compress(data, 6) if encoding == "gzip" else zlib.compress(data, 6)


def zeros_bomb(nbytes: int, encoding: str = "gzip") -> bytes:
    """``nbytes`` zeros, compressed (about a thousandth of their size), built without holding them."""
    chunk = b"\0" * (1 << 20)
    if encoding == "gzip":
        z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    else:
        z = zlib.compressobj(9)
    out = [z.compress(chunk) for _ in range(nbytes >> 20)]
    out.append(z.compress(b"\0" * (nbytes & ((1 << 20) - 1))))
    return b"".join(out) + z.flush()


class Tricklers:
    """``count`` connections from ``source`` that send a whole head, then their body a byte every
    ``every`` seconds; each connection the server closes (or answers) is opened again at once.

    ``opened`` counts connections made, ``answered`` the statuses the server sent before closing one.
    """

    def __init__(self, port: int, head: bytes, count: int, *, source: str = "127.0.0.1", every: float = 0.2):
        self.port, self.head, self.count, self.source, self.every = port, head, count, source, every
        self.opened = 0
        self.answered: list[int] = []
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Tricklers:
        self._socks = [self._open() for _ in range(self.count)]
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self._socks:
            s.close()

    def _open(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5, source_address=(self.source, 0))
        sock.sendall(self.head)
        sock.setblocking(False)
        self.opened += 1
        return sock

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for i, sock in enumerate(self._socks):
                try:
                    answer = sock.recv(65536)
                except BlockingIOError:
                    answer = None  # nothing from the server: still waiting for our body
                except OSError:
                    answer = b""
                if answer is None:
                    try:
                        sock.send(b" ")
                        continue
                    except OSError:
                        answer = b""
                if answer.startswith(b"HTTP/1.1 "):
                    self.answered.append(int(answer.split(b" ", 2)[1]))
                sock.close()
                try:
                    self._socks[i] = self._open()
                except OSError:
                    time.sleep(0.05)
                    self._socks[i] = socket.socket()  # closed placeholder: tried again next round
