"""Golden outputs: the same inputs give the same model bytes, results and report shapes as before.

The digests below were recorded on the code before the reorganisation of
issue 13 (main at 3c86164), with the library versions in ``RECORDED_WITH``:
a model's bytes name the versions it was trained with, and scikit-learn or
NumPy may round differently in another release, so under other versions the
digest checks are skipped (the report shapes are checked whatever the
versions). The digests also depend on the BLAS kernels OpenBLAS picks for
the CPU (``OPENBLAS_CORETYPE`` changes them): they are kept per kernel
family, and on a CPU whose kernels no digest was recorded with the digest
checks are skipped too. What must never change for the same code, versions
and kernels: the published model's bytes, the predictions file, and the keys
of every ``--json`` report.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version

import numpy as np
import pytest

import mlwf
import mlwf.model
from mlwf.cli import main
from mlwf.engine.driver import Engine
from mlwf.workflows.training import TrainingConfig
from tests.conftest import BATCH_PREFIX, FAST, TRAIN_PREFIX

FAST_FLAGS = ["--image-size", "16", "--components", "6", "--trees", "12", "--max-depth", "8"]

RECORDED_WITH = {"mlwf": "0.1.0", "scikit-learn": "1.9.1", "numpy": "2.4.6", "pillow": "13.0.0"}
#: Per family of OpenBLAS kernels (threadpoolctl's ``architecture``): the AVX-512 ones (recorded at
#: 3c86164), and the AVX2 ones (recorded at 4dccfff, whose light runs gave the same bytes as 3c86164's
#: code: only the kernels differ).
KERNELS = {"SkylakeX": "avx512", "Cooperlake": "avx512", "SapphireRapids": "avx512", "Haswell": "avx2",
           "Zen": "avx2"}
GOLDEN = {
    "avx512": {
        "fast-2-4": "25c81dde0401ac3257b903d52b186be15d75807f4492bef7e0f7abf38888fd3c",
        "default-2-8": "d60784da0299307ae4eda3213973d535d5699b0a4fcaa4f3fad555be976647c6",
        "predictions-fast-2-4": "d3a5ac789c5306b0cb0c4f2c640b5822e2adbdf722f3487fb428bc6b7ce3c18b",
    },
    "avx2": {
        "fast-2-4": "48711c5b89e357ac39d486354a4f96856aeb8a111f9ce9a90360d8b843d0879d",
        "default-2-8": "c34e57eedc92f3fb5bf84ffc0f32fa7c6c9091afb61a5946b30e98e89d9bc7b4",
        "predictions-fast-2-4": "d3a5ac789c5306b0cb0c4f2c640b5822e2adbdf722f3487fb428bc6b7ce3c18b",
    },
}

#: The keys of ``mlwf run ml-training … --json`` (and ml-inference), and of ``mlwf runs show/ls --json``.
TRAINING_KEYS = ["backend", "bucket", "classes", "confusion", "e2e_ms", "edges", "memory", "model_bytes",
                 "model_digest", "model_prefix", "num_images", "num_train_images", "num_validation",
                 "publish_ms", "run_id", "skipped", "skipped_examples", "skipped_reasons", "stage_ms", "stages",
                 "startup_ms", "state", "state_transfer_ms", "store", "train_per_pca", "transfer", "unlabelled",
                 "unlabelled_examples", "validated", "validation_accuracy", "validation_per_class", "warnings",
                 "workflow"]
INFERENCE_KEYS = ["accuracy", "backend", "bucket", "confusion", "data_prefix", "e2e_ms", "edges",
                  "labels_not_in_model", "memory", "model_digest", "model_prefix", "num_funcs",
                  "num_funcs_requested", "num_images", "num_labelled", "num_predicted", "results_key",
                  "run_id", "skipped", "skipped_examples", "skipped_reasons", "stage_ms", "stages", "startup_ms",
                  "state", "state_transfer_ms", "store", "summary_key", "transfer", "warnings", "workflow"]
#: Per stage, in report order: the figures it reports.
STAGE_KEYS = {
    "ml-training": {
        "partition": ["attempts", "calls", "compute_ms", "encode_ms", "list_ms", "output_bytes", "put_ms",
                      "reused", "wall_ms"],
        "pca": ["attempts", "calls", "compute_ms", "encode_ms", "fetch_bytes", "fetch_ms", "input_bytes",
                "input_decode_ms", "input_get_ms", "output_bytes", "put_ms", "reused", "wall_ms"],
        "train": ["attempts", "calls", "compute_ms", "encode_ms", "input_bytes", "input_decode_ms",
                  "input_get_ms", "output_bytes", "put_ms", "reused", "wall_ms"],
        "score": ["attempts", "calls", "compute_ms", "encode_ms", "fetch_bytes", "fetch_ms", "input_bytes",
                  "input_decode_ms", "input_get_ms", "output_bytes", "put_ms", "reused", "wall_ms"],
        "validation": ["attempts", "calls", "compute_ms", "encode_ms", "input_bytes", "input_decode_ms",
                       "input_get_ms", "output_bytes", "put_ms", "reused", "wall_ms"],
    },
    "ml-inference": {
        "partition": ["attempts", "calls", "compute_ms", "encode_ms", "list_ms", "output_bytes", "put_ms",
                      "reused", "wall_ms"],
        "load": ["attempts", "calls", "compute_ms", "encode_ms", "fetch_bytes", "fetch_ms", "output_bytes",
                 "reused", "wall_ms"],
        "predict": ["attempts", "calls", "compute_ms", "encode_ms", "fetch_bytes", "fetch_ms", "input_bytes",
                    "input_decode_ms", "input_get_ms", "output_bytes", "put_ms", "reused", "wall_ms"],
    },
}
#: The edges of the graph each report accounts for, in report order.
EDGES = {
    "ml-training": [("partition", "pca"), ("partition", "score"), ("pca", "score"), ("pca", "train"),
                    ("pca", "validation"), ("score", "validation"), ("store", "pca"), ("store", "score"),
                    ("train", "score"), ("train", "validation")],
    "ml-inference": [("load", "predict"), ("partition", "predict"), ("predict", "driver"), ("store", "load"),
                     ("store", "predict")],
}
EDGE_KEYS = ["bytes", "deserialize_ms", "from", "serialize_ms", "to", "transfer_ms"]
RUNS_SHOW_KEYS = ["duration_ms", "error", "outputs", "params", "progress", "report", "resume", "resumed", "run_id",
                  "started_at", "status", "transfer", "updated_at", "workflow"]
RUNS_LS_KEYS = ["accuracy", "bytes", "duration_ms", "e2e_ms", "error", "heartbeat_at", "intermediate_bytes",
                "progress", "run_id", "started_at", "status", "updated_at", "workflow"]


def _versions() -> dict[str, str]:
    return {"mlwf": mlwf.__version__, "scikit-learn": version("scikit-learn"), "numpy": np.__version__,
            "pillow": version("pillow")}


def _kernels() -> str | None:
    """The family of the BLAS kernels NumPy and SciPy use here, or None if it has no digests."""
    from threadpoolctl import threadpool_info

    found = {KERNELS.get(i.get("architecture")) for i in threadpool_info() if i.get("internal_api") == "openblas"}
    return found.pop() if len(found) == 1 else None


def _golden(name: str) -> str:
    if _versions() != RECORDED_WITH:
        pytest.skip(f"golden digests were recorded with {RECORDED_WITH}, this is {_versions()}")
    kernels = _kernels()
    if kernels is None:
        pytest.skip("golden digests were recorded with OpenBLAS's AVX-512 and AVX2 kernels, not this CPU's")
    return GOLDEN[kernels][name]


def _published_sha256(engine, prefix: str = "ml-inference/model") -> str:
    data, _ = mlwf.model.read_published(engine.store.get, prefix)
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("transfer", ["store", "direct"])
def test_fast_training_publishes_the_same_model_bytes(store_url, transfer):
    with Engine(store_url, "tless", transfer=transfer) as engine:
        report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
        assert _published_sha256(engine) == report["model_digest"]
    assert report["model_digest"] == _golden("fast-2-4")


def test_default_training_publishes_the_same_model_bytes(engine):
    report = engine.run_training(TRAIN_PREFIX, 2, 8, config=TrainingConfig())
    assert _published_sha256(engine) == report["model_digest"]
    assert report["model_digest"] == _golden("default-2-8")


def test_inference_writes_the_same_predictions(trained):
    engine, _ = trained
    report = engine.run_inference("ml-inference/model", BATCH_PREFIX, 4)
    predictions = engine.store.get(report["results_key"])
    assert hashlib.sha256(predictions).hexdigest() == _golden("predictions-fast-2-4")


def _json(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_every_json_report_keeps_its_keys(store_url, capsys):
    where = ["--store", store_url, "--bucket", "tless"]
    training = _json(capsys, "run", "ml-training", TRAIN_PREFIX, "2", "4", *FAST_FLAGS, *where, "--json")
    inference = _json(capsys, "run", "ml-inference", "ml-inference/model", BATCH_PREFIX, "4", *where, "--json")
    assert sorted(training) == TRAINING_KEYS
    assert sorted(inference) == INFERENCE_KEYS
    for report in (training, inference):
        stages = {stage: sorted(figures) for stage, figures in report["stages"].items()}
        assert list(stages.items()) == list(STAGE_KEYS[report["workflow"]].items())
        assert [(e["from"], e["to"]) for e in report["edges"]] == EDGES[report["workflow"]]
        assert all(sorted(e) == EDGE_KEYS for e in report["edges"])
    shown = _json(capsys, "runs", "show", inference["run_id"], *where, "--json")
    assert sorted(shown) == RUNS_SHOW_KEYS
    assert sorted(shown["report"]) == INFERENCE_KEYS
    listed = _json(capsys, "runs", "ls", *where, "--json")
    assert [sorted(r) for r in listed["runs"]] == [RUNS_LS_KEYS, RUNS_LS_KEYS]
