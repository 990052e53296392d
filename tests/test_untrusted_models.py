"""Models read from storage are untrusted: crafted files with consistent checksums are refused.

Every file here is small and written by the test. Each is refused in one line
before anything proportional to what it claims is allocated, and the store is
left as it was.
"""

from __future__ import annotations

import json
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
