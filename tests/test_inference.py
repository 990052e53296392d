"""ml-inference: each stage on its own, then the whole workflow after a training run."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

import mlwf.model
from mlwf import codec, runs
from mlwf.errors import DataError, MlwfError, ModelError, NotFoundError, UsageError
from mlwf.workflows import inference
from mlwf.workflows.base import Blob
from mlwf.workflows.inference import INFERENCE
from tests.conftest import BATCH_PREFIX, FAST, TRAIN_PREFIX

MODEL_PREFIX = "ml-inference/model"


# --------------------------------------------------------------------------- helpers
def _listing(keys):
    return lambda p: [k for k in sorted(keys) if k.startswith(p)]


def _fetch_from(objects: dict[str, bytes]):
    """A ``fetch(keys)`` over a dict that fails like a store does for a missing key."""

    def fetch(keys):
        out = []
        for k in keys:
            if k not in objects:
                raise NotFoundError(f"no object {k!r}")
            out.append(objects[k])
        return out

    return fetch


def _png(arr, mode=None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(np.asarray(arr, dtype=np.uint8))
    if mode:
        img = img.convert(mode)
    img.save(buf, format="PNG")
    return buf.getvalue()


def _threshold_model() -> mlwf.model.Model:
    """Two classes over 2×2 images: 'dark' if the top-left pixel is <= 0.5, else 'bright'."""
    member = {
        "projection": 0, "max_depth": 1,
        "roots": np.array([0], np.int32),
        "left": np.array([1, 1, 2], np.int32), "right": np.array([2, 1, 2], np.int32),
        "feature": np.array([0, 0, 0], np.int32), "threshold": np.array([0.5, 0, 0], np.float64),
        "leaf_index": np.array([-1, 0, 1], np.int32),
        "leaf_value": np.array([[1.0, 0.0], [0.0, 1.0]], np.float32),
    }
    proj = {"mean": np.zeros(4), "components": np.eye(1, 4)}
    return mlwf.model.build(["dark", "bright"], 2, [proj], [member])


def _manifest_for(prefix: str, data: bytes) -> dict[str, bytes]:
    obj = f"{prefix}/versions/{codec.digest(data)}.mlwf"
    manifest = {"format": mlwf.model.MANIFEST_FORMAT, "object": obj, "sha256": codec.digest(data),
                "size": len(data), "run_id": "r1"}
    return {f"{prefix}/MODEL.json": json.dumps(manifest).encode(), obj: data}


def _csv_rows(engine, report) -> list[list[str]]:
    return list(csv.reader(io.StringIO(engine.store.get(report["results_key"]).decode())))


def _predictions_written(engine) -> list[str]:
    return [o.key for o in engine.store.list("ml-inference/outputs/") if o.key.endswith("predictions.csv")]


def _batch_keys(engine, prefix=BATCH_PREFIX) -> list[str]:
    return [o.key for o in engine.store.list(prefix + "/")]


# --------------------------------------------------------------------------- partition
def test_partition_deals_keys_round_robin_in_key_order():
    keys = [f"data/{c}/{i:03d}.png" for c in ("a", "b") for i in range(5)]
    out = inference.partition(_listing(keys), prefix="data", num_funcs=3)
    assert [p["keys"] for p in out.parts["assignments"]] == [sorted(keys)[i::3] for i in range(3)]
    assert [len(p["keys"]) for p in out.parts["assignments"]] == [4, 3, 3]
    for p in out.parts["assignments"]:
        assert p["labels"] == [k.split("/")[1] for k in p["keys"]]
    assert out.info == {"num_images": 10, "num_funcs": 3, "labelled": 10}
    again = inference.partition(_listing(keys), prefix="data/", num_funcs=3)
    assert again.parts == out.parts


def test_partition_labels_flat_keys_none_and_clamps_functions_to_images():
    keys = ["imgs/x.png", "imgs/y.png", "imgs/3/z.png"]
    out = inference.partition(_listing(keys + ["other/w.png"]), prefix="imgs", num_funcs=8)
    assert out.info["num_funcs"] == 3 and len(out.parts["assignments"]) == 3
    assert out.info["num_images"] == 3 and out.info["labelled"] == 1
    by_key = {k: lab for p in out.parts["assignments"] for k, lab in zip(p["keys"], p["labels"])}
    assert by_key == {"imgs/3/z.png": "3", "imgs/x.png": None, "imgs/y.png": None}


def test_partition_without_images_says_to_upload():
    with pytest.raises(DataError, match="no images under prefix 'imgs/'.*upload-dir"):
        inference.partition(_listing(["elsewhere/a.png"]), prefix="imgs", num_funcs=2)


# --------------------------------------------------------------------------- load
def test_load_hands_on_the_checked_model_bytes():
    data = _threshold_model().to_bytes()
    out = inference.load(_fetch_from(_manifest_for("m", data)), model_prefix="m")
    blob = out.parts["model"]
    assert isinstance(blob, Blob) and blob.data == data
    assert INFERENCE.stage("predict").input("model").decode == "mlwf.model:from_bytes"  # read as a model
    # Handed on as the published version object itself, not as a copy to store.
    assert blob.stored_at == f"m/versions/{codec.digest(data)}.mlwf"
    assert out.info["model_digest"] == codec.digest(data)
    assert out.info["classes"] == ["dark", "bright"] and out.info["image_size"] == 2
    assert out.info["model_run_id"] == "r1"


def test_load_without_a_manifest_says_to_train_first():
    with pytest.raises(ModelError, match="run ml-training first") as info:
        inference.load(_fetch_from({}), model_prefix="m")
    assert "\n" not in str(info.value)


def test_load_refuses_an_object_that_does_not_match_its_manifest():
    objects = _manifest_for("m", _threshold_model().to_bytes())
    obj = next(k for k in objects if k.endswith(".mlwf"))
    objects[obj] = objects[obj][:-1] + bytes([objects[obj][-1] ^ 1])
    with pytest.raises(ModelError, match="does not match its manifest checksum"):
        inference.load(_fetch_from(objects), model_prefix="m")


# --------------------------------------------------------------------------- predict
def test_predict_classifies_skips_undecodable_and_keeps_labels_aligned():
    model = _threshold_model()
    blobs = {"d/a/0.png": _png([[10, 255], [255, 255]]),   # dark top-left
             "d/b/1.png": _png([[250, 0], [0, 0]]),        # bright top-left
             "d/a/2.png": b"not a png",
             "d/x.png": _png([[0, 0], [0, 0]], mode="RGB")}
    assignment = {"keys": list(blobs), "labels": ["a", "b", "a", None]}
    out = inference.predict(assignment, model, _fetch_from(blobs))
    part = out.parts["predictions"]
    assert part["keys"] == ["d/a/0.png", "d/b/1.png", "d/x.png"]
    assert part["labels"] == ["a", "b", None]
    assert [model.classes[i] for i in part["pred"]] == ["dark", "bright", "dark"]
    assert np.allclose(part["prob"], 1.0)
    assert out.info == {"num_images": 3, "skipped": 1, "skipped_reasons": {
        "d/a/2.png": "not a PNG or JPEG file: mlwf decodes PNG and JPEG images only; convert it to PNG"}}


# --------------------------------------------------------------------------- workflow
def _bytes_under(engine, prefix: str) -> int:
    """Bytes under ``prefix``, but the runs' traces (their timelines, for mlwf ui: no data of the run)."""
    return sum(o.size for o in engine.store.list(prefix) if not o.key.endswith("/trace.json"))


