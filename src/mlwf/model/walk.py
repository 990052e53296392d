"""Walking a model's trees in compiled code: scikit-learn's own tree walker on mlwf's arrays.

:meth:`mlwf.model.Model.proba_from_pixels` moves every image one level down
every tree per NumPy step, ``max_depth`` steps whatever the leaf's depth.
scikit-learn's ``Tree.predict`` follows each image down each tree in compiled
code, as deep as its leaf: 3–5× faster on the models mlwf trains. The trees
are rebuilt from the member's arrays (node for node, leaves carrying the
member's stored float32 leaf values as float64), so the probabilities are
bit-for-bit those of the NumPy walk: the same comparisons (a float32 feature
against a float64 threshold, NaN goes left), the same values, added tree by
tree in the same order.

Only used where scikit-learn is already loaded (training workers, ``mlwf
serve``, a session that imported it): importing it costs 0.8 s, more than a
cold inference process spends on its whole batch.
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
#: (about 3 µs a tree), so for a few images the NumPy walk, a few steps per member, is faster.
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
