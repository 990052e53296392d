"""The Ray backend: both workflows on one real Ray instance (started once for the session).

Every run is compared with the local backend on the same store: same images and
seed, same model bytes and the same predictions, whichever way state moves.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray backend needs Ray: pip install 'mlwf[ray]'")

import mlwf.model  # noqa: E402
from mlwf import bulk  # noqa: E402
from mlwf.cli import main  # noqa: E402
from mlwf.engine.driver import Engine  # noqa: E402
from mlwf.backends.ray import RayBackend, RayConfig  # noqa: E402
from mlwf.errors import DataError, StageError, UsageError  # noqa: E402
from mlwf.storage import StoreSpec  # noqa: E402
from tests.conftest import BATCH_PREFIX, FAST, TRAIN_PREFIX  # noqa: E402
from tests.raycluster import last_json  # noqa: E402
from tests.s3server import free_port  # noqa: E402

FAST_FLAGS = ["--image-size", "16", "--components", "6", "--trees", "12", "--max-depth", "8"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def ray_instance():
    """One Ray instance for the whole session: 2 CPUs, no dashboard, worker output in log files."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    yield
    if started:
        ray.shutdown()


def _predictions(engine: Engine, report: dict) -> list[list[str]]:
    return list(csv.reader(io.StringIO(engine.store.get(report["results_key"]).decode())))


def _one_error_line(capsys, argv) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlwf: error: "), err
    return lines[0]


def _cli(args: list[str], env: dict | None = None, prelude: str = "", timeout: float = 60):
    """``mlwf ARGS`` in a fresh interpreter (no Ray initialised in it); returns (code, stdout, stderr, s)."""
    code = f"import sys\n{prelude}\nfrom mlwf.cli import main\nsys.exit(main({args!r}))\n"
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})})
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t


# --------------------------------------------------------------------------- both workflows
@pytest.mark.parametrize("transfer", ["store", "direct"])
def test_both_workflows_on_ray_match_the_local_backend(store_url, transfer, local_reference):
    local_trained, local_inferred, local_rows = local_reference.trained, local_reference.inferred, local_reference.rows

    with Engine(store_url, "tless", backend="ray", transfer=transfer) as engine:
        trained = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
        inferred = engine.run_inference("ml-inference/model", BATCH_PREFIX, 4)
        rows = _predictions(engine, inferred)
        written = [o.key for o in engine.store.list(f"ml-training/outputs/{trained['run_id']}/")]
        # The dashboard (mlwf ui) shows a Ray run as any other: its backend, one bar per call from its trace.
        from mlwf.ui.views import run_detail

        shown = run_detail(engine.store, trained["run_id"])
        assert shown["backend"] == "ray" and shown["trace"] is True
        assert len(shown["calls"]) == sum(s["calls"] for s in trained["stages"].values())
        # --state heavy (pixels and whole feature matrices between the tasks): the same model and predictions.
        heavy = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False, state="heavy")
        heavy_rows = _predictions(engine, engine.run_inference("ml-inference/model", BATCH_PREFIX, 4, state="heavy"))
    assert heavy["model_digest"] == local_trained["model_digest"] and heavy_rows == local_rows

    assert trained["backend"] == inferred["backend"] == "ray" and trained["transfer"] == transfer
    assert trained["model_digest"] == local_trained["model_digest"]
    assert trained["validation_accuracy"] == local_trained["validation_accuracy"]
    assert inferred["model_digest"] == local_trained["model_digest"]
    assert rows == local_rows and len(rows) == 121  # header + 120 images, same predictions and probabilities
    assert inferred["accuracy"] == local_inferred["accuracy"]

    edges = {(e["from"], e["to"]): e for e in trained["edges"]}
    assert edges[("pca", "train")]["bytes"] > 0 and edges[("train", "score")]["bytes"] > 0
    assert all(e["transfer_ms"] >= 0 and e["deserialize_ms"] >= 0 for e in trained["edges"])
    if transfer == "direct":
        # Intermediates went task to task through Ray's object store: only the run record is in the store.
        # Only the run's record and its trace (what mlwf ui draws the calls from) are in the store.
        assert written == [f"ml-training/outputs/{trained['run_id']}/{name}" for name in ("run.json", "trace.json")]
        assert trained["stages"]["train"]["put_ms"] > 0 and trained["stages"]["train"]["input_get_ms"] > 0
    else:
        assert any("/train/" in k for k in written)


