"""``--state heavy``: the stages hand each other pixels and whole feature matrices instead of keys.

The variant changes where data moves, not what is computed: the same model bytes, accuracy and
predictions as ``light``, on both transfers; the same images skipped for the same reasons; and it
really moves more bytes between stages (issue 27's state-transfer study rests on that).
"""

from __future__ import annotations

import json

import pytest

from mlwf.cli import main
from mlwf.engine.driver import Engine
from mlwf.errors import DataError, MlwfError
from mlwf.workflows import inference, state, training
from tests.conftest import BATCH_PREFIX, FAST, TRAIN_PREFIX


def _edge_bytes(report: dict, source: str, target: str) -> int:
    return sum(e["bytes"] for e in report["edges"] if (e["from"], e["to"]) == (source, target))


def _with_junk(engine) -> None:
    """One object no decoder takes in a training class folder and in the batch: both variants must skip it."""
    engine.store.put(f"{TRAIN_PREFIX}/3/junk.png", b"not an image")
    engine.store.put(f"{BATCH_PREFIX}/7/junk.png", b"\x89PNG\r\n\x1a\n truncated")


@pytest.mark.parametrize("transfer", ["store", "direct", "payload", "shm"])
def test_heavy_gives_the_same_model_accuracy_and_predictions_as_light(store_url, transfer):
    with Engine(store_url, "tless") as publisher:
        _with_junk(publisher)
        base = publisher.run_training(TRAIN_PREFIX, 2, 4, config=FAST)  # store · light; the model inference uses
    with Engine(store_url, "tless", transfer=transfer) as engine:
        light = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
        heavy = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False, state="heavy")
        light_inf = engine.run_inference("ml-inference/model", BATCH_PREFIX, 3)
        heavy_inf = engine.run_inference("ml-inference/model", BATCH_PREFIX, 3, state="heavy")

    assert (light["state"], heavy["state"]) == ("light", "heavy")
    assert heavy["model_digest"] == light["model_digest"] == base["model_digest"]  # every mode × variant
    for key in ("model_digest", "validation_accuracy", "num_train_images", "num_validation", "confusion",
                "skipped", "skipped_reasons"):
        assert heavy[key] == light[key], key
    assert light["skipped_reasons"] == {f"{TRAIN_PREFIX}/3/junk.png": light["skipped_reasons"][
        f"{TRAIN_PREFIX}/3/junk.png"]}
    # The decode moved: partition fetches the images, pca and score no longer do.
    assert heavy["stages"]["partition"]["fetch_bytes"] > 0 and "fetch_bytes" not in light["stages"]["partition"]
    assert "fetch_bytes" not in heavy["stages"]["pca"] and light["stages"]["pca"]["fetch_bytes"] > 0
    # And the variant is heavy: pixels instead of keys, whole feature matrices instead of slices.
    assert _edge_bytes(heavy, "partition", "pca") > 10 * _edge_bytes(light, "partition", "pca")
    assert _edge_bytes(heavy, "partition", "score") > 10 * _edge_bytes(light, "partition", "score")
    assert _edge_bytes(heavy, "pca", "train") > _edge_bytes(light, "pca", "train")

    assert (light_inf["state"], heavy_inf["state"]) == ("light", "heavy")
    for key in ("model_digest", "accuracy", "num_predicted", "confusion", "skipped", "skipped_reasons"):
        assert heavy_inf[key] == light_inf[key], key
    assert light_inf["skipped"] == 1
    with Engine(store_url, "tless") as engine:
        predictions = [engine.store.get(r["results_key"]) for r in (light_inf, heavy_inf)]
    assert predictions[0] == predictions[1] and predictions[0].count(b"\n") == 121
    assert _edge_bytes(heavy_inf, "partition", "predict") > 10 * _edge_bytes(light_inf, "partition", "predict")


