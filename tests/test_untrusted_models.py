"""Models read from storage are untrusted: crafted files with consistent checksums are refused.

Every file here is small and written by the test. Each is refused in one line
before anything proportional to what it claims is allocated, and the store is
left as it was.
"""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest

import mlwf.model
import mlwf.model.format
from mlwf import codec
from mlwf.cli import main
from mlwf.errors import ModelError
from tests.conftest import BATCH_PREFIX
from tests.test_model import _raw, _tree_meta

_PRE = struct.Struct("<4sIQ")


def split(data: bytes) -> tuple[dict, bytes]:
    """The header and body of a payload."""
    _, _, hlen = _PRE.unpack_from(data)
    header = json.loads(data[_PRE.size : _PRE.size + hlen])
    start = _PRE.size + hlen
    return header, data[start + (-start) % 64 :]


def rewrite(meta: dict, change) -> bytes:
    """Encode ``meta`` honestly, then let ``change(header)`` edit the header; the checksum stays consistent."""
    header, body = split(codec.encode(meta))
    change(header)
    return _raw(header, body)


def refused(data: bytes, match: str) -> str:
    with pytest.raises(ModelError, match=match) as info:
        mlwf.model.from_bytes(data, source="crafted.mlwf")
    message = str(info.value)
    assert "\n" not in message and "crafted.mlwf" in message and len(message) < 400
    return message


def test_the_honest_model_the_crafted_ones_start_from_loads():
    mlwf.model.from_bytes(codec.encode(_tree_meta()))
    mlwf.model.from_bytes(rewrite(_tree_meta(), lambda h: None))


# --------------------------------------------------------------------------- sharing and overlapping
def test_twenty_thousand_projections_sharing_one_array_are_refused():
    def share(header):
        projection = header["meta"]["projections"][0]
        header["meta"]["projections"] = [projection] * 20_000

    data = rewrite(_tree_meta(), share)
    assert len(data) < 2_000_000
    refused(data, "referenced more than once")


def test_members_sharing_arrays_are_refused():
    def share(header):
        header["meta"]["members"] = header["meta"]["members"] * 2

    refused(rewrite(_tree_meta(), share), "referenced more than once")


def test_overlapping_arrays_are_refused():
    # Five int32 arrays of the same length read from the same bytes: a file that claims five times its size.
    meta = _tree_meta()

    def overlap(header):
        descs = header["arrays"]
        member = header["meta"]["members"][0]
        first = descs[member["left"]["__array__"]]
        for name in ("right", "feature", "leaf_index"):
            descs[member[name]["__array__"]].update(offset=first["offset"])

    refused(rewrite(meta, overlap), "arrays overlap")


# --------------------------------------------------------------------------- counts
def single_leaf_forest(n_trees: int, n_classes: int = 2) -> dict:
    ids = np.arange(n_trees, dtype=np.int32)
    return {"projection": 0, "max_depth": 0, "roots": ids, "left": ids.copy(), "right": ids.copy(),
            "feature": np.zeros(n_trees, np.int32), "threshold": np.zeros(n_trees),
            "leaf_index": ids.copy(), "leaf_value": np.full((n_trees, n_classes), 1 / n_classes, np.float32)}


def test_more_trees_than_allowed_are_refused_before_their_arrays_are_checked(monkeypatch):
    monkeypatch.setattr(mlwf.model.format, "MAX_TREES", 10)
    meta = {**_tree_meta(), "members": [single_leaf_forest(6), single_leaf_forest(5)]}
    refused(codec.encode(meta), "11 trees, more than the 10 allowed")
    mlwf.model.from_bytes(codec.encode({**meta, "members": [single_leaf_forest(10)]}))


