"""The model file read back: from bytes, with every structural check and limit.

The file is an :mod:`mlwf.codec` payload: JSON metadata plus raw arrays,
written by :meth:`Model.to_bytes <mlwf.model.predict.Model.to_bytes>` (which
names the :data:`FORMAT` and its :data:`FORMAT_VERSION`). Loading parses and
checks it (format version, checksum, shapes, tree structure) and never
executes anything from it; the limits below bound what a file read from
anywhere can make mlwf build.

What the checks cost: the bounds are counted from the header and the array
table before the structural checks, plus one ``isfinite`` pass over arrays
those checks read anyway, and each tree's nodes are walked once (``b9ec7d1``).
Loads got faster with them: the 2k / 60k model 10.0 / 83.7 → 8.2 / 60.9 ms
against ``40cc98e`` (2026-12-06, ``benchmarks/throughput.py --measures
load_model``). A process checks given bytes in full once
(:func:`checked_summary`, by digest): ml-inference's load stage went 117 → 65 ms,
35 ms once warm (2026-11-28).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import numpy as np

from mlwf import codec
from mlwf.errors import ModelError
from mlwf.model.predict import FORMAT, FORMAT_VERSION, Model

#: Bounds of a model read from anywhere (see :func:`from_bytes`); training refuses settings beyond them.
MAX_CLASSES = 1000
MAX_CLASS_NAME_BYTES = 255
MAX_MEMBERS = 1024
MAX_TREES = 100_000
MAX_NODES_PER_MEMBER = 1 << 30
MAX_COMPONENTS = 4096
MAX_HEADER_BYTES = 8 << 20
MAX_HEADER_DEPTH = 8
#: Control characters, never allowed in a class name or a manifest's text fields.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
#: The one dtype of each array of a projection and of a member, as :meth:`Model.to_bytes` writes them
#: (:func:`mlwf.model.export_forest`, training's PCA). Another dtype is refused, never cast: a cast
#: would hide a file no mlwf wrote, and the walks index with these arrays as they are (an unsigned
#: index mixed with a signed one becomes a float; a narrow one overflows).
PROJECTION_DTYPES = {"mean": np.dtype("<f8"), "components": np.dtype("<f8")}
MEMBER_DTYPES = {"roots": np.dtype("<i4"), "left": np.dtype("<i4"), "right": np.dtype("<i4"),
                 "feature": np.dtype("<i4"), "threshold": np.dtype("<f8"), "leaf_index": np.dtype("<i4"),
                 "leaf_value": np.dtype("<f4")}


def build(classes, image_size, projections, members, config=None, metrics=None) -> Model:
    """Assemble a :class:`Model` and check it as :func:`from_bytes` would."""
    model = Model(list(classes), int(image_size), list(projections), list(members),
                  dict(config or {}), dict(metrics or {}))
    _check(model, "new model")
    return model


# --------------------------------------------------------------------------- load
def from_bytes(data: bytes | memoryview, *, source: str = "model", digest: str | None = None) -> Model:
    """Parse and check model bytes, trusting nothing in them.

    ``digest``: the SHA-256 of exactly these bytes when the caller has just
    computed it (it becomes :attr:`Model.digest` instead of hashing them again).

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
    Every array has the one dtype the format defines (:data:`MEMBER_DTYPES`,
    :data:`PROJECTION_DTYPES`): another is refused, never cast. Every index
    lies in range (children, roots, the leaf rows, and the feature of every
    node, leaves included) and each tree is a tree: a child comes after its
    parent in the same tree, each node has exactly one parent. So prediction,
    in either walk (:mod:`mlwf.model.walk`), takes at most ``max_depth``
    steps per image and tree and reads only inside its arrays, on any batch.

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
            digest=digest or codec.digest(data),
        )
    except (KeyError, TypeError):
        raise ModelError(f"{source} is corrupt (missing fields)") from None
    _check(model, source)
    return model


#: Digests of model bytes this process has parsed and checked in full, with what
#: :func:`checked_summary` returns for them (the newest few).
_CHECKED: OrderedDict[str, dict[str, Any]] = OrderedDict()
_CHECKED_KEPT = 8


def checked_summary(data: bytes | memoryview, *, digest: str, source: str = "model") -> dict[str, Any]:
    """``classes``, ``image_size`` and ``metrics`` of model bytes whose SHA-256 is ``digest``,
    checked in full by :func:`from_bytes` unless this process already checked bytes with that digest.

    The same digest means the same bytes, so the same verdict: a warm process
    that reads a published model again pays for a hash, not for a parse.

    Raises
    ------
    ModelError
        As :func:`from_bytes`.
    """
    if digest not in _CHECKED:
        model = from_bytes(data, source=source, digest=digest)
        _CHECKED[digest] = {"classes": list(model.classes), "image_size": model.image_size,
                            "metrics": dict(model.metrics)}
        while len(_CHECKED) > _CHECKED_KEPT:
            _CHECKED.popitem(last=False)
    _CHECKED.move_to_end(digest)
    found = _CHECKED[digest]
    return {"classes": list(found["classes"]), "image_size": found["image_size"], "metrics": dict(found["metrics"])}


def class_name_problem(name: Any) -> str | None:
    """What makes ``name`` unfit as a class name (text a terminal or CSV shows as is), or None."""
    if not isinstance(name, str) or not name or len(name.encode("utf-8", "surrogatepass")) > MAX_CLASS_NAME_BYTES \
            or CONTROL.search(name):
        return f"1 to {MAX_CLASS_NAME_BYTES} bytes of text without control characters"
    return None


