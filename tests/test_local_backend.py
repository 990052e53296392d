"""The local backend from a user's seat: worker start-up as its own figure, scripts without a
``__main__`` guard, and a driver that imports only what it needs."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from mlwf.engine import trace
from mlwf.engine.driver import Engine
from mlwf.backends.local import LocalBackend, LocalConfig
from mlwf.errors import StageError, UsageError
from tests.conftest import BATCH_PREFIX, FAST, TRAIN_PREFIX

REPO = Path(__file__).resolve().parent.parent


def _python(args: list[str], cwd, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLWF_")}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_a_fresh_engine_reports_worker_start_up_apart_from_its_stages(store_url):
    clock = trace.StageClock()
    with Engine(store_url, "tless", progress=clock) as engine:
        cold = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
        doc = trace.build(engine.last_run, cold, clock)
        warm = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    assert cold["startup_ms"] > 0 and warm["startup_ms"] == 0
    assert cold["e2e_ms"] > cold["startup_ms"]

    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    [startup] = [e for e in spans if e["cat"] == "startup"]
    assert startup["name"] == "worker start-up"
    assert startup["args"]["startup_ms"] == pytest.approx(cold["startup_ms"])
    assert startup["dur"] == pytest.approx(cold["startup_ms"] * 1e3, rel=0.01)
    ready = startup["ts"] + startup["dur"]
    # No stage, on the driver or in a worker, began before the workers were up.
    stages = [e for e in spans if e["cat"] in ("stage", "call")]
    assert {e["name"] for e in stages} >= {"partition", "partition[0]"}
    assert all(e["ts"] >= ready for e in stages), (ready, sorted((e["ts"], e["name"]) for e in stages)[:3])
    procs = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name"}
    assert procs[startup["pid"]] == "driver"


def test_the_driver_imports_no_scikit_learn(store_url, tmp_path):
    # The stages need scikit-learn; the driver only records its version.
    script = textwrap.dedent(f"""
        import importlib.metadata, json, sys
        import mlwf
        from mlwf.workflows.training import TrainingConfig
        with mlwf.Engine({store_url!r}, "tless") as engine:
            engine.run_training({TRAIN_PREFIX!r}, 2, 2, model_prefix="m",
                                config=TrainingConfig(image_size=8, n_components=4, n_trees=4, max_depth=4))
            engine.run_inference("m", {BATCH_PREFIX!r}, 2)
        print(json.dumps({{"imported": sorted(m for m in sys.modules if m.split(".")[0] in ("sklearn", "scipy")),
                          "installed": importlib.metadata.version("scikit-learn")}}))
    """)
    proc = _python(["-c", script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["imported"] == []
    import mlwf.model

    model = mlwf.model.load("m", store=store_url, bucket="tless")
    assert model.config["trained_with"]["scikit-learn"] == out["installed"]


PRELOADED = """
import contextlib
import json
from mlwf.backends.local import LocalBackend, LocalConfig
from tests import loaded_modules

backend = LocalBackend(LocalConfig(workers=1, workflow={workflow!r}))
try:
    backend.warm_up()
    print(json.dumps(backend._start().submit(loaded_modules.loaded).result()))
finally:
    backend.close()
