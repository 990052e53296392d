"""Training data a user gets wrong: classes counted after decoding, validation required, absurd counts.

Each refusal is one line, publishes nothing, and leaves the published model
and the data as they were.
"""

from __future__ import annotations

import json
import re

import pytest

import mlwf.model
from mlwf.cli import main
from mlwf.errors import DataError, UsageError
from mlwf.workflows import training
from tests.conftest import BATCH_PREFIX, FAST, TRAIN_PREFIX
from tests.test_training import _listing

FAST_FLAGS = ["--image-size", "16", "--components", "6", "--trees", "12", "--max-depth", "8"]
JUNK = [b"not an image", b"\x89PNG\r\n\x1a\n truncated", b""]


def snapshot(store) -> dict[str, bytes]:
    keys = [o.key for o in store.list()]
    return dict(zip(keys, store.get_many(keys)))


def copy_class(store, label: str, to: str, *, n: int | None = None, as_label: str | None = None) -> None:
    keys = [o.key for o in store.list(f"{TRAIN_PREFIX}/{label}/")][:n]
    store.put_many((f"{to}/{as_label or label}/{k.rsplit('/', 1)[1]}", d) for k, d in zip(keys, store.get_many(keys)))


def junk_class(store, to: str, label: str = "junk", n: int = 30) -> None:
    store.put_many((f"{to}/{label}/{i:03d}.png", JUNK[i % len(JUNK)]) for i in range(n))


def refused_and_intact(engine, error, match, *args, **options):
    """Run training expecting a one-line refusal; the store must be as it was, but for the failed run's folder."""
    before = snapshot(engine.store)
    with pytest.raises(error, match=match) as info:
        engine.run_training(*args, **options)
    assert "\n" not in str(info.value)
    after = snapshot(engine.store)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert all(re.match(r"ml-training/outputs/[^/]+/", k) for k in changed), changed
    for k in changed:
        if k.endswith("/run.json"):
            assert json.loads(after[k])["status"] == "failed"
    return str(info.value)


# --------------------------------------------------------------------------- classes after decoding
def test_one_real_class_and_a_folder_of_junk_is_refused(trained):
    engine, first = trained
    copy_class(engine.store, "3", "ml-training/onejunk")
    junk_class(engine.store, "ml-training/onejunk")
    message = refused_and_intact(engine, DataError, "class folder 'junk' .* hold no decodable training image",
                                 "ml-training/onejunk", 2, 4, config=FAST)
    assert "objects skipped" in message
    assert mlwf.model.load("ml-inference/model", store=engine.store).digest == first["model_digest"]


def test_a_junk_class_beside_real_ones_is_refused_even_without_publishing(trained):
    engine, _ = trained
    for label in ("3", "5"):
        copy_class(engine.store, label, "ml-training/twojunk")
    junk_class(engine.store, "ml-training/twojunk", "zz-junk")
    refused_and_intact(engine, DataError, "'zz-junk'", "ml-training/twojunk", 2, 4, config=FAST, publish=False)


def test_a_class_whose_held_out_images_do_not_decode_is_not_published_unless_asked(trained):
    engine, first = trained
    for label in ("3", "5"):
        copy_class(engine.store, label, "ml-training/badheld")
    # Class '7': ten real images and fifty junk files, so what partition holds out is mostly junk.
    copy_class(engine.store, "7", "ml-training/badheld", n=10)
    junk_class(engine.store, "ml-training/badheld", "7", n=50)
    report = engine.run_training("ml-training/badheld", 1, 2, config=FAST, publish=False)
    assert report["validation_per_class"][2] < training.MIN_VALIDATION_PER_CLASS
    assert report["validated"] is False and report["model_prefix"] is None
    refused_and_intact(engine, DataError, r"1 of 3 classes have fewer than 2 decodable held-out images \('7': [01]\)",
                       "ml-training/badheld", 1, 2, config=FAST)
    assert mlwf.model.load("ml-inference/model", store=engine.store).digest == first["model_digest"]
    forced = engine.run_training("ml-training/badheld", 1, 2, config=FAST, allow_unvalidated=True)
    assert forced["validated"] is False
    manifest = mlwf.model.read_manifest(engine.store.get, "ml-inference/model")
    assert manifest["sha256"] == forced["model_digest"] and manifest["summary"]["validated"] is False


