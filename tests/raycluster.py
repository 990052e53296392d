"""A real multi-node Ray cluster for tests: two raylets on this host, token authentication on.

``ray start --head`` and ``ray start --address`` are run exactly as a user
would (``python -m ray.scripts.scripts``, the module behind the ``ray``
command), each with ``--block`` so that the cluster belongs to the process that
started it:

* every port is chosen here (GCS, node manager, object manager, dashboard,
  dashboard agent, metrics, runtime-env agent) and workers bind random ports,
  so the cluster never collides with another Ray instance on the machine
  (Ray's defaults, such as 6379, 8265 and 52365, are shared by every instance);
* each node has its own short ``--temp-dir`` (Unix socket paths must stay
  under about 100 bytes) that nothing else uses;
* it is stopped by signalling the two ``ray start`` processes we started
  (SIGTERM: the node drains and stops its processes), never with ``ray stop``,
  which stops every Ray instance on the machine; anything of ours still
  running after the grace period is killed by process id. The ``ray start``
  processes also get SIGTERM if the process that started them dies (Linux's
  parent-death signal), so a killed test run leaves no cluster behind.

Token authentication (Ray 2.52+): ``RAY_AUTH_MODE=token`` and
``RAY_AUTH_TOKEN_PATH`` pointing at a fresh token file of our own, for the
nodes and for every driver that joins (:meth:`RayCluster.env`). The user's
``~/.ray/auth_token`` is never read or written.

Fixture (a plugin of the suite: tests/conftest.py): ``ray_cluster``
(module scope), a started :class:`RayCluster` with 1 CPU per node.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

__all__ = ["RayCluster", "ray_cluster"]

#: Ray's variables that would point a driver or a node at another cluster or token.
RAY_ENV_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_STARTED = "Ray runtime started"


_handed_out: set[int] = set()


def _free_port() -> int:
    """A port free now, below the kernel's ephemeral range and never handed out twice by this process.

    Outside the ephemeral range, no process binding port 0 (Ray's workers, other
    test servers) can take it between now and the moment the node binds it.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    low, high = 20000, max(20001, min(ephemeral_low, 32768))
    for _ in range(1000):
        port = random.randrange(low, high)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def last_json(stdout: str):
    """The last line of a driver's ``stdout`` that is a JSON document: Ray prints there too, after it
    (a node lost while the driver looked: "raylet has lagging heartbeats due to slow network")."""
    import json

    for line in reversed(stdout.splitlines()):
        if line.startswith(("{", "[")):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise AssertionError(f"no JSON line in the driver's output: {stdout[-2000:]!r}")