@pytest.mark.parametrize("transfer", ["store", "direct"])
def test_an_inference_run_references_the_published_model_and_stores_no_copy(trained, transfer):
    engine, training_report = trained
    manifest = json.loads(engine.store.get(f"{MODEL_PREFIX}/MODEL.json"))
    model_bytes = manifest["size"]
    with type(engine)(engine.spec.url, "tless", transfer=transfer) as e:
        before = _bytes_under(e, "")
        reports = [e.run_inference(MODEL_PREFIX, BATCH_PREFIX, 3) for _ in range(3)]
        grown = _bytes_under(e, "") - before
    # Three runs wrote their results and intermediates, and no copy of the model.
    assert grown < model_bytes, (grown, model_bytes)
    for report in reports:
        assert report["model_digest"] == training_report["model_digest"]
        assert report["accuracy"] > 0.7
        run_folder = f"ml-inference/outputs/{report['run_id']}/"
        assert not [o.key for o in engine.store.list(run_folder) if o.size >= model_bytes]
    if transfer == "store":
        done = json.loads(engine.store.get(f"ml-inference/outputs/{reports[0]['run_id']}/load/0.done.json"))
        ref = done["outcome"]["outputs"]["model"]
        assert ref["key"] == manifest["object"] and ref["sha256"] == manifest["sha256"]


