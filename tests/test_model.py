"""The model file: the codec it is written in, the checks on load, predict, load and publish."""

from __future__ import annotations

import hashlib
import json
import struct
import sys

import numpy as np
import pytest
from PIL import Image

import mlwf.model
from mlwf import codec
from mlwf.codec import CodecError
from mlwf.errors import ModelError
from mlwf.storage import StoreSpec


# --------------------------------------------------------------------------- codec
def _value():
    return {
        "name": "x", "n": 3, "ratio": 0.25, "ok": True, "none": None,
        "scalar": np.float64(1.5), "count": np.int32(7),
        "nested": [{"ints": np.arange(6, dtype=np.int8).reshape(2, 3)}, [np.array([True, False])]],
        "arrays": {
            "u8": np.arange(256, dtype=np.uint8),
            "u16": np.array([0, 65535], dtype=np.uint16),
            "i32": np.array([[-1, 2], [3, -4]], dtype=np.int32),
            "i64": np.array([-(2**62), 2**62], dtype=np.int64),
            "f16": np.array([0.5, -2.0], dtype=np.float16),
            "f32": np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4),
            "f64": np.array([np.pi, -np.e, 1e-300]),
            "big_endian": np.array([1, 256, -5], dtype=">i4"),
            "empty": np.zeros((0, 3), dtype=np.float32),
            "strided": np.arange(20, dtype=np.int16)[::3],
        },
    }


def _assert_same(a, b):
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        assert b.shape == a.shape and b.dtype.str == a.dtype.newbyteorder("<").str  # stored little-endian
        assert np.array_equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, np.generic):
        assert b == a.item() and type(b) is type(a.item())
    else:
        assert b == a and type(b) is type(a)


def test_codec_round_trips_nested_values_and_arrays_of_many_dtypes():
    value = _value()
    back = codec.decode(codec.encode(value))
    _assert_same(value, back)
    assert back["arrays"]["big_endian"].dtype == np.dtype("<i4")
    assert back["arrays"]["big_endian"].tolist() == [1, 256, -5]
    assert back["arrays"]["strided"].tolist() == list(range(0, 20, 3))


def test_codec_bytes_are_deterministic():
    a = codec.encode(_value())
    assert codec.encode(_value()) == a
    assert codec.encode({"b": 2, "a": np.ones(3)}) == codec.encode({"a": np.ones(3), "b": 2})
    assert codec.digest(a) == hashlib.sha256(a).hexdigest()
    assert codec.encode({"a": np.ones(3)}) != codec.encode({"a": np.ones(3, dtype=np.float32)})


def test_codec_lists_of_plain_values_keep_the_depth_bound_and_their_types():
    payload = codec.encode({"keys": ("a", "b"), "deep": [[[1, "x", None, 2.5, True]]], "mixed": [1, np.arange(2)]})
    back = codec.decode(payload)
    assert back["keys"] == ["a", "b"] and back["deep"] == [[[1, "x", None, 2.5, True]]]
    assert back["mixed"][0] == 1 and back["mixed"][1].tolist() == [0, 1]
    assert codec.decode(codec.encode([[[1]]]), max_depth=4) == [[[1]]]
    with pytest.raises(codec.CodecError, match="nested more than 3 deep"):
        codec.decode(codec.encode([[[1]]]), max_depth=3)  # the scalars sit at depth 4
    with pytest.raises(TypeError):
        codec.encode({"keys": ["a", object()]})
    assert codec.encode([np.int64(3), 1.5]) == codec.encode([3, 1.5])


@pytest.mark.parametrize("value", [
    {"a": np.array([object()], dtype=object)},
    {"a": np.array(["text"])},
    {1: "non-string key"},
    {"a": {1, 2}},
    {"__array__": 0},
])
def test_codec_encode_refuses_what_it_cannot_represent(value):
    with pytest.raises(TypeError):
        codec.encode(value)


