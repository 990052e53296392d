"""ONNX export: the exported graph, run by onnxruntime, gives mlwf's own predictions.

Agreement is checked on real images (the digits the fixtures write as PNG
files), for the small test model and for a model of the default size (100
trees per forest, depth 10, 8 members); plus a hand-built model whose
thresholds sit within float32 rounding of its inputs, so the export must
compare in float64 as mlwf does.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

import mlwf.model
from mlwf import codec
from mlwf.errors import ModelError, UsageError
from mlwf.serving import onnx as onnx_export
from mlwf.serving.prepare import onnx_metadata, prepare
from mlwf.workflows.training import TrainingConfig
from tests.conftest import FAST, TRAIN_PREFIX

#: The default model shape (trees, depth, components), on 28×28 images.
FULL = TrainingConfig(image_size=28, n_components=10, n_trees=100, max_depth=10, holdout=0.2, seed=0)
FAST_TREES = FAST.n_trees


def _images(digits_dir: Path) -> list[Path]:
    return sorted(digits_dir.rglob("*.png"))


def _run(path, pixels):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["label", "probabilities"], {"pixels": pixels})


def _assert_agrees(model, path, files):
    pixels = prepare(files, model.image_size)
    label, proba = _run(path, pixels)
    expected = model.predict_proba(files)
    assert label.dtype == np.int64 and label.shape == (len(files),)
    assert proba.dtype == np.float32 and proba.shape == (len(files), len(model.classes))
    assert np.array_equal(label, np.argmax(expected, axis=1))
    assert np.max(np.abs(proba - expected)) <= 1e-5
    names = np.asarray(onnx_metadata(path)["classes"])[label]
    assert names.tolist() == model.predict(files).tolist()


def test_exported_graph_agrees_with_mlwf_on_real_images(trained, digits_dir, tmp_path):
    engine, report = trained
    model = mlwf.model.load("ml-inference/model", store=engine.store)
    path = tmp_path / "model.onnx"
    result = onnx_export.export(model, path)
    assert result["check"]["label_agreement"] == 1.0 and result["check"]["max_abs_diff"] <= 1e-5
    assert result["num_trees"] == 4 * FAST_TREES and result["bytes"] == path.stat().st_size
    _assert_agrees(model, path, _images(digits_dir))



def test_a_default_size_model_agrees_too(engine, digits_dir, tmp_path):
    report = engine.run_training(TRAIN_PREFIX, 2, 8, config=FULL, model_prefix="models/full")
    model = mlwf.model.load("models/full", store=engine.store)
    assert model.digest == report["model_digest"] and len(model.members) == 8
    assert sum(len(m["roots"]) for m in model.members) == 800
    path = tmp_path / "full.onnx"
    onnx_export.export(model, path)
    _assert_agrees(model, path, _images(digits_dir))


def test_metadata_names_classes_image_size_and_digest(trained, tmp_path):
    engine, report = trained
    model = mlwf.model.load("ml-inference/model", store=engine.store)
    path = tmp_path / "model.onnx"
    onnx_export.export(model, path)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == model.classes == [str(d) for d in range(10)]
    assert int(props["image_size"]) == model.image_size == 16
    assert props["model_digest"] == report["model_digest"]
    assert onnx_metadata(path) == {"classes": model.classes, "image_size": 16,
                                   "model_digest": report["model_digest"]}
    [graph_input] = proto.graph.input
    assert graph_input.name == "pixels"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value or d.dim_param for d in graph_input.type.tensor_type.shape.dim] == ["N", 256]
    outputs = {o.name: o.type.tensor_type for o in proto.graph.output}
    assert outputs["label"].elem_type == onnx.TensorProto.INT64
    assert outputs["probabilities"].elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value or d.dim_param for d in outputs["probabilities"].shape.dim] == ["N", 10]


def _threshold_model():
    """Two trees on pixel 0 of 2×2 images, two classes; pixel value 100/255 meets both thresholds.

    Tree 0's threshold is 1e-12 below the pixel: float64 sends the pixel right
    (class "yes"), but the threshold rounded to float32 equals the pixel and
    would send it left. Tree 1's threshold is the pixel itself: left ("no"-ish).
    """
    x = float(np.float32(100) / np.float32(255))
    assert np.float32(x - 1e-12) == np.float32(x)
    member = {"projection": 0, "max_depth": 1, "roots": np.array([0, 3], np.int32),
              "left": np.array([1, 1, 2, 4, 4, 5], np.int32), "right": np.array([2, 1, 2, 5, 4, 5], np.int32),
              "feature": np.zeros(6, np.int32),
              "threshold": np.array([x - 1e-12, 0, 0, x, 0, 0], np.float64),
              "leaf_index": np.array([-1, 0, 1, -1, 2, 3], np.int32),
              "leaf_value": np.array([[1, 0], [0, 1], [0.25, 0.75], [0.5, 0.5]], np.float32)}
    meta = {"format": "mlwf-model", "version": 1, "classes": ["no", "yes"], "image_size": 2, "config": {},
            "metrics": {}, "projections": [{"mean": np.zeros(4), "components": np.eye(1, 4)}],
            "members": [member]}
    return mlwf.model.from_bytes(codec.encode(meta))


def test_thresholds_compare_in_float64_as_mlwf_does(tmp_path):
    model = _threshold_model()
    images = np.array([[[100, 0], [0, 0]], [[99, 0], [0, 0]], [[101, 0], [0, 0]]], np.uint8)
    expected = model.predict_proba(images)
    assert np.array_equal(expected, [[0.125, 0.875], [0.625, 0.375], [0.25, 0.75]])
    path = tmp_path / "t.onnx"
    onnx_export.export(model, path)
    label, proba = _run(path, prepare(images, 2))
    assert np.array_equal(proba, expected.astype(np.float32))
    assert label.tolist() == [1, 0, 1]


def test_export_refuses_bad_targets_and_writes_nothing_when_the_check_fails(trained, tmp_path, monkeypatch):
    engine, _ = trained
    model = mlwf.model.load("ml-inference/model", store=engine.store)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad in (tmp_path, tmp_path / "missing" / "m.onnx", "", fifo):
        with pytest.raises(UsageError):
            onnx_export.export(model, bad)
    assert stat.S_ISFIFO(fifo.stat().st_mode)  # never replaced by a regular file (think -o /dev/null)
    out = tmp_path / "out"
    out.mkdir()
    path = out / "model.onnx"
    path.write_bytes(b"the previous export")

    def disagree(data, model, **kwargs):
        raise ModelError("the exported graph disagrees with mlwf")

    monkeypatch.setattr(onnx_export, "check", disagree)
    with pytest.raises(ModelError):
        onnx_export.export(model, path)
    assert path.read_bytes() == b"the previous export"
    assert [p.name for p in out.iterdir()] == ["model.onnx"]  # no temporary file left behind


def test_prepare_is_the_workflows_decoding(trained, digits_dir):
    engine, _ = trained
    model = mlwf.model.load("ml-inference/model", store=engine.store)
    files = _images(digits_dir)[:20]
    pixels = prepare(files, model.image_size)
    assert pixels.dtype == np.float32 and pixels.flags.c_contiguous and pixels.shape == (20, 256)
    assert np.array_equal(model.proba_from_pixels(pixels), model.predict_proba(files))
    with pytest.raises(ValueError, match="image_size"):
        prepare(files, 0)
    with pytest.raises(ValueError, match="cannot be decoded"):
        prepare([b"not an image"], 16)


def test_onnx_metadata_refuses_other_files(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not an ONNX model"):
        onnx_metadata(junk)
    other = tmp_path / "other.onnx"
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(other))
    with pytest.raises(ValueError, match="not one exported by mlwf"):
        onnx_metadata(other)
