"""Walking a model's trees in compiled code: scikit-learn's own tree walker on mlwf's arrays.

:meth:`mlwf.model.Model.proba_from_pixels` moves every image one level down
every tree per NumPy step, ``max_depth`` steps whatever the leaf's depth.
scikit-learn's ``Tree.predict`` follows each image down each tree in compiled
code, as deep as its leaf: 3–5× faster on the models mlwf trains. The trees
are rebuilt from the member's arrays (node for node, leaves carrying the
member's stored float32 leaf values as float64), so the probabilities are
bit-for-bit those of the NumPy walk: the same comparisons (a float32 feature
against a float64 threshold, NaN goes left), the same values, added tree by
tree in the same order. With the projection in blocks
(:func:`mlwf.model.predict.project_all`), 10k images on the 60k model went
3.84 → 1.42 s (2026-11-28, under load, ``benchmarks/serving.py``).

Only used where scikit-learn is already loaded (training workers, ``mlwf
serve``, a session that imported it): importing it costs 0.8 s, more than a
cold inference process spends on its whole batch.

Why not onnxruntime. On one thread it was 2.9–3.6× faster than the NumPy walk
on the 2k model and 1.8–2.0× on the 60k one (three runs, 2026-11-28,
``benchmarks/serving.py --parts engines``), also on batches of 64, for the
same reason: it follows each row only as deep as its leaf. Its lead is smaller
on the 60k model, whose trees are larger (533,360 nodes against 50,142) and
deeper (mean leaf depth 8.6 against 6.4). It is not the engine: its
probabilities differ from mlwf's by up to 3e-8 (float32 sums), which the
predictions CSV and a model's validation accuracy would show; it needs the
optional ``onnx`` extra and 0.1–1.1 s to build a session per model; and this
walk is as fast on the 60k model and changes nothing.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

#: Largest model (nodes × classes) walked in compiled code, where each node holds 64 bytes and
#: its class values as float64 (at this bound with 10 classes: 6.7 M nodes, about 0.9 GB, 5× the
#: model's bytes); a larger one takes the NumPy walk, whose memory is bounded per batch.
MAX_VALUES = 1 << 26
#: Fewest images a batch needs for the compiled walk: it calls each tree once per batch
#: (about 3 µs a tree), so for a few images the NumPy walk, a few steps per member, is faster
#: (1 image on the 2k model: 2.8 ms compiled, 1.8 ms in NumPy).
MIN_ROWS = 32


def usable(members: list[dict[str, Any]], n_classes: int, n_rows: int) -> bool:
    """Whether to walk these members in compiled code for a batch of ``n_rows`` images:
    scikit-learn's tree module is already imported in this process, the batch has at
    least :data:`MIN_ROWS` images and the model is within :data:`MAX_VALUES`."""
    return n_rows >= MIN_ROWS and "sklearn.tree._tree" in sys.modules and \
        sum(len(m["left"]) for m in members) * n_classes <= MAX_VALUES


def build_trees(member: dict[str, Any], n_features: int, n_classes: int) -> list:
    """scikit-learn ``Tree`` objects for one member (of a model checked as :func:`mlwf.model.from_bytes` does).

    Parameters
    ----------
    member : dict of arrays, as :func:`mlwf.model.export_forest` returns them.
    n_features : columns of the projected features the member reads.
    n_classes : size of the model's label set.

    Returns
    -------
    list of ``sklearn.tree._tree.Tree``, one per root, in the member's order.
    """
    from sklearn.tree._tree import NODE_DTYPE, TREE_LEAF, Tree

    left, right = member["left"], member["right"]
    n = len(left)
    ids = np.arange(n)
    leaf = left == ids
    nodes = np.zeros(n, dtype=NODE_DTYPE)
    owner_root = np.repeat(member["roots"].astype(np.int64), np.diff(np.append(member["roots"], n)))
    nodes["left_child"] = np.where(leaf, TREE_LEAF, left.astype(np.int64) - owner_root)
    nodes["right_child"] = np.where(leaf, TREE_LEAF, right.astype(np.int64) - owner_root)
    nodes["feature"] = np.where(leaf, -2, member["feature"])
    nodes["threshold"] = np.where(leaf, -2.0, member["threshold"])
    nodes["missing_go_to_left"] = 1  # NaN > threshold is False in the NumPy walk: left
    values = np.zeros((n, 1, n_classes), dtype=np.float64)
    values[leaf, 0, :] = member["leaf_value"][member["leaf_index"][leaf]]
    trees = []
    bounds = np.append(member["roots"], n)
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        tree = Tree(n_features, np.array([n_classes], dtype=np.intp), 1)
        tree.__setstate__({"max_depth": int(member["max_depth"]), "node_count": end - start,
                           "nodes": nodes[start:end], "values": values[start:end]})
        trees.append(tree)
    return trees


def add_proba(trees: list, features: np.ndarray, acc: np.ndarray) -> None:
    """Add each tree's leaf values for ``features`` (float32) to ``acc``, tree by tree."""
    for tree in trees:
        acc += tree.predict(features)