def test_a_referenced_model_replaced_after_load_is_refused_before_predict_runs(trained):
    from mlwf.engine import runner
    from mlwf.engine.calls import Call, Ref, RunContext

    engine, _ = trained
    manifest = json.loads(engine.store.get(f"{MODEL_PREFIX}/MODEL.json"))
    data = engine.store.get(manifest["object"])
    handed_on = Ref(sha256=codec.digest(data), nbytes=len(data), key=manifest["object"], producer="load")
    # Replaced, since load checked it, by another whole and valid model.
    other = engine.run_training(TRAIN_PREFIX, 2, 4, config=dataclasses.replace(FAST, seed=1), model_prefix="other")
    engine.store.put(manifest["object"], engine.store.get(f"other/versions/{other['model_digest']}.mlwf"))
    ctx = RunContext("r", "ml-inference", engine.spec.url, "tless", "ml-inference/outputs/r")
    call = Call("ml-inference", "predict", 0, {"model": handed_on, "assignment": {"keys": [], "labels": []}})
    with pytest.raises(DataError, match="replaced or damaged") as info:
        runner.execute(call, ctx)
    assert manifest["object"] in str(info.value) and "\n" not in str(info.value)


def test_a_resumed_inference_run_reuses_the_referenced_model(trained, monkeypatch):
    engine, training_report = trained
    monkeypatch.setenv("MLWF_FAULTS", "predict:1:raise:99")
    with pytest.raises(MlwfError):
        with type(engine)(engine.spec.url, "tless", retries=0, workers=1) as e:
            e.run_inference(MODEL_PREFIX, BATCH_PREFIX, 3)
    monkeypatch.delenv("MLWF_FAULTS")
    [failed] = [r for r in runs.list_runs(engine.store) if r["workflow"] == "ml-inference"]
    assert failed["status"] == "failed"
    report = engine.run_inference(MODEL_PREFIX, BATCH_PREFIX, 3, resume=failed["run_id"])
    assert report["run_id"] == failed["run_id"]
    assert report["stages"]["load"]["reused"] == 1 and report["stages"]["load"]["attempts"] == 0
    assert report["model_digest"] == training_report["model_digest"]
    assert report["num_predicted"] == 120 and report["accuracy"] > 0.7


def test_labelled_batch_reports_accuracy_confusion_and_writes_the_csv(trained):
    engine, training_report = trained
    report = engine.run_inference(MODEL_PREFIX, BATCH_PREFIX, 3)
    for key in ("workflow", "run_id", "backend", "num_images", "e2e_ms", "stage_ms", "accuracy",
                "results_key", "model_digest"):
        assert key in report
    assert report["workflow"] == "ml-inference" and report["backend"] == "local"
    assert set(report["stage_ms"]) == {"partition", "load", "predict"}
    assert report["e2e_ms"] > 0
    assert report["model_digest"] == training_report["model_digest"]
    assert report["num_images"] == 120 and report["num_predicted"] == 120 and report["skipped"] == 0
    assert report["results_key"] == f"ml-inference/outputs/{report['run_id']}/predictions.csv"

    rows = _csv_rows(engine, report)
    assert rows[0] == ["key", "prediction", "probability", "label"]
    body = rows[1:]
    assert [r[0] for r in body] == _batch_keys(engine)  # one row per image, in key order
    assert all(r[3] == r[0].split("/")[2] for r in body)
    assert all(r[1] in training_report["classes"] and 0 < float(r[2]) <= 1 for r in body)
    correct = sum(r[1] == r[3] for r in body)
    assert report["accuracy"] == pytest.approx(correct / 120)
    assert report["accuracy"] > 0.7

    confusion = report["confusion"]
    matrix = np.array(confusion["matrix"])
    assert confusion["labels"] == training_report["classes"]
    assert matrix.sum() == 120 and np.trace(matrix) == correct
    summary = json.loads(engine.store.get(report["summary_key"]))
    assert summary["run_id"] == report["run_id"] and summary["accuracy"] == report["accuracy"]
    run = json.loads(engine.store.get(f"ml-inference/outputs/{report['run_id']}/run.json"))
    assert run["status"] == "succeeded"


