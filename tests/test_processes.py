"""Nothing is left running when a driver (or ``mlwf serve``) is killed with ``kill -9`` mid-call.

Each test starts the real command in a session of its own, waits until a stage
call is stuck (the test-only ``hang`` fault), kills the session leader with
SIGKILL and checks that every process of the session is gone within seconds:
the local backend's workers, fork server and resource tracker, ``mlwf serve
--workers``' pool, and a local Ray instance (gcs_server, raylet, agents,
workers), which is also checked after a normal run.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import BATCH_PREFIX, TRAIN_PREFIX
from tests.test_knative import SECRET
from tests.s3server import free_port

#: Seconds every process of a killed driver's session gets to exit.
BOUND = 10.0


def _session(sid: int) -> dict[int, str]:
    """Every live process of session ``sid``: {pid: command line} (zombies excluded)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[3]) != sid or fields[0] == b"Z":
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                found[int(name)] = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
        except (OSError, IndexError, ValueError):
            continue
    return found


def _reapers() -> set[int]:
    """The reaper processes running now (they run in sessions of their own)."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if b"mlwf.backends.lifeline" in f.read():
                        found.add(int(name))
            except OSError:
                pass
    return found


def _wait_for_hang(marker: str, proc: subprocess.Popen, log: Path, since: float, timeout: float = 120.0) -> None:
    """Until a stage call is stuck in the hang fault named ``marker`` (its claim file appears)."""
    pattern = os.path.join(tempfile.gettempdir(), "mlwf-faults", "*", marker)
    deadline = time.monotonic() + timeout
    while not any(os.path.getmtime(p) >= since for p in glob.glob(pattern)):
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, "the stage never started: " + log.read_text(errors="replace")
        time.sleep(0.2)
    time.sleep(0.5)  # let the other calls of the stage start too


def _kill_and_expect_nothing_left(proc: subprocess.Popen, at_least: int) -> None:
    sid = proc.pid
    before = _session(sid)
    assert len(before) >= at_least, before  # the driver and what it started
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + BOUND
    while (left := _session(sid)):
        assert time.monotonic() < deadline, f"still running {BOUND} s after kill -9 of the driver: {left}"
        time.sleep(0.2)


def _start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MLWF_", "RAY_ADDRESS"))}
    full.update(env)
    return subprocess.Popen([sys.executable, "-m", "mlwf.cli", *args], stdin=subprocess.DEVNULL,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=full, start_new_session=True)


def test_killing_a_local_run_leaves_no_worker_fork_server_or_tracker(store_url, tmp_path):
    marker = f"train:1:hang:{uuid.uuid4().int % 90 + 10}"
    since = time.time() - 1
    proc = _start(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url, "--workers", "2",
                   "--image-size", "16", "--trees", "4"], tmp_path / "run.log", MLWF_FAULTS=marker)
    _wait_for_hang(marker.replace(":", "-") + "-0", proc, tmp_path / "run.log", since)
    # the driver, the resource tracker, the fork server and two workers
    _kill_and_expect_nothing_left(proc, at_least=5)


def test_killing_mlwf_serve_leaves_no_worker(store_url, tmp_path):
    from mlwf.backends.knative import events
    from mlwf.engine.calls import Call, RunContext

    marker = f"partition:0:hang:{uuid.uuid4().int % 90 + 10}"
    port = free_port()
    since = time.time() - 1
    proc = _start(["serve", "--host", "127.0.0.1", "--port", str(port), "--store", store_url, "--bucket", "tless",
                   "--workers", "2"], tmp_path / "serve.log", MLWF_FAULTS=marker, MLWF_FUNCTION_SECRET=SECRET)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    run = f"kill-{time.time_ns()}"
    ctx = RunContext(run, "ml-inference", store_url, "tless", f"ml-inference/outputs/{run}").to_json()
    call = Call("ml-inference", "partition", 0, {"prefix": BATCH_PREFIX, "num_funcs": 2}).to_json()
    headers, body = events.to_http(events.call_event(call, ctx, SECRET))
    with httpx.Client() as client:
        stuck = client.build_request("POST", f"http://127.0.0.1:{port}", content=body, headers=headers)
        threading.Thread(target=lambda: _ignore(client.send, stuck), daemon=True).start()
        _wait_for_hang(marker.replace(":", "-") + "-0", proc, tmp_path / "serve.log", since)
        # the server, the resource tracker, the fork server and two workers
        _kill_and_expect_nothing_left(proc, at_least=5)


def _ignore(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - the server is killed under it
        pass


def test_killing_a_ray_run_leaves_no_ray_process(store_url, tmp_path):
    pytest.importorskip("ray")
    reapers = _reapers()
    marker = f"train:1:hang:{uuid.uuid4().int % 90 + 10}"
    since = time.time() - 1
    proc = _start(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url, "--backend", "ray",
                   "--image-size", "16", "--trees", "4"], tmp_path / "run.log", MLWF_FAULTS=marker)
    _wait_for_hang(marker.replace(":", "-") + "-0", proc, tmp_path / "run.log", since)
    # the driver, gcs_server, raylet, Ray's monitor, log monitor and agents, and the stuck worker
    _kill_and_expect_nothing_left(proc, at_least=6)
    deadline = time.monotonic() + BOUND
    while _reapers() - reapers:  # and the reaper, its work done, is gone too
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_normal_ray_run_leaves_no_ray_process(store_url, tmp_path):
    pytest.importorskip("ray")
    reapers = _reapers()
    proc = _start(["run", "ml-inference", "ml-inference/model", BATCH_PREFIX, "2", "--store", store_url,
                   "--backend", "ray"], tmp_path / "run.log")
    # No model yet: the run fails at once, after Ray started; what matters is what it leaves.
    assert proc.wait(120) == 2, (tmp_path / "run.log").read_text()
    deadline = time.monotonic() + BOUND
    while (left := _session(proc.pid)) or _reapers() - reapers:
        assert time.monotonic() < deadline, f"left running after the run: {left or 'the reaper'}"
        time.sleep(0.2)