def test_more_members_or_projections_than_allowed_are_refused(monkeypatch):
    monkeypatch.setattr(mlwf.model.format, "MAX_MEMBERS", 2)
    refused(codec.encode({**_tree_meta(), "members": [single_leaf_forest(1) for _ in range(3)]}),
            "at most 2 members")
    two = [_tree_meta()["projections"][0], _tree_meta()["projections"][0]]
    refused(codec.encode({**_tree_meta(), "projections": two * 2, "members": [single_leaf_forest(1)] * 2}),
            "no more projections than members")
    refused(codec.encode({**_tree_meta(), "projections": two, "members": [single_leaf_forest(1)] * 2}),
            "a projection no member uses")


def test_the_real_limits_are_what_the_readme_documents():
    assert (mlwf.model.MAX_CLASSES, mlwf.model.MAX_MEMBERS, mlwf.model.MAX_TREES, mlwf.model.MAX_COMPONENTS) \
        == (1000, 1024, 100_000, 4096)


def test_a_thousand_and_one_classes_are_refused():
    classes = [f"c{i}" for i in range(1001)]
    meta = {**_tree_meta(), "classes": classes, "members": [single_leaf_forest(1, n_classes=1001)]}
    refused(codec.encode(meta), "class list: 2 to 1,000 classes")


@pytest.mark.parametrize("classes", [["no", 5], ["no", ""], ["no", "y\nes"], ["no", "\x1b[31mred"],
                                     ["no", "x" * 256], ["no", "\u0085"], "ab", {"no": 1, "yes": 2},
                                     ["no", ["yes"]]])
def test_class_names_that_are_not_plain_text_are_refused(classes):
    refused(codec.encode({**_tree_meta(), "classes": classes}), "class list")


def test_more_components_than_pixels_are_refused():
    meta = _tree_meta()
    meta["projections"] = [{"mean": np.zeros(4), "components": np.eye(5, 4)}]
    refused(codec.encode(meta), "projection shape")


# --------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("where, value", [("mean", np.nan), ("mean", np.inf), ("components", -np.inf),
                                          ("components", np.nan)])
def test_a_non_finite_number_in_a_projection_is_refused(where, value):
    meta = _tree_meta()
    meta["projections"][0][where] = meta["projections"][0][where].copy()
    meta["projections"][0][where].flat[1] = value
    refused(codec.encode(meta), "projection: a number is not finite")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_threshold_is_refused(value):
    refused(codec.encode(_tree_meta(threshold=np.array([value, 0.5, 0, 0, 0]))), "thresholds")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"])
def test_a_non_finite_number_in_the_json_header_is_refused(literal):
    header, body = split(codec.encode(_tree_meta()))
    raw = json.dumps({**header, "meta": {**header["meta"], "metrics": {"validation_accuracy": "X"}}})
    raw = raw.replace('"X"', literal.decode())
    hjson = raw.encode()
    pad = b"\0" * ((-(_PRE.size + len(hjson))) % 64)
    refused(_PRE.pack(b"MLWF", 1, len(hjson)) + hjson + pad + body, "unreadable header")


@pytest.mark.parametrize("field, value", [("image_size", True), ("image_size", 2.0), ("config", [1, 2]),
                                          ("metrics", "good"), ("metrics", {"validation_accuracy": "99 %"}),
                                          ("metrics", {"validation_accuracy": 7}),
                                          ("metrics", {"validation_accuracy": [1]})])
def test_fields_of_the_wrong_kind_are_refused(field, value):
    refused(codec.encode({**_tree_meta(), field: value}), "image size|config or metrics|validation accuracy")


def test_bools_are_not_indices():
    refused(codec.encode(_tree_meta(projection=False)), "member projection")
    refused(codec.encode(_tree_meta(max_depth=True)), "tree depth")


# --------------------------------------------------------------------------- the header itself
def test_a_header_nested_deep_enough_to_crash_the_parser_is_refused():
    header, body = split(codec.encode(_tree_meta()))
    raw = json.dumps(header).replace('"config": {}', '"config": ' + "[" * 200_000 + "]" * 200_000).encode()
    pad = b"\0" * ((-(_PRE.size + len(raw))) % 64)
    refused(_PRE.pack(b"MLWF", 1, len(raw)) + raw + pad + body, "nested too deeply")