def test_a_worker_killed_mid_call_is_rerun_by_the_driver_with_the_same_model(store_url, monkeypatch,
                                                                              local_model_digest):
    monkeypatch.setenv("MLWF_FAULTS", "train:1:exit:1")  # reaches the workers through runtime_env
    with Engine(store_url, "tless", backend="ray", transfer="direct", retries=1) as engine:
        report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    assert report["model_digest"] == local_model_digest
    # The worker did die (the fault was claimed) and the driver, not Ray, ran the call again: one budget.
    assert (Path(tempfile.gettempdir()) / "mlwf-faults" / report["run_id"] / "train-1-exit-1-0").exists()
    assert report["stages"]["train"]["attempts"] == 5
    monkeypatch.setenv("MLWF_FAULTS", "train:1:exit:1")
    with Engine(store_url, "tless", backend="ray", transfer="direct", retries=0) as engine, \
            pytest.raises(StageError, match=r"train\[1\] failed: its Ray worker died"):
        engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)


@ray.remote(num_cpus=0)
def _small():
    return b"gone"


@ray.remote(num_cpus=0)
class _Owner:
    def make(self):
        return [_small.remote()]  # a small result lives in its owner's memory, this actor's


def _a_lost_object():
    """A real ObjectRef whose object Ray lost: the actor that owned it was killed."""
    owner = _Owner.remote()
    [ref] = ray.get(owner.make.remote())
    ray.kill(owner)
    with pytest.raises(ray.exceptions.ObjectLostError):
        ray.get(ref, timeout=60)
    return ref


def test_outputs_ray_lost_are_made_again_before_a_call_or_the_driver_reads_them(store_url, local_model_digest):
    """What a node's death does to --transfer direct (tests/test_ray_cluster.py kills a real node): a member
    is lost before scoring reads it, the model before the driver reads it. Both are made again."""
    lost = _a_lost_object()
    with Engine(store_url, "tless", backend="ray", transfer="direct", retries=1) as engine:
        backend = engine.backend
        submit, read = backend.submit, backend.read

        def lose(made_by_stage: str) -> None:
            for run_id, made in backend._made_by.items():
                for sha, (call, _) in made.items():
                    if call.name == made_by_stage:
                        backend._held[run_id][sha] = lost

        done: set[str] = set()

        def submit_losing_a_member(call, ctx):
            if call.stage == "score" and not done & {"train[1]"}:
                done.add("train[1]")
                lose("train[1]")
            return submit(call, ctx)

        def read_losing_the_model(ref):
            if not done & {"validation[0]"}:
                done.add("validation[0]")
                lose("validation[0]")
            return read(ref)

        backend.submit, backend.read = submit_losing_a_member, read_losing_the_model
        report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, model_prefix="ml-inference/model-remade")
        published = mlwf.model.load("ml-inference/model-remade", store=engine.store)
    assert report["model_digest"] == local_model_digest == published.digest
    assert report["warnings"] == ["Ray lost outputs held in its object store (a node died?); train[1], validation[0] "
                                  "ran again to make them"]
    assert report["stages"]["score"]["attempts"] > 2  # a score call failed on the lost member and was retried


def test_many_outputs_lost_at_once_cost_one_retry_though_ray_reports_them_one_by_one(store_url):
    """A node takes every output it held, but a call that reads them fails on the first lost one only. With
    --retries 1, three lost members must all be made again within the one retry."""
    # The local run of its own (not the session's reference) also lets the previous test's Ray instance wind
    # down first: started straight after it, this run's calls raced its shutdown and failed twice in CI.
    with Engine(store_url, "tless") as local:
        clean = local.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    lost = {name: _a_lost_object() for name in ("train[0]", "train[2]", "train[3]")}
    with Engine(store_url, "tless", backend="ray", transfer="direct", retries=1) as engine:
        backend, submit = engine.backend, engine.backend.submit

        def submit_losing_members(call, ctx):
            if call.stage == "score" and lost:
                for sha, (maker, _) in backend._made_by[ctx.run_id].items():
                    if maker.name in lost:
                        backend._held[ctx.run_id][sha] = lost[maker.name]
                lost.clear()
            return submit(call, ctx)

        backend.submit = submit_losing_members
        report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    assert report["model_digest"] == clean["model_digest"]
    assert report["warnings"] == ["Ray lost outputs held in its object store (a node died?); train[0], train[2], "
                                  "train[3] ran again to make them"]
    assert report["stages"]["score"]["attempts"] <= 4  # two score calls, each at most once more


