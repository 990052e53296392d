"""Issue 16: Model.proba_from_pixels before and after, on the 10k test images, one thread, same session.

    python benchmarks/issue16/predict_engines.py [--model ml-inference/model-i16-60k-after] [--repeats 5] [--before 24b140c]

Decodes the 10,000 Fashion-MNIST test images once, then times, alternating:
``before`` (the single-file mlwf/model.py of ``--before``, default main before issue 16 and the
reorganisation, extracted with ``git archive`` and
imported under another name), ``numpy`` (this tree, the NumPy walk: what a
process without scikit-learn loaded does) and ``compiled`` (this tree,
scikit-learn's tree walker), on the same pixels. All three must give the same
probabilities bit for bit. Needs a model published by warm_targets.py (or any).
Writes benchmarks/results/issue16/predict_engines.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ml-inference/model-i16-60k-after")
    p.add_argument("--before", default="24b140c")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/issue16/predict_engines.json"))
    a = p.parse_args()
    threadpool_limits(1)
    import sklearn.tree  # noqa: F401  (loaded, as in a training worker or a warm engine's worker)

    import mlwf.model
    from mlwf.model import walk as forest_walk
    from mlwf.images import decode_many
    from mlwf.storage import open_store

    store = open_store(str(ROOT / "benchmarks/data/store"), "tless")
    keys = [o.key for o in store.list("ml-inference/fashion-test-10k/")]
    pixels, _ = decode_many(store.get_many(keys), 64)
    data = mlwf.model.load(a.model, store=store).to_bytes()

    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", a.before, "src/mlwf/model.py"], cwd=ROOT, capture_output=True,
                                 check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        spec = importlib.util.spec_from_file_location("mlwf.model_before", Path(tmp) / "src/mlwf/model.py")
        before_module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = before_module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(before_module)
    models = {"before": before_module.from_bytes(data), "numpy": mlwf.model.from_bytes(data),
              "compiled": mlwf.model.from_bytes(data)}
    real_usable = forest_walk.usable

    def run(name: str) -> tuple[float, np.ndarray]:
        forest_walk.usable = real_usable if name == "compiled" else (lambda *args: False)
        t = time.perf_counter()
        proba = models[name].proba_from_pixels(pixels)
        return time.perf_counter() - t, proba

    for name in models:  # builds each walk's tables once, not timed
        run(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    reference = None
    for _ in range(a.repeats):
        for name in models:
            seconds, proba = run(name)
            times[name].append(seconds)
            reference = proba if reference is None else reference
            if not np.array_equal(proba, reference):
                raise SystemExit(f"{name} gave other probabilities")
    result = {"model": a.model, "before": a.before, "images": len(pixels), "repeats": a.repeats,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_1min": os.getloadavg()[0],
              "identical_probabilities": True,
              "seconds": {n: {"median": round(statistics.median(t), 3), "min": round(min(t), 3),
                              "max": round(max(t), 3)} for n, t in times.items()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    base = result["seconds"]["before"]["median"]
    for name, s in result["seconds"].items():
        print(f"{name:9} {s['median']:6.3f} s ({s['min']:.3f}–{s['max']:.3f})  {len(pixels) / s['median']:7.0f} images/s"
              f"  ×{s['median'] / base:.2f}")
    print("identical probabilities: yes", file=sys.stderr)


if __name__ == "__main__":
    main()
