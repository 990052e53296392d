"""One HTTP server of ours in its own process on 127.0.0.1, for tests: start, wait until ready, stop."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx


class ServerProcess:
    """``argv`` run with ``env``, logging to ``log``; ready once ``GET ready_path`` answers 200.

    ``port`` and ``url`` say where it listens (``argv`` must make it listen there).
    """

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, port: int, *, ready_path: str,
                 name: str, log_mode: str = "ab"):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self.name = name
        self._ready_path = ready_path
        self._log = open(log, log_mode)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)

    def wait_ready(self, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(self.url + self._ready_path, timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not get ready within {timeout} s: {self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
