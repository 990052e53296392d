"""mlwf against a real two-node Ray cluster with token authentication, from fresh driver processes.

The cluster (:mod:`tests.raycluster`) is two raylets on this host started with
``ray start --head`` and ``ray start --address``, 1 CPU each, so the stages'
concurrent calls need both nodes. Each run is ``mlwf run … --backend ray
--ray-address HOST:PORT`` in a new process, as a user would type it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the Ray backend needs Ray: pip install 'mlwf[ray]'")

from tests.conftest import BATCH_PREFIX, TRAIN_PREFIX  # noqa: E402

pytest_plugins = ["tests.raycluster"]

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


def test_both_workflows_on_the_cluster_use_both_nodes_and_match_the_local_backend(ray_cluster, store_url, tmp_path):
    env = ray_cluster.driver_env()
    train = ["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url, *FAST_FLAGS, "--json"]
    local = _report(_mlwf([*train, "--model-prefix", "ml-inference/model-local"], env))
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


#: RAY_AUTH_MODE=token with no token anywhere makes Ray's own client abort (a failed check in
#: C++, no exception), which mlwf's probe reports as "no Ray cluster answers"; it should say
#: which variable to set, as it does when the mode is unset.
_ABORTS = pytest.mark.xfail(strict=True, reason="mlwf's probe misreads Ray's abort as 'no Ray cluster answers'")


@pytest.mark.parametrize("mode", ["unset", pytest.param("token", marks=_ABORTS)])
def test_a_driver_without_the_token_is_refused_in_one_line_naming_the_variables(ray_cluster, store_url,
                                                                                 tmp_path, mode):
    # No token anywhere: not in the environment, not at ~/.ray/auth_token of this HOME.
    env = ray_cluster.driver_env(HOME=str(tmp_path))
    del env["RAY_AUTH_TOKEN_PATH"]
    if mode == "unset":
        del env["RAY_AUTH_MODE"]
    done = _mlwf(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url, *FAST_FLAGS,
                  "--backend", "ray", "--ray-address", ray_cluster.address], env, timeout=90)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"mlwf: error: the Ray cluster at {ray_cluster.address} requires an "
                               "authentication token")
    assert "RAY_AUTH_MODE=token" in lines[0] and "RAY_AUTH_TOKEN_PATH" in lines[0]


def test_the_token_file_alone_is_not_enough_the_driver_needs_the_mode_too(ray_cluster, store_url):
    # What the README must say: a driver sets RAY_AUTH_MODE=token as well as the token's path.
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