def test_a_header_nested_deeper_than_a_model_needs_is_refused():
    nested: object = 1
    for _ in range(20):
        nested = {"x": nested}
    refused(codec.encode({**_tree_meta(), "config": nested}), "nested more than 8 deep")


def test_a_header_larger_than_allowed_is_refused_before_it_is_parsed():
    meta = {**_tree_meta(), "config": {"pad": "x" * mlwf.model.MAX_HEADER_BYTES}}
    refused(codec.encode(meta), "more than the 8,388,608 allowed")


def test_an_array_table_claiming_huge_shapes_is_refused():
    def huge(header):
        header["arrays"][0].update(shape=[2**40, 2**40, 0])  # zero bytes, absurd dimensions

    with pytest.raises(ModelError):
        mlwf.model.from_bytes(rewrite(_tree_meta(), huge))

    def many_dims(header):
        header["arrays"][0].update(shape=[1] * 40)

    refused(rewrite(_tree_meta(), many_dims), "bad array table")


# --------------------------------------------------------------------------- through the store
def test_a_crafted_model_in_the_store_is_refused_by_inference_and_model_show(trained, capsys):
    engine, report = trained

    def share(header):
        header["meta"]["projections"] = header["meta"]["projections"] * 500

    data = engine.store.get(f"ml-inference/model/versions/{report['model_digest']}.mlwf")
    crafted = rewrite(codec.decode(data), share)
    before = {o.key for o in engine.store.list()}
    mlwf.model.publish(engine.store, "ml-inference/crafted", crafted, run_id="crafted")
    where = ["--store", engine.spec.url]
    assert main(["model", "show", "ml-inference/crafted", *where]) == 2
    assert "referenced more than once" in capsys.readouterr().err
    assert main(["run", "ml-inference", "ml-inference/crafted", BATCH_PREFIX, "2", *where]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "referenced more than once" in err
    after = {o.key for o in engine.store.list()}
    [record] = [k for k in after - before if k.endswith("/run.json")]
    assert json.loads(engine.store.get(record))["status"] == "failed"
    run_folder = record[: -len("run.json")]
    assert all(k.startswith(("ml-inference/crafted/", run_folder)) for k in after - before)
    assert not any(k.endswith("predictions.csv") for k in after - before)  # no predict function ran
    assert mlwf.model.load("ml-inference/model", store=engine.store).digest == report["model_digest"]


def test_a_large_model_predicts_in_bounded_batches(monkeypatch):
    # 3,000 one-leaf trees of 1,000 classes: 3 million values per image; a batch holds at most 4 million.
    meta = {**_tree_meta(), "classes": [f"c{i}" for i in range(1000)],
            "members": [single_leaf_forest(3000, n_classes=1000)]}
    model = mlwf.model.from_bytes(codec.encode(meta))
    seen = []
    real = model._proba_batch
    monkeypatch.setattr(model, "_proba_batch", lambda pixels: seen.append(len(pixels)) or real(pixels))
    proba = model.proba_from_pixels(np.zeros((3, 4), np.float32))
    assert proba.shape == (3, 1000) and seen == [1, 1, 1]



def test_a_model_is_checked_in_full_once_per_process_and_other_bytes_are_checked_again(monkeypatch):
    """The load stage of a warm process reads the same published model on every run: it parses it
    once per digest; bytes with another digest, crafted with a consistent checksum, are checked again."""
    from mlwf.model import format as model_format

    good = codec.encode(_tree_meta())
    parsed = []
    real = model_format.from_bytes
    monkeypatch.setattr(model_format, "from_bytes", lambda data, **kw: parsed.append(1) or real(data, **kw))
    first = model_format.checked_summary(good, digest=codec.digest(good), source="m.mlwf")
    second = model_format.checked_summary(good, digest=codec.digest(good), source="m.mlwf")
    assert first == second and first["classes"] and len(parsed) == 1
    crafted = rewrite(_tree_meta(), lambda h: h["meta"].update(image_size=0))
    with pytest.raises(ModelError, match=r"m\.mlwf is corrupt .*\(image size\)"):
        model_format.checked_summary(crafted, digest=codec.digest(crafted), source="m.mlwf")
    assert len(parsed) == 2


# --------------------------------------------------------------------------- types and ranges
def _cast(meta: dict, where: str, name: str, dtype) -> dict:
    """``meta`` with one array (``where``: "member" or "projection") stored in ``dtype``, values kept."""
    part = meta["members"][0] if where == "member" else meta["projections"][0]
    part[name] = part[name].astype(dtype)
    return meta


@pytest.mark.parametrize("where, name, dtype", [
    *[("member", name, dtype) for name in ("roots", "left", "right", "feature", "leaf_index")
      for dtype in (np.uint64, np.int64, np.uint32, np.int16, np.int8, np.float64)],
    *[("member", name, dtype) for name in ("threshold", "leaf_value")
      for dtype in (np.float16, np.int64, {"threshold": np.float32, "leaf_value": np.float64}[name])],
    *[("projection", name, dtype) for name in ("mean", "components") for dtype in (np.float32, np.float16)],
])
def test_an_array_of_another_dtype_than_the_format_defines_is_refused_not_cast(where, name, dtype):
    meta = _cast(_tree_meta(), where, name, dtype)
    message = refused(codec.encode(meta), f"'{name}' holds {np.dtype(dtype)}, the format holds")
    assert ("int32" if name in ("roots", "left", "right", "feature", "leaf_index") else
            "float32" if name == "leaf_value" else "float64") in message


def test_the_uint64_tree_of_the_issue_is_refused_at_load_not_at_the_first_predict():
    member = _tree_meta()["members"][0]
    meta = _tree_meta(right=member["right"].astype(np.uint64), feature=member["feature"].astype(np.uint64))
    refused(codec.encode(meta), "member 0: 'right' holds uint64, the format holds int32")


@pytest.mark.parametrize("value", [2, 900, 2**31 - 1])
def test_a_leaf_reading_a_feature_past_the_projection_is_refused(value):
    # Node 2 is a leaf at depth 1: the NumPy walk reads its feature at the level below, so a feature past
    # the 2 components read the next image's features, or past the batch for its last image.
    feature = _tree_meta()["members"][0]["feature"].copy()
    feature[2] = value
    refused(codec.encode(_tree_meta(feature=feature)), "tree features: member 0 reads a feature outside")


def _chain(depth: int, *, share: bool) -> dict:
    """One tree of ``depth`` internal nodes in a row. With ``share`` each node's two children are the same node:
    no cycle, no node out of range, but a walk that follows both branches visits 2**depth paths."""
    ids = np.arange(1, depth + 1, dtype=np.int32)
    left = np.append(ids, depth).astype(np.int32)
    right = np.append(ids if share else np.arange(depth + 1, 2 * depth + 1), depth).astype(np.int32)
    n = depth + 1 if share else 2 * depth + 1
    if not share:
        left = np.append(left[:-1], np.arange(depth, n)).astype(np.int32)
        right = np.append(right[:-1], np.arange(depth, n)).astype(np.int32)
    leaf = left == np.arange(n)
    leaf_index = np.full(n, -1, np.int32)
    leaf_index[leaf] = np.arange(leaf.sum())
    return _tree_meta(max_depth=depth, left=left, right=right, feature=np.zeros(n, np.int32),
                      threshold=np.zeros(n), leaf_index=leaf_index,
                      leaf_value=np.full((int(leaf.sum()), 2), 0.5, np.float32))


def test_a_tree_whose_nodes_share_children_is_refused_in_bounded_time_and_memory():
    # 2.4 KB: checking its depth used to double the frontier at each level (depth 26: 0.7 GB, 7 s; 64: never).
    mlwf.model.from_bytes(codec.encode(_chain(20, share=False)))  # the same chain as a proper tree loads
    data = codec.encode(_chain(20, share=True))
    assert len(data) < 4000
    refused(data, "in member 0 node 1 is the child of 2 nodes, a tree's node has one parent")
    refused(codec.encode(_chain(64, share=True)), "node 1 is the child of 2 nodes")


@pytest.mark.parametrize("change, match", [
    (dict(left=np.array([1, 3, 2, 3, 4], np.int32), right=np.array([2, 0, 2, 3, 4], np.int32)), "tree links"),
    (dict(right=np.array([2, 4, 1, 3, 4], np.int32)), "tree links"),                        # a leaf to its sibling
    (dict(left=np.array([1, -3, 2, 3, 4], np.int32)), "tree links"),                         # negative child
    (dict(roots=np.array([-5], np.int32)), "tree roots"),
    (dict(leaf_index=np.array([-1, -1, 0, 1, -2], np.int32)), "leaf index"),                # negative leaf
    (dict(leaf_index=np.array([-1, -1, 0, 1, 3], np.int32)), "leaf index"),                 # past the leaves
    (dict(leaf_value=np.full((3, 3), 1 / 3, np.float32)), "leaf values"),                  # a class past the list
    (dict(max_depth=65), "tree depth"),
])
def test_indices_out_of_range_and_cycles_are_refused(change, match):
    refused(codec.encode(_tree_meta(**change)), match)


def test_a_node_count_far_above_the_bytes_is_refused_before_anything_is_allocated():
    def claim(header):
        member = header["meta"]["members"][0]
        header["arrays"][member["left"]["__array__"]].update(shape=[2**30], nbytes=4 * 2**30)

    refused(rewrite(_tree_meta(), claim), "bad array table")


def _trained_member_meta(seed: int = 0) -> dict:
    """A model of five real scikit-learn trees over 4x4 images, 3 components, 3 classes."""
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)
    forest = RandomForestClassifier(n_estimators=5, max_depth=4, random_state=seed).fit(x, y)
    member = {"projection": 0, **mlwf.model.export_forest(forest, [0, 1, 2], 3)}
    projection = {"mean": rng.uniform(size=16), "components": rng.normal(size=(3, 16))}
    return {"format": "mlwf-model", "version": 1, "classes": ["a", "b", "c"], "image_size": 4, "config": {},
            "metrics": {}, "projections": [projection], "members": [member]}


