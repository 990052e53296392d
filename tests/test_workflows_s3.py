"""Both workflows with all their state in a real S3 protocol server (moto, a separate process)."""

from __future__ import annotations

import json
import os

import pytest

import mlwf.model
from mlwf import bulk
from mlwf.cli import main
from mlwf.engine.driver import Engine
from mlwf.errors import MlwfError
from mlwf.storage import StoreSpec
from mlwf.workflows.training import TrainingConfig
from tests.conftest import BATCH_PREFIX, FAST, TRAIN_PREFIX
from tests.s3server import FaultProxy


def _upload_with_boto3(s3_server, bucket, folder, prefix):
    """Upload like another S3 client would (not through mlwf)."""
    client = s3_server.boto3_client()
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            key = f"{prefix}/{os.path.relpath(path, folder)}"
            client.upload_file(path, bucket, key)


@pytest.fixture
def s3_data(s3_env, s3_server, digits_dir):
    """A bucket in the S3 server holding the digits: training set via mlwf, batch via boto3."""
    store = StoreSpec("s3://", s3_env).open()
    bulk.upload_dir(store, digits_dir / "train", TRAIN_PREFIX)
    _upload_with_boto3(s3_server, s3_env, digits_dir / "batch", BATCH_PREFIX)
    return s3_env


def test_both_workflows_keep_all_state_in_s3_and_match_the_local_store(s3_data, s3_server, local_reference):
    with Engine("s3://", s3_data) as engine:
        trained = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
        inferred = engine.run_inference("ml-inference/model", BATCH_PREFIX, 4)
    local_trained, local_inferred = local_reference.trained, local_reference.inferred

    assert trained["store"].startswith("s3://") and "test" not in trained["store"]
    # Same images, same seed: the same model bytes, whichever store held the state.
    assert trained["model_digest"] == local_trained["model_digest"]
    assert inferred["accuracy"] == local_inferred["accuracy"] and inferred["num_predicted"] == 120

    # Every intermediate, the model and the results are objects in the S3 bucket.
    client = s3_server.boto3_client()
    keys = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_data)
            for o in page.get("Contents", [])}
    run = trained["run_id"]
    assert {f"ml-training/outputs/{run}/run.json", f"ml-training/outputs/{run}/validation/0-0.bin",
            "ml-inference/model/MODEL.json", inferred["results_key"]} <= keys
    assert any(k.startswith(f"ml-training/outputs/{run}/train/") for k in keys)
    csv = client.get_object(Bucket=s3_data, Key=inferred["results_key"])["Body"].read().decode()
    assert csv.startswith("key,prediction,probability,label\n") and csv.count("\n") == 121
    model = mlwf.model.load("ml-inference/model", store=StoreSpec("s3://", s3_data).open())
    assert model.digest == trained["model_digest"]


def test_cli_on_s3_prints_counts_and_never_credentials(s3_data, s3_server, digits_dir, capsys, tmp_path):
    assert main(["s3", "ls", "--store", "s3://", "--bucket", s3_data, "--prefix", BATCH_PREFIX, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["count"] == 120
    assert main(["s3", "upload-dir", "--store", "s3://", "--bucket", s3_data, "--host-path",
                 str(digits_dir / "batch"), "--s3-path", BATCH_PREFIX, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["uploaded"] == 0 and again["skipped"] == 120  # boto3's objects recognised as the same
    assert main(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", "s3://", "--bucket", s3_data,
                 "--image-size", "16", "--components", "6", "--trees", "12", "--json"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["validation_accuracy"] > 0.8
    assert main(["s3", "download-dir", "--store", "s3://", "--bucket", s3_data, "--s3-path", "ml-inference/model",
                 "--host-path", str(tmp_path / "model"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["objects"] == 2
    secret = s3_server.env()["S3_PASSWORD"]
    assert secret not in out.out + out.err and secret not in json.dumps(report)


def test_missing_bucket_is_one_line_unless_asked_to_create(s3_env, digits_dir, capsys):
    code = main(["s3", "upload-dir", "--store", "s3://", "--bucket", "no-such-bucket-x", "--host-path",
                 str(digits_dir / "batch"), "--s3-path", "batch"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no-such-bucket-x" in err and "--create-bucket" in err
    assert main(["s3", "upload-dir", "--store", "s3://", "--bucket", "made-by-flag", "--host-path",
                 str(digits_dir / "batch"), "--s3-path", "batch", "--create-bucket", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["uploaded"] == 120


def test_a_server_answering_503_for_a_while_is_retried_and_the_run_completes(s3_data, s3_server, monkeypatch):
    with FaultProxy(s3_server.endpoint, failures=6, mode="503") as proxy:
        monkeypatch.setenv("S3_PORT", str(proxy.port))
        # The proxy is a small Python server in the test process: keep its load modest.
        monkeypatch.setenv("MLWF_S3_CONCURRENCY", "16")
        with Engine("s3://", s3_data) as engine:
            report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    assert proxy.faults == 6 and report["validation_accuracy"] > 0.8


def test_server_down_mid_run_fails_clearly_and_keeps_the_previous_model(s3_data, s3_server, monkeypatch):
    with Engine("s3://", s3_data) as engine:
        first = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    monkeypatch.setenv("MLWF_S3_TIMEOUT", "2")
    # Up for the listing and a few reads, then every request dropped.
    with FaultProxy(s3_server.endpoint, pass_first=40, failures=10**9, mode="drop") as proxy:
        monkeypatch.setenv("S3_PORT", str(proxy.port))
        with Engine("s3://", s3_data, retries=0) as engine, pytest.raises(MlwfError) as info:
            engine.run_training(TRAIN_PREFIX, 2, 4, config=TrainingConfig(**{**FAST.__dict__, "seed": 1}))
    assert proxy.faults > 0
    assert "\n" not in str(info.value) and s3_server.env()["S3_PASSWORD"] not in str(info.value)
    monkeypatch.setenv("S3_PORT", str(s3_server.port))
    model = mlwf.model.load("ml-inference/model", store=StoreSpec("s3://", s3_data).open())
    assert model.digest == first["model_digest"]