def test_a_hung_call_is_timed_out_its_worker_killed_and_the_call_rerun(store_url, monkeypatch):
    # A local run of its own first, as in the test above, so the last test's Ray instance has wound down.
    with Engine(store_url, "tless") as local:
        clean = local.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    monkeypatch.setenv("MLWF_FAULTS", "train:1:hang:1")
    # The hang is endless, so any timeout finds it; 10 s, not 3, lets a rerun on a Ray worker that is started
    # afresh (importing scikit-learn) finish in time: at 3 s, CI saw all three attempts of a healthy call time out.
    with Engine(store_url, "tless", backend="ray", transfer="direct", stage_timeouts={"train": 10}) as engine:
        report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
        assert report["model_digest"] == clean["model_digest"]
        deadline = time.monotonic() + 10  # the stuck task was cancelled: its CPU comes back
        while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU", 0) == 2


def test_a_stage_error_on_ray_is_the_stages_own_one_line_error(store_url):
    with Engine(store_url, "tless", backend="ray") as engine, \
            pytest.raises(DataError, match=r"^no objects under prefix 'ml-training/nothing/'"):
        engine.run_training("ml-training/nothing", 2, 4, config=FAST)


def test_s3_settings_reach_the_ray_workers(s3_env, digits_dir, local_model_digest):
    store = StoreSpec("s3://", s3_env).open()
    bulk.upload_dir(store, digits_dir / "train", TRAIN_PREFIX)
    with Engine("s3://", s3_env, backend="ray") as engine:
        report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    assert report["model_digest"] == local_model_digest
    assert any(o.key.startswith(f"ml-training/outputs/{report['run_id']}/train/")
               for o in store.list("ml-training/outputs/"))


# --------------------------------------------------------------------------- command line
def test_cli_runs_both_workflows_on_ray_with_one_json_report_each(capsys, store_url):
    where = ["--store", store_url, "--bucket", "tless", "--backend", "ray"]
    assert main(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--json", "--transfer", "direct",
                 "--stage-cpus", "train=1", "--stage-memory", "train=64", *where, *FAST_FLAGS]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1, out
    train = json.loads(out)
    assert train["backend"] == "ray" and train["transfer"] == "direct" and train["num_images"] == 600
    assert main(["run", "ml-inference", "ml-inference/model", BATCH_PREFIX, "3", "--json", *where]) == 0
    out, err = capsys.readouterr()
    infer = json.loads(out)
    assert infer["backend"] == "ray" and infer["num_predicted"] == 120
    assert infer["model_digest"] == train["model_digest"]


def test_without_ray_installed_the_cli_says_how_to_install_it(store_url):
    code, out, err, _ = _cli(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--backend", "ray",
                              "--store", store_url, *FAST_FLAGS], prelude="sys.modules['ray'] = None")
    assert code == 2 and out == ""
    assert err.splitlines() == ["mlwf: error: the Ray backend needs Ray: pip install 'mlwf[ray]'"]


def test_an_address_where_nothing_listens_fails_at_once_with_one_line(store_url):
    port = free_port()
    code, out, err, took = _cli(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--backend", "ray",
                                 "--ray-address", f"127.0.0.1:{port}", "--store", store_url, *FAST_FLAGS])
    assert code == 2 and out == "" and took < 15, (took, err)
    [line] = err.splitlines()
    assert line.startswith(f"mlwf: error: no Ray cluster answers at 127.0.0.1:{port} (")
    assert "--ray-address" in line and "leave it unset to start a local Ray instance" in line
    # A pool command has no local instance to fall back to: its line does not suggest one.
    code, out, err, took = _cli(["ray", "pool", "status", "--ray-address", f"127.0.0.1:{port}"])
    assert code == 2 and out == "" and took < 15, (took, err)
    [line] = err.splitlines()
    assert line.startswith(f"mlwf: error: no Ray cluster answers at 127.0.0.1:{port} (") and "unset" not in line


def test_an_address_that_accepts_but_never_answers_fails_within_the_bound(store_url):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    accepted = []
    threading.Thread(target=lambda: accepted.extend(silent.accept() for _ in range(2)), daemon=True).start()
    try:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        code, out, err, took = _cli(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--backend", "ray",
                                     "--ray-address", address, "--store", store_url, *FAST_FLAGS],
                                    env={"MLWF_RAY_CONNECT_TIMEOUT": "3"})
    finally:
        silent.close()
    assert code == 2 and out == "" and took < 12, (took, err)
    [line] = err.splitlines()
    assert line.startswith(f"mlwf: error: no Ray cluster answers at {address} (")


