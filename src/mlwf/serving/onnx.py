"""``mlwf model export --format onnx``: the whole ensemble as one ONNX graph.

The graph computes what :meth:`mlwf.model.Model.predict_proba` computes, in the
same precision:

1. ``pixels`` (float32 ``[N, image_size²]``, prepared as :mod:`mlwf.serving.prepare`
   says) is cast to float64;
2. for each trained projection: ``Sub`` its mean, ``MatMul`` its components
   (float64, as :func:`mlwf.model.project`), ``Cast`` to float32 (the
   precision the forests were trained in), and the projections are
   concatenated side by side;
3. one ``ai.onnx.ml`` ``TreeEnsembleRegressor`` (opset 3) holds every tree of
   every member: a member's feature ids point into its own projection's
   columns, thresholds and leaf weights are float64 (``*_as_tensor``), so the
   comparisons are mlwf's exactly (``x <= threshold`` goes left), and
   ``AVERAGE`` divides the per-class sums by the number of trees in the
   ensemble, which is mlwf's average over the full class set;
4. ``label`` = ``ArgMax`` of ``probabilities`` (int64 ``[N]``, an index into
   the ``classes`` metadata); ``probabilities`` is float32 ``[N, C]``.

The regressor, not ``TreeEnsembleClassifier``, because the classifier gives two
class models special treatment (a label from the sign of the second score, and
rewritten scores) that is not an average of probabilities.

Metadata (``metadata_props``): ``classes`` (JSON list of names),
``image_size``, ``model_digest`` (SHA-256 of the mlwf model bytes),
``mlwf_export_version``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mlwf.errors import ModelError, UsageError

INPUT = "pixels"
LABEL = "label"
PROBABILITIES = "probabilities"
#: Opsets: ai.onnx 13 (Cast, Sub, MatMul, Concat, ArgMax) and ai.onnx.ml 3 (float64 tree attributes).
OPSET = 13
ML_OPSET = 3
EXPORT_VERSION = 1
#: The check after export: this many rows must give the same labels, and probabilities within this.
CHECK_ROWS = 512
CHECK_TOLERANCE = 1e-5


def _onnx():
    try:
        import onnx
    except ModuleNotFoundError:
        raise UsageError("exporting to ONNX needs the onnx package: pip install 'mlwf[onnx]'") from None
    return onnx


def to_onnx(model) -> Any:
    """Build the ONNX graph of a model.

    Parameters
    ----------
    model : mlwf.model.Model
        A loaded (checked) model.

    Returns
    -------
    onnx.ModelProto
        Input ``pixels`` float32 ``[N, image_size²]``; outputs ``label`` int64
        ``[N]`` and ``probabilities`` float32 ``[N, len(classes)]``.

    Raises
    ------
    UsageError
        If the onnx package is not installed.
    """
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    import mlwf

    n_classes = len(model.classes)
    d = model.image_size**2
    initializers, nodes = [], [helper.make_node("Cast", [INPUT], ["pixels_f64"], to=TensorProto.DOUBLE)]
    offsets, projected = [], []
    offset = 0
    for i, p in enumerate(model.projections):
        mean = np.asarray(p["mean"], dtype=np.float64)
        components_t = np.ascontiguousarray(np.asarray(p["components"], dtype=np.float64).T)
        initializers += [numpy_helper.from_array(mean, f"mean_{i}"),
                         numpy_helper.from_array(components_t, f"components_t_{i}")]
        nodes += [helper.make_node("Sub", ["pixels_f64", f"mean_{i}"], [f"centred_{i}"]),
                  helper.make_node("MatMul", [f"centred_{i}", f"components_t_{i}"], [f"projected_{i}"]),
                  helper.make_node("Cast", [f"projected_{i}"], [f"features_{i}"], to=TensorProto.FLOAT)]
        projected.append(f"features_{i}")
        offsets.append(offset)
        offset += components_t.shape[1]
    nodes += [helper.make_node("Concat", projected, ["features_f32"], axis=1),
              helper.make_node("Cast", ["features_f32"], ["features"], to=TensorProto.DOUBLE)]
    trees = _forest_attributes(model, offsets)
    nodes += [
        helper.make_node("TreeEnsembleRegressor", ["features"], [PROBABILITIES], domain="ai.onnx.ml",
                         n_targets=n_classes, aggregate_function="AVERAGE", post_transform="NONE",
                         nodes_values_as_tensor=numpy_helper.from_array(trees.pop("nodes_values")),
                         target_weights_as_tensor=numpy_helper.from_array(trees.pop("target_weights")),
                         **trees),
        helper.make_node("ArgMax", [PROBABILITIES], [LABEL], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "mlwf_ensemble",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info(LABEL, TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["N", n_classes])],
        initializer=initializers,
        doc_string=(f"mlwf ensemble of {len(model.members)} forests over {len(model.projections)} projections. "
                    f"Input: {model.image_size}x{model.image_size} grayscale pixels / 255, float32, flattened "
                    "row by row (see mlwf.serving.prepare). label indexes the 'classes' metadata."))
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="mlwf",
                              producer_version=getattr(mlwf, "__version__", ""),
                              ir_version=helper.find_min_ir_version_for(opsets))
    digest = model.digest
    if digest is None:
        model.to_bytes()  # sets the digest of a model built in memory
        digest = model.digest
    helper.set_model_props(proto, {"classes": json.dumps(list(model.classes)),
                                   "image_size": str(model.image_size), "model_digest": digest,
                                   "mlwf_export_version": str(EXPORT_VERSION)})
    onnx.checker.check_model(proto)
    return proto


def _forest_attributes(model, offsets: list[int]) -> dict[str, Any]:
    """Every member's trees as one ``TreeEnsembleRegressor``'s attribute arrays."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (
        "nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values", "nodes_truenodeids",
        "nodes_falsenodeids", "leaf", "target_treeids", "target_nodeids", "target_ids", "target_weights")}
    first_tree = 0
    for m in model.members:
        roots = np.asarray(m["roots"], dtype=np.int64)
        left = np.asarray(m["left"], dtype=np.int64)
        right = np.asarray(m["right"], dtype=np.int64)
        ids = np.arange(len(left), dtype=np.int64)
        tree = np.searchsorted(roots, ids, side="right") - 1
        local = ids - roots[tree]
        leaf = left == ids
        parts["nodes_treeids"].append(first_tree + tree)
        parts["nodes_nodeids"].append(local)
        parts["nodes_featureids"].append(np.where(leaf, 0, np.asarray(m["feature"], np.int64)
                                                  + offsets[m["projection"]]))
        parts["nodes_values"].append(np.where(leaf, 0.0, np.asarray(m["threshold"], np.float64)))
        parts["nodes_truenodeids"].append(np.where(leaf, 0, left - roots[tree]))
        parts["nodes_falsenodeids"].append(np.where(leaf, 0, right - roots[tree]))
        parts["leaf"].append(leaf)
        leaves = ids[leaf]
        values = np.asarray(m["leaf_value"], dtype=np.float64)[np.asarray(m["leaf_index"])[leaves]]
        # Zero weights add nothing to a sum: only the classes a leaf votes for are listed.
        row, column = np.nonzero(values)
        parts["target_treeids"].append(first_tree + tree[leaves][row])
        parts["target_nodeids"].append(local[leaves][row])
        parts["target_ids"].append(column.astype(np.int64))
        parts["target_weights"].append(values[row, column])
        first_tree += len(roots)
    joined = {k: np.concatenate(v) for k, v in parts.items()}
    leaf = joined.pop("leaf")
    attrs: dict[str, Any] = {k: v.tolist() for k, v in joined.items()
                             if k not in ("nodes_values", "target_weights")}
    attrs["nodes_modes"] = np.where(leaf, "LEAF", "BRANCH_LEQ").tolist()
    attrs["nodes_values"] = joined["nodes_values"]
    attrs["target_weights"] = joined["target_weights"]
    return attrs


