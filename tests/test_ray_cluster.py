"""mlwf against a real two-node Ray cluster with token authentication, from fresh driver processes.

The cluster (:mod:`tests.raycluster`) is two raylets on this host started with
``ray start --head`` and ``ray start --address``, 1 CPU each, so the stages'
concurrent calls need both nodes. Each run is ``mlwf run … --backend ray
--ray-address HOST:PORT`` in a new process, as a user would type it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the Ray backend needs Ray: pip install 'mlwf[ray]'")

from mlwf.engine.driver import Engine  # noqa: E402
from tests.conftest import BATCH_PREFIX, FAST, TRAIN_PREFIX  # noqa: E402
from tests.raycluster import last_json  # noqa: E402


FAST_FLAGS = ["--image-size", "16", "--components", "6", "--trees", "12", "--max-depth", "8"]
ROOT = Path(__file__).resolve().parent.parent


def _mlwf(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlwf.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)


def _report(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_cluster_has_two_nodes_of_one_cpu(ray_cluster):
    nodes = ray_cluster.alive_nodes()
    assert len(nodes) == 2 and len({n["NodeID"] for n in nodes}) == 2
    assert [n["CPU"] for n in nodes] == [1.0, 1.0]


def test_both_workflows_on_the_cluster_use_both_nodes_and_match_the_local_backend(ray_cluster, store_url, tmp_path,
                                                                                 local_training):
    env = ray_cluster.driver_env()
    train = ["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url, *FAST_FLAGS, "--json"]
    local = local_training
    trace = tmp_path / "cluster-run.json"
    with ray_cluster.watch_nodes() as node_of:
        remote = _report(_mlwf([*train, "--model-prefix", "ml-inference/model-cluster", "--backend", "ray",
                                "--ray-address", ray_cluster.address, "--trace", str(trace)], env))
    assert remote["backend"] == "ray" and local["backend"] == "local"
    # The calls ran in worker processes of both raylets.
    events = json.loads(trace.read_text())["traceEvents"]
    workers = {int(e["args"]["worker"].rsplit(":", 1)[1]) for e in events
               if e.get("ph") == "X" and "worker" in e.get("args", {})}
    assert {node_of.get(pid) for pid in workers} == {0, 1}
    assert remote["model_digest"] == local["model_digest"]
    assert remote["validation_accuracy"] == local["validation_accuracy"] > 0.5
    assert remote["stages"]["train"]["calls"] == 4

    infer = ["run", "ml-inference", "ml-inference/model-cluster", BATCH_PREFIX, "4", "--store", store_url, "--json"]
    on_cluster = _report(_mlwf([*infer, "--backend", "ray", "--ray-address", ray_cluster.address,
                                "--transfer", "direct"], env))
    here = _report(_mlwf(infer, env))
    assert on_cluster["model_digest"] == here["model_digest"] == remote["model_digest"]
    assert on_cluster["accuracy"] == here["accuracy"] > 0.5
    from mlwf.storage import StoreSpec

    store = StoreSpec(store_url, "tless").open()
    assert store.get(on_cluster["results_key"]) == store.get(here["results_key"])


@pytest.mark.parametrize("mode", ["unset", "token"])
def test_a_driver_without_the_token_is_refused_in_one_line_naming_the_variables(ray_cluster, store_url,
                                                                                 tmp_path, mode):
    # No token anywhere: not in the environment, not at ~/.ray/auth_token of this HOME.
    # With RAY_AUTH_MODE=token Ray's own client would abort the process (a failed check in C++).
    env = ray_cluster.driver_env(HOME=str(tmp_path))
    del env["RAY_AUTH_TOKEN_PATH"]
    if mode == "unset":
        del env["RAY_AUTH_MODE"]
    done = _mlwf(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url, *FAST_FLAGS,
                  "--backend", "ray", "--ray-address", ray_cluster.address], env, timeout=90)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    if mode == "unset":
        assert lines[0].startswith(f"mlwf: error: the Ray cluster at {ray_cluster.address} requires an "
                                   "authentication token: set RAY_AUTH_MODE=token")
    else:
        assert lines[0].startswith("mlwf: error: RAY_AUTH_MODE=token but no authentication token for the Ray "
                                   f"cluster at {ray_cluster.address}")
    assert "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH" in lines[0]


def test_an_empty_token_file_is_no_token(ray_cluster, store_url, tmp_path):
    (tmp_path / "empty").write_text("\n")
    env = ray_cluster.driver_env(RAY_AUTH_TOKEN_PATH=str(tmp_path / "empty"))
    done = _mlwf(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url, *FAST_FLAGS,
                  "--backend", "ray", "--ray-address", ray_cluster.address], env, timeout=90)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "no authentication token" in done.stderr and "RAY_AUTH_TOKEN_PATH" in done.stderr


def test_the_token_file_alone_is_not_enough_the_driver_needs_the_mode_too(ray_cluster, store_url):
    # What docs/ray.md must say: a driver sets RAY_AUTH_MODE=token as well as the token's path.
    env = ray_cluster.driver_env()
    del env["RAY_AUTH_MODE"]
    done = _mlwf(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url, *FAST_FLAGS,
                  "--backend", "ray", "--ray-address", ray_cluster.address], env, timeout=90)
    assert done.returncode == 2
    assert "requires an authentication token" in done.stderr and "RAY_AUTH_MODE=token" in done.stderr


def test_stopping_the_cluster_leaves_none_of_its_processes(tmp_path):
    from tests.raycluster import RayCluster

    cluster = RayCluster(tmp_path / "own", nodes=2).start()
    try:
        pids = cluster.pids()
        assert len(pids) >= 6  # two `ray start`, a GCS, two raylets and their agents
    finally:
        cluster.stop()
    left = [pid for pid in pids if Path(f"/proc/{pid}").exists()
            and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert left == []


# ---------------------------------------------------------------------------------------------- the worker pool
# These run last in the module: a pool, once started, takes the calls of every run on the cluster.
def _pool(command: str, env: dict[str, str], *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return _mlwf(["ray", "pool", command, *extra], env, timeout=timeout)


def _pool_status(ray_cluster, env: dict[str, str]) -> dict:
    done = _pool("status", env, "--ray-address", ray_cluster.address, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


SECRET_VALUE = "pool-test-secret-3f9a0c"
_LOOK = """
import json, logging, sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level=logging.ERROR)
from mlwf.backends.ray import pool