def test_more_cpus_or_memory_than_any_node_is_refused_before_anything_runs(capsys, store_url):
    where = ["--store", store_url, "--bucket", "tless", "--backend", "ray"]
    t = time.monotonic()
    line = _one_error_line(capsys, ["run", "ml-training", TRAIN_PREFIX, "2", "4", "--stage-cpus", "train=64",
                                    *where, *FAST_FLAGS])
    assert "stage train asks for 64 CPUs per call, but no node of the Ray cluster has that much" in line
    assert "--stage-cpus" in line
    line = _one_error_line(capsys, ["run", "ml-training", TRAIN_PREFIX, "2", "4", "--stage-memory",
                                    "pca=100000000", *where, *FAST_FLAGS])
    assert "stage pca asks for 1 CPU and 100000000 MB per call" in line
    assert time.monotonic() - t < 10
    assert not list(StoreSpec(store_url, "tless").open().list("ml-training/outputs/"))  # no run was started


@pytest.mark.parametrize("flag, match", [
    (["--stage-cpus", "train"], "--stage-cpus 'train': expected STAGE=N"),
    (["--stage-cpus", "train=0"], "--stage-cpus 'train=0': expected STAGE=N"),
    (["--stage-memory", "train=lots"], "--stage-memory 'train=lots': expected STAGE=MB"),
    (["--stage-cpus", "fit=2"], "unknown stage 'fit'"),
])
def test_bad_stage_resource_flags_are_one_line(capsys, store_url, flag, match):
    line = _one_error_line(capsys, ["run", "ml-training", TRAIN_PREFIX, "2", "4", "--backend", "ray",
                                    "--store", store_url, *flag])
    assert match in line


def test_a_local_store_with_a_remote_cluster_needs_shared_store(capsys, store_url):
    line = _one_error_line(capsys, ["run", "ml-training", TRAIN_PREFIX, "2", "4", "--backend", "ray",
                                    "--ray-address", "10.1.2.3:6379", "--store", store_url, *FAST_FLAGS])
    assert f"the store {store_url} is a directory on this machine" in line
    assert "10.1.2.3:6379" in line and "--shared-store" in line and "s3://" in line
    # Stated as shared, or on S3, the same cluster is accepted (checked before connecting).
    cluster = RayConfig(address="10.1.2.3:6379")
    RayBackend(replace(cluster, shared_store=True))._check_store_before_connecting(StoreSpec(store_url, "tless"))
    RayBackend(cluster)._check_store_before_connecting(StoreSpec("s3://", "tless"))