_PRE = struct.Struct("<4sIQ")


def _raw(header: dict, body: bytes, *, magic=b"MLWF", version=1, fix_sha=True) -> bytes:
    """A payload assembled by hand, so headers codec.encode would never write can be tried."""
    if fix_sha:
        header = {**header, "sha256": hashlib.sha256(body).hexdigest()}
    hjson = json.dumps(header).encode()
    pad = b"\0" * ((-(_PRE.size + len(hjson))) % 64)
    return _PRE.pack(magic, version, len(hjson)) + hjson + pad + body


def _good_parts():
    body = np.arange(4, dtype="<i4").tobytes()
    header = {"arrays": [{"dtype": "<i4", "shape": [4], "offset": 0, "nbytes": 16}],
              "meta": {"a": {"__array__": 0}}}
    return header, body


def test_hand_built_payload_is_valid_so_the_refusals_below_are_meaningful():
    header, body = _good_parts()
    assert codec.decode(_raw(header, body))["a"].tolist() == [0, 1, 2, 3]


def _with_array(**changes):
    header, body = _good_parts()
    header["arrays"] = [{**header["arrays"][0], **changes}]
    return _raw(header, body)


_GOOD = codec.encode({"x": np.arange(10, dtype=np.float64), "y": "text"})


@pytest.mark.parametrize("data, match", [
    (b"NOPE" + _GOOD[4:], "bad magic"),
    (_GOOD[:4] + struct.pack("<I", 2) + _GOOD[8:], "payload format version 2"),
    (b"", "truncated"),
    (_GOOD[:10], "truncated"),
    (_GOOD[:40], "truncated"),
    (_GOOD[:-1], "checksum mismatch"),
    (_GOOD[:-3] + b"\x01\x02\x03", "checksum mismatch"),
    (_raw(*_good_parts(), fix_sha=False), "unreadable header"),
    (_raw({**_good_parts()[0], "sha256": "0" * 64}, _good_parts()[1], fix_sha=False), "checksum mismatch"),
    (_with_array(offset=8), "bad array table"),
    (_with_array(offset=-16), "bad array table"),
    (_with_array(nbytes=1 << 40, shape=[1 << 38]), "bad array table"),
    (_with_array(shape=[5]), "bad array table"),
    (_with_array(shape=[-4]), "bad array table"),
    (_with_array(dtype="|O", nbytes=16, shape=[2]), "bad array table"),
    (_with_array(dtype="<U4", shape=[1]), "bad array table"),
    (_with_array(dtype=">i4"), "bad array table"),
    (_raw({**_good_parts()[0], "meta": {"a": {"__array__": 3}}}, _good_parts()[1]), "bad array reference"),
    (_raw({"meta": {}}, b""), "unreadable header"),
])
def test_codec_decode_refuses_bad_bytes(data, match):
    with pytest.raises(CodecError, match=match) as info:
        codec.decode(data, what="thing.bin")
    assert "thing.bin" in str(info.value) and "\n" not in str(info.value)


