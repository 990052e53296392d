"""Accuracy: what the training settings reach on the 10k test images at 60k `4 16`, and how long a cold run takes.

Usage (from the repository root, with mlwf installed; under ``nice`` on a shared machine):

    python benchmarks/accuracy.py [--only default,preset-accurate] [--repeats 1] [--fashion DIR]
        [--out benchmarks/results/accuracy]

Each candidate is a set of ``mlwf run ml-training`` options (``--only``
names them; default all). For each, a fresh process runs ``mlwf run
ml-training ml-training/fashion-60k 4 16 OPTIONS --json`` (timed from process
start to exit: the preset's time target counts the whole cold command), then
a second process classifies the 10,000 Fashion-MNIST test images with the
model it published (``mlwf run ml-inference … 16 --json``), whose report
gives the test accuracy. Each candidate publishes under its own prefix.
Every run is appended to ``accuracy.json`` in ``--out`` (with its date and
load average), and a table of this run is printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from common import ROOT, TEST10K, TRAIN60K, arguments, load_average, now, prepare

CANDIDATES: dict[str, list[str]] = {
    "default": [],
    "size28-c40": ["--image-size", "28", "--components", "40"],
    "size28-c40-d20": ["--image-size", "28", "--components", "40", "--max-depth", "20"],
    "preset-accurate": ["--preset", "accurate"],
}


def run(args: list[str], store: str) -> tuple[float, dict]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mlwf.cli", *args, "--store", store, "--json"], cwd=ROOT,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    if done.returncode:
        raise SystemExit(f"failed: mlwf {' '.join(args)}\n{done.stderr[-2000:]}")
    return wall, json.loads(done.stdout)


def main() -> None:
    p = arguments(__doc__, "accuracy", repeats=1)
    p.add_argument("--only", help=f"comma-separated candidates, of {', '.join(CANDIDATES)} (default: all)")
    a = p.parse_args()
    names = a.only.split(",") if a.only else list(CANDIDATES)
    if set(names) - set(CANDIDATES):
        sys.exit(f"accuracy.py: --only takes {', '.join(CANDIDATES)}")
    store = prepare(a.fashion, a.data, extra=[(TRAIN60K, "train", 60000, 0)])
    out = a.out / "accuracy.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    for name in names:
        for _ in range(a.repeats):
            prefix = f"ml-inference/model-preset-{name}"
            load = load_average()[0]
            wall, train = run(["run", "ml-training", TRAIN60K, "4", "16", *CANDIDATES[name], "--model-prefix", prefix],
                              store)
            _, infer = run(["run", "ml-inference", prefix, TEST10K, "16"], store)
            row = {"name": name, "options": CANDIDATES[name], "date": now(),
                   "cold_wall_s": round(wall, 2), "e2e_s": round(train["e2e_ms"] / 1e3, 2),
                   "stage_s": {s: round(v / 1e3, 2) for s, v in train["stage_ms"].items()},
                   "validation_accuracy": train["validation_accuracy"], "test_accuracy": infer["accuracy"],
                   "model_bytes": train["model_bytes"], "digest": train["model_digest"],
                   "load_average_1min": [load, load_average()[0]]}
            rows.append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=2))
            print(f"{name:22} cold {wall:6.1f} s  test {100 * infer['accuracy']:.2f} %  held-out "
                  f"{100 * train['validation_accuracy']:.2f} %  stages {row['stage_s']}  "
                  f"load {row['load_average_1min']}",
                  flush=True)


if __name__ == "__main__":
    main()
