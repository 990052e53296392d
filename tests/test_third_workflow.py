"""Adding a workflow is one definition: a tiny third one (tests/tiny_workflow.py), named in
MLWF_WORKFLOW_MODULES, runs unchanged on every backend: the local pool, a real local Ray instance and
real ``mlwf serve`` processes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from mlwf import runs, workflows
from mlwf.engine.driver import Engine
from mlwf.errors import UsageError
from mlwf.storage import StoreSpec
from tests.test_knative import SECRET, ServeProcess

MODULE = "tests.tiny_workflow"
NUMBERS = list(range(1, 21))
EXPECTED = sum(n * n for n in NUMBERS)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """A fresh local store, and the tiny workflow named where every process reads it."""
    monkeypatch.setenv("MLWF_WORKFLOW_MODULES", MODULE)
    url = str(tmp_path / "store")
    StoreSpec(url, "tless").open().create_bucket()
    return url


def _check(engine: Engine, report: dict, backend: str) -> None:
    assert report["sum"] == EXPECTED and report["backend"] == backend
    assert {s: v["calls"] for s, v in report["stages"].items()} == {"split": 1, "square": 4, "total": 1}
    # mlwf runs reads its progress from the definition, like the built-in workflows'.
    [listed] = [r for r in runs.list_runs(engine.store) if r["run_id"] == report["run_id"]]
    assert listed["workflow"] == "tiny-squares" and listed["status"] == "succeeded"
    record = json.loads(engine.store.get(f"tiny-squares/outputs/{report['run_id']}/run.json"))
    assert record["params"] == {"numbers": NUMBERS, "parts": 4}


@pytest.mark.parametrize("transfer", ["store", "direct"])
def test_the_tiny_workflow_runs_on_the_local_backend(tiny, transfer):
    with Engine(tiny, "tless", workers=2, transfer=transfer) as engine:
        report = engine.run("tiny-squares", NUMBERS, 4)
        _check(engine, report, "local")
        if transfer == "store":  # its intermediates follow the documented layout
            keys = {o.key.split("/", 3)[3] for o in engine.store.list(f"tiny-squares/outputs/{report['run_id']}/")}
            assert {"split/0-0.bin", "split/0-3.bin", "square/3-0.bin", "total/0.done.json"} <= keys


def test_the_tiny_workflow_runs_on_ray(tiny):
    pytest.importorskip("ray")
    with Engine(tiny, "tless", backend="ray", transfer="direct") as engine:
        _check(engine, engine.run("tiny-squares", NUMBERS, 4), "ray")


def test_the_tiny_workflow_runs_on_mlwf_serve_processes(tiny, tmp_path, monkeypatch):
    pytest.importorskip("httpx")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLWF_")}
    env.update({"MLWF_FUNCTION_SECRET": SECRET, "MLWF_WORKFLOW_MODULES": MODULE,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))})
    monkeypatch.setenv("MLWF_FUNCTION_SECRET", SECRET)
    # One service for the fan-out stage, one for the rest: routed by the tiny workflow's stage names.
    services = [ServeProcess(env, tmp_path / f"serve-{i}.log", "--store", tiny, "--bucket", "tless",
                             "--stages", stages) for i, stages in enumerate(["tiny-squares/square", "tiny-squares"])]
    try:
        for s in services:
            s.wait_ready()
        endpoints = [f"tiny-squares/square={services[0].url}", services[1].url]
        with Engine(tiny, "tless", backend="knative", backend_options={"endpoints": endpoints}) as engine:
            _check(engine, engine.run("tiny-squares", NUMBERS, 4), "knative")
    finally:
        logs = [s.log() for s in services] if all(s.log_path.exists() for s in services) else []
        for s in services:
            s.stop()
    assert logs[0].count("type=dev.mlwf.tiny-squares.square status=200") == 4
    assert "tiny-squares.split status=200" in logs[1] and "tiny-squares.total status=200" in logs[1]


def test_a_workflow_module_that_cannot_be_imported_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("MLWF_WORKFLOW_MODULES", "tests.no_such_workflow")
    with pytest.raises(UsageError, match=r"MLWF_WORKFLOW_MODULES names 'tests.no_such_workflow', which cannot be "
                                         r"imported here") as info:
        Engine(str(tmp_path / "store"), "tless")
    assert "\n" not in str(info.value)
    assert "tiny-squares" in workflows.names([MODULE])  # a module defining one is registered once
    assert sys.modules[MODULE].WORKFLOW is workflows.get("tiny-squares")


def test_mlwf_deploy_knative_renders_a_service_per_stage_of_the_tiny_workflow_and_runs_lists_it(tiny, tmp_path,
                                                                                              capsys):
    from mlwf.cli import main

    with Engine(tiny, "tless") as engine:
        report = engine.run("tiny-squares", NUMBERS, 4)
    out = tmp_path / "knative"
    assert main(["deploy", "knative", "--image", "example.org/mlwf:1", "--namespace", "ml", "--s3-host", "minio",
                 "--s3-port", "9000", "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    import yaml

    services = {d["metadata"]["name"]: d for d in yaml.safe_load_all((out / "20-services.yaml").read_text())}
    square = services["mlwf-tiny-squares-square"]["spec"]["template"]
    assert square["spec"]["containerConcurrency"] == 1  # its definition's profile
    assert "mlwf-training-pca" in services and "mlwf-tiny-squares-total" in services
    endpoints = (out / "endpoints.txt").read_text()
    assert "tiny-squares/square=http://mlwf-tiny-squares-square.ml.svc.cluster.local" in endpoints
    assert not (out / "run" / "tiny-squares.yaml").exists()  # no reference arguments to run it with
    assert main(["runs", "ls", "--store", tiny, "--bucket", "tless", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["runs"]
    assert [r["progress"] for r in listed if r["run_id"] == report["run_id"]] == [
        {"split": "1/1", "square": "4/4", "total": "1/1"}]


def test_the_tiny_workflow_runs_choreographed_with_no_driver(tiny, tmp_path, monkeypatch):
    """Choreography reads the definition and the drive() of any workflow: one server, its own sink."""
    pytest.importorskip("httpx")
    from mlwf.choreography.invoke import invoke, wait
    from tests.s3server import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLWF_")}
    env.update({"MLWF_FUNCTION_SECRET": SECRET, "MLWF_WORKFLOW_MODULES": MODULE,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = ServeProcess(env, tmp_path / "serve.log", "--store", tiny, "--bucket", "tless", "--sink", url,
                           port=port).wait_ready()
    try:
        spec = StoreSpec(tiny, "tless")
        run_id = invoke("tiny-squares", {"args": [NUMBERS, 4]}, url, spec, secret=SECRET)
        store = spec.open()
        report = wait(store, "tiny-squares", run_id, timeout=60)
        assert report["sum"] == EXPECTED and report["choreography"] is True
        assert {s: v["calls"] for s, v in report["stages"].items()} == {"split": 1, "square": 4, "total": 1}
        store.close()
    finally:
        service.stop()
    assert service.log().count(f"run={run_id} call=tiny-squares/square[") == 4



def test_a_large_input_is_read_again_by_the_next_run_not_found_in_the_worker(tiny):
    """A worker keeps a large decoded input for the other calls of its run only (unless the input is
    declared cacheable, as the model is): a repeated run moves its state again, so a benchmark's warm
    runs measure the transfer they claim to."""
    from mlwf import codec
    from mlwf.engine import runner
    from mlwf.engine.calls import Call, Ref, RunContext

    store = StoreSpec(tiny, "tless").open()
    data = codec.encode({"values": np.arange(300_000, dtype=np.int64)})  # 2.4 MB: over the 1 MiB mark
    store.put("chunk.bin", data)
    ref = Ref(sha256=codec.digest(data), nbytes=len(data), key="chunk.bin", producer="split")

    def moved(run_id: str) -> int:
        ctx = RunContext(run_id, "tiny-squares", tiny, "tless", f"tiny-squares/outputs/{run_id}")
        outcome = runner.execute(Call("tiny-squares", "square", 0, {"chunk": ref}), ctx)
        [edge] = outcome.input_edges
        return edge["bytes"]

    runner.forget_decoded()
    try:
        assert moved("run-a") == len(data)
        assert moved("run-a") == 0  # the same run: found in the worker
        assert moved("run-b") == len(data)  # another run: read again
    finally:
        runner.forget_decoded()
        runner.forget_stores()