def check(onnx_bytes: bytes, model, *, rows: int = CHECK_ROWS, seed: int = 0) -> dict[str, float]:
    """Run the exported graph with onnxruntime and compare it with ``model`` on synthetic pixels.

    The rows are the projections' mean images plus uniform noise around them and
    across [0, 1], so every tree is exercised far from and near its thresholds.

    Returns
    -------
    dict
        ``rows``, ``label_agreement`` (fraction) and ``max_abs_diff`` (probabilities).

    Raises
    ------
    ModelError
        If a label differs or a probability differs by more than 1e-5.
    UsageError
        If onnxruntime is not installed.
    """
    runtime = _onnxruntime()
    rng = np.random.default_rng(seed)
    d = model.image_size**2
    means = np.stack([np.asarray(p["mean"], dtype=np.float64) for p in model.projections])
    base = means[rng.integers(0, len(means), rows)]
    noise = rng.normal(0.0, rng.uniform(0.0, 0.3, (rows, 1)), (rows, d))
    pixels = np.clip(base + noise, 0.0, 1.0).astype(np.float32)
    pixels[: rows // 4] = rng.uniform(0.0, 1.0, (rows // 4, d)).astype(np.float32)
    session = runtime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    label, proba = session.run([LABEL, PROBABILITIES], {INPUT: pixels})
    expected = model.proba_from_pixels(pixels)
    same = float(np.mean(label == np.argmax(expected, axis=1)))
    diff = float(np.max(np.abs(proba.astype(np.float64) - expected)))
    if same != 1.0 or not diff <= CHECK_TOLERANCE:
        raise ModelError(f"the exported graph disagrees with mlwf ({same:.4%} same labels, probabilities "
                         f"up to {diff:.2e} apart): nothing written; please report this with the model digest "
                         f"{model.digest}")
    return {"rows": rows, "label_agreement": same, "max_abs_diff": diff}


def _onnxruntime():
    try:
        import onnxruntime
    except ModuleNotFoundError:
        raise UsageError("checking the ONNX export needs onnxruntime: pip install 'mlwf[onnx]'") from None
    return onnxruntime


def export(model, path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Write the model as an ONNX file, atomically (a reader never sees half a file).

    Parameters
    ----------
    model : mlwf.model.Model
    path : where to write the ``.onnx`` file; its directory must exist.
    verify : run the file with onnxruntime first and refuse to write it if it
        disagrees with ``model`` (see :func:`check`).

    Returns
    -------
    dict
        ``path``, ``bytes``, ``model_digest``, ``classes``, ``image_size``,
        ``num_trees`` and, when verified, ``check``.

    Raises
    ------
    UsageError
        If ``path`` is a directory or its directory does not exist, or onnx is missing.
    ModelError
        If the check fails.
    """
    target = Path(path)
    if str(path).strip() == "" or target.is_dir():
        raise UsageError(f"-o {str(path)!r} is a directory or empty: give a file name, e.g. model.onnx")
    if os.path.exists(target) and not target.is_file():
        # The file is replaced by a rename: that would put a regular file in place of /dev/null or a FIFO.
        raise UsageError(f"-o {target} exists and is not a regular file: give a file name, e.g. model.onnx")
    if not target.parent.is_dir():
        raise UsageError(f"cannot write {target}: directory {target.parent} does not exist")
    proto = to_onnx(model)
    data = proto.SerializeToString()
    report: dict[str, Any] = {"path": str(target), "bytes": len(data), "model_digest": model.digest,
                              "classes": list(model.classes), "image_size": model.image_size,
                              "num_trees": int(sum(len(m["roots"]) for m in model.members))}
    if verify:
        report["check"] = check(data, model)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return report