class RayCluster:
    """A Ray cluster of ``nodes`` raylets on this host, started and stopped by us.

    Parameters
    ----------
    root : a folder for the token, the logs of ``ray start`` and the nodes' temp dirs
        are made under ``/tmp`` (short paths) and removed by :meth:`stop`.
    nodes : raylets (the head and ``nodes - 1`` others).
    cpus : CPUs each node offers.
    node_env : extra environment of the nodes (e.g. ``RAY_preload_python_modules``).
    """

    def __init__(self, root: Path, nodes: int = 2, cpus: int = 1, node_env: dict[str, str] | None = None):
        if nodes < 1:
            raise ValueError("a cluster needs at least its head node")
        self.root = Path(root)
        self.nodes = nodes
        self.cpus = cpus
        self.node_env = dict(node_env or {})
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.token_path = self.root / "ray-auth-token"
        self._procs: list[subprocess.Popen] = []
        self._temp_dirs: list[str] = []
        self._seen: set[int] = set()

    # ------------------------------------------------------------------ environment
    def env(self) -> dict[str, str]:
        """The variables a driver (or a node) needs to join this cluster: token mode and our token file."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "RAY_USAGE_STATS_ENABLED": "0"}

    def driver_env(self, **extra: str) -> dict[str, str]:
        """``os.environ`` without any other cluster's address or token, plus :meth:`env` and ``extra``."""
        base = {k: v for k, v in os.environ.items() if k not in RAY_ENV_VARS}
        return {**base, **self.env(), **extra}

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout: float = 90.0) -> RayCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        try:
            self._start_node(head=True, timeout=timeout)
            for _ in range(self.nodes - 1):
                self._start_node(head=False, timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, *, head: bool, timeout: float) -> None:
        index = len(self._procs)
        temp_dir = tempfile.mkdtemp(prefix=f"mlwf-ray{index}-", dir="/tmp")
        self._temp_dirs.append(temp_dir)
        ports = ["--node-manager-port", _free_port(), "--object-manager-port", _free_port(),
                 "--min-worker-port", 0, "--max-worker-port", 0,
                 "--dashboard-agent-listen-port", _free_port(), "--dashboard-agent-grpc-port", _free_port(),
                 "--metrics-export-port", _free_port(), "--runtime-env-agent-port", _free_port()]
        if head:
            # No --ray-client-server-port: mlwf does not use Ray Client, whose server needs ray[client].
            role = ["--head", "--port", self.port, "--dashboard-port", _free_port(), "--include-dashboard", "false"]
        else:
            role = ["--address", self.address]
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *role, *ports,
               "--num-cpus", self.cpus, "--object-store-memory", 100 * 2**20, "--temp-dir", temp_dir,
               "--disable-usage-stats"]
        log_path = self.root / f"ray-start-{index}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env={**self.driver_env(), **self.node_env},
                                    preexec_fn=_die_with_parent, start_new_session=True)
        self._procs.append(proc)
        deadline = time.monotonic() + timeout
        while _STARTED not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"ray start ({'head' if head else 'node'}) did not come up "
                                   f"(exit status {proc.poll()}):\n{tail}")
            time.sleep(0.2)
        self._remember()

    def _remember(self) -> None:
        """Note every process of ours now running, so :meth:`stop` can kill any that outlive their node."""
        for proc in self._procs:
            if proc.poll() is None:
                self._seen |= _descendants(proc.pid)

    def stop(self, grace: float = 30.0) -> None:
        """Stop the nodes (the others first, then the head) and everything they started."""
        self._remember()
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in self._seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self._seen:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._procs.clear()
        self._seen.clear()
        for d in self._temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._temp_dirs.clear()

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ looking at it
    def alive_nodes(self, timeout: float = 60.0) -> list[dict]:
        """The alive nodes as a fresh driver sees them (``ray.nodes()``), with their CPUs."""
        code = ("import json, logging, ray\n"
                f"ray.init(address={self.address!r}, log_to_driver=False, logging_level=logging.ERROR)\n"
                "print(json.dumps([{'NodeID': n['NodeID'], 'CPU': n['Resources'].get('CPU', 0)}\n"
                "                  for n in ray.nodes() if n['Alive']]))\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                             env=self.driver_env(), stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise RuntimeError(f"could not list the cluster's nodes: {out.stderr.strip()[-2000:]}")
        return last_json(out.stdout)

    @contextlib.contextmanager
    def watch_nodes(self, every: float = 0.05):
        """While the block runs, note which node each new process belongs to; yields ``{pid: node index}``.

        A Ray worker is a child of its node's raylet; it lives as long as the
        job that leased it, so a process that ran a call is seen here.
        """
        seen: dict[int, int] = {}
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                for index, proc in enumerate(self._procs):
                    for pid in _descendants(proc.pid):
                        seen.setdefault(pid, index)
                stop.wait(every)

        watcher = threading.Thread(target=poll, name="ray-cluster-watch", daemon=True)
        watcher.start()
        try:
            yield seen
        finally:
            stop.set()
            watcher.join()

    def pids(self) -> set[int]:
        """Every process of this cluster now running (the ``ray start`` processes and below)."""
        found = set()
        for proc in self._procs:
            if proc.poll() is None:
                found |= {proc.pid} | _descendants(proc.pid)
        return found


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Two raylets on this host with token authentication, 1 CPU each; stopped after the module."""
    pytest.importorskip("ray", reason="the Ray backend needs Ray: pip install 'mlwf[ray]'")
    if not sys.platform.startswith("linux"):
        pytest.skip("the cluster fixture reads /proc to stop what it started")
    with RayCluster(tmp_path_factory.mktemp("ray-cluster")) as cluster:
        yield cluster
