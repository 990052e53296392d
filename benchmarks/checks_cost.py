"""What the safety checks cost a normal run: before and after, measured in the same session.

Usage (from the repository root, with mlwf installed):

    python benchmarks/checks_cost.py [--before COMMIT] [--rounds 4] [--repeats 3]
                                     [--fashion DIR] [--out benchmarks/results/checks_cost.json]

The checks measured are those of docs/guarantees.md ("Guarantees and
limits"): the local store opening every folder without following links, runs
renewing a lease, publishing by compare-and-swap, models checked against
their limits on load, training counting classes after decoding.

Each round starts one fresh process per side, alternating: the source of
``--before`` (default: the commit the checks were added on, extracted with
``git archive`` and put first on ``PYTHONPATH``) and the working tree. Each
process holds an ``Engine`` on the local backend, does one warm-up run of each
workflow, then ``--repeats`` timed warm runs of ml-training on 2,000
Fashion-MNIST images ``2 8`` (publishing to its own model prefix) and of
ml-inference on 1,000 images with 16 functions; then it times, three times
per repeat, loading the 2k model and a 60k-image model from their bytes
(``mlwf.model.from_bytes``) and reading the 2,000 training images from the
local store (``get_many``). Figures are medians with their min–max over all
rounds. The images are written once into benchmarks/data/store by
``run.py``'s ``prepare()``; the 60k model is trained once, with the
``--before`` code, into benchmarks/data/model-60k.mlwf.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

BEFORE = "7ab0517"  # the commit the checks were added on (main after the merge of issue-11b)
TRAIN = "ml-training/fashion-2k"
TRAIN60K = "ml-training/fashion-60k"
TEST1K = "ml-inference/images-inference-1k"

_CHILD = r"""
import json, sys, time
import mlwf.model
from mlwf.engine.driver import Engine
from mlwf.storage import StoreSpec

store_url, side, repeats, model60k = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
TRAIN, TEST1K = "ml-training/fashion-2k", "ml-inference/images-inference-1k"
prefix = f"ml-inference/model-checks-{side}"
out = {"training_warm_ms": [], "inference_warm_ms": [], "load_model_2k_ms": [], "load_model_60k_ms": [],
       "get_many_2k_images_ms": []}

def timed(key, fn):
    t = time.perf_counter()
    fn()
    out[key].append((time.perf_counter() - t) * 1e3)

with Engine(store_url, "tless") as engine:
    engine.run_training(TRAIN, 2, 8, model_prefix=prefix)  # warm-up, not counted
    engine.run_inference(prefix, TEST1K, 16)
    for _ in range(repeats):
        timed("training_warm_ms", lambda: engine.run_training(TRAIN, 2, 8, model_prefix=prefix))
        timed("inference_warm_ms", lambda: engine.run_inference(prefix, TEST1K, 16))
store = StoreSpec(store_url, "tless").open()
keys = [o.key for o in store.list(TRAIN + "/")]
manifest = json.loads(store.get(prefix + "/MODEL.json"))
data2k = store.get(manifest["object"])
data60k = open(model60k, "rb").read()
for _ in range(3 * repeats):
    timed("load_model_2k_ms", lambda: mlwf.model.from_bytes(data2k))
    timed("load_model_60k_ms", lambda: mlwf.model.from_bytes(data60k))
    timed("get_many_2k_images_ms", lambda: store.get_many(keys))
print(json.dumps(out))
"""


def child(src: Path | None, side: str, store_url: str, repeats: int, model60k: Path) -> dict:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    done = subprocess.run([sys.executable, "-c", _CHILD, store_url, side, str(repeats), str(model60k)],
                          capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_60k_model(src: Path, store_url: str, out: Path) -> None:
    """The 60k model both sides load, trained once with the ``--before`` code."""
    code = (f"import json; from mlwf.engine.driver import Engine\n"
            f"with Engine({store_url!r}, 'tless') as e:\n"
            f"    e.run_training({TRAIN60K!r}, 4, 16, model_prefix='ml-inference/model-checks-60k')\n"
            f"    s = e.store; m = json.loads(s.get('ml-inference/model-checks-60k/MODEL.json'))\n"
            f"    open({str(out)!r}, 'wb').write(s.get(m['object']))\n")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(src)}, cwd=ROOT, check=True)


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "n": len(values)}


def main() -> None:
    import run  # benchmarks/run.py: prepare() and machine()

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default=BEFORE, help=f"the commit to compare with (default {BEFORE})")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fashion", default=str(ROOT.parent / "shared/datasets/fashion-mnist"))
    p.add_argument("--out", default=str(HERE / "results/checks_cost.json"))
    a = p.parse_args()
    data = HERE / "data"
    store_url = run.prepare(Path(a.fashion), data, extra=[(TRAIN60K, "train", 60000, 0)])
    model60k = data / "model-60k.mlwf"
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", a.before, "src"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        before_src = Path(tmp) / "src"
        if not model60k.exists():
            train_60k_model(before_src, store_url, model60k)
        sides: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
        loads = []
        for _ in range(a.rounds):
            for side, src in (("before", before_src), ("after", None)):
                for key, values in child(src, side, store_url, a.repeats, model60k).items():
                    sides[side].setdefault(key, []).extend(values)
            loads.append(round(os.getloadavg()[0], 2))
    result = {"command": "python benchmarks/checks_cost.py " + " ".join(sys.argv[1:]), "before": a.before,
              "rounds": a.rounds, "repeats": a.repeats, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "seconds": round(time.time() - t0), "machine": run.machine(), "load_average_per_round": loads,
              "model_60k_bytes": model60k.stat().st_size,
              "before_runs": {k: summary(v) for k, v in sides["before"].items()},
              "after_runs": {k: summary(v) for k, v in sides["after"].items()}}
    result["ratio_after_before"] = {k: round(result["after_runs"][k]["median"] / result["before_runs"][k]["median"], 3)
                                    for k in result["after_runs"]}
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"| measure | before {a.before} | after | ratio |\n|---|---|---|---|")
    for key in result["after_runs"]:
        b, f = result["before_runs"][key], result["after_runs"][key]
        print(f"| {key} | {b['median']:.1f} ({b['min']:.1f}–{b['max']:.1f}) | "
              f"{f['median']:.1f} ({f['min']:.1f}–{f['max']:.1f}) | {result['ratio_after_before'][key]:.3f} |")


if __name__ == "__main__":
    main()