def test_unlabelled_images_get_predictions_but_no_accuracy(trained):
    engine, training_report = trained
    keys = _batch_keys(engine)[:3]
    for i, key in enumerate(keys):
        engine.store.put(f"ml-inference/flat/x{i}.png", engine.store.get(key))
    report = engine.run_inference(MODEL_PREFIX, "ml-inference/flat", 8)
    assert report["accuracy"] is None and report["confusion"] is None
    assert report["num_funcs"] == 3 and report["stages"]["predict"]["calls"] == 3
    rows = _csv_rows(engine, report)[1:]
    assert [r[0] for r in rows] == [f"ml-inference/flat/x{i}.png" for i in range(3)]
    assert all(r[3] == "" for r in rows)
    assert all(r[1] in training_report["classes"] for r in rows)


def test_library_model_agrees_with_the_workflow_csv(trained):
    engine, _ = trained
    report = engine.run_inference(MODEL_PREFIX, BATCH_PREFIX, 4)
    rows = _csv_rows(engine, report)[1:]
    model = mlwf.model.load(MODEL_PREFIX, store=engine.store)
    images = [engine.store.get(r[0]) for r in rows]
    assert model.digest == report["model_digest"]
    assert model.predict(images).tolist() == [r[1] for r in rows]
    proba = model.predict_proba(images)
    assert [f"{p:.6f}" for p in proba.max(axis=1)] == [r[2] for r in rows]


def test_a_single_image_is_classified_as_within_the_batch(trained):
    """The trained projection is applied: an image's answer does not depend on its batch."""
    engine, _ = trained
    report = engine.run_inference(MODEL_PREFIX, BATCH_PREFIX, 2)
    rows = {r[0]: r for r in _csv_rows(engine, report)[1:]}
    model = mlwf.model.load(MODEL_PREFIX, store=engine.store)
    for key in list(rows)[::17]:
        alone = model.predict_proba([engine.store.get(key)])[0]
        assert model.classes[int(np.argmax(alone))] == rows[key][1]
        assert f"{alone.max():.6f}" == rows[key][2]
    # A whole workflow over a batch of one image gives the same answer too.
    key = list(rows)[5]
    engine.store.put("ml-inference/one/" + key.split("/")[-2] + "/only.png", engine.store.get(key))
    one = engine.run_inference(MODEL_PREFIX, "ml-inference/one", 4)
    [row] = _csv_rows(engine, one)[1:]
    assert row[1:3] == rows[key][1:3] and one["num_funcs"] == 1


# --------------------------------------------------------------------------- bad input
def test_no_model_says_run_training_first_and_writes_nothing(engine):
    with pytest.raises(ModelError, match="run ml-training first") as info:
        engine.run_inference(MODEL_PREFIX, BATCH_PREFIX, 2)
    assert "\n" not in str(info.value)
    assert engine.store.list("ml-inference/outputs/") == []


def _republish(engine, data: bytes) -> None:
    mlwf.model.publish(engine.store, MODEL_PREFIX, data, run_id="tampered")


