"""A fitted scikit-learn random forest as the plain arrays a model member stores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def export_forest(forest, class_index: Sequence[int], n_classes: int) -> dict[str, Any]:
    """Export a fitted ``RandomForestClassifier`` to the arrays a member stores.

    Parameters
    ----------
    forest : sklearn.ensemble.RandomForestClassifier, fitted.
    class_index : the global class number of each of ``forest.classes_``.
    n_classes : size of the full label set.

    Returns
    -------
    dict of arrays: ``roots``, ``left``, ``right`` (leaves point to themselves),
    ``feature``, ``threshold``, ``leaf_index`` (-1 on internal nodes),
    ``leaf_value`` (class probabilities per leaf over all classes) and
    ``max_depth``.
    """
    cols = np.asarray(class_index, dtype=np.int64)
    roots, lefts, rights, feats, thrs, leaf_idx, leaf_vals = [], [], [], [], [], [], []
    offset = 0
    n_leaves = 0
    depth = 0
    for est in forest.estimators_:
        t = est.tree_
        n = t.node_count
        ids = np.arange(n, dtype=np.int64)
        is_leaf = t.children_left < 0
        roots.append(offset)
        lefts.append(np.where(is_leaf, ids, t.children_left) + offset)
        rights.append(np.where(is_leaf, ids, t.children_right) + offset)
        feats.append(np.where(is_leaf, 0, t.feature))
        thrs.append(np.where(is_leaf, 0.0, t.threshold))
        li = np.full(n, -1, dtype=np.int64)
        li[is_leaf] = np.arange(is_leaf.sum()) + n_leaves
        leaf_idx.append(li)
        v = t.value[is_leaf, 0, :]
        v = v / v.sum(axis=1, keepdims=True)
        full = np.zeros((v.shape[0], n_classes), dtype=np.float64)
        full[:, cols] = v
        leaf_vals.append(full)
        n_leaves += int(is_leaf.sum())
        offset += n
        depth = max(depth, int(t.max_depth))
    return {
        "max_depth": depth,
        "roots": np.asarray(roots, dtype=np.int32),
        "left": np.concatenate(lefts).astype(np.int32),
        "right": np.concatenate(rights).astype(np.int32),
        "feature": np.concatenate(feats).astype(np.int32),
        "threshold": np.concatenate(thrs).astype(np.float64),
        "leaf_index": np.concatenate(leaf_idx).astype(np.int32),
        "leaf_value": np.concatenate(leaf_vals).astype(np.float32),
    }