_INTERESTING_INTS = (-2**31, -2, -1, 0, 1, 2, 3, 7, 2**31 - 1)
_INTERESTING_FLOATS = (np.nan, np.inf, -np.inf, -1.0, 0.0, 1e300, -1e-300)


def test_every_mutated_model_is_refused_at_load_or_predicts_the_same_in_both_walks(monkeypatch):
    """One value of one array changed, a thousand times: each model is refused at load with a ModelError, or
    both walks (scikit-learn's compiled one and NumPy's) predict every batch with the same probabilities."""
    import sklearn.tree._tree  # noqa: F401  (the compiled walk is used where scikit-learn is loaded)

    from mlwf.model import walk

    rng = np.random.default_rng(24)
    pixels = rng.uniform(size=(walk.MIN_ROWS + 8, 16)).astype(np.float32)
    honest = _trained_member_meta()
    names = ["roots", "left", "right", "feature", "threshold", "leaf_index", "leaf_value"]
    loaded = 0
    for _ in range(1000):
        meta = {**honest, "members": [dict(honest["members"][0])]}
        member = meta["members"][0]
        name = names[rng.integers(len(names))]
        array = member[name] = member[name].copy()
        spot = tuple(int(rng.integers(s)) for s in array.shape)
        if array.dtype.kind == "f":
            with np.errstate(over="ignore"):  # 1e300 as float32 is inf: one more number to refuse
                array[spot] = _INTERESTING_FLOATS[rng.integers(len(_INTERESTING_FLOATS))]
        elif rng.random() < 0.5:
            array[spot] = _INTERESTING_INTS[rng.integers(len(_INTERESTING_INTS))]
        else:
            array[spot] = rng.integers(-3, len(member["left"]) + 3)
        try:
            model = mlwf.model.from_bytes(codec.encode(meta), source="mutated.mlwf")
        except ModelError as e:
            assert "mutated.mlwf" in str(e) and "\n" not in str(e)
            continue
        loaded += 1
        monkeypatch.setattr(walk, "usable", lambda *a: True)
        compiled = model.proba_from_pixels(pixels)
        monkeypatch.setattr(walk, "usable", lambda *a: False)
        numpy_walk = np.concatenate([model.proba_from_pixels(pixels[i : i + 5]) for i in range(0, len(pixels), 5)])
        assert np.array_equal(compiled, numpy_walk) and np.all(np.isfinite(compiled))
    assert 0 < loaded < 1000  # some changes are harmless (a threshold, a leaf value), most are not
    mlwf.model.from_bytes(codec.encode(honest))