def test_codec_decode_never_unpickles_an_object_array(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    body = pickle.dumps(np.array([Boom()], dtype=object))
    header = {"arrays": [{"dtype": "|O", "shape": [1], "offset": 0, "nbytes": len(body)}],
              "meta": {"a": {"__array__": 0}}}
    with pytest.raises(CodecError):
        codec.decode(_raw(header, body))
    assert not (tmp_path / "ran").exists()


# --------------------------------------------------------------------------- model structure
def _tree_meta(**member_changes):
    """A valid model payload's metadata: one tree over 2×2 images, 2 classes, 2 components.

    Node 0 splits on component 0, node 1 on component 1; nodes 2, 3, 4 are leaves.
    """
    member = {
        "projection": 0, "max_depth": 2,
        "roots": np.array([0], np.int32),
        "left": np.array([1, 3, 2, 3, 4], np.int32),
        "right": np.array([2, 4, 2, 3, 4], np.int32),
        "feature": np.array([0, 1, 0, 0, 0], np.int32),
        "threshold": np.array([0.5, 0.5, 0, 0, 0], np.float64),
        "leaf_index": np.array([-1, -1, 0, 1, 2], np.int32),
        "leaf_value": np.array([[0, 1], [1, 0], [0.5, 0.5]], np.float32),
    }
    member.update(member_changes)
    return {"format": "mlwf-model", "version": 1, "classes": ["no", "yes"], "image_size": 2,
            "config": {}, "metrics": {},
            "projections": [{"mean": np.zeros(4), "components": np.eye(2, 4)}], "members": [member]}


def test_the_hand_built_model_loads_and_predicts_as_designed():
    model = mlwf.model.from_bytes(codec.encode(_tree_meta()))
    images = np.array([[[255, 0], [0, 0]],      # component 0 high -> leaf 2 -> "yes"
                       [[0, 0], [0, 0]],        # both low -> leaf 3 -> "no"
                       [[0, 255], [0, 0]]],     # component 1 high -> leaf 4 -> 50/50
                      dtype=np.uint8)
    proba = model.predict_proba(images)
    assert np.allclose(proba, [[0, 1], [1, 0], [0.5, 0.5]])
    assert model.predict(images[:2]).tolist() == ["yes", "no"]


def _i32(*v):
    return np.array(v, np.int32)


@pytest.mark.parametrize("meta, match", [
    (_tree_meta(left=_i32(1, 0, 2, 3, 4)), "tree links"),                     # child 1 -> 0: a cycle
    (_tree_meta(right=_i32(2, 1, 2, 3, 4)), "tree links"),                    # node points to itself
    (_tree_meta(left=_i32(1, 9, 2, 3, 4)), "tree links"),                     # out of range
    (_tree_meta(feature=_i32(2, 1, 0, 0, 0)), "tree features"),               # only 2 components
    (_tree_meta(feature=_i32(0, -1, 0, 0, 0)), "tree features"),
    (_tree_meta(leaf_value=np.ones((3, 3), np.float32)), "leaf values"),      # 3 classes for 2
    (_tree_meta(leaf_value=np.ones((2, 2), np.float32)), "leaf values"),      # 2 leaves for 3
    (_tree_meta(leaf_value=np.array([[0, 1], [1, 0], [np.nan, 1]], np.float32)), "leaf values"),
    (_tree_meta(leaf_index=_i32(-1, -1, 0, 1, 7)), "leaf index"),
    (_tree_meta(roots=_i32(3)), "tree roots"),
    (_tree_meta(max_depth=1), "deeper than its stated depth"),
    (_tree_meta(projection=1), "member projection"),
    (_tree_meta(threshold=np.zeros(4)), "tree array lengths"),
    (_tree_meta(feature=np.zeros(5, np.float32)), "'feature' holds float32, the format holds int32"),
    ({**_tree_meta(), "image_size": 3}, "projection shape"),
    ({**_tree_meta(), "classes": ["a", "a"]}, "class list"),
    ({**_tree_meta(), "members": []}, "empty ensemble"),
    ({**_tree_meta(), "members": ["x"]}, "member fields"),
    ({**_tree_meta(), "version": 99}, "model format version 99"),
    ({**_tree_meta(), "format": "something-else"}, "not an mlwf model"),
    ({k: v for k, v in _tree_meta().items() if k != "classes"}, "missing fields"),
])
def test_from_bytes_refuses_a_structurally_bad_model_with_a_valid_checksum(meta, match):
    data = codec.encode(meta)
    codec.decode(data)  # the payload itself is intact: only the model inside is bad
    with pytest.raises(ModelError, match=match) as info:
        mlwf.model.from_bytes(data, source="evil.mlwf")
    assert "evil.mlwf" in str(info.value) and "\n" not in str(info.value)


def test_from_bytes_wraps_codec_errors_as_model_errors():
    data = codec.encode(_tree_meta())
    for bad in (data[:-1], data[:20], b"MLWX" + data[4:]):
        with pytest.raises(ModelError, match="refusing to load it"):
            mlwf.model.from_bytes(bad)


def test_to_bytes_round_trips_and_sets_the_digest():
    model = mlwf.model.from_bytes(codec.encode(_tree_meta()))
    data = model.to_bytes()
    assert model.digest == codec.digest(data)
    again = mlwf.model.from_bytes(data)
    assert again.to_bytes() == data and again.digest == model.digest
    assert again.classes == ["no", "yes"] and again.image_size == 2


# --------------------------------------------------------------------------- predict inputs
def test_predict_accepts_bytes_paths_pil_images_and_arrays_alike(trained, digits_dir):
    engine, _ = trained
    model = mlwf.model.load("ml-inference/model", store=engine.store)
    paths = sorted((digits_dir / "batch").rglob("*.png"))[::10]
    labels = [p.parent.name for p in paths]
    pils = [Image.open(p) for p in paths]
    arrays = np.stack([np.asarray(im) for im in pils])
    assert arrays.dtype == np.uint8 and arrays.ndim == 3
    forms = {
        "bytes": [p.read_bytes() for p in paths],
        "bytearray": [bytearray(p.read_bytes()) for p in paths],
        "str paths": [str(p) for p in paths],
        "Path": paths,
        "PIL": pils,
        "uint8 array": arrays,
        "float array": arrays.astype(np.float64) / 255.0,
    }
    expected = model.predict_proba(forms["bytes"])
    assert expected.shape == (len(paths), 10) and np.allclose(expected.sum(axis=1), 1)
    for name, images in forms.items():
        assert np.array_equal(model.predict_proba(images), expected), name
        assert model.predict(images).tolist() == [model.classes[i] for i in expected.argmax(axis=1)], name
    assert model.predict(arrays[0]).tolist() == model.predict(arrays[:1]).tolist()
    assert np.mean(model.predict(forms["bytes"]) == np.array(labels)) > 0.6
    with pytest.raises(ValueError, match="image 1 cannot be decoded"):
        model.predict([forms["bytes"][0], b"junk"])
    with pytest.raises(ValueError, match="shape"):
        model.predict(np.zeros((2, 2, 2, 2), np.uint8))


def test_load_from_a_file_path_and_from_bytes(trained, tmp_path):
    engine, report = trained
    manifest = json.loads(engine.store.get("ml-inference/model/MODEL.json"))
    data = engine.store.get(manifest["object"])
    path = tmp_path / "model.mlwf"
    path.write_bytes(data)
    for source in (path, str(path), data):
        model = mlwf.model.load(source)
        assert model.digest == report["model_digest"]
        assert model.predict(np.zeros((1, 8, 8), np.uint8))[0] in model.classes
    broken = tmp_path / "broken.mlwf"
    broken.write_bytes(data[:-7])
    with pytest.raises(ModelError, match="broken.mlwf"):
        mlwf.model.load(broken)


# --------------------------------------------------------------------------- publish
class _Recording:
    """A store that records the order of the writes that changed something."""

    def __init__(self, store):
        self._store = store
        self.puts: list[str] = []

    def put(self, key, data):
        self.puts.append(key)
        self._store.put(key, data)

    def put_if_absent(self, key, data):
        existed = self._store.exists(key)
        written = self._store.put_if_absent(key, data)
        if written and not existed:
            self.puts.append(key)
        return written

    def put_if_tag(self, key, data, tag):
        written = self._store.put_if_tag(key, data, tag)
        if written:
            self.puts.append(key)
        return written

    def __getattr__(self, name):
        return getattr(self._store, name)


def _model_bytes(threshold: float) -> bytes:
    meta = _tree_meta(threshold=np.array([threshold, 0.5, 0, 0, 0]))
    return mlwf.model.from_bytes(codec.encode(meta)).to_bytes()


def test_publish_writes_the_object_before_the_manifest_and_keeps_history(tmp_path):
    store = StoreSpec(str(tmp_path / "store"), "b").open()
    store.create_bucket()
    rec = _Recording(store)
    a, b = _model_bytes(0.25), _model_bytes(0.75)

    first = mlwf.model.publish(rec, "models/m", a, run_id="run-a")
    assert rec.puts == [first["object"], "models/m/MODEL.json"]
    assert first["object"] == f"models/m/versions/{codec.digest(a)}.mlwf" and first["history"] == []

    rec.puts.clear()
    second = mlwf.model.publish(rec, "models/m", b, run_id="run-b", summary={"note": 1})
    assert rec.puts == [second["object"], "models/m/MODEL.json"]
    manifest = json.loads(store.get("models/m/MODEL.json"))
    assert manifest == second and manifest["summary"] == {"note": 1}
    assert codec.digest(store.get(manifest["object"])) == manifest["sha256"] == codec.digest(b)
    assert manifest["size"] == len(b) and manifest["run_id"] == "run-b"
    assert [h["sha256"] for h in manifest["history"]] == [codec.digest(a)]
    assert manifest["history"][0]["run_id"] == "run-a"
    assert store.get(manifest["history"][0]["object"]) == a  # the previous version is still there
    assert mlwf.model.load("models/m", store=store).digest == codec.digest(b)

    # Re-publishing A: B goes into the history, A is not listed twice, A's object is not rewritten.
    rec.puts.clear()
    third = mlwf.model.publish(rec, "models/m", a, run_id="run-a2")
    assert rec.puts == ["models/m/MODEL.json"]
    assert [h["sha256"] for h in third["history"]] == [codec.digest(b)]
    assert mlwf.model.load("models/m", store=store).digest == codec.digest(a)


def test_history_is_bounded(tmp_path):
    store = StoreSpec(str(tmp_path / "store"), "b").open()
    store.create_bucket()
    for i in range(mlwf.model.HISTORY_LENGTH + 3):
        manifest = mlwf.model.publish(store, "m", _model_bytes(0.1 + i / 100), run_id=f"r{i}")
    assert len(manifest["history"]) == mlwf.model.HISTORY_LENGTH
    assert manifest["history"][0]["run_id"] == f"r{mlwf.model.HISTORY_LENGTH + 1}"


def test_read_published_refuses_an_object_changed_after_publishing(tmp_path):
    store = StoreSpec(str(tmp_path / "store"), "b").open()
    store.create_bucket()
    manifest = mlwf.model.publish(store, "m", _model_bytes(0.5), run_id="r")
    store.put(manifest["object"], _model_bytes(0.6))  # a valid model, but not the published one
    with pytest.raises(ModelError, match="does not match its manifest checksum"):
        mlwf.model.load("m", store=store)
    store.delete(manifest["object"])
    with pytest.raises(ModelError, match="is missing"):
        mlwf.model.load("m", store=store)
    with pytest.raises(ModelError, match="run ml-training first"):
        mlwf.model.load("elsewhere", store=store)


# --------------------------------------------------------------------------- the two tree walks
def _walk(model, pixels, compiled, monkeypatch):
    """Probabilities from a fresh copy of ``model``, with scikit-learn's compiled walk or the NumPy walk."""
    from mlwf.model import walk as forest_walk

    monkeypatch.setattr(forest_walk, "usable", lambda members, n_classes, n_rows: compiled)
    fresh = mlwf.model.from_bytes(model.to_bytes())
    with np.errstate(invalid="ignore"):  # infinite pixels project to NaN features
        proba = fresh.proba_from_pixels(pixels)
    assert bool(fresh._compiled) == (compiled and len(pixels) > 0)
    return proba


def test_the_compiled_walk_gives_the_numpy_walks_probabilities_bit_for_bit(trained, digits_dir, monkeypatch):
    engine, _ = trained
    model = mlwf.model.load("ml-inference/model", store=engine.store)
    from mlwf.images import decode_many

    pixels, _ = decode_many([p.read_bytes() for p in sorted((digits_dir / "batch").rglob("*.png"))],
                            model.image_size)
    # Rows that land exactly on thresholds, beyond every threshold, and NaN (which goes left in both).
    odd = np.tile(pixels[:1], (4, 1))
    odd[1] = np.inf
    odd[2] = -np.inf
    odd[3, ::7] = np.nan
    pixels = np.concatenate([pixels, odd])
    numpy_walk = _walk(model, pixels, False, monkeypatch)
    compiled = _walk(model, pixels, True, monkeypatch)
    assert numpy_walk.shape == (len(pixels), 10)
    assert np.array_equal(numpy_walk, compiled, equal_nan=True)
    assert np.array_equal(model.proba_from_pixels(pixels[:5]), numpy_walk[:5])  # as the process walks by default


def test_the_compiled_walk_is_taken_only_for_batches_it_is_faster_on(trained, monkeypatch):
    from mlwf.model import walk as forest_walk

    engine, _ = trained
    model = mlwf.model.load("ml-inference/model", store=engine.store)
    pixels = np.random.default_rng(0).random((forest_walk.MIN_ROWS, model.image_size**2), dtype=np.float32)
    import sklearn.tree  # noqa: F401  (loaded, as in a training worker)
    model.proba_from_pixels(pixels[:-1])
    assert not model._compiled
    model.proba_from_pixels(pixels)
    assert len(model._compiled) == len(model.members)
    monkeypatch.delitem(sys.modules, "sklearn.tree._tree")
    assert not forest_walk.usable(model.members, len(model.classes), 10_000)


def test_the_compiled_walk_agrees_on_the_hand_built_tree_and_on_no_rows(monkeypatch):
    model = mlwf.model.from_bytes(codec.encode(_tree_meta()))
    # Features exactly at the 0.5 thresholds go left (x > threshold is false), just above go right.
    pixels = np.array([[0.5, 0.5, 0, 0], [np.nextafter(np.float32(0.5), np.float32(1)), 0, 0, 0],
                       [0, 0.75, 0, 0], [0, 0, 0, 0]], np.float32)
    for compiled in (False, True):
        proba = _walk(model, pixels, compiled, monkeypatch)
        assert proba.tolist() == [[1, 0], [0, 1], [0.5, 0.5], [1, 0]]
        assert _walk(model, pixels[:0], compiled, monkeypatch).shape == (0, 2)


def test_projection_does_not_depend_on_the_rows_beside_it():
    rng = np.random.default_rng(3)
    pixels = rng.random((700, 64), dtype=np.float32)
    mean, components = rng.random(64), rng.standard_normal((5, 64))
    whole = mlwf.model.project(pixels, mean, components)
    assert whole.dtype == np.float32 and whole.shape == (700, 5)
    assert np.array_equal(whole, ((pixels.astype(np.float64) - mean) @ components.T).astype(np.float32))
    for rows in (slice(0, 1), slice(255, 258), slice(300, 700)):
        assert np.array_equal(mlwf.model.project(pixels[rows], mean, components), whole[rows])


def test_a_model_too_large_for_the_compiled_walk_takes_the_numpy_walk(trained, monkeypatch):
    from mlwf.model import walk

    import sklearn.tree  # noqa: F401

    engine, _ = trained
    model = mlwf.model.load("ml-inference/model", store=engine.store)
    nodes = sum(len(m["left"]) for m in model.members)
    assert walk.usable(model.members, len(model.classes), 1000)
    monkeypatch.setattr(walk, "MAX_VALUES", nodes * len(model.classes) - 1)
    assert not walk.usable(model.members, len(model.classes), 1000)