def test_a_local_store_is_refused_when_the_joined_cluster_has_nodes_elsewhere(store_url, monkeypatch):
    backend = RayBackend()
    spec = StoreSpec(store_url, "tless")
    nodes = [{"Alive": True, "NodeManagerAddress": "10.9.8.7", "Resources": {"CPU": 4.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    with pytest.raises(UsageError, match=r"nodes on other hosts \(10\.9\.8\.7\).*--shared-store"):
        backend._check_store(spec)
    RayBackend(RayConfig(shared_store=True))._check_store(spec)


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1", "1e9", "soon"])
def test_a_connect_timeout_that_is_not_a_sane_number_of_seconds_is_refused(monkeypatch, value):
    monkeypatch.setenv("MLWF_RAY_CONNECT_TIMEOUT", value)
    with pytest.raises(UsageError, match=r"MLWF_RAY_CONNECT_TIMEOUT must be a number of seconds") as info:
        RayBackend(RayConfig(address="127.0.0.1:1"))
    assert value in str(info.value) and "\n" not in str(info.value)


def test_the_pool_fingerprint_changes_with_any_file_of_the_code_and_nothing_else(tmp_path):
    import shutil

    import mlwf
    from mlwf.backends.ray.pool import code_fingerprint, digest_code

    package = tmp_path / "a" / "mlwf"
    shutil.copytree(Path(mlwf.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    module = tmp_path / "tiny.py"
    module.write_text("WORKFLOW = None\n")
    first = digest_code("0.1.0", package, {"tiny": module})
    # The same code elsewhere (another node's installation) has the same fingerprint; this one's, too.
    moved = tmp_path / "b" / "mlwf"
    shutil.copytree(package, moved)
    assert digest_code("0.1.0", moved, {"tiny": module}) == first
    assert digest_code(mlwf.__version__, Path(mlwf.__file__).parent, {}) == code_fingerprint(())
    # Another version, a changed byte, a new file, another workflow module, a changed module: not the same.
    changed = []
    changed.append(digest_code("0.1.1", package, {"tiny": module}))
    runner = package / "engine" / "runner.py"
    runner.write_bytes(runner.read_bytes() + b" ")
    changed.append(digest_code("0.1.0", package, {"tiny": module}))
    runner.write_bytes(runner.read_bytes()[:-1])
    assert digest_code("0.1.0", package, {"tiny": module}) == first
    (package / "extra.py").write_text("")
    changed.append(digest_code("0.1.0", package, {"tiny": module}))
    (package / "extra.py").unlink()
    changed.append(digest_code("0.1.0", package, {}))
    module.write_text("WORKFLOW = 1\n")
    changed.append(digest_code("0.1.0", package, {"tiny": module}))
    assert len({first, *changed}) == 1 + len(changed)


def test_a_workflow_module_the_pool_cannot_find_is_one_line():
    from mlwf.backends.ray.pool import code_fingerprint
    from mlwf.errors import UsageError

    with pytest.raises(UsageError, match=r"^MLWF_WORKFLOW_MODULES names 'tests.no_such_module', which cannot be "
                                         r"found here"):
        code_fingerprint(("tests.no_such_module",))


def test_the_local_ray_instance_mlwf_starts_listens_on_loopback_only(store_url):
    """--backend ray with no address starts a Ray instance for the run: none of its processes (the driver,
    GCS, raylet, runtime-env agent, workers) accepts a connection from another machine."""
    probe = (
        "import json, os, sys\n"
        "import ray\n"
        "from mlwf.engine.driver import Engine\n"
        "from tests.procfs import descendants, listening_sockets\n"
        "def pid():\n"
        "    return os.getpid()\n"
        "with Engine(sys.argv[1], 'tless', backend='ray') as engine:\n"
        "    assert ray.get(ray.remote(pid).remote()) != os.getpid()  # a worker runs\n"
        "    print(json.dumps(listening_sockets(descendants(os.getpid()))))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLWF_"))}
    done = subprocess.run([sys.executable, "-c", probe, store_url], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    sockets = last_json(done.stdout)
    assert len({pid for _, _, pid in sockets}) >= 3, sockets  # the driver, GCS and raylet at least
    from tests.procfs import is_loopback

    assert [s for s in sockets if not is_loopback(s[0])] == [], sockets


class _Object:
    """Stands in for an ObjectRef in the lineage's bookkeeping, which reads only its id."""

    def __init__(self, hex_id: str):
        self._hex = hex_id

    def hex(self) -> str:
        return self._hex


def test_a_call_that_finds_an_input_lost_after_another_call_made_it_again_reads_the_new_one_at_once():
    """Two calls read one member Ray lost. The first to fail forgets it (its retry makes it again); the second,
    failing on the same lost object after the member was made again, must run again at once on the new one, not
    spend its retry, or fail, on a loss already mended. What test_many_outputs_lost_at_once_… hit under load."""
    from mlwf.backends.ray.lineage import InputLost, Lineage
    from mlwf.engine.calls import Call, Ref, RunContext

    ctx = RunContext("r", "ml-training", "/s", "b", "ml-training/outputs/r", transfer="direct")
    member = Ref(sha256="a" * 64, nbytes=10, producer="train")
    lineage = Lineage()
    lineage._held = {"r": {member.sha256: _Object("old")}}
    first, second = (Call("ml-training", "score", i, {"members": [member]}) for i in (0, 1))

    assert isinstance(lineage._forget_lost(first, ctx, "old"), InputLost)
    assert member.sha256 not in lineage._held["r"]
    # The same loss reported again before the member is made again: still lost, the retry makes it.
    assert isinstance(lineage._forget_lost(second, ctx, "old"), InputLost)
    lineage._held["r"][member.sha256] = _Object("new")  # made again by the first call's retry
    assert lineage._forget_lost(second, ctx, "old") is None
    assert lineage._held["r"][member.sha256].hex() == "new"
    # A loss of the new object is a new loss.
    assert isinstance(lineage._forget_lost(second, ctx, "new"), InputLost)
    assert member.sha256 not in lineage._held["r"]