def test_heavy_train_calls_get_the_whole_matrix_and_fit_their_own_rows(engine):
    report = engine.run_training(TRAIN_PREFIX, 2, 5, config=FAST, publish=False, state="heavy")
    light = engine.run_training(TRAIN_PREFIX, 2, 5, config=FAST, publish=False)
    assert report["model_digest"] == light["model_digest"]
    record = json.loads(engine.store.get(f"ml-training/outputs/{report['run_id']}/run.json"))
    assert record["params"]["state"] == "heavy"
    assert "state" not in json.loads(engine.store.get(f"ml-training/outputs/{light['run_id']}/run.json"))["params"]
    # 3 + 2 train calls: each PCA call's one output is read by each of its train calls.
    outputs = [o.key for o in engine.store.list(f"ml-training/outputs/{report['run_id']}/pca/")]
    assert sorted(k.rsplit("/", 1)[1] for k in outputs if k.endswith(".bin")) == ["0-0.bin", "0-1.bin", "1-0.bin",
                                                                                 "1-1.bin"]
    assert state.row_ranges(10, 3) == [[0, 4], [4, 7], [7, 10]]


def test_a_heavy_run_resumes_from_the_store(engine, monkeypatch):
    clean = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    monkeypatch.setenv("MLWF_FAULTS", "train:3:raise:99")
    with pytest.raises(MlwfError), Engine(engine.spec.url, "tless", retries=0, workers=1) as e:
        e.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False, state="heavy")
    monkeypatch.delenv("MLWF_FAULTS")
    [run_id] = [o.key.split("/")[-2] for o in engine.store.list("ml-training/outputs/")
                if o.key.endswith("/run.json") and json.loads(engine.store.get(o.key))["status"] == "failed"]
    with pytest.raises(MlwfError, match=r"other parameters \(state='heavy'\)"):  # resumed light: other work
        engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False, resume=run_id)
    report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False, state="heavy", resume=run_id)
    assert report["model_digest"] == clean["model_digest"] and report["state"] == "heavy"
    assert report["stages"]["partition"]["reused"] == 1 and report["stages"]["pca"]["reused"] == 2
    assert report["stages"]["train"]["reused"] >= 1


def _listing(n_images: int):
    keys = [f"p/{i % 2}/{i}.png" for i in range(n_images)]
    return lambda prefix: keys


def _no_fetch(keys):
    raise AssertionError("the size is checked before anything is fetched")


def test_a_heavy_partition_too_large_is_refused_before_any_work_naming_the_way_out():
    size = 1024  # 4 MiB of float32 pixels an image: 1,100 images are over the 4 GiB allowed
    with pytest.raises(DataError, match=r"--state heavy: .*all 1,100 images.*use --state light") as info:
        training.partition(_listing(1100), _no_fetch, prefix="p", num_pca=8, num_train=8, holdout=0.2, seed=0,
                           n_components=4, image_size=size, state="heavy")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="use --state light"):
        inference.partition(_listing(1100), _no_fetch, prefix="p", num_funcs=4, state="heavy", image_size=size)
    # The same listing is no problem with light state: nothing is decoded there.
    part = inference.partition(_listing(1100), _no_fetch, prefix="p", num_funcs=4, image_size=size)
    assert "pixels" not in part.parts["assignments"][0]


def test_the_state_flag_is_checked_and_recorded(store_url, capsys):
    where = ["--store", store_url, "--bucket", "tless"]
    fast = ["--image-size", "16", "--components", "6", "--trees", "12", "--max-depth", "8"]
    assert main(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--state", "heavvy", *where]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "--state 'heavvy' is not one of light or heavy: did you mean 'heavy'?" in err
    with pytest.raises(MlwfError, match="--state must be light or heavy, got 'full'"), \
            Engine(store_url, "tless") as engine:
        engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, state="full")

    assert main(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--state", "heavy", "--no-publish", "--json",
                 *fast, *where]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["state"] == "heavy"
    assert main(["runs", "show", report["run_id"], "--json", *where]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["params"]["state"] == "heavy" and shown["report"]["state"] == "heavy"