def test_no_held_out_image_at_all_is_refused_before_any_work_unless_asked(trained, capsys):
    engine, first = trained
    config = training.TrainingConfig(**{**FAST.__dict__, "holdout": 0.0})
    message = refused_and_intact(engine, DataError, "10 of 10 classes have fewer than 2", TRAIN_PREFIX, 2, 4,
                                 config=config)
    assert "--allow-unvalidated" in message
    [record] = [o.key for o in engine.store.list("ml-training/outputs/")
                if o.key.endswith("run.json") and json.loads(engine.store.get(o.key))["status"] == "failed"]
    assert not engine.store.list(record.replace("run.json", "pca/"))  # refused after partition, before PCA
    where = ["--store", engine.spec.url]
    assert main(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--holdout", "0", *FAST_FLAGS, *where]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--holdout", "0", "--allow-unvalidated", "--json",
                 *FAST_FLAGS, *where]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_validation"] == 0 and report["validation_accuracy"] is None and not report["validated"]
    assert mlwf.model.load("ml-inference/model", store=engine.store).digest == report["model_digest"]


def test_a_validated_run_says_so(trained):
    _, report = trained
    assert report["validated"] is True and min(report["validation_per_class"]) >= 2


def test_class_folders_named_like_odd_numbers_sort_without_an_internal_error():
    for names in (["2", "²"], ["--5", "3"], ["-1", "10", "9"], ["١", "2"]):
        out = training.partition(_listing({n: 10 for n in names}), prefix="data", num_pca=1, num_train=1,
                                 holdout=0.2, seed=0, n_components=2)
        assert sorted(out.info["classes"]) == sorted(names)
    assert training.sort_classes(["-1", "10", "9"]) == ["-1", "9", "10"]


def test_class_names_a_model_cannot_hold_are_refused_by_partition():
    with pytest.raises(DataError, match="a class name must be"):
        training.partition(_listing({"ok": 10, "bad\u0085name": 10}), prefix="data", num_pca=1, num_train=1,
                           holdout=0.2, seed=0, n_components=2)
    with pytest.raises(DataError, match="1,001 class folders"):
        training.partition(_listing({f"c{i}": 1 for i in range(1001)}), prefix="data", num_pca=1, num_train=1,
                           holdout=0.2, seed=0, n_components=2)


# --------------------------------------------------------------------------- absurd counts
@pytest.mark.parametrize("num_pca, num_train, config, error, match", [
    (10**9, 10**9, FAST, UsageError, "NUM_PCA must be at most 1,024"),
    (2, 10**18, FAST, UsageError, "NUM_TRAIN must be at most 1,024"),
    (1000, 1000, FAST, DataError, "too few for 1000 PCA functions"),
    (2, 1024, training.TrainingConfig(**{**FAST.__dict__, "n_trees": 10_000}), UsageError,
     "10,240,000 trees, more than the 100,000"),
])
def test_absurd_function_counts_are_refused_at_once(trained, num_pca, num_train, config, error, match):
    engine, first = trained
    before = snapshot(engine.store)
    with pytest.raises(error, match=match):
        engine.run_training(TRAIN_PREFIX, num_pca, num_train, config=config)
    after = snapshot(engine.store)
    assert {k: v for k, v in after.items() if not k.startswith("ml-training/outputs/")} == \
        {k: v for k, v in before.items() if not k.startswith("ml-training/outputs/")}


def test_partition_refuses_before_building_anything_sized_by_the_counts(monkeypatch):
    built = []
    monkeypatch.setattr(training, "train_split", lambda *a: built.append(a) or [1])
    with pytest.raises(DataError, match="too few"):
        training.partition(_listing({"a": 50, "b": 50}), prefix="data", num_pca=10**9, num_train=10**9,
                           holdout=0.2, seed=0, n_components=6)
    assert built == []


