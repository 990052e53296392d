"""The trained ensemble: build it, turn it into bytes, load it back, predict.

A model is a list of *members*. Each member is the PCA projection it was trained
on plus its random forest, exported to plain arrays (no scikit-learn objects).
Prediction projects the images with each member's trained projection, runs
every tree, and averages the class probabilities over all members, over the
full set of classes (a member that never saw a class gives it probability 0).

The file is an :mod:`mlwf.codec` payload: JSON metadata plus raw arrays.
Loading parses and checks it (format version, checksum, shapes, tree
structure) and never executes anything from it.

Library use::

    import mlwf.model
    model = mlwf.model.load("ml-inference/model")      # from the configured store
    model = mlwf.model.load("path/to/model.mlwf")      # or from a file
    model.predict(["img1.png", "img2.png"])            # -> array of class names
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlwf import codec
from mlwf.errors import ModelError, NotFoundError, UsageError

FORMAT = "mlwf-model"
#: Bump when the model layout changes; :func:`from_bytes` refuses other versions.
FORMAT_VERSION = 1
MANIFEST = "MODEL.json"
MANIFEST_FORMAT = "mlwf-model-manifest"
HISTORY_LENGTH = 10
#: Largest manifest read; one with a full history is about 3 KB.
MAX_MANIFEST_BYTES = 1 << 20
#: Attempts of a compare-and-swap of the manifest before giving up (each after a short random pause).
_CAS_ATTEMPTS = 64
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BATCH = 4096
#: Values (images × trees × classes) one prediction batch may hold: 16 MiB of float32.
#: The default model (100 trees, 10 classes) still predicts 4,096 images at a time.
_BATCH_VALUES = 1 << 22

#: Bounds of a model read from anywhere (see :func:`from_bytes`); training refuses settings beyond them.
MAX_CLASSES = 1000
MAX_CLASS_NAME_BYTES = 255
MAX_MEMBERS = 1024
MAX_TREES = 100_000
MAX_NODES_PER_MEMBER = 1 << 30
MAX_COMPONENTS = 4096
MAX_HEADER_BYTES = 8 << 20
MAX_HEADER_DEPTH = 8
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


# --------------------------------------------------------------------------- build
def project(pixels: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Apply a trained PCA projection; the one code path for training and inference.

    Computed in float64 and rounded to float32, the precision the forests
    compare in, so a row's features do not depend on the batch it came in.
    """
    centred = np.asarray(pixels, dtype=np.float64) - mean
    return (centred @ components.T).astype(np.float32)


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