def _reencoded(engine, **changes) -> bytes:
    meta = codec.decode(engine.store.get(_manifest(engine)["object"]))
    meta.update(changes)
    return codec.encode(meta)


def _manifest(engine) -> dict:
    return json.loads(engine.store.get(f"{MODEL_PREFIX}/MODEL.json"))


def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x40]) + data[pos + 1:]


def _incompatible_version(engine):
    _republish(engine, _reencoded(engine, version=2))


def _truncated_in_place(engine):
    obj = _manifest(engine)["object"]
    engine.store.put(obj, engine.store.get(obj)[:-100])


def _truncated_published(engine):
    data = engine.store.get(_manifest(engine)["object"])
    _republish(engine, data[: len(data) // 2])


def _flipped_in_place(engine):
    obj = _manifest(engine)["object"]
    data = engine.store.get(obj)
    engine.store.put(obj, _flip(data, len(data) - 10))


def _flipped_published(engine):
    data = engine.store.get(_manifest(engine)["object"])
    _republish(engine, _flip(data, len(data) - 10))


def _manifest_sha_changed(engine):
    manifest = _manifest(engine)
    manifest["sha256"] = "0" * 64
    engine.store.put(f"{MODEL_PREFIX}/MODEL.json", json.dumps(manifest).encode())


def _manifest_not_json(engine):
    engine.store.put(f"{MODEL_PREFIX}/MODEL.json", b"{not json")


@pytest.mark.parametrize("tamper, match", [
    (_incompatible_version, "model format version 2, this mlwf reads version 1"),
    (_truncated_in_place, "does not match its manifest checksum"),
    (_truncated_published, "truncated|corrupt"),
    (_flipped_in_place, "does not match its manifest checksum"),
    (_flipped_published, "corrupt or was modified"),
    (_manifest_sha_changed, "names an object other than"),
    (_manifest_not_json, "manifest .* is corrupt"),
])
def test_untrustworthy_model_is_refused_before_predicting(trained, tamper, match):
    engine, _ = trained
    tamper(engine)
    with pytest.raises(ModelError, match=match) as info:
        engine.run_inference(MODEL_PREFIX, BATCH_PREFIX, 2)
    assert "\n" not in str(info.value)
    assert _predictions_written(engine) == []
    # No predict function ran: nothing was classified with the untrusted model.
    outputs = [o.key for o in engine.store.list("ml-inference/outputs/")]
    assert not [k for k in outputs if "/predict/" in k]
    runs = [json.loads(engine.store.get(k)) for k in outputs if k.endswith("run.json")]
    assert all(r["status"] == "failed" for r in runs)


def test_prefix_without_objects_is_a_data_error(trained):
    engine, _ = trained
    with pytest.raises(DataError, match="no images under prefix 'ml-inference/nothing/'"):
        engine.run_inference(MODEL_PREFIX, "ml-inference/nothing", 2)
    assert _predictions_written(engine) == []


def test_prefix_without_any_decodable_image_is_a_data_error(trained):
    engine, _ = trained
    engine.store.put("ml-inference/junk/README.txt", b"hello")
    engine.store.put("ml-inference/junk/3/broken.png", b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match="no decodable image") as info:
        engine.run_inference(MODEL_PREFIX, "ml-inference/junk", 2)
    assert "\n" not in str(info.value)
    assert _predictions_written(engine) == []


def test_corrupt_objects_among_images_are_skipped_and_counted(trained):
    engine, _ = trained
    engine.store.put(f"{BATCH_PREFIX}/3/broken.png", b"\x89PNG\r\n\x1a\n truncated")
    engine.store.put(f"{BATCH_PREFIX}/notes.txt", b"hello")
    report = engine.run_inference(MODEL_PREFIX, BATCH_PREFIX, 3)
    assert report["skipped"] == 2
    assert report["skipped_examples"] == [f"{BATCH_PREFIX}/3/broken.png", f"{BATCH_PREFIX}/notes.txt"]
    assert list(report["skipped_reasons"]) == report["skipped_examples"]
    assert "PNG without its header chunk" in report["skipped_reasons"][f"{BATCH_PREFIX}/3/broken.png"]
    assert "not a PNG or JPEG file" in report["skipped_reasons"][f"{BATCH_PREFIX}/notes.txt"]
    assert report["num_images"] == 122 and report["num_predicted"] == 120
    rows = _csv_rows(engine, report)[1:]
    assert len(rows) == 120 and not {r[0] for r in rows} & set(report["skipped_examples"])
    assert report["accuracy"] > 0.7


@pytest.mark.parametrize("num_funcs", [0, -1, True, 2.0])
def test_num_funcs_must_be_a_positive_integer(trained, num_funcs):
    engine, _ = trained
    with pytest.raises(UsageError, match="NUM_FUNCS must be a positive integer"):
        engine.run_inference(MODEL_PREFIX, BATCH_PREFIX, num_funcs)
    assert engine.store.list("ml-inference/outputs/") == []


def test_colour_and_other_sized_images_are_converted_as_in_training(trained):
    engine, _ = trained
    key = _batch_keys(engine)[7]
    label = key.split("/")[-2]
    grey = np.asarray(Image.open(io.BytesIO(engine.store.get(key))))
    assert grey.ndim == 2
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    big = Image.fromarray(grey).resize((40, 30), Image.Resampling.NEAREST).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    objects = {f"ml-inference/colour/{label}/grey.png": engine.store.get(key),
               f"ml-inference/colour/{label}/rgb.png": _png(grey, mode="RGB"),
               f"ml-inference/colour/{label}/rgba.png": _png(rgba),
               f"ml-inference/colour/{label}/rgb40x30.png": buf.getvalue()}
    for k, v in objects.items():
        engine.store.put(k, v)
    report = engine.run_inference(MODEL_PREFIX, "ml-inference/colour", 2)
    assert report["skipped"] == 0 and report["num_predicted"] == 4
    rows = {r[0].rsplit("/", 1)[1]: r for r in _csv_rows(engine, report)[1:]}
    # Grey as RGB or opaque RGBA is the same grey image: same answer, same probability.
    assert rows["rgb.png"][1:3] == rows["grey.png"][1:3] == rows["rgba.png"][1:3]
    model = mlwf.model.load(MODEL_PREFIX, store=engine.store)
    assert rows["rgb40x30.png"][1] in model.classes
    assert model.predict([buf.getvalue()])[0] == rows["rgb40x30.png"][1]


# --------------------------------------------------------------------------- tampering
class _CreatesFile:
    """Unpickling this opens (and so creates) a file: a stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_nothing_from_a_tampered_model_is_executed(trained, tmp_path):
    engine, _ = trained
    # The payload is live: unpickling it really does create its file.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_CreatesFile(control))).close()
    assert control.exists()

    target = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(target))
    meta = codec.decode(engine.store.get(_manifest(engine)["object"]))
    meta["config"] = {**meta["config"], "evil": np.frombuffer(payload, dtype=np.uint8),
                      "evil_list": list(payload), "evil_text": payload.decode("latin-1")}
    data = codec.encode(meta)

    # Loaded as plain data: the bytes are there, nothing ran.
    model = mlwf.model.from_bytes(data)
    assert bytes(model.config["evil"]) == payload
    assert not target.exists()
    # A whole inference run with it publishes predictions and still runs nothing.
    _republish(engine, data)
    report = engine.run_inference(MODEL_PREFIX, BATCH_PREFIX, 2)
    assert report["model_digest"] == codec.digest(data) and report["num_predicted"] == 120
    assert not target.exists()

    # A pickle where a model should be is refused as not a model, without unpickling it.
    with pytest.raises(ModelError, match="bad magic"):
        mlwf.model.from_bytes(payload)
    path = tmp_path / "model.mlwf"
    path.write_bytes(payload)
    with pytest.raises(ModelError):
        mlwf.model.load(path)
    _republish(engine, payload)
    with pytest.raises(ModelError, match="bad magic"):
        engine.run_inference(MODEL_PREFIX, BATCH_PREFIX, 2)
    assert not target.exists()