def look(worker, secret):
    import gc, os
    from mlwf.engine import runner
    return {"environment": sorted(k for k, v in os.environ.items() if secret in v),
            "dicts": sum(1 for o in gc.get_objects()
                         if isinstance(o, dict) and any(isinstance(v, str) and secret in v for v in o.values())),
            "open_stores": len(runner._stores)}

workers = ray.get(pool.manager().describe.remote())["workers"]
print(json.dumps(ray.get([w.__ray_call__.remote(look, sys.argv[2]) for w in workers])))
"""


def _look_into_workers(ray_cluster, env: dict[str, str]) -> list[dict]:
    """What each pool worker still holds of :data:`SECRET_VALUE`: in its environment, in any dict, open stores."""
    done = subprocess.run([sys.executable, "-c", _LOOK, ray_cluster.address, SECRET_VALUE], capture_output=True,
                          text=True, env=env, timeout=120, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return last_json(done.stdout)


@pytest.fixture
def pool_env(ray_cluster):
    """The cluster's driver environment; any pool left by the test is stopped afterwards."""
    env = ray_cluster.driver_env()
    yield env
    _pool("stop", env, "--ray-address", ray_cluster.address)


def test_a_fresh_driver_runs_on_the_pool_and_gets_the_local_model(ray_cluster, pool_env, store_url, tmp_path,
                                                                  local_model_digest):
    """A pool's life in one test (each pool start costs seconds): started, used by fresh drivers (both
    transfers, credentials not kept), skipped for bigger stages and --no-ray-pool, its workers dying under
    calls (killed, stuck), then stopped in the middle of a run."""
    env = pool_env
    started = _pool("start", env, "--ray-address", ray_cluster.address, "--json")
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["size"] == 2  # one worker per CPU: one on each node
    before = _pool_status(ray_cluster, env)
    assert before["running"] and before["ready"] and [w["calls"] for w in before["workers"]] == [0, 0]
    assert {w["pid"] for w in before["workers"]} <= ray_cluster.pids()

    train = ["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url, *FAST_FLAGS, "--json"]
    trace = tmp_path / "pool-run.json"
    # Credentials travel with each call and stay with it (a local store does not use them).
    with_keys = {**env, "AWS_ACCESS_KEY_ID": "pool-test-key-id", "AWS_SECRET_ACCESS_KEY": SECRET_VALUE}
    remote = _report(_mlwf([*train, "--model-prefix", "ml-inference/model-pool", "--backend", "ray",
                            "--ray-address", ray_cluster.address, "--trace", str(trace)], with_keys))
    assert remote["model_digest"] == local_model_digest
    assert remote["warnings"] == []
    calls = sum(s["calls"] for s in remote["stages"].values())
    assert remote["ray_pool"] == {"used": True, "workers": 2, "pool_calls": calls, "task_calls": 0}
    # Every call ran in a pool worker, and the workers' own counters moved by as many calls.
    after = _pool_status(ray_cluster, env)
    events = json.loads(trace.read_text())["traceEvents"]
    ran_in = {int(e["args"]["worker"].rsplit(":", 1)[1]) for e in events
              if e.get("ph") == "X" and "worker" in e.get("args", {})}
    assert ran_in and ran_in <= {w["pid"] for w in after["workers"]}
    assert sum(w["calls"] for w in after["workers"]) == calls
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]
    kept = _look_into_workers(ray_cluster, env)
    assert kept == [{"environment": [], "dicts": 0, "open_stores": 0}] * 2

    # --transfer direct, inference, from another fresh driver: the same results as here.
    infer = ["run", "ml-inference", "ml-inference/model-pool", BATCH_PREFIX, "4", "--store", store_url, "--json"]
    on_pool = _report(_mlwf([*infer, "--backend", "ray", "--ray-address", ray_cluster.address,
                             "--transfer", "direct"], env))
    here = _report(_mlwf(infer, env))
    assert on_pool["ray_pool"]["pool_calls"] == sum(s["calls"] for s in on_pool["stages"].values())
    assert on_pool["accuracy"] == here["accuracy"] > 0.5
    from mlwf.storage import StoreSpec

    store = StoreSpec(store_url, "tless").open()
    assert store.get(on_pool["results_key"]) == store.get(here["results_key"])

    # A stage that asks for more than a pool worker offers runs as a task; --no-ray-pool: every call.
    asks = _report(_mlwf([*train, "--no-publish", "--backend", "ray", "--ray-address", ray_cluster.address,
                          "--stage-memory", "train=64"], env))
    assert asks["ray_pool"]["task_calls"] == 4 and asks["ray_pool"]["pool_calls"] == calls - 4
    assert asks["model_digest"] == local_model_digest
    off = _report(_mlwf([*train, "--no-publish", "--backend", "ray", "--ray-address", ray_cluster.address,
                         "--no-ray-pool"], env))
    assert off["ray_pool"] is None and off["model_digest"] == local_model_digest

    # A call stuck past its timeout: its worker is killed (Ray restarts it), the call is retried.
    stuck = _report(_mlwf([*train, "--no-publish", "--backend", "ray", "--ray-address", ray_cluster.address,
                           "--timeout", "5"], {**env, "MLWF_FAULTS": "train:2:hang:1"}))
    assert stuck["model_digest"] == local_model_digest and stuck["stages"]["train"]["attempts"] == 5

    # A pool worker killed mid-run (its process exits under a call): the call is retried, the run finishes.
    crash = {**env, "MLWF_FAULTS": "train:1:exit:1"}
    survived = _report(_mlwf([*train, "--no-publish", "--backend", "ray", "--ray-address", ray_cluster.address],
                             crash))
    assert survived["model_digest"] == local_model_digest
    assert survived["stages"]["train"]["attempts"] == 5
    # ... and with no retry left, it fails in one line.
    crash = {**env, "MLWF_FAULTS": "train:1:exit:1"}
    failed = _mlwf([*train, "--no-publish", "--backend", "ray", "--ray-address", ray_cluster.address,
                    "--retries", "0"], crash)
    assert failed.returncode != 0 and failed.stdout == ""
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlwf: error: ml-training stage train[1] failed: its worker of "
                                                   "the mlwf pool died"), failed.stderr

    # Stopped mid-run: the calls on the pool fail as lost workers and are retried, as tasks in the end.
    # train[1] hangs on its worker until the pool goes away, so the run is still going when it does.
    run = subprocess.Popen([sys.executable, "-m", "mlwf.cli", *train, "--no-publish", "--backend", "ray",
                            "--ray-address", ray_cluster.address, "--timeout", "60"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env={**env, "MLWF_FAULTS": "train:1:hang:1"}, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:  # until the training calls have started (partition and 2 pca calls came first)
            workers = _pool_status(ray_cluster, env)["workers"]
            if sum(w["calls"] for w in workers if w) >= 4 and any(w and w["busy"] for w in workers):
                break
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.2)
        stopped = _pool("stop", env, "--ray-address", ray_cluster.address, "--json")
        out, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["stopped"] is True, stopped.stderr
    assert run.returncode == 0, err
    mid_run = json.loads(out)
    assert mid_run["ray_pool"]["task_calls"] >= 1 and mid_run["model_digest"] == local_model_digest
    assert _pool_status(ray_cluster, env) == {"running": False, "address": ray_cluster.address}
    assert not any(Path(f"/proc/{w['pid']}").exists() for w in workers if w)
    again = _pool("stop", env, "--ray-address", ray_cluster.address)
    assert again.returncode == 0 and "nothing to stop" in again.stdout


def test_a_pool_of_other_code_is_not_used(ray_cluster, pool_env, store_url):
    env = pool_env
    # A pool started with another workflow module: its fingerprint is not this driver's.
    other = {**env, "MLWF_WORKFLOW_MODULES": "tests.tiny_workflow"}
    started = _pool("start", other, "--ray-address", ray_cluster.address, "--size", "1")
    assert started.returncode == 0, started.stderr
    assert "1 workers" in started.stdout and "workflow modules tests.tiny_workflow" in started.stdout
    train = ["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url, *FAST_FLAGS, "--no-publish",
             "--backend", "ray", "--ray-address", ray_cluster.address]
    done = _mlwf(train, env)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("mlwf: warning:")]
    assert len(warnings) == 1 and "the mlwf worker pool on the Ray cluster runs other code" in warnings[0]
    assert "workflow modules tests.tiny_workflow" in warnings[0] and "mlwf ray pool stop" in warnings[0]
    assert _pool_status(ray_cluster, env)["workers"][0]["calls"] == 0
    # A second pool is refused while this one runs.
    twice = _pool("start", env, "--ray-address", ray_cluster.address)
    assert twice.returncode == 2 and twice.stderr.startswith("mlwf: error: a worker pool is already running")


