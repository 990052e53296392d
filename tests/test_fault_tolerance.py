"""Runs that survive faults, resume where they stopped, and never tear a model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import mlwf.model
import mlwf.workflows.training
from mlwf.cli import main
from mlwf.engine.driver import Engine
from mlwf.errors import MlwfError, UsageError
from tests.conftest import BATCH_PREFIX, FAST, TRAIN_PREFIX

FAST_FLAGS = ["--image-size", "16", "--components", "6", "--trees", "12", "--max-depth", "8"]


def test_a_hung_call_is_timed_out_killed_and_retried(engine, monkeypatch):
    clean = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    monkeypatch.setenv("MLWF_FAULTS", "train:3:hang:1")
    with Engine(engine.spec.url, "tless", stage_timeouts={"train": 3}) as e:
        t = time.monotonic()
        report = e.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    assert report["model_digest"] == clean["model_digest"]
    assert time.monotonic() - t < 30


def test_a_call_that_keeps_hanging_fails_with_the_stage_and_index(engine, monkeypatch):
    monkeypatch.setenv("MLWF_FAULTS", "pca:1:hang:5")
    with Engine(engine.spec.url, "tless", retries=1, stage_timeouts={"pca": 1.5}) as e, \
            pytest.raises(MlwfError, match=r"pca\[1\] failed: timed out after 1.5 s \(2 attempts\)"):
        e.run_training(TRAIN_PREFIX, 2, 4, config=FAST)


def _failed_training_run(engine, monkeypatch, faults: str) -> str:
    """The id of a training run on one worker that failed on the injected ``faults`` (MLWF_FAULTS)."""
    monkeypatch.setenv("MLWF_FAULTS", faults)
    with pytest.raises(MlwfError):
        with Engine(engine.spec.url, "tless", retries=0, workers=1) as e:
            e.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    monkeypatch.delenv("MLWF_FAULTS")
    records = [json.loads(engine.store.get(o.key)) for o in engine.store.list("ml-training/outputs/")
               if o.key.endswith("/run.json")]
    [failed] = [r for r in records if r["status"] == "failed"]
    return failed["run_id"]


def test_resume_reuses_verified_outputs_and_reruns_only_the_rest(engine, monkeypatch):
    clean = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    # One worker runs the train calls in order, so 0-2 have finished when 3 fails:
    # what a resume can reuse does not depend on timing.
    run_id = _failed_training_run(engine, monkeypatch, "train:3:raise:99")
    # Damage one finished output: resume must notice by checksum and redo that call only.
    pca_out = f"ml-training/outputs/{run_id}/pca/1-0.bin"
    data = engine.store.get(pca_out)
    engine.store.put(pca_out, data[:-1] + bytes([data[-1] ^ 0xFF]))
    report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False, resume=run_id)
    assert report["run_id"] == run_id
    assert report["model_digest"] == clean["model_digest"]
    stages = report["stages"]
    assert stages["partition"]["reused"] == 1 and stages["partition"]["attempts"] == 0
    assert stages["pca"]["reused"] == 1 and stages["pca"]["attempts"] == 1
    # The redone pca wrote the same bytes, so every train call that had finished is reused;
    # train 3 never finished and runs again.
    assert stages["train"]["attempts"] >= 1 and stages["train"]["reused"] >= 1
    assert stages["train"]["attempts"] + stages["train"]["reused"] == 4
    assert stages["validation"]["attempts"] == 1


def test_resume_reruns_a_call_whose_record_has_outputs_of_another_shape(engine, monkeypatch):
    """A run recorded by an mlwf whose partition handed on one hold-out set (not one share per
    score function) resumes: that call runs again instead of feeding its old outputs on."""
    run_id = _failed_training_run(engine, monkeypatch, "train:0:raise:99")
    done_key = f"ml-training/outputs/{run_id}/partition/0.done.json"
    doc = json.loads(engine.store.get(done_key))
    doc["outcome"]["outputs"]["holdout"] = doc["outcome"]["outputs"]["holdout"][0]  # the old shape
    engine.store.put(done_key, json.dumps(doc).encode())
    report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False, resume=run_id)
    assert report["run_id"] == run_id
    assert report["stages"]["partition"]["reused"] == 0 and report["stages"]["partition"]["attempts"] == 1
    assert report["stages"]["score"]["attempts"] == 2 and report["validation_accuracy"] is not None


def test_resume_after_the_driver_is_killed(store_url, capsys):
    # A short lease, so the killed run is seen as abandoned within seconds.
    env = {**os.environ, "MLWF_FAULTS": "train:1:hang:1", "MLWF_HEARTBEAT_S": "0.2", "MLWF_LEASE_S": "1"}
    args = [sys.executable, "-m", "mlwf.cli", "run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url,
            "--bucket", "tless", *FAST_FLAGS, "--json"]
    driver = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    outputs = os.path.join(store_url, "tless", "ml-training", "outputs")
    deadline = time.monotonic() + 60
    run_dir = None
    while time.monotonic() < deadline:  # wait until three of four train calls have finished
        runs = os.listdir(outputs) if os.path.isdir(outputs) else []
        if runs:
            run_dir = os.path.join(outputs, runs[0])
            train = os.path.join(run_dir, "train")
            if os.path.isdir(train) and len([f for f in os.listdir(train) if f.endswith(".done.json")]) >= 3:
                break
        time.sleep(0.1)
    assert run_dir, "the driver never started"
    first_beat = json.load(open(os.path.join(run_dir, "run.json")))["heartbeat_at"]
    while time.monotonic() < deadline and \
            json.load(open(os.path.join(run_dir, "run.json")))["heartbeat_at"] == first_beat:
        time.sleep(0.05)  # the driver renews its lease while its calls run
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its workers, as when a node disappears
    driver.wait(timeout=30)
    run_id = os.path.basename(run_dir)
    record = json.load(open(os.path.join(run_dir, "run.json")))
    assert record["status"] == "running" and record["heartbeat_at"] != first_beat and record["lease_s"] == 1
    # Nobody renews the lease any more: the run shows as abandoned, and gc may collect it.
    status = None
    while time.monotonic() < deadline and status != "abandoned":
        assert main(["runs", "ls", "--json", "--store", store_url]) == 0
        [run] = json.loads(capsys.readouterr().out)["runs"]
        status = run["status"]
        time.sleep(0.1)
    assert status == "abandoned" and run["run_id"] == run_id

    resumed = subprocess.run(args[:-1] + ["--resume", run_id, "--json"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["stages"]["pca"]["reused"] == 2 and report["stages"]["pca"]["attempts"] == 0
    assert report["stages"]["train"]["reused"] == 3 and report["stages"]["train"]["attempts"] == 1
    with Engine(store_url, "tless") as e:
        assert report["model_digest"] == e.run_training(TRAIN_PREFIX, 2, 4, config=FAST)["model_digest"]


@pytest.mark.parametrize("resume, match", [
    ("20990101T000000Z-000000", "unknown run id"),
    ("../x", "unknown run id"),
])
def test_resume_of_an_unknown_run_is_refused(engine, resume, match):
    with pytest.raises(UsageError, match=match):
        engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, resume=resume)


def test_resume_of_another_workflow_or_other_parameters_is_refused_and_changes_nothing(trained, capsys):
    engine, first = trained
    before = sorted(o.key for o in engine.store.list(""))
    with pytest.raises(UsageError, match="is a ml-training run, not ml-inference"):
        engine.run_inference("ml-inference/model", BATCH_PREFIX, 4, resume=first["run_id"])
    with pytest.raises(UsageError, match=r"other parameters \(num_train=4"):
        engine.run_training(TRAIN_PREFIX, 2, 5, config=FAST, resume=first["run_id"])
    assert sorted(o.key for o in engine.store.list("")) == before
    code = main(["run", "ml-training", TRAIN_PREFIX, "2", "8", "--store", engine.spec.url, "--resume",
                 first["run_id"], *FAST_FLAGS])
    assert code == 2 and capsys.readouterr().err.count("\n") == 1


def test_concurrent_training_runs_leave_one_whole_model(store_url):
    reports, errors = [], []

    def train(seed):
        try:
            with Engine(store_url, "tless", workers=1) as e:
                config = mlwf.workflows.training.TrainingConfig(**{**FAST.__dict__, "seed": seed})
                reports.append(e.run_training(TRAIN_PREFIX, 2, 4, config=config))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r["run_id"] for r in reports}) == 2
    model = mlwf.model.load("ml-inference/model", store=store_url)
    assert model.digest in {r["model_digest"] for r in reports}


def test_inference_reading_while_training_publishes_always_sees_a_whole_model(trained):
    engine, _ = trained
    stop = threading.Event()
    published = []

    def publish_repeatedly():
        seed = 10
        while not stop.is_set():
            config = mlwf.workflows.training.TrainingConfig(**{**FAST.__dict__, "seed": seed})
            with Engine(engine.spec.url, "tless", workers=1) as e:
                published.append(e.run_training(TRAIN_PREFIX, 2, 4, config=config)["model_digest"])
            seed += 1

    writer = threading.Thread(target=publish_repeatedly)
    writer.start()
    try:
        digests = set()
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            report = engine.run_inference("ml-inference/model", BATCH_PREFIX, 2)
            assert report["num_predicted"] == 120
            digests.add(report["model_digest"])
    finally:
        stop.set()
        writer.join()
    assert published and len(digests) >= 1


def test_rollback_restores_the_previous_model(trained, capsys):
    engine, first = trained
    second = engine.run_training(TRAIN_PREFIX, 2, 4,
                                 config=mlwf.workflows.training.TrainingConfig(**{**FAST.__dict__, "seed": 7}))
    assert mlwf.model.load("ml-inference/model", store=engine.store).digest == second["model_digest"]
    assert main(["model", "rollback", "--store", engine.spec.url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sha256"] == first["model_digest"] and out["replaced"] == second["model_digest"]
    assert mlwf.model.load("ml-inference/model", store=engine.store).digest == first["model_digest"]
    # Rolling back again returns to the newer one: the replaced model is now the previous version.
    assert main(["model", "rollback", "--store", engine.spec.url]) == 0
    assert mlwf.model.load("ml-inference/model", store=engine.store).digest == second["model_digest"]


def test_rollback_without_an_earlier_version_is_one_line(trained, capsys):
    engine, _ = trained
    assert main(["model", "rollback", "--store", engine.spec.url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no earlier version" in err


def test_runs_ls_and_gc_keep_models_and_recent_runs(trained, capsys):
    engine, first = trained
    second = engine.run_inference("ml-inference/model", BATCH_PREFIX, 2)
    third = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    assert main(["runs", "ls", "--store", engine.spec.url, "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    by_id = {r["run_id"]: r for r in runs}
    assert by_id[first["run_id"]]["status"] == "succeeded"
    assert by_id[first["run_id"]]["progress"] == {"partition": "1/1", "pca": "2/2", "train": "4/4",
                                                  "score": "2/2", "validation": "1/1"}
    assert by_id[second["run_id"]]["workflow"] == "ml-inference"

    assert main(["runs", "gc", "--keep", "1", "--store", engine.spec.url, "--json"]) == 0
    gc = json.loads(capsys.readouterr().out)
    assert gc["runs"] == [first["run_id"]] and gc["deleted"] > 0
    left = [o.key for o in engine.store.list(f"ml-training/outputs/{first['run_id']}/")]
    # The record and the trace (a result, as predictions are) stay.
    assert left == [f"ml-training/outputs/{first['run_id']}/run.json", f"ml-training/outputs/{first['run_id']}/trace.json"]
    assert engine.store.list(f"ml-training/outputs/{third['run_id']}/train/")
    assert engine.store.exists(second["results_key"])
    assert mlwf.model.load("ml-inference/model", store=engine.store).digest == third["model_digest"]
    # The model version the first run published is never collected.
    assert engine.store.exists(f"ml-inference/model/versions/{first['model_digest']}.mlwf")


def test_a_store_failing_for_a_while_is_retried_and_the_run_completes(engine, monkeypatch):
    clean = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    # Every worker's first image fetch fails, and every store operation is slow.
    monkeypatch.setenv("MLWF_STORE_FAULTS", "get_many:1,latency_ms:2")
    with Engine(engine.spec.url, "tless", retries=2) as e:
        report = e.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    assert report["model_digest"] == clean["model_digest"]
    assert report["stages"]["pca"]["attempts"] > 2


def test_a_store_that_keeps_failing_fails_the_run_in_one_line(trained, monkeypatch):
    engine, first = trained
    monkeypatch.setenv("MLWF_STORE_FAULTS", "get_many:99")
    with Engine(engine.spec.url, "tless", retries=1) as e, pytest.raises(MlwfError) as info:
        e.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    assert "injected store fault in get_many" in str(info.value) and "\n" not in str(info.value)
    monkeypatch.delenv("MLWF_STORE_FAULTS")
    assert mlwf.model.load("ml-inference/model", store=engine.store).digest == first["model_digest"]