def is_int(v: Any, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _check(model: Model, source: str) -> None:
    """Refuse anything that could make prediction index out of bounds, loop, or cost more than the file is worth.

    Counts are checked first, then each array, so no work proportional to a
    claim is done before the claim is known to be within bounds.
    """

    def bad(why: str):
        raise ModelError(f"{source} is corrupt or was tampered with ({why}); refusing to use it: "
                         "retrain with 'mlwf run ml-training'")

    def bad_dtype(where: str, arrays: dict[str, np.ndarray], dtypes: dict[str, np.dtype]):
        for name, array in arrays.items():
            if array.dtype != dtypes[name]:
                bad(f"{where}: {name!r} holds {array.dtype}, the format holds {dtypes[name]}")

    if not isinstance(model.config, dict) or not isinstance(model.metrics, dict):
        bad("config or metrics")
    accuracy = model.metrics.get("validation_accuracy")
    if accuracy is not None and not (isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool)
                                     and 0 <= accuracy <= 1):
        bad("metrics: validation accuracy is not a fraction")
    if not is_int(model.image_size, 1, 1024):
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
    for i, p in enumerate(model.projections):
        if not isinstance(p, dict):
            bad("projection")
        mean, comp = p.get("mean"), p.get("components")
        if not isinstance(mean, np.ndarray) or not isinstance(comp, np.ndarray):
            bad("projection arrays")
        bad_dtype(f"projection {i}", {"mean": mean, "components": comp}, PROJECTION_DTYPES)
        if mean.shape != (d,) or comp.ndim != 2 or comp.shape[1] != d or not 1 <= comp.shape[0] <= min(d, MAX_COMPONENTS):
            bad("projection shape")
        if not (np.isfinite(mean).all() and np.isfinite(comp).all()):
            bad("projection: a number is not finite")
    n_classes = len(classes)
    used = np.zeros(len(model.projections), dtype=bool)
    for j, m in enumerate(model.members):
        try:
            pi = m["projection"]
            depth = m["max_depth"]
            arrays = {name: m[name] for name in MEMBER_DTYPES}
        except (KeyError, TypeError):
            bad("member fields")
        if not is_int(pi, 0, len(model.projections) - 1):
            bad("member projection")
        used[pi] = True
        k = model.projections[pi]["components"].shape[0]
        if not all(isinstance(a, np.ndarray) for a in arrays.values()):
            bad("member arrays")
        bad_dtype(f"member {j}", arrays, MEMBER_DTYPES)
        roots, left, right = arrays["roots"], arrays["left"], arrays["right"]
        feature, threshold = arrays["feature"], arrays["threshold"]
        leaf_index, leaf_value = arrays["leaf_index"], arrays["leaf_value"]
        n = len(left)
        if not is_int(depth, 0, 64) or n == 0:
            bad("tree depth")
        if n > MAX_NODES_PER_MEMBER:
            bad(f"{n:,} nodes in one member, more than the {MAX_NODES_PER_MEMBER:,} allowed")
        if any(a.ndim != 1 or len(a) != n for a in (left, right, feature, threshold, leaf_index)) or roots.ndim != 1:
            bad("tree array lengths")
        if not np.isfinite(threshold).all():
            bad("tree thresholds: a number is not finite")
        ids = np.arange(n)
        leaf = left == ids
        # The internal nodes and their children, taken once: every check below reads them.
        inner = np.flatnonzero(~leaf)
        kids_left, kids_right = left[inner], right[inner]
        # Children come after their parent (no cycles) and stay in range.
        if np.any(leaf != (right == ids)) or np.any(kids_left <= inner) or np.any(kids_right <= inner) \
                or np.any(kids_left >= n) or np.any(kids_right >= n):
            bad("tree links")
        # Leaves too: the NumPy walk reads a leaf's feature at every level below it.
        if np.any(feature < 0) or np.any(feature >= k):
            bad(f"tree features: member {j} reads a feature outside its projection's {k} components")
        if roots.size == 0 or np.any(roots < 0) or np.any(roots >= n) or roots[0] != 0 \
                or np.any(np.diff(roots) <= 0):
            bad("tree roots")
        # A tree, not a graph: each node the child of exactly one node, a root of none. Children
        # shared by several parents would double the nodes at each level of a walk (2**64 at depth 64).
        parents = np.bincount(np.concatenate([kids_left, kids_right]), minlength=n)
        is_root = np.zeros(n, dtype=bool)
        is_root[roots] = True
        if np.any(parents[is_root] != 0):
            bad(f"tree links: in member {j} a root is the child of another node")
        if np.any(parents[~is_root] > 1):
            node = int(np.flatnonzero((parents > 1) & ~is_root)[0])
            bad(f"tree links: in member {j} node {node} is the child of {int(parents[node])} nodes, "
                "a tree's node has one parent")
        n_leaves = n - len(inner)
        if leaf_value.shape != (n_leaves, n_classes) or not np.all(np.isfinite(leaf_value)) \
                or np.any(leaf_value < 0):
            bad("leaf values")
        if np.any(leaf_index[inner] != -1) or np.any(np.sort(leaf_index[leaf]) != np.arange(n_leaves)):
            bad("leaf index")
        # A child stays in its parent's tree (scikit-learn's walk numbers nodes within a tree).
        tree_end = np.append(roots[1:], n)[np.searchsorted(roots, inner, side="right") - 1]
        if np.any(kids_left >= tree_end) or np.any(kids_right >= tree_end):
            bad("tree links cross trees")
        # Every node must be reachable within max_depth steps of its tree's root.
        internal = ~leaf
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

