"""Issue 16: what a cold ``mlwf run ml-training … 2 8`` cannot shed without leaving scikit-learn's public API.

Usage (from the repository root; needs no data)::

    python benchmarks/issue16/sklearn_floor.py [--repeats 5] [--trees 800]

Two measurements, each in fresh processes, medians of ``--repeats``:

* **The fork server's imports**, as a cold run's fork server makes them
  (``MLWF_PRELOAD_WORKFLOW=ml-training``, one BLAS thread): wall time of the
  import in a fresh interpreter, then one more run under ``python -X
  importtime`` whose self times are summed per top-level package (importtime
  inflates them; read the shares, not the sums).
* **One tree of the default run** (a slice of 250 rows × 10 PCA features, 10
  classes, depth 10), fitted ``--trees`` times five ways: inside
  ``RandomForestClassifier.fit`` (what the stage does), a bare
  ``DecisionTreeClassifier.fit``, the same with ``check_input=False`` (public,
  documented), that under ``config_context(skip_parameter_validation=True,
  assume_finite=True)``, and scikit-learn's private ``_fit``. The last is the
  floor of any path through scikit-learn's estimators.

Writes benchmarks/results/issue16/sklearn_floor.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "MLWF_PRELOAD_WORKFLOW": "ml-training", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1"}

IMPORT = textwrap.dedent("""\
    import time
    t = time.perf_counter()
    import multiprocessing.forkserver
    import mlwf.backends.local.preload
    print(round((time.perf_counter() - t) * 1e3, 1))
""")

TREES = textwrap.dedent("""\
    import json, sys, time
    import numpy as np
    import sklearn
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.tree import DecisionTreeClassifier

    n = int(sys.argv[1])
    rng = np.random.default_rng(0)
    X = rng.random((250, 10)).astype(np.float32)
    y = rng.integers(0, 10, 250)
    y2 = y.astype(np.float64).reshape(-1, 1)
    tree = dict(max_depth=10, max_features="sqrt")

    def ms_per_tree(fit, calls=n, trees_per_call=1):
        fit(0)
        t = time.perf_counter()
        for i in range(calls):
            fit(i)
        return (time.perf_counter() - t) / (calls * trees_per_call) * 1e3

    # The stage's way: forests of 100 trees (n // 100 of them), per tree.
    out = {"forest": ms_per_tree(lambda i: RandomForestClassifier(n_estimators=100, n_jobs=1, random_state=i,
                                                                  **tree).fit(X, y),
                                 calls=max(1, n // 100), trees_per_call=100)}
    out["tree_fit"] = ms_per_tree(lambda i: DecisionTreeClassifier(random_state=i, **tree).fit(X, y))
    out["tree_fit_check_input_false"] = ms_per_tree(
        lambda i: DecisionTreeClassifier(random_state=i, **tree).fit(X, y2, check_input=False))
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        out["tree_fit_unchecked_unvalidated"] = ms_per_tree(
            lambda i: DecisionTreeClassifier(random_state=i, **tree).fit(X, y2, check_input=False))
        out["tree_private_fit"] = ms_per_tree(
            lambda i: DecisionTreeClassifier(random_state=i, **tree)._fit(X, y2, check_input=False))
    print(json.dumps(out))
""")


def run(code: str, *args: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code, *args], env=ENV, cwd=ROOT, capture_output=True,
                          text=True, check=True)


def import_shares() -> dict[str, float]:
    """Self time per top-level package of one importtime run of the fork server's imports, in ms."""
    err = run(IMPORT, flags=("-X", "importtime")).stderr
    per = collections.Counter()
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            per[m.group(2).split(".")[0]] += int(m.group(1)) / 1e3
    return {k: round(v, 1) for k, v in per.most_common(12)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trees", type=int, default=800)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/issue16/sklearn_floor.json")
    args = ap.parse_args()
    walls = [float(run(IMPORT).stdout) for _ in range(args.repeats)]
    trees = [json.loads(run(TREES, str(args.trees)).stdout) for _ in range(args.repeats)]
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "fork_server_imports_ms": {"median": statistics.median(walls), "runs": walls},
        "importtime_self_ms_by_package": import_shares(),
        "ms_per_tree": {k: round(statistics.median(t[k] for t in trees), 3) for k in trees[0]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