@pytest.mark.parametrize("args, says", [
    (["stop"], "which Ray cluster?"),
    (["stop", "--ray-address", ""], "which Ray cluster?"),
    (["stop", "--ray-address", " "], "which Ray cluster?"),
    (["stop", "--ray-address", "auto"], "name the cluster whose pool to stop"),
    (["start", "--ray-address", "ray://h:10001"], "Ray Client (ray://) addresses are not supported"),
    (["status", "--ray-address", "nohost"], "is not HOST:PORT"),
])
def test_pool_commands_never_guess_the_cluster(args, says, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = _mlwf(["ray", "pool", *args], env, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and says in done.stderr, done.stderr


def test_pool_start_refuses_a_size_the_cluster_cannot_hold(ray_cluster, pool_env):
    for size, says in (("3", "the cluster has 2 CPUs: give a size from 1 to 2"), ("0", "at least 1")):
        done = _pool("start", pool_env, "--ray-address", ray_cluster.address, "--size", size)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and says in done.stderr, done.stderr
    assert _pool_status(ray_cluster, pool_env)["running"] is False


_NOT_A_POOL = """
import logging, sys
import ray
ray.init(address=sys.argv[1], namespace="mlwf", log_to_driver=False, logging_level=logging.ERROR)

@ray.remote(num_cpus=0)
class SomethingElse:
    def ping(self):
        return "pong"

if sys.argv[2] == "make":
    ray.get(SomethingElse.options(name="worker-pool", lifetime="detached").remote().ping.remote())
elif sys.argv[2] == "ping":
    print(ray.get(ray.get_actor("worker-pool").ping.remote()))
else:
    ray.kill(ray.get_actor("worker-pool"))
"""


def test_stop_leaves_alone_an_actor_of_the_same_name_that_is_not_a_pool(ray_cluster, pool_env):
    def other(action: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _NOT_A_POOL, ray_cluster.address, action], capture_output=True,
                              text=True, env=pool_env, timeout=120, cwd=ROOT, stdin=subprocess.DEVNULL)

    assert other("make").returncode == 0
    try:
        for command in ("stop", "status"):
            done = _pool(command, pool_env, "--ray-address", ray_cluster.address)
            assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
            assert "is not an mlwf worker pool (it is a __main__.SomethingElse): mlwf leaves it alone" in done.stderr
        assert other("ping").stdout.strip() == "pong"
    finally:
        other("kill")



# --------------------------------------------------------------------------- a node dies
#: The GCS declares a node dead after about 4 s without an answer instead of Ray's ~15 s (and not sooner: a
#: live raylet starved of CPU on a busy 2-core machine must not be taken for dead).
QUICK_DEATH = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "1000",
               "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "4"}

#: Trees per member: enough for each member to be over Ray's 100 KB, so that it lives in the object store of the
#: node that made it (Ray hands smaller outputs to the driver itself, where no node's death can take them).
NODE_DEATH_TREES = 60

_LOSE_A_NODE = """\
import json, os, signal, sys
from dataclasses import replace
import ray
from mlwf.engine.driver import Engine
from tests.conftest import FAST, TRAIN_PREFIX
from tests.raycluster import _descendants

store, address, node_pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
TREES = int(sys.argv[4])
seen = {}
with Engine(store, "tless", backend="ray", transfer="direct", retries=2,
            backend_options={"address": address}) as engine:
    backend, submit = engine.backend, engine.backend.submit

    def submit_then(call, ctx):
        if call.stage == "score" and not seen:  # every member is in Ray's object store, and nothing read them yet
            mine = ray.get_runtime_context().get_node_id()
            held = backend._held[ctx.run_id]
            where = ray.experimental.get_object_locations(list(held.values()))
            seen["lost"] = sorted(backend._made_by[ctx.run_id][sha][0].name for sha, ref in held.items()
                                  if where[ref]["node_ids"] and mine not in where[ref]["node_ids"])
            for pid in {node_pid} | _descendants(node_pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return submit(call, ctx)

    backend.submit = submit_then
    report = engine.run_training(TRAIN_PREFIX, 2, 4, config=replace(FAST, n_trees=TREES), publish=False)
print(json.dumps({**seen, "digest": report["model_digest"], "warnings": report["warnings"],
                  "attempts": {s: v["attempts"] for s, v in report["stages"].items()}}))
"""


def test_outputs_ray_lost_with_a_node_are_made_again_by_the_calls_that_made_them(tmp_path, store_url):
    """--transfer direct keeps the stages' outputs in Ray's object store, on the node that made them. The second
    node is killed (every process of it) after training and before scoring: the members it made are gone, and
    Ray cannot rebuild them (its task retries are off). The backend runs those training calls again and the run
    ends with the model it makes without the loss."""
    from tests.raycluster import RayCluster

    with Engine(store_url, "tless") as local:
        clean = local.run_training(TRAIN_PREFIX, 2, 4, config=replace(FAST, n_trees=NODE_DEATH_TREES), publish=False)
    with RayCluster(tmp_path / "dying", nodes=2, cpus=1, node_env=QUICK_DEATH) as cluster:
        node = cluster._procs[1]
        done = subprocess.run([sys.executable, "-c", _LOSE_A_NODE, store_url, cluster.address, str(node.pid),
                               str(NODE_DEATH_TREES)],
                              capture_output=True, text=True, timeout=300, env=cluster.driver_env(), cwd=ROOT,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr[-3000:]
        assert node.wait(30) is not None  # the node is really gone, and Ray knows it
        deadline = time.monotonic() + 30
        while len(cluster.alive_nodes()) != 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(cluster.alive_nodes()) == 1
    got = last_json(done.stdout)
    assert got["lost"] and all(name.startswith("train[") for name in got["lost"])  # members only there
    assert got["digest"] == clean["model_digest"]
    # Exactly the calls whose outputs were lost ran again, and the report says which.
    assert got["warnings"] == [f"Ray lost outputs held in its object store (a node died?); {', '.join(got['lost'])} "
                               "ran again to make them"]
    assert got["attempts"]["score"] > 2  # a score call failed on a lost member and was retried
