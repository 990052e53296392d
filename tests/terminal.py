"""Run a real command in a pseudo-terminal and read back what a terminal would show.

The command sees a terminal of the given size (its stdin, stdout and stderr
are the pseudo-terminal, as in an interactive shell), so progress displays
redraw in place exactly as they do for a user; a terminal emulator (pyte)
then replays every byte it wrote. Output piped to a file reads fine even when
the screen is garbled, which is why the screen is what these tests look at.

As in a shell with job control, a small session leader (:data:`_SHELL`) owns
the terminal and runs the command in a process group of its own, the
terminal's foreground group: Ctrl-C typed on the terminal (``interrupt_when``)
reaches that whole group, and the session leader outlives the command, so a
process the command left behind is not hung up with it and can be found
(:attr:`Screen.left`).
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyte

from tests.procfs import wait_for_empty_group

#: The session leader: takes the terminal, runs the command as its foreground process group, reports
#: the command's pid and then its exit status on the first fd it is given, and stays until the second
#: closes (its exit hangs up the foreground group: it comes only after the test looked for leftovers).
_SHELL = r"""
import fcntl, os, signal, sys, termios
report, hold = int(sys.argv.pop(1)), int(sys.argv.pop(1))
os.setsid()
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    os.tcsetpgrp(0, os.getpid())
    # An interactive shell gives its foreground job the default dispositions: a test suite started in
    # the background (nohup, `&` in a script) has SIGINT and SIGQUIT ignored, and that would be inherited.
    for sig in (signal.SIGTTOU, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    os.execvp(sys.argv[1], sys.argv[1:])
os.write(report, f"{pid}\n".encode())
_, status = os.waitpid(pid, 0)
os.write(report, f"{os.waitstatus_to_exitcode(status)}\n".encode())
os.read(hold, 1)
"""


class _WrapScreen(pyte.HistoryScreen):
    """pyte's screen, marking each row the terminal wrapped onto the next (``row.wrapped``), so that a line
    whose wrap falls on a space is still known to go on. Erasing a row's end unmarks it."""

    def draw(self, data: str) -> None:
        for char in data:
            if self.cursor.x == self.columns and pyte.modes.DECAWM in self.mode:
                self.buffer[self.cursor.y].wrapped = True
            super().draw(char)

    def erase_in_line(self, how: int = 0, private: bool = False) -> None:
        super().erase_in_line(how, private)
        if how in (0, 2):
            self.buffer[self.cursor.y].wrapped = False

    def erase_in_display(self, how: int = 0, *args, **kwargs) -> None:
        super().erase_in_display(how, *args, **kwargs)
        rows = {0: range(self.cursor.y, self.lines), 1: range(0, self.cursor.y)}.get(how, range(self.lines))
        for y in rows:
            self.buffer[y].wrapped = False


@dataclass
class Screen:
    """What the terminal showed once the command ended."""

    returncode: int
    columns: int
    #: Every line the terminal drew, top to bottom (scrolled-off lines first), right-stripped.
    lines: list[str]
    #: Per line: the terminal wrapped it onto the next (it was full; not a newline).
    wrapped: list[bool] = field(default_factory=list)
    #: The command's process group (its pid).
    pgid: int = 0
    #: Seconds from the start to the Ctrl-C, and from the Ctrl-C to the command's exit (None: no Ctrl-C).
    interrupted_at: float | None = None
    exit_after_interrupt: float | None = None
    #: Processes of the command's group still running a second after it exited: pid → command line.
    left: dict[int, str] = field(default_factory=dict)

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
        """Line ``i`` joined with the rows the terminal wrapped it onto (a soft-wrapped value, whole).

        A wrapped row that ends in a space keeps it: ``lines`` are right-stripped, so the space is put back."""
        text = self.lines[i]
        while i + 1 < len(self.lines) and self.wrapped[i]:
            text = text.ljust(self.columns) + self.lines[i + 1]
            i += 1
        return text


def run_in_terminal(argv: list[str], *, columns: int, rows: int = 24, env: dict[str, str] | None = None,
                    cwd: str | None = None, timeout: float = 240.0,
                    interrupt_when: Callable[[bytes], bool] | None = None, presses: int = 1,
                    press_interval: float = 0.3) -> Screen:
    """Run ``argv`` with a ``columns`` × ``rows`` terminal as stdin, stdout and stderr; return the screen.

    ``interrupt_when(output so far)`` is asked as the command runs; the first
    time it is true, Ctrl-C is typed on the terminal, and again every
    ``press_interval`` seconds while the command runs, ``presses`` times in all.
    """
    env = dict(os.environ if env is None else env)
    for name in ("COLUMNS", "LINES", "NO_COLOR"):  # the size comes from the terminal itself
        env.pop(name, None)
    env["TERM"] = "xterm-256color"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    report_r, report_w = os.pipe()
    hold_r, hold_w = os.pipe()
    try:
        shell = subprocess.Popen([sys.executable, "-c", _SHELL, str(report_w), str(hold_r), *argv], stdin=slave,
                                 stdout=slave, stderr=slave, env=env, cwd=cwd, pass_fds=(report_w, hold_r))
    finally:
        for fd in (slave, report_w, hold_r):
            os.close(fd)
    chunks: list[bytes] = []
    reported = b""
    start = time.monotonic()
    deadline = start + timeout
    pgid = returncode = None
    interrupted_at = ended_at = None
    quiet_since = None
    pressed = 0
    try:
        while True:
            ready, _, _ = select.select([master, report_r], [], [], 0.05)
            data = b""
            if master in ready:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: every writer has closed the terminal
                    data = b""
                chunks.append(data)
            if report_r in ready:
                reported += os.read(report_r, 64)
                lines = reported.decode().split()
                if lines and pgid is None:
                    pgid = int(lines[0])
                if len(lines) > 1 and returncode is None:
                    returncode, ended_at = int(lines[1]), time.monotonic()
            if interrupt_when is not None and returncode is None and pressed < presses:
                if (interrupted_at is None and interrupt_when(b"".join(chunks))) or \
                        (interrupted_at is not None and time.monotonic() >= interrupted_at + pressed * press_interval):
                    os.write(master, b"\x03")
                    interrupted_at = interrupted_at or time.monotonic()
                    pressed += 1
            if returncode is not None:
                # Worker processes may hold the terminal a little longer: drain what is left.
                if data:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > 0.3:
                    break
            if time.monotonic() > deadline:
                if pgid is not None:
                    os.killpg(pgid, 9)
                raise AssertionError(f"{argv} did not finish within {timeout} s")
        # Within a second of the command's exit, nothing of its process group may still run.
        left = wait_for_empty_group(pgid, max(0.0, ended_at + 1.0 - time.monotonic())) if pgid else {}
    finally:
        os.close(hold_w)  # the session leader may go now
        shell.wait(timeout=30)
        os.close(master)
        os.close(report_r)
    screen = _WrapScreen(columns, rows, history=100_000)
    pyte.ByteStream(screen).feed(b"".join(chunks))
    rows_drawn = [*screen.history.top, *(screen.buffer[y] for y in range(screen.lines))]
    lines = ["".join(row[x].data for x in range(columns)).rstrip() for row in rows_drawn]
    wrapped = [getattr(row, "wrapped", False) for row in rows_drawn]
    while lines and not lines[-1]:
        lines.pop()
    return Screen(returncode, columns, lines, wrapped=wrapped[:len(lines)], pgid=pgid or 0,
                  interrupted_at=None if interrupted_at is None else interrupted_at - start,
                  exit_after_interrupt=None if interrupted_at is None else ended_at - interrupted_at,
                  left=left)
