"""Issue 16: the accurate preset's candidates, emulated in one process on the IDX arrays.

    python benchmarks/issue16/preset_emulation.py [--fashion DIR] [--only NAME,…]

Each candidate repeats the workflow's shape at 60k `4 16` with plain
scikit-learn on Fashion-MNIST's 28×28 training images (no PNG decoding, no
workflow): hold out a fraction, deal the rest round-robin to 4 partitions, fit
a randomized PCA per partition, and 4 forests per partition, each on a
disjoint quarter of it (``slice``) or on all of it (``partition``); average
the 16 forests' probabilities on the 10,000 test images. It prints the test
accuracy, the CPU time of the forest fits (one core) and the trees' node
count (what the model's size follows). The workflow's own figures for the
chosen candidates come from preset_search.py; this is how they were chosen.
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

# name: (holdout, components, trees per forest, max depth, rows, forest, extra options)
CANDIDATES = {
    "rf-slice-c40-t100-d20": (0.2, 40, 100, 20, "slice", "random", {}),
    "rf-partition-c40-t25-d20": (0.2, 40, 25, 20, "partition", "random", {}),
    "rf-partition-h10-c40-t25-dnone": (0.1, 40, 25, None, "partition", "random", {}),
    "rf-partition-h10-c40-t25-d20-half-samples": (0.1, 40, 25, 20, "partition", "random", {"max_samples": 0.5}),
    "et-slice-h10-c40-t100-dnone": (0.1, 40, 100, None, "slice", "extra", {}),
    "et-partition-h10-c40-t25-dnone": (0.1, 40, 25, None, "partition", "extra", {}),
    "et-partition-h10-c40-t50-dnone": (0.1, 40, 50, None, "partition", "extra", {}),
    "et-partition-h10-c60-t40-d16": (0.1, 60, 40, 16, "partition", "extra", {}),
    "et-partition-h10-c60-t40-d20": (0.1, 60, 40, 20, "partition", "extra", {}),
    "et-partition-h10-c60-t40-dnone": (0.1, 60, 40, None, "partition", "extra", {}),
    "et-partition-h10-c80-t40-dnone": (0.1, 80, 40, None, "partition", "extra", {}),
}


def idx(path: Path, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(path).read(), np.uint8, offset=offset)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fashion", type=Path, default=Path(__file__).resolve().parents[3] / "shared/datasets/fashion-mnist")
    p.add_argument("--only")
    a = p.parse_args()
    threadpool_limits(1)
    from sklearn.decomposition import PCA
    from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier

    x = idx(a.fashion / "train-images-idx3-ubyte.gz", 16).reshape(-1, 784).astype(np.float32) / 255
    y = idx(a.fashion / "train-labels-idx1-ubyte.gz", 8)
    x_test = idx(a.fashion / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 784).astype(np.float32) / 255
    y_test = idx(a.fashion / "t10k-labels-idx1-ubyte.gz", 8)
    for name in (a.only.split(",") if a.only else CANDIDATES):
        holdout, components, trees, depth, rows, forest, extra = CANDIDATES[name]
        kind = ExtraTreesClassifier if forest == "extra" else RandomForestClassifier
        order = np.random.default_rng(0).permutation(len(x))
        train = order[: int(len(x) * (1 - holdout))]
        proba = np.zeros((len(x_test), 10))
        fit_s, nodes = 0.0, 0
        for i in range(4):
            part = train[i::4]
            pca = PCA(components, svd_solver="randomized", random_state=i).fit(x[part])
            features, test = pca.transform(x[part]).astype(np.float32), pca.transform(x_test).astype(np.float32)
            for j, mine in enumerate(np.array_split(np.arange(len(part)), 4)):
                use = np.arange(len(part)) if rows == "partition" else mine
                t = time.process_time()
                fitted = kind(trees, max_depth=depth, min_samples_split=5, n_jobs=1, random_state=4 * i + j,
                              **extra).fit(features[use], y[part][use])
                fit_s += time.process_time() - t
                nodes += sum(e.tree_.node_count for e in fitted.estimators_)
                proba += fitted.predict_proba(test)
        accuracy = float(np.mean(proba.argmax(axis=1) == y_test))
        print(f"{name:44} test {100 * accuracy:.2f} %  forest fits {fit_s:5.1f} s CPU  nodes {nodes / 1e6:.2f} M",
              flush=True)


if __name__ == "__main__":
    main()
