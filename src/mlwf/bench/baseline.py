"""The same-run baseline: the same work as the workflows, in one process, plain scikit-learn.

Training reads the same PNG files from the local store's bucket folder, holds
out the same stratified fraction, fits P PCAs on the round-robin partitions and
T random forests on their slices with the same settings, one after the other;
the ensemble averages ``predict_proba``. Inference decodes a folder of images
and applies that ensemble. Nothing here imports mlwf but the settings' default
values (:data:`mlwf.presets.DEFAULTS`, plain values), so it measures what a
user would write by hand.

Also: ``single_forest`` fits one PCA and one forest on all the training images
(what a user would do without a workflow), for an accuracy reference.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import make_dataclass

import numpy as np
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split

from mlwf.presets import DEFAULTS

#: The settings the baseline follows, named as ml-training names them, by default the same (the reference's).
Settings = make_dataclass("Settings", [(name, type(value), value) for name, value in DEFAULTS.items()], frozen=True)


def list_images(folder: str) -> tuple[list[str], list[str]]:
    """Paths and labels (class folder names) of every file under ``folder``, sorted."""
    paths, labels = [], []
    for label in sorted(os.listdir(folder)):
        sub = os.path.join(folder, label)
        if os.path.isdir(sub):
            for name in sorted(os.listdir(sub)):
                paths.append(os.path.join(sub, name))
                labels.append(label)
    return paths, labels


def decode(paths: list[str], size: int) -> np.ndarray:
    out = np.empty((len(paths), size * size), dtype=np.float32)
    for i, p in enumerate(paths):
        with open(p, "rb") as f:
            im = Image.open(io.BytesIO(f.read())).convert("L").resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(im, dtype=np.float32).reshape(-1) / 255.0
    return out


class Ensemble:
    def __init__(self, classes, members):
        self.classes = classes
        self.members = members  # (pca, forest)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        acc = np.zeros((len(x), len(self.classes)))
        for pca, forest in self.members:
            acc[:, forest.classes_] += forest.predict_proba(pca.transform(x))
        return acc / len(self.members)


def train(folder: str, num_pca: int, num_train: int, s: Settings = Settings()) -> dict:
    """Train like ml-training, in this process; return timings, accuracy and the ensemble."""
    t0 = time.perf_counter()
    paths, names = list_images(folder)
    classes = sorted(set(names), key=lambda c: (len(c), c))
    y = np.array([classes.index(n) for n in names])
    tr, ho = train_test_split(np.arange(len(paths)), test_size=s.holdout, stratify=y, random_state=s.seed)
    x = decode(paths, s.image_size)
    members = []
    per_pca = [num_train // num_pca + (1 if i < num_train % num_pca else 0) for i in range(num_pca)]
    for i in range(num_pca):
        rows = tr[i::num_pca]
        pca = PCA(s.n_components, svd_solver="randomized", random_state=s.seed).fit(x[rows])
        feats = pca.transform(x[rows])
        for j, part in enumerate(np.array_split(np.arange(len(rows)), per_pca[i])):
            forest = RandomForestClassifier(n_estimators=s.n_trees, max_depth=s.max_depth,
                                            min_samples_split=s.min_samples_split,
                                            random_state=s.seed + j, n_jobs=1)
            members.append((pca, forest.fit(feats[part], y[rows][part])))
    model = Ensemble(classes, members)
    accuracy = float(np.mean(model.predict_proba(x[ho]).argmax(1) == y[ho]))
    return {"ms": (time.perf_counter() - t0) * 1e3, "validation_accuracy": accuracy, "model": model}


def single_forest(folder: str, s: Settings = Settings()) -> dict:
    """One PCA and one forest on all training images: the no-workflow reference."""
    t0 = time.perf_counter()
    paths, names = list_images(folder)
    classes = sorted(set(names), key=lambda c: (len(c), c))
    y = np.array([classes.index(n) for n in names])
    x = decode(paths, s.image_size)
    pca = PCA(s.n_components, svd_solver="randomized", random_state=s.seed).fit(x)
    forest = RandomForestClassifier(n_estimators=s.n_trees, max_depth=s.max_depth,
                                    min_samples_split=s.min_samples_split, random_state=s.seed, n_jobs=1)
    forest.fit(pca.transform(x), y)
    return {"ms": (time.perf_counter() - t0) * 1e3, "model": Ensemble(classes, [(pca, forest)])}


def infer(model: Ensemble, folder: str, size: int = 64) -> dict:
    """Classify every image under ``folder`` (class folders); return time and accuracy."""
    t0 = time.perf_counter()
    paths, names = list_images(folder)
    pred = model.predict_proba(decode(paths, size)).argmax(1)
    accuracy = float(np.mean([model.classes[p] == n for p, n in zip(pred, names)]))
    return {"ms": (time.perf_counter() - t0) * 1e3, "accuracy": accuracy, "num_images": len(paths)}