def test_partition_refuses_more_pixels_per_pca_function_than_allowed():
    with pytest.raises(DataError, match=r"more than the 4 GiB allowed.*more PCA functions"):
        training.partition(_listing({"a": 1500, "b": 1500}), prefix="data", num_pca=1, num_train=1,
                           holdout=0.2, seed=0, n_components=6, image_size=1024)


@pytest.mark.parametrize("argv, match", [
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--timeout", "inf"], "--timeout must be a positive, finite"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--timeout", "1e300"], "--timeout must be a positive, finite"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--timeout", "-1"], "--timeout must be a positive, finite"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--timeout", "nan"], "--timeout must be a positive, finite"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--holdout", "nan"], r"holdout must be a fraction in \[0, 1\)"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--holdout=-inf"], r"holdout must be a fraction"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--retries", "1000000000"], "--retries must be an integer"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--workers", "1000000000"], "--workers must be an integer"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--workers", "0"], "--workers must be an integer"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--trees", "1000000000"], r"n-trees must be an integer"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--seed", "-1"], "seed must be"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--stage-cpus", "train=inf"], "--stage-cpus 'train=inf'"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--stage-cpus", "train=nan"], "--stage-cpus 'train=nan'"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--stage-memory", "train=1e30"], "--stage-memory 'train=1e30'"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--model-prefix", ""], "names no folder"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--model-prefix", " / "], "names no folder"),
    (["run", "ml-inference", "ml-inference/model", BATCH_PREFIX, "1000000000"], "NUM_FUNCS must be at most 100,000"),
    (["run", "ml-inference", "ml-inference/model", BATCH_PREFIX, "2", "--timeout", "inf"], "--timeout"),
    (["run", "ml-inference", "", BATCH_PREFIX, "2"], "names no folder"),
])
def test_non_finite_negative_and_huge_numbers_are_one_error_line(trained, capsys, argv, match):
    engine, _ = trained
    before = snapshot(engine.store)
    assert main([*argv, "--store", engine.spec.url]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("mlwf: error: ") and "internal" not in err, err
    assert re.search(match, err), err
    assert snapshot(engine.store) == before


# --------------------------------------------------------------------------- library noise
def test_identical_images_give_one_warning_line_and_no_library_noise(tmp_path):
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "data" / label / f"{i}.png")
    where = ["--store", str(tmp_path / "store")]
    assert main(["s3", "upload-dir", "--host-path", str(tmp_path / "data"), "--s3-path", "flat",
                 "--create-bucket", *where]) == 0
    # A separate process: the workers' stderr is the real one, where library warnings used to land.
    done = subprocess.run([sys.executable, "-m", "mlwf.cli", "run", "ml-training", "flat", "2", "4", *FAST_FLAGS,
                           "--components", "2", *where], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["mlwf: warning: pca: its images are all identical, so its projection "
                                        "carries no information; check the data (2 of 2 calls)"]


def test_a_library_warning_inside_a_stage_becomes_a_fact_of_the_run(monkeypatch, tmp_path):
    import warnings

    from mlwf.engine import runner
    from mlwf.engine.calls import Call, RunContext
    from mlwf.storage import StoreSpec
    from mlwf.workflows.base import StageOutput

    def noisy(list_keys, *, prefix):
        for _ in range(50):
            warnings.warn("a library complaint", UserWarning, stacklevel=1)
        warnings.warn("another one\nwith a second line", RuntimeWarning, stacklevel=1)
        return StageOutput({"assignments": [], "holdout": []}, {"n": 1})

    monkeypatch.setattr(training, "partition", noisy)
    StoreSpec(str(tmp_path / "store"), "tless").open().create_bucket()  # its outputs are put there
    ctx = RunContext("r", "ml-training", str(tmp_path / "store"), "tless", "ml-training/outputs/r", "store")
    with warnings.catch_warnings(record=True) as printed:
        warnings.simplefilter("always")
        outcome = runner.execute(Call("ml-training", "partition", 0, {"prefix": "x"}), ctx)
        warnings.warn("outside a stage call", UserWarning, stacklevel=1)
    assert [str(w.message) for w in printed] == ["outside a stage call"]  # shown as usual, the others collected
    assert outcome.info == {"n": 1, "warnings": ["RuntimeWarning: another one", "UserWarning: a library complaint"]}