@dataclass
class Model:
    """A trained ensemble. Build one with :func:`build`, load one with :func:`load`."""

    classes: list[str]
    image_size: int
    projections: list[dict[str, np.ndarray]]
    members: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    #: SHA-256 of the bytes this model was loaded from or serialized to.
    digest: str | None = None
    _children: list = field(default_factory=list, repr=False, compare=False)

    # ---------------------------------------------------------------- predict
    def predict_proba(self, images) -> np.ndarray:
        """Class probabilities, shape ``(n_images, n_classes)``, columns in :attr:`classes` order.

        ``images``: encoded image bytes, file paths, Pillow images, or an array of
        shape ``(n, height, width)``; converted exactly as in training.
        """
        from mlwf.images import as_pixels

        return self.proba_from_pixels(as_pixels(images, self.image_size))

    def predict(self, images) -> np.ndarray:
        """Predicted class names, one per image (see :meth:`predict_proba`)."""
        proba = self.predict_proba(images)
        return np.asarray(self.classes, dtype=object)[np.argmax(proba, axis=1)]

    def proba_from_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities for already decoded ``float32[n, size*size]`` pixels."""
        pixels = np.asarray(pixels, dtype=np.float32)
        if pixels.ndim != 2 or pixels.shape[1] != self.image_size**2:
            raise ValueError(f"expected pixels of shape (n, {self.image_size**2}), got {pixels.shape}")
        out = np.empty((len(pixels), len(self.classes)), dtype=np.float64)
        # Fewer images per batch for a large model, so memory stays bounded whatever it holds.
        widest = max(len(m["roots"]) for m in self.members) * len(self.classes)
        batch = max(1, min(_BATCH, _BATCH_VALUES // widest))
        for start in range(0, len(pixels), batch):
            out[start : start + batch] = self._proba_batch(pixels[start : start + batch])
        return out

    def _proba_batch(self, pixels: np.ndarray) -> np.ndarray:
        projected = [project(pixels, p["mean"], p["components"]) for p in self.projections]
        n = len(pixels)
        acc = np.zeros((n, len(self.classes)), dtype=np.float64)
        n_trees = 0
        if len(self._children) != len(self.members):
            # Left and right child side by side: one gather per level picks the branch.
            self._children = [np.stack([m["left"], m["right"]], axis=1).ravel() for m in self.members]
        for m, children in zip(self.members, self._children):
            x = projected[m["projection"]]
            flat = x.ravel()
            row_start = (np.arange(n, dtype=np.int64) * x.shape[1])[:, None]
            nodes = np.broadcast_to(m["roots"], (n, len(m["roots"]))).copy()
            for _ in range(m["max_depth"]):
                # Every tree, every image, one level down (a leaf points to itself).
                go_right = flat[row_start + m["feature"][nodes]] > m["threshold"][nodes]
                nodes = children[2 * nodes + go_right]
            values = m["leaf_value"][m["leaf_index"][nodes]]  # (n, trees, classes)
            # Tree by tree, so a row's sum never depends on the rows beside it.
            for t in range(values.shape[1]):
                acc += values[:, t, :]
            n_trees += values.shape[1]
        return acc / max(n_trees, 1)

    # ---------------------------------------------------------------- bytes
    def to_bytes(self) -> bytes:
        """Serialize; equal models give equal bytes. Sets :attr:`digest`."""
        data = codec.encode(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "classes": list(self.classes),
                "image_size": int(self.image_size),
                "config": self.config,
                "metrics": self.metrics,
                "projections": self.projections,
                "members": self.members,
            }
        )
        self.digest = codec.digest(data)
        return data

    def summary(self) -> dict[str, Any]:
        """A JSON-able description (no arrays)."""
        return {
            "digest": self.digest,
            "classes": self.classes,
            "image_size": self.image_size,
            "num_members": len(self.members),
            "num_projections": len(self.projections),
            "num_trees": int(sum(len(m["roots"]) for m in self.members)),
            "config": self.config,
            "metrics": self.metrics,
        }


def build(classes, image_size, projections, members, config=None, metrics=None) -> Model:
    """Assemble a :class:`Model` and check it as :func:`from_bytes` would."""
    model = Model(list(classes), int(image_size), list(projections), list(members),
                  dict(config or {}), dict(metrics or {}))
    _check(model, "new model")
    return model


# --------------------------------------------------------------------------- load
def from_bytes(data: bytes | memoryview, *, source: str = "model") -> Model:
    """Parse and check model bytes, trusting nothing in them.

    A checksum proves the bytes are whole, not that they are sane, so every
    count and size is bounded before anything proportional to it is built:
    by the limits below and by what the file can honestly hold (each array
    lies in the file and is used once, see :func:`mlwf.codec.decode`).

    ======================================  =========================
    header (JSON) size, nesting depth        :data:`MAX_HEADER_BYTES`, :data:`MAX_HEADER_DEPTH`
    classes, bytes of a class name           :data:`MAX_CLASSES`, :data:`MAX_CLASS_NAME_BYTES`
    members (forests), projections           :data:`MAX_MEMBERS` (a projection serves at least one member)
    trees (all members), nodes per member    :data:`MAX_TREES`, :data:`MAX_NODES_PER_MEMBER`
    components per projection               :data:`MAX_COMPONENTS`, and no more than pixels
    image size, tree depth                   1–1024, 0–64
    ======================================  =========================

    Every number must be finite (thresholds, projections, leaf values, and
    the JSON metadata); class names are text without control characters.

    Raises
    ------
    ModelError
        If the bytes are not a model, are truncated, corrupt or tampered with,
        break a bound, or were written by an incompatible version. Nothing in
        them is executed.
    """
    try:
        meta = codec.decode(data, what=source, max_header=MAX_HEADER_BYTES, max_depth=MAX_HEADER_DEPTH)
    except codec.CodecError as e:
        raise ModelError(f"{e}: refusing to load it; retrain with 'mlwf run ml-training'") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{source} is not an mlwf model")
    if meta.get("version") != FORMAT_VERSION:
        shown = meta.get("version") if isinstance(meta.get("version"), (int, float, type(None))) else "?"
        raise ModelError(
            f"{source} is model format version {shown!r}, this mlwf reads version "
            f"{FORMAT_VERSION}: retrain with 'mlwf run ml-training' or use the mlwf that wrote it"
        )
    try:
        model = Model(
            classes=meta["classes"],
            image_size=meta["image_size"],
            projections=meta["projections"],
            members=meta["members"],
            config=meta.get("config", {}),
            metrics=meta.get("metrics", {}),
            digest=codec.digest(data),
        )
    except (KeyError, TypeError):
        raise ModelError(f"{source} is corrupt (missing fields)") from None
    _check(model, source)
    return model


def class_name_problem(name: Any) -> str | None:
    """What makes ``name`` unfit as a class name (text a terminal or CSV shows as is), or None."""
    if not isinstance(name, str) or not name or len(name.encode("utf-8", "surrogatepass")) > MAX_CLASS_NAME_BYTES \
            or _CONTROL.search(name):
        return f"1 to {MAX_CLASS_NAME_BYTES} bytes of text without control characters"
    return None


def _is_int(v: Any, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _check(model: Model, source: str) -> None:
    """Refuse anything that could make prediction index out of bounds, loop, or cost more than the file is worth.

    Counts are checked first, then each array, so no work proportional to a
    claim is done before the claim is known to be within bounds.
    """

    def bad(why: str):
        raise ModelError(f"{source} is corrupt or was tampered with ({why}); refusing to use it")

    if not isinstance(model.config, dict) or not isinstance(model.metrics, dict):
        bad("config or metrics")
    accuracy = model.metrics.get("validation_accuracy")
    if accuracy is not None and not (isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool)
                                     and 0 <= accuracy <= 1):
        bad("metrics: validation accuracy is not a fraction")
    if not _is_int(model.image_size, 1, 1024):
        bad("image size")
    classes = model.classes
    if not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES:
        bad(f"class list: 2 to {MAX_CLASSES:,} classes")
    for c in classes:
        if class_name_problem(c):
            bad(f"class list: a name must be {class_name_problem(c)}")
    if len(set(classes)) != len(classes):
        bad("class list: a name appears twice")
    if not isinstance(model.projections, list) or not isinstance(model.members, list):
        bad("projections or members")
    if not model.projections or not model.members:
        bad("empty ensemble")
    if len(model.members) > MAX_MEMBERS or len(model.projections) > len(model.members):
        bad(f"{len(model.members):,} members and {len(model.projections):,} projections: at most "
            f"{MAX_MEMBERS:,} members, and no more projections than members")
    n_trees = 0
    for m in model.members:
        roots = m.get("roots") if isinstance(m, dict) else None
        if not isinstance(roots, np.ndarray) or roots.ndim != 1:
            bad("member fields")
        n_trees += len(roots)
    if n_trees > MAX_TREES:
        bad(f"{n_trees:,} trees, more than the {MAX_TREES:,} allowed")
    d = model.image_size**2
    for p in model.projections:
        if not isinstance(p, dict):
            bad("projection")
        mean, comp = p.get("mean"), p.get("components")
        if not isinstance(mean, np.ndarray) or not isinstance(comp, np.ndarray):
            bad("projection arrays")
        if mean.shape != (d,) or comp.ndim != 2 or comp.shape[1] != d or not 1 <= comp.shape[0] <= min(d, MAX_COMPONENTS):
            bad("projection shape")
        if not (np.issubdtype(mean.dtype, np.floating) and np.issubdtype(comp.dtype, np.floating)):
            bad("projection dtype")
        if not (np.isfinite(mean).all() and np.isfinite(comp).all()):
            bad("projection: a number is not finite")
    n_classes = len(classes)
    used = np.zeros(len(model.projections), dtype=bool)
    for m in model.members:
        try:
            pi = m["projection"]
            depth = m["max_depth"]
            roots, left, right = m["roots"], m["left"], m["right"]
            feature, threshold = m["feature"], m["threshold"]
            leaf_index, leaf_value = m["leaf_index"], m["leaf_value"]
        except (KeyError, TypeError):
            bad("member fields")
        if not _is_int(pi, 0, len(model.projections) - 1):
            bad("member projection")
        used[pi] = True
        k = model.projections[pi]["components"].shape[0]
        arrays = (roots, left, right, feature, threshold, leaf_index, leaf_value)
        if not all(isinstance(a, np.ndarray) for a in arrays):
            bad("member arrays")
        n = len(left)
        if not _is_int(depth, 0, 64) or n == 0:
            bad("tree depth")
        if n > MAX_NODES_PER_MEMBER:
            bad(f"{n:,} nodes in one member, more than the {MAX_NODES_PER_MEMBER:,} allowed")
        if any(a.ndim != 1 or len(a) != n for a in (right, feature, threshold, leaf_index)) or roots.ndim != 1:
            bad("tree array lengths")
        if not all(np.issubdtype(a.dtype, np.integer) for a in (roots, left, right, feature, leaf_index)):
            bad("tree array dtypes")
        if not (np.issubdtype(threshold.dtype, np.floating) and np.issubdtype(leaf_value.dtype, np.floating)):
            bad("tree array dtypes")
        if not np.isfinite(threshold).all():
            bad("tree thresholds: a number is not finite")
        ids = np.arange(n)
        leaf = left == ids
        internal = ~leaf
        # Children come after their parent (no cycles) and stay in range.
        if np.any(leaf != (right == ids)) or np.any(left[internal] <= ids[internal]) \
                or np.any(right[internal] <= ids[internal]) or np.any(left >= n) or np.any(right >= n):
            bad("tree links")
        if np.any(feature[internal] < 0) or np.any(feature[internal] >= k) or np.any(feature < 0):
            bad("tree features")
        if roots.size == 0 or np.any(roots < 0) or np.any(roots >= n) or roots[0] != 0 \
                or np.any(np.diff(roots) <= 0):
            bad("tree roots")
        n_leaves = int(leaf.sum())
        if leaf_value.shape != (n_leaves, n_classes) or not np.all(np.isfinite(leaf_value)) \
                or np.any(leaf_value < 0):
            bad("leaf values")
        if np.any(leaf_index[internal] != -1) or np.any(np.sort(leaf_index[leaf]) != np.arange(n_leaves)):
            bad("leaf index")
        # Every node must be reachable within max_depth steps of its tree's root.
        tree_end = np.append(roots[1:], n)
        owner = np.searchsorted(roots, ids, side="right") - 1
        if np.any(left[internal] >= tree_end[owner[internal]]) or np.any(right[internal] >= tree_end[owner[internal]]):
            bad("tree links cross trees")
        node_depth = np.full(n, -1, dtype=np.int64)
        node_depth[roots] = 0
        frontier = roots
        for level in range(1, depth + 2):
            kids = np.concatenate([left[frontier][internal[frontier]], right[frontier][internal[frontier]]])
            if kids.size == 0:
                break
            if level > depth:
                bad("tree deeper than its stated depth")
            node_depth[kids] = level
            frontier = kids
        if np.any(node_depth < 0):
            bad("unreachable nodes")
    if not used.all():
        bad("a projection no member uses")


# --------------------------------------------------------------------------- store
def manifest_key(prefix: str) -> str:
    """The key of the manifest of the model at ``prefix``; refuses a blank prefix.

    Raises
    ------
    UsageError
        If ``prefix`` is empty or blank: a model lives in a folder of its own,
        never at the top of a bucket.
    StoreError
        If it is not a valid key prefix.
    """
    from mlwf.storage import check_prefix, join_key

    if not isinstance(prefix, str) or not prefix.strip().strip("/").strip():
        raise UsageError(f"model prefix {prefix!r} names no folder: give one such as 'ml-inference/model'")
    check_prefix(prefix)
    return join_key(prefix, MANIFEST)


def _object_key(prefix: str, sha: str) -> str:
    from mlwf.storage import join_key

    return join_key(prefix, "versions", f"{sha}.mlwf")


def _parse_manifest(raw: bytes, key: str, prefix: str) -> dict[str, Any]:
    """A manifest's bytes as a dict, every entry checked; :class:`ModelError` if corrupt.

    The current model and every history entry must name the object
    ``<prefix>/versions/<sha256>.mlwf`` of their own checksum, so a manifest
    can never point a reader outside its model's folder.
    """
    def corrupt(why: str):
        raise ModelError(f"model manifest {key!r} is corrupt ({why}): publish a model again with "
                         "'mlwf run ml-training'")

    if len(raw) > MAX_MANIFEST_BYTES:
        corrupt(f"larger than {MAX_MANIFEST_BYTES >> 10} KiB")
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError):
        corrupt("not JSON")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        corrupt("not an mlwf model manifest")
    history = manifest.setdefault("history", [])
    if not isinstance(history, list):
        corrupt("its history is not a list")
    for i, entry in enumerate([manifest, *history]):
        where = "current model" if i == 0 else f"history entry {i}"
        if not isinstance(entry, dict):
            corrupt(f"{where} is not an object")
        sha = entry.get("sha256")
        if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            corrupt(f"{where} has no valid sha256")
        if entry.get("object") != _object_key(prefix, sha):
            corrupt(f"{where} names an object other than {_object_key(prefix, '<sha256>')!r}")
        for name in ("run_id", "published_at", "rolled_back_at", "write_id"):
            value = entry.get(name)
            if value is not None and not (isinstance(value, str) and len(value) <= 256 and not _CONTROL.search(value)):
                corrupt(f"{where} has a {name} that is not plain text")
        size = entry.get("size")
        if size is not None and not _is_int(size, 0, 1 << 62):
            corrupt(f"{where} has a size that is not a byte count")
    return manifest


def read_manifest(get, prefix: str, *, where: str = "the store") -> dict[str, Any]:
    """The manifest of the model published at ``prefix``.

    ``get(key) -> bytes`` reads one object (e.g. ``store.get``). Raises
    :class:`~mlwf.errors.ModelError` if there is no model there or its
    manifest is corrupt, :class:`~mlwf.errors.UsageError` for a blank prefix.
    """
    key = manifest_key(prefix)
    try:
        raw = get(key)
    except NotFoundError:
        raise ModelError(
            f"no model at {prefix!r} in {where}: run ml-training first, e.g. "
            f"'mlwf run ml-training ml-training/mnist-images-2k 2 8 --model-prefix {prefix}'"
        ) from None
    return _parse_manifest(raw, key, prefix)


def read_published(get, prefix: str, *, where: str = "the store") -> tuple[bytes, dict[str, Any]]:
    """Bytes and manifest of the model published at ``prefix``, checksum verified."""
    manifest = read_manifest(get, prefix, where=where)
    try:
        data = get(manifest["object"])
    except NotFoundError:
        raise ModelError(f"model object {manifest['object']!r} named by {prefix}/{MANIFEST} is missing: "
                         "retrain with 'mlwf run ml-training'") from None
    if codec.digest(data) != manifest.get("sha256"):
        raise ModelError(f"model object {manifest['object']!r} does not match its manifest checksum "
                         "(truncated or modified): refusing to load it; retrain with 'mlwf run ml-training'")
    return data, manifest


def publish(store, prefix: str, data: bytes, *, run_id: str, summary: dict[str, Any] | None = None) -> dict:
    """Publish validated model bytes at ``prefix``; return the new manifest.

    The model object is written first under a content-addressed key
    (``versions/<sha256>.mlwf``), then the manifest that names it. The
    manifest is replaced by compare-and-swap (:meth:`~mlwf.storage.Store.put_if_tag`):
    a publisher that finds the manifest changed since it read it reads it
    again and retries, so concurrent publishers each land in turn, the last
    one current and every other in ``history``, and a reader sees one whole
    model or the other, never a mix. Earlier versions stay, listed in the
    manifest's ``history`` (the newest :data:`HISTORY_LENGTH`).

    A manifest that is corrupt is replaced, its history with it.

    Raises
    ------
    UsageError
        If ``prefix`` is blank.
    StoreError
        If the store fails, or the manifest kept changing for
        :data:`_CAS_ATTEMPTS` attempts.
    """
    manifest_key(prefix)
    sha = codec.digest(data)
    obj = _object_key(prefix, sha)
    if not store.put_if_absent(obj, data):
        store.put(obj, data)  # other bytes at a content-addressed key are damage: its name says what belongs there

    def change(current: dict | None, write_id: str) -> dict:
        history = [] if current is None else [_entry(current), *current["history"]]
        return {
            "format": MANIFEST_FORMAT,
            "version": 1,
            "object": obj,
            "sha256": sha,
            "size": len(data),
            "run_id": run_id,
            "published_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "write_id": write_id,
            "summary": summary or {},
            "history": [h for h in history if h.get("sha256") != sha][:HISTORY_LENGTH],
        }

    return _update_manifest(store, prefix, change, replace_corrupt=True)


def rollback(store, prefix: str) -> dict:
    """Make the previous published version current again; return the new manifest.

    The model it replaces becomes the newest entry of ``history`` (so a
    second rollback undoes the first, and ``history[0]`` of the result names
    what was replaced). The manifest is replaced by compare-and-swap, as in
    :func:`publish`.

    Raises
    ------
    ModelError
        If there is no model, no earlier version, the manifest is corrupt, or
        the earlier object is missing, does not match its checksum or is not
        a valid model.
    """
    where = f"bucket {store.bucket!r} of {store.url}"
    checked: set[str] = set()

    def change(current: dict | None, write_id: str) -> dict:
        if current is None:
            read_manifest(store.get, prefix, where=where)  # raises the "no model" error
        history = current["history"]
        if not history:
            raise ModelError(f"no earlier version of the model at {prefix!r} to roll back to")
        previous = history[0]
        if previous["sha256"] not in checked:
            try:
                data = store.get(previous["object"])
            except NotFoundError:
                raise ModelError(f"the earlier model object {previous['object']!r} is gone: cannot roll back") from None
            if codec.digest(data) != previous["sha256"]:
                raise ModelError(f"the earlier model object {previous['object']!r} does not match its checksum: "
                                 "cannot roll back to it")
            from_bytes(data, source=previous["object"])
            checked.add(previous["sha256"])
        manifest = {**current, **{k: previous.get(k) for k in _ENTRY_FIELDS},
                    "rolled_back_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    "write_id": write_id, "history": [_entry(current)] + history[1:]}
        manifest.pop("summary", None)
        return manifest

    return _update_manifest(store, prefix, change, replace_corrupt=False)


def _update_manifest(store, prefix: str, change, *, replace_corrupt: bool) -> dict:
    """Read, change and compare-and-swap the manifest at ``prefix`` until it lands.

    ``change(current_or_None, write_id)`` returns the new manifest. Each
    attempt carries a fresh ``write_id``; finding one of ours in the manifest
    read back means that attempt landed although the store reported it had
    not (an S3 request retried after a lost answer sees its own write).
    """
    from mlwf.errors import StoreError

    key = manifest_key(prefix)
    ours: dict[str, dict] = {}  # write_id -> the manifest that attempt wrote
    for attempt in range(_CAS_ATTEMPTS):
        try:
            raw, tag = store.get_tagged(key)
        except NotFoundError:
            raw, tag = None, None
        current = None
        if raw is not None:
            try:
                current = _parse_manifest(raw, key, prefix)
            except ModelError:
                if not replace_corrupt:
                    raise
            if current is not None and ours:
                # A landed attempt is current, or already in the history of a writer who came after.
                for entry in [current, *current["history"]]:
                    if entry.get("write_id") in ours:
                        return ours[entry["write_id"]]
        write_id = secrets.token_hex(8)
        manifest = ours[write_id] = change(current, write_id)
        body = json.dumps(manifest, indent=2).encode()
        if store.put_if_absent(key, body) if tag is None else store.put_if_tag(key, body, tag):
            return manifest
        time.sleep(random.uniform(0, min(1.0, 0.005 * 2**attempt)))  # let the winner's write settle
    raise StoreError(f"the model manifest {key!r} in {store.url} kept changing during {_CAS_ATTEMPTS} attempts "
                     "to update it (other publishers at the same prefix): try again")


_ENTRY_FIELDS = ("object", "sha256", "size", "run_id", "published_at", "write_id")


def _entry(manifest: dict) -> dict:
    return {k: manifest.get(k) for k in _ENTRY_FIELDS}


def load(source: str | os.PathLike | bytes, *, store=None, bucket: str | None = None) -> Model:
    """Load a model from a file, from bytes, or from a model prefix in a store.

    Parameters
    ----------
    source : a path to a ``.mlwf`` file, the model's bytes, or a model prefix
        such as ``"ml-inference/model"``.
    store : a :class:`~mlwf.storage.Store` or a store URL/directory; by default
        ``MLWF_STORE`` or the default local store. Used only for prefixes.
    bucket : bucket name when ``store`` is a URL (default ``MLWF_BUCKET`` or ``tless``).

    Raises
    ------
    ModelError
        If there is no model there or it cannot be trusted (see :func:`from_bytes`).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return from_bytes(source)
    path = os.fspath(source)
    if store is None and os.path.isfile(path):
        with open(path, "rb") as f:
            return from_bytes(f.read(), source=path)
    from mlwf.settings import Settings
    from mlwf.storage import Store

    if not isinstance(store, Store):
        settings = Settings.resolve(store=store, bucket=bucket)
        store = settings.store.open(settings)
    data, manifest = read_published(store.get, path, where=f"bucket {store.bucket!r} of {store.url}")
    return from_bytes(data, source=manifest["object"])
