"""The trained ensemble and prediction: each member's trained projection, its trees, probabilities averaged.

A model is a list of *members*. Each member is the PCA projection it was trained
on plus its random forest, exported to plain arrays (no scikit-learn objects,
see :mod:`mlwf.model.forest`). Prediction projects the images with each
member's trained projection, runs every tree, and averages the class
probabilities over all members, over the full set of classes (a member that
never saw a class gives it probability 0). A model writes itself
(:meth:`Model.to_bytes`); :mod:`mlwf.model.format` reads it back and checks it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlwf import codec
from mlwf.model import walk

FORMAT = "mlwf-model"
#: Bump when the model layout changes; :func:`mlwf.model.format.from_bytes` refuses other versions.
FORMAT_VERSION = 1

_BATCH = 4096
#: Values (images × trees × classes) one prediction batch may hold: 16 MiB of float32.
#: The default model (100 trees, 10 classes) still predicts 4,096 images at a time.
_BATCH_VALUES = 1 << 22
#: Rows projected at a time (see :func:`project`).
_PROJECT_ROWS = 64


def project(pixels: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Apply a trained PCA projection; the one code path for training and inference.

    ``pixels`` are ``float32`` in [0, 1], or gray levels (``uint8``) that are
    scaled exactly as decoding scales them. Computed in float64 and rounded to
    float32, the precision the forests compare in, so a row's features do not
    depend on the batch it came in.
    """
    return project_all(pixels, [(mean, components)])[0]


@functools.cache
def _levels_as_float64() -> np.ndarray:
    """Each gray level as the float32 pixel decoding gives (level / 255), widened to float64."""
    from mlwf.images import unit_scale  # Pillow: only where images are decoded anyway

    return unit_scale(np.arange(256, dtype=np.uint8)).astype(np.float64)


def project_all(pixels: np.ndarray, projections) -> list[np.ndarray]:
    """:func:`project` with each ``(mean, components)`` of ``projections``, converting the pixels once."""
    pixels = np.asarray(pixels)
    outs = [np.empty((len(pixels), len(components)), dtype=np.float32) for _, components in projections]
    # A few dozen rows at a time, centred into one reused buffer: the float64
    # rows stay in cache instead of costing a page fault per 4 KiB of a fresh
    # array, and a model's projections share them. Whole, 10k × 4,096 pixels
    # made 330 MB arrays per projection: 0.85–1.45 s for 4 projections against
    # 0.13 s in blocks; with the table, a predict call of 625 images 33 → 19 ms.
    centred = np.empty((min(_PROJECT_ROWS, len(pixels)), pixels.shape[1] if pixels.ndim == 2 else 0))
    for start in range(0, len(pixels), _PROJECT_ROWS):
        rows = pixels[start : start + _PROJECT_ROWS]
        # Gray levels: exactly the float32 pixels decoding gives, widened, by table.
        rows = _levels_as_float64()[rows] if rows.dtype == np.uint8 else rows.astype(np.float64)
        buf = centred[: len(rows)]
        for out, (mean, components) in zip(outs, projections):
            np.subtract(rows, mean, out=buf)
            out[start : start + _PROJECT_ROWS] = buf @ components.T
    return outs


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
    _compiled: list = field(default_factory=list, repr=False, compare=False)

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
        """Probabilities for already decoded ``float32[n, size*size]`` pixels in [0, 1], or their
        ``uint8`` gray levels (see :func:`mlwf.images.decode_many`)."""
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8:
            pixels = pixels.astype(np.float32, copy=False)
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
        projected = project_all(pixels, [(p["mean"], p["components"]) for p in self.projections])
        n = len(pixels)
        acc = np.zeros((n, len(self.classes)), dtype=np.float64)
        n_trees = 0
        if walk.usable(self.members, len(self.classes), n):
            if len(self._compiled) != len(self.members):
                self._compiled = [walk.build_trees(m, self.projections[m["projection"]]["components"].shape[0],
                                                   len(self.classes)) for m in self.members]
            for m, trees in zip(self.members, self._compiled):
                walk.add_proba(trees, projected[m["projection"]], acc)
                n_trees += len(trees)
            return acc / max(n_trees, 1)
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
        """Serialize (read back by :mod:`mlwf.model.format`); equal models give equal bytes. Sets :attr:`digest`."""
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

