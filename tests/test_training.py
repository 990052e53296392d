"""ml-training: each stage on its own, then the whole workflow on the local backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import mlwf.model
from mlwf.engine.driver import Engine
from mlwf.errors import DataError, MlwfError, NotFoundError, StoreError, UsageError
from mlwf.workflows import training
from mlwf.workflows.training import TrainingConfig, train_split
from tests.conftest import FAST, TRAIN_PREFIX


def _listing(n_per_class: dict[str, int], prefix="data/"):
    keys = [f"{prefix}{c}/{i:04d}.png" for c, n in n_per_class.items() for i in range(n)]
    return lambda p: [k for k in sorted(keys) if k.startswith(p)]


# --------------------------------------------------------------------------- partition
def test_partition_labels_from_class_folders_and_holds_out_each_class():
    out = training.partition(_listing({"cat": 20, "dog": 30, "eel": 10}), prefix="data", num_pca=2,
                             num_train=4, holdout=0.2, seed=1, n_components=3)
    assert out.info["classes"] == ["cat", "dog", "eel"]
    shares = out.parts["holdout"]
    assert len(shares) == 2 and abs(len(shares[0]["keys"]) - len(shares[1]["keys"])) <= 1  # one per PCA function
    held = {"keys": [k for s in shares for k in s["keys"]], "labels": [c for s in shares for c in s["labels"]]}
    assert len(set(held["keys"])) == len(held["keys"])
    names = [k.split("/")[1] for k in held["keys"]]
    assert sorted(names).count("cat") == 4 and names.count("dog") == 6 and names.count("eel") == 2
    assert [out.info["classes"][i] for i in held["labels"]] == names
    train_keys = [k for p in out.parts["assignments"] for k in p["keys"]]
    assert len(train_keys) == 48 and not set(train_keys) & set(held["keys"])
    for p in out.parts["assignments"]:
        assert [out.info["classes"][i] for i in p["labels"]] == [k.split("/")[1] for k in p["keys"]]


def test_partition_is_deterministic_and_depends_on_seed():
    args = dict(prefix="data", num_pca=2, num_train=2, holdout=0.25, n_components=2)
    a = training.partition(_listing({"a": 10, "b": 10}), seed=3, **args)
    b = training.partition(_listing({"a": 10, "b": 10}), seed=3, **args)
    c = training.partition(_listing({"a": 10, "b": 10}), seed=4, **args)
    assert [s["keys"] for s in a.parts["holdout"]] == [s["keys"] for s in b.parts["holdout"]]
    assert a.parts["assignments"][0]["keys"] == b.parts["assignments"][0]["keys"]
    assert a.parts["assignments"][0]["keys"] != c.parts["assignments"][0]["keys"]


def test_partition_sorts_numeric_class_names_numerically():
    out = training.partition(_listing({str(i): 3 for i in range(12)}), prefix="data", num_pca=1,
                             num_train=1, holdout=0.0, seed=0, n_components=2)
    assert out.info["classes"] == [str(i) for i in range(12)]


def test_partition_deals_uneven_training_functions_and_says_so():
    assert train_split(2, 5) == [3, 2]
    assert train_split(3, 8) == [3, 3, 2]
    out = training.partition(_listing({"a": 20, "b": 20}), prefix="data", num_pca=2, num_train=5,
                             holdout=0.0, seed=0, n_components=2)
    assert [p["num_train"] for p in out.parts["assignments"]] == [3, 2]
    assert [p["first_train"] for p in out.parts["assignments"]] == [0, 3]
    assert out.info["train_per_pca"] == [3, 2]


def test_partition_counts_objects_outside_class_folders():
    listing = _listing({"a": 5, "b": 5})
    out = training.partition(lambda p: listing(p) + ["data/README.txt"], prefix="data", num_pca=1,
                             num_train=1, holdout=0.0, seed=0, n_components=2)
    assert out.info["unlabelled"] == 1 and out.info["unlabelled_examples"] == ["data/README.txt"]


@pytest.mark.parametrize("listing, match", [
    (lambda p: [], "no objects under prefix 'data/'"),
    (lambda p: ["data/x.png"], "no labelled images"),
    (_listing({"only": 30}), "only one class"),
    (_listing({"a": 3, "b": 3}), "too few"),
])
def test_partition_refuses_unusable_data(listing, match):
    with pytest.raises(DataError, match=match):
        training.partition(listing, prefix="data", num_pca=2, num_train=8, holdout=0.0, seed=0, n_components=2)


# --------------------------------------------------------------------------- pca / train
def _png(arr) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_pca_projects_slices_and_skips_undecodable_objects():
    rng = np.random.default_rng(0)
    blobs = {f"k{i}": _png(rng.integers(0, 255, (8, 8))) for i in range(20)}
    blobs["k3"] = b"not an image"
    assignment = {"keys": list(blobs), "labels": np.arange(20, dtype=np.int32) % 2, "num_train": 3}
    out = training.pca(assignment, lambda keys: [blobs[k] for k in keys], image_size=8, n_components=4,
                       seed=0, index=0)
    slices, projection = out.parts["slices"], out.parts["projection"]
    assert len(slices) == 3
    assert sum(len(s["labels"]) for s in slices) == 19
    assert all(s["features"].shape[1] == 4 and s["features"].dtype == np.float32 for s in slices)
    assert projection["mean"].shape == (64,) and projection["components"].shape == (4, 64)
    assert out.info["skipped"] == 1 and out.info["skipped_examples"] == ["k3"]
    assert out.info["skipped_reasons"] == {"k3": "not a PNG or JPEG file: mlwf decodes PNG and JPEG images only; "
                                                 "convert it to PNG"}
    # Labels stay aligned with their images after the skip.
    assert np.concatenate([s["labels"] for s in slices]).tolist() == [i % 2 for i in range(20) if i != 3]


def test_pca_with_too_few_decodable_images_fails_clearly():
    assignment = {"keys": ["a", "b"], "labels": np.array([0, 1]), "num_train": 1}
    with pytest.raises(DataError, match="PCA function 0 has 0 decodable images"):
        training.pca(assignment, lambda keys: [b"x", b"y"], image_size=8, n_components=2, seed=0, index=0)


def test_train_exports_a_forest_that_predicts_like_scikit_learn():
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) * 2  # classes 0 and 2 of 3: class 1 never seen
    out = training.train({"features": x, "labels": y}, num_classes=3, n_trees=7, max_depth=6,
                         min_samples_split=5, seed=5, index=1, projection=0)
    member = out.parts["member"]
    forest = RandomForestClassifier(n_estimators=7, max_depth=6, min_samples_split=5,
                                    random_state=training.derive_seed(5, "train", 1)).fit(x, y)
    model = mlwf.model.build(["a", "b", "c"], 3, [{"mean": np.zeros(9), "components": np.eye(5, 9)}], [member])
    m = model.members[0]
    nodes = np.broadcast_to(m["roots"], (len(x), len(m["roots"]))).copy()
    for _ in range(m["max_depth"]):
        go_left = np.take_along_axis(x, m["feature"][nodes], axis=1) <= m["threshold"][nodes]
        nodes = np.where(go_left, m["left"][nodes], m["right"][nodes])
    proba = m["leaf_value"][m["leaf_index"][nodes]].mean(axis=1)
    expected = forest.predict_proba(x)
    assert np.allclose(proba[:, [0, 2]], expected, atol=1e-6)
    assert np.all(proba[:, 1] == 0)


# --------------------------------------------------------------------------- workflow
def test_training_publishes_a_validated_model(engine):
    report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    assert report["workflow"] == "ml-training" and report["backend"] == "local"
    assert report["num_images"] == 600 and report["num_validation"] == 116  # floor(0.2 × n) per class
    assert report["classes"] == [str(i) for i in range(10)]
    assert report["validation_accuracy"] > 0.8
    assert set(report["stage_ms"]) == {"partition", "pca", "train", "score", "validation"}
    model = mlwf.model.load("ml-inference/model", store=engine.store)
    assert model.digest == report["model_digest"]
    assert model.metrics["validation_accuracy"] == report["validation_accuracy"]
    assert len(model.members) == 4 and len(model.projections) == 2
    # Intermediates live under the run's own prefix.
    keys = [o.key for o in engine.store.list("ml-training/outputs/")]
    assert keys and all(k.startswith(f"ml-training/outputs/{report['run_id']}/") for k in keys)
    run = json.loads(engine.store.get(f"ml-training/outputs/{report['run_id']}/run.json"))
    assert run["status"] == "succeeded"


def test_same_seed_same_model_bytes_other_seed_other_model(engine):
    a = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    b = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    c = engine.run_training(TRAIN_PREFIX, 2, 4, config=TrainingConfig(**{**FAST.__dict__, "seed": 1}))
    assert a["run_id"] != b["run_id"]
    assert a["model_digest"] == b["model_digest"]
    assert c["model_digest"] != a["model_digest"]


def test_model_digest_does_not_depend_on_the_number_of_workers(store_url):
    digests = []
    for workers in (1, 2):
        with Engine(store_url, "tless", workers=workers) as e:
            digests.append(e.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)["model_digest"])
    assert digests[0] == digests[1]


def test_uneven_training_functions_all_train(engine):
    report = engine.run_training(TRAIN_PREFIX, 2, 5, config=FAST)
    assert report["train_per_pca"] == [3, 2]
    assert len(mlwf.model.load("ml-inference/model", store=engine.store).members) == 5


def test_default_settings_reach_reference_shape(engine):
    report = engine.run_training(TRAIN_PREFIX, 2, 8, publish=False)
    model = mlwf.model.from_bytes(engine.store.get(f"ml-training/outputs/{report['run_id']}/validation/0-0.bin"))
    assert model.image_size == 64 and model.projections[0]["components"].shape == (10, 4096)
    assert sum(len(m["roots"]) for m in model.members) == 800
    assert model.config["max_depth"] == 10 and model.config["min_samples_split"] == 5
    assert report["validation_accuracy"] > 0.85


def test_corrupt_objects_are_skipped_and_counted(engine):
    engine.store.put(f"{TRAIN_PREFIX}/3/broken.png", b"\x89PNG\r\n\x1a\n truncated")
    engine.store.put(f"{TRAIN_PREFIX}/4/notes.txt", b"hello")
    report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    assert report["skipped"] == 2
    assert report["num_images"] == 602


# --------------------------------------------------------------------------- bad input
def _published(engine):
    return engine.store.get("ml-inference/model/MODEL.json")


@pytest.mark.parametrize("args, error, match", [
    (("ml-training/none", 2, 4), DataError, "no objects under prefix 'ml-training/none/'"),
    ((TRAIN_PREFIX, 0, 4), UsageError, "NUM_PCA must be a positive integer"),
    ((TRAIN_PREFIX, 2, -1), UsageError, "NUM_TRAIN must be a positive integer"),
    ((TRAIN_PREFIX, 4, 2), UsageError, "must be at least NUM_PCA"),
    ((TRAIN_PREFIX, 2, 700), DataError, "too few"),
    (("../escape", 2, 4), StoreError, "escape the store root"),
    (("/abs/path", 2, 4), StoreError, "is absolute"),
])
def test_bad_input_fails_clearly_and_keeps_the_published_model(trained, args, error, match):
    engine, _ = trained
    before = _published(engine)
    with pytest.raises(error, match=match) as info:
        engine.run_training(*args, config=FAST)
    assert "\n" not in str(info.value)
    assert _published(engine) == before


def test_single_class_is_refused(engine):
    for key in [o.key for o in engine.store.list(TRAIN_PREFIX + "/") if not o.key.startswith(TRAIN_PREFIX + "/1/")]:
        engine.store.delete(key)
    with pytest.raises(DataError, match="only one class"):
        engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    assert not engine.store.exists("ml-inference/model/MODEL.json")


def test_missing_bucket_is_refused(store_url):
    with Engine(store_url, "nope") as e, pytest.raises(NotFoundError, match="bucket 'nope' does not exist"):
        e.run_training(TRAIN_PREFIX, 2, 4, config=FAST)


def test_a_stage_failing_mid_run_publishes_nothing(trained):
    engine, first = trained
    before = _published(engine)
    # Partition succeeds (the keys are fine); every PCA function then finds only junk.
    for o in engine.store.list(TRAIN_PREFIX + "/"):
        engine.store.put(o.key, b"junk")
    with pytest.raises(DataError, match="decodable images") as info:
        engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    assert "\n" not in str(info.value)
    assert _published(engine) == before
    assert mlwf.model.load("ml-inference/model", store=engine.store).digest == first["model_digest"]
    runs = [json.loads(engine.store.get(o.key)) for o in engine.store.list("ml-training/outputs/")
            if o.key.endswith("run.json")]
    assert sorted(r["status"] for r in runs) == ["failed", "succeeded"]


def test_direct_transfer_gives_the_same_model_and_accounts_for_every_edge(engine):
    stored = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    with Engine(engine.spec.url, "tless", transfer="direct") as direct_engine:
        direct = direct_engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    assert direct["transfer"] == "direct" and direct["model_digest"] == stored["model_digest"]
    # Direct transfer writes no intermediate to the store (only the record and the trace); store transfer
    # writes them all.
    prefix = f"ml-training/outputs/{direct['run_id']}/"
    assert [o.key for o in engine.store.list(prefix)] == [prefix + "run.json", prefix + "trace.json"]
    assert any(o.key.endswith("/train/0-0.bin") for o in engine.store.list(f"ml-training/outputs/{stored['run_id']}/"))
    edges = {(e["from"], e["to"]): e for e in direct["edges"]}
    assert {("partition", "pca"), ("pca", "train"), ("train", "validation"), ("store", "pca")} <= set(edges)
    assert all(e["bytes"] > 0 for e in edges.values())
    assert edges[("train", "validation")]["serialize_ms"] > 0
    # With no done records to count, the run still reports every call done (runs ls / runs show).
    from mlwf.runs import list_runs, show_run

    expected = {"partition": "1/1", "pca": "2/2", "train": "4/4", "score": "2/2", "validation": "1/1"}
    assert show_run(engine.store, direct["run_id"])["progress"] == expected
    assert {r["run_id"]: r["progress"] for r in list_runs(engine.store)}[direct["run_id"]] == expected


def test_unknown_backend_or_transfer_is_refused(store_url):
    with pytest.raises(UsageError, match="unknown backend 'lambda'"):
        Engine(store_url, "tless", backend="lambda")
    with pytest.raises(UsageError, match="unknown transfer"):
        Engine(store_url, "tless", transfer="carrier-pigeon")


def test_a_killed_worker_is_replaced_and_the_run_gives_the_same_model(engine, monkeypatch):
    clean = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    monkeypatch.setenv("MLWF_FAULTS", "train:2:exit:1;pca:1:raise:1")
    with Engine(engine.spec.url, "tless") as faulty:
        report = faulty.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    assert report["model_digest"] == clean["model_digest"]
    assert report["stages"]["pca"]["attempts"] == 3
    assert report["stages"]["train"]["attempts"] > 4


def test_a_call_that_keeps_failing_fails_the_run_naming_stage_and_index(trained, monkeypatch):
    engine, first = trained
    monkeypatch.setenv("MLWF_FAULTS", "train:1:raise:5")
    with Engine(engine.spec.url, "tless", retries=2) as faulty, pytest.raises(MlwfError) as info:
        faulty.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    assert "train[1]" in str(info.value) and "injected fault" in str(info.value)
    assert mlwf.model.load("ml-inference/model", store=engine.store).digest == first["model_digest"]