def _uint64_tree(meta: dict) -> dict:
    """``meta`` with its first member's ``right`` and ``feature`` stored as uint64, the values unchanged."""
    member = meta["members"][0]
    member["right"], member["feature"] = member["right"].astype(np.uint64), member["feature"].astype(np.uint64)
    return meta


def test_the_uint64_model_is_refused_by_model_serve_which_does_not_start_and_by_model_export(tmp_path, capsys):
    import subprocess
    import sys
    import time

    path = tmp_path / "uint64.mlwf"
    path.write_bytes(codec.encode(_uint64_tree(_tree_meta())))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mlwf.cli", "model", "serve", str(path), "--host", "127.0.0.1",
                           "--port", "0"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and done.stdout == "" and time.monotonic() - started < 30
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"{path} is corrupt or was tampered with (member 0: 'right' holds uint64" in done.stderr
    out = tmp_path / "model.onnx"
    assert main(["model", "export", str(path), "--format", "onnx", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'right' holds uint64, the format holds int32" in err
    assert not out.exists()


def test_the_uint64_model_in_the_store_is_refused_by_ml_inference_before_any_prediction(trained, capsys):
    engine, report = trained
    data = engine.store.get(f"ml-inference/model/versions/{report['model_digest']}.mlwf")
    mlwf.model.publish(engine.store, "ml-inference/uint64", codec.encode(_uint64_tree(codec.decode(data))),
                       run_id="crafted")
    before = {o.key for o in engine.store.list()}
    assert main(["run", "ml-inference", "ml-inference/uint64", BATCH_PREFIX, "2", "--store", engine.spec.url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'right' holds uint64, the format holds int32" in err and "internal" not in err
    assert not any(k.endswith("predictions.csv") for k in {o.key for o in engine.store.list()} - before)


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_a_model_path_that_is_not_a_regular_file_is_refused_at_once_not_read_or_taken_for_a_prefix(
        tmp_path, capsys, special):
    import os
    import subprocess
    import sys

    if special == "fifo":
        path = tmp_path / "model.mlwf"
        os.mkfifo(path)
        what = "a named pipe (FIFO)"
    else:
        path, what = special, "a character device"
    with pytest.raises(ModelError, match=rf"model file {path} is {re.escape(what)}, not a regular file"):
        mlwf.model.load(path)
    done = subprocess.run([sys.executable, "-m", "mlwf.cli", "model", "serve", str(path), "--host", "127.0.0.1",
                           "--port", "0"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"{path} is {what}" in done.stderr
    assert main(["model", "export", str(path), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path} is {what}" in err
