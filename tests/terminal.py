"""Run a real command in a pseudo-terminal and read back what a terminal would show.

The command sees a terminal of the given size (its stdout and stderr are the
pseudo-terminal, as in an interactive shell), so progress displays redraw in
place exactly as they do for a user; a terminal emulator (pyte) then replays
every byte it wrote. Output piped to a file reads fine even when the screen is
garbled, which is why the screen is what these tests look at.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time
from dataclasses import dataclass

import pyte


@dataclass
class Screen:
    """What the terminal showed once the command ended."""

    returncode: int
    columns: int
    #: Every line the terminal drew, top to bottom (scrolled-off lines first), right-stripped.
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def index(self, predicate, start: int = 0) -> int:
        """The index of the first line from ``start`` for which ``predicate(line)`` holds."""
        for i in range(start, len(self.lines)):
            if predicate(self.lines[i]):
                return i
        raise AssertionError(f"no such line after line {start}:\n{self.text}")

    def logical_line(self, i: int) -> str:
        """Line ``i`` joined with the lines a full row wrapped it onto (a soft-wrapped value, whole)."""
        text = self.lines[i]
        while len(self.lines[i]) == self.columns and i + 1 < len(self.lines):
            i += 1
            text += self.lines[i]
        return text


def run_in_terminal(argv: list[str], *, columns: int, rows: int = 24, env: dict[str, str] | None = None,
                    cwd: str | None = None, timeout: float = 240.0) -> Screen:
    """Run ``argv`` with a ``columns`` × ``rows`` terminal as stdin, stdout and stderr; return the screen."""
    env = dict(os.environ if env is None else env)
    for name in ("COLUMNS", "LINES", "NO_COLOR"):  # the size comes from the terminal itself
        env.pop(name, None)
    env["TERM"] = "xterm-256color"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                start_new_session=True)
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    quiet_since = None
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.1)
            data = b""
            if ready:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            if proc.poll() is not None:
                # Worker processes may hold the terminal a little longer: drain what is left.
                if data:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > 0.5:
                    break
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{argv} did not finish within {timeout} s")
    finally:
        os.close(master)
        proc.wait(timeout=30)
    screen = pyte.HistoryScreen(columns, rows, history=100_000)
    pyte.ByteStream(screen).feed(b"".join(chunks))
    lines = ["".join(line[x].data for x in range(columns)).rstrip() for line in screen.history.top]
    lines += [line.rstrip() for line in screen.display]
    while lines and not lines[-1]:
        lines.pop()
    return Screen(proc.returncode, columns, lines)