"""
TRAINING_CODE = {"mlwf.workflows.training", "sklearn.decomposition", "sklearn.ensemble", "mlwf.workflows.warmup"}
INFERENCE_CODE = {"mlwf.workflows.inference", "mlwf.model", "mlwf.images"}


@pytest.mark.parametrize("workflow, has, lacks", [
    ("ml-training", TRAINING_CODE, set()),
    ("ml-inference", INFERENCE_CODE, {"sklearn", "scipy", "mlwf.workflows.warmup"}),
    ("tiny-squares", {"tests.tiny_workflow"}, {"sklearn", "scipy", "mlwf.workflows.warmup"}),
    (None, TRAINING_CODE | INFERENCE_CODE | {"tests.tiny_workflow"}, set()),
])
def test_the_fork_server_imports_what_the_workflows_stages_import(workflow, has, lacks):
    # A fresh process each (the fork server is one per process), with a third workflow named in
    # MLWF_WORKFLOW_MODULES. Workers start with what the fork server imported, frozen for the
    # garbage collector; an inference-only process never pays for scikit-learn.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLWF_")},
           "MLWF_WORKFLOW_MODULES": "tests.tiny_workflow"}
    proc = subprocess.run([sys.executable, "-c", PRELOADED.format(workflow=workflow)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    modules = set(found["modules"])
    assert has <= modules, has - modules
    assert not {m for m in modules if m in lacks or m.split(".")[0] in lacks}
    assert found["frozen"] > 10_000


def test_a_workflow_module_that_raises_in_the_fork_server_does_not_end_it(tmp_path):
    script = textwrap.dedent(f"""
        from mlwf.storage import StoreSpec
        from mlwf.engine.driver import Engine
        StoreSpec({str(tmp_path / "store")!r}, "tless").open().create_bucket()
        with Engine({str(tmp_path / "store")!r}, "tless", workers=1) as engine:
            print(engine.run("tiny-squares", [1, 2, 3], 2)["sum"])
    """)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLWF_")},
           "MLWF_WORKFLOW_MODULES": "tests.raises_in_fork_server"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["14"]


def test_mlwf_run_asks_for_the_fork_server_of_its_workflow(capsys, trained, store_url, monkeypatch):
    from mlwf.backends import forkserver
    from mlwf.cli import main

    asked, start = [], forkserver.start
    monkeypatch.setattr(forkserver, "start", lambda workflow=None: (asked.append(workflow), start(workflow))[1])
    assert main(["run", "ml-inference", "ml-inference/model", BATCH_PREFIX, "2", "--store", store_url,
                 "--json"]) == 0
    assert asked and set(asked) == {"ml-inference"}


def test_engines_starting_in_two_threads_leave_the_environment_as_it_was(monkeypatch):
    """The fork server's variables live in this process's environment only while it starts. Two threads
    starting at once must not save each other's variables and put them back for good."""
    import multiprocessing.forkserver

    from mlwf.backends import forkserver
    from mlwf.settings import BLAS_THREAD_VARIABLES, DRIVER_MAIN_VARIABLE, PRELOAD_WORKFLOW_VARIABLE

    names = (*BLAS_THREAD_VARIABLES, DRIVER_MAIN_VARIABLE, PRELOAD_WORKFLOW_VARIABLE)
    for name in names:
        monkeypatch.delenv(name, raising=False)
    both_inside, arrived, lock = threading.Barrier(2, timeout=1), [], threading.Lock()

    def ensure_running():  # no real server: hold the first thread here until the second comes, if it can
        with lock:
            arrived.append(threading.current_thread().name)
            second = len(arrived) == 2
        with contextlib.suppress(threading.BrokenBarrierError):
            both_inside.wait()
        if second:
            time.sleep(0.2)  # the second to come in restores last: what it saved is what stays

    monkeypatch.setattr(multiprocessing.forkserver, "ensure_running", ensure_running)
    threads = [threading.Thread(target=forkserver.start, args=(w,)) for w in ("ml-training", "ml-inference")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(arrived) == 2
    assert {name: os.environ.get(name) for name in names} == dict.fromkeys(names)


UNGUARDED = """\
import contextlib
import json
import mlwf
from mlwf.workflows.training import TrainingConfig

print("the script ran", flush=True)
with mlwf.Engine({store!r}, "tless") as engine:
    report = engine.run_training({train!r}, 2, 4, model_prefix="scripted",
                                 config=TrainingConfig(image_size=8, n_components=4, n_trees=4, max_depth=4))
print(json.dumps({{"digest": report["model_digest"]}}))
"""


@pytest.mark.parametrize("how", ["file", "module"])
def test_a_script_without_a_main_guard_runs_once(store_url, tmp_path, how):
    code = UNGUARDED.format(store=store_url, train=TRAIN_PREFIX)
    if how == "file":
        (tmp_path / "train_it.py").write_text(code)
        args = ["train_it.py"]
    else:
        (tmp_path / "jobs").mkdir()
        (tmp_path / "jobs" / "__init__.py").write_text("")
        (tmp_path / "jobs" / "train_it.py").write_text(code)
        args = ["-m", "jobs.train_it"]
    proc = _python(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "the script ran" and len(lines) == 2, proc.stdout  # the workers never ran it
    assert len(json.loads(lines[1])["digest"]) == 64
    assert "Traceback" not in proc.stderr


class _DyingBackend(LocalBackend):
    """Workers that die as they start, as they do when something kills them before their first call."""

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=mp.get_context("forkserver"), initializer=os._exit,
                                             initargs=(3,))
        return self._pool


@pytest.mark.parametrize("workflow", ["", " ", "ml-training\0", 3])
def test_a_local_config_refuses_a_workflow_that_names_none(workflow):
    with pytest.raises(UsageError, match="workflow= names the workflow"):
        LocalConfig(workflow=workflow)


def test_workers_dying_as_they_start_is_one_line_saying_what_to_do():
    backend = _DyingBackend(LocalConfig(workers=1))
    try:
        with pytest.raises(StageError) as info:
            backend.warm_up()
    finally:
        backend.close()
    message = str(info.value)
    assert "\n" not in message and "died as they started" in message
    assert "if __name__ == \"__main__\":" in message


KEEPS = """
import contextlib
import json
from mlwf.backends.local import LocalBackend, LocalConfig
from tests import worker_probe

backend = LocalBackend(LocalConfig(workers=1, workflow="tiny-squares", keep_freed_bytes={keep}))
try:
    print(json.dumps([backend._start().submit(worker_probe.allocate_and_free, 300 << 20).result()
                      for _ in range(2)]))
finally:
    backend.close()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="workers keep freed memory through glibc's allocator only")
@pytest.mark.parametrize("keep, kept", [(1 << 30, True), (64 << 20, False), (0, False)])
def test_a_worker_keeps_freed_memory_for_its_next_call_up_to_its_bound(keep, kept):
    # The second call reuses what the first freed: a large array costs no fresh page faults
    # (dear on a VM whose host takes freed memory back). Beyond the bound, or with 0, it goes back.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLWF_")},
           "MLWF_WORKFLOW_MODULES": "tests.tiny_workflow"}
    proc = subprocess.run([sys.executable, "-c", KEEPS.format(keep=keep)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    first, second = json.loads(proc.stdout)
    assert first["holding"] - first["before"] > 250 << 20, first  # the array was written, so resident
    assert (first["after"] - first["before"] > 250 << 20) is kept, first
    if kept:  # the second call found its memory already there
        assert second["before"] - first["before"] > 250 << 20 and second["holding"] - first["holding"] < 20 << 20
    else:
        assert second["holding"] - second["before"] > 250 << 20 and second["after"] - first["before"] < 50 << 20


@pytest.mark.parametrize("keep", [-1, True, 1 << 31, 1.5, "1", None])
def test_a_local_config_refuses_a_bound_on_kept_memory_that_is_not_a_byte_count(keep):
    with pytest.raises(UsageError, match="keep_freed_bytes= must be an integer from 0 to 2,147,483,647"):
        LocalConfig(keep_freed_bytes=keep)


FOREIGN_FORK_SERVER = """
import json, multiprocessing as mp, os
from mlwf.engine.driver import Engine
from mlwf.workflows.training import TrainingConfig
from tests import worker_probe

if __name__ == "__main__":
    process = mp.get_context("forkserver").Process(target=os.getpid)  # a fork server mlwf did not start
    process.start()
    process.join()
    with Engine({store!r}, "tless") as engine:
        report = engine.run_training({prefix!r}, 2, 8, config=TrainingConfig())
        threads = engine.backend._start().submit(worker_probe.blas_threads).result()
    print(json.dumps({{"digest": report["model_digest"], "threads": threads}}))
"""


def test_a_fork_server_started_by_someone_else_still_trains_the_same_model_bytes(store_url):
    # The program used multiprocessing's fork server before mlwf: it preloaded nothing and set no
    # BLAS threads. The workers still pin every BLAS (SciPy's own, loaded later, too) to one thread,
    # so the model is the one any other run publishes.
    from tests.test_golden import _golden

    golden = _golden("default-2-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLWF_") and not k.endswith("_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", FOREIGN_FORK_SERVER.format(store=store_url, prefix=TRAIN_PREFIX)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["threads"] and set(out["threads"]) == {1}
    assert out["digest"] == golden
