"""Issue 16: training settings for an accurate preset at 60k `4 16`, tried one by one.

Usage (from the repository root, after ``python benchmarks/run.py`` prepared
benchmarks/data/store; under ``nice`` on a shared machine)::

    python benchmarks/issue16/preset_search.py [--only NAME,…] [--repeats 1]

Each candidate is a set of ``mlwf run ml-training`` options. For each, a fresh
process runs ``mlwf run ml-training ml-training/fashion-60k 4 16 OPTIONS --json``
(timed from process start to exit: the preset's time target counts the whole
cold command), then a second process classifies the 10,000 Fashion-MNIST test
images with the model it published (``mlwf run ml-inference … 16 --json``),
whose report gives the test accuracy. The model is published under its own
prefix per candidate. Results are appended to
benchmarks/results/issue16/preset_search.json (one entry per run, with the
load average), and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STORE = ["--store", str(ROOT / "benchmarks/data/store"), "--bucket", "tless"]

CANDIDATES: dict[str, list[str]] = {
    "default": [],
    "size28-c40": ["--image-size", "28", "--components", "40"],
    "size28-c40-d20": ["--image-size", "28", "--components", "40", "--max-depth", "20"],
    "size28-c40-d20-h10": ["--image-size", "28", "--components", "40", "--max-depth", "20", "--holdout", "0.1"],
    "size28-c60-d20-h10": ["--image-size", "28", "--components", "60", "--max-depth", "20", "--holdout", "0.1"],
    "preset-accurate": ["--preset", "accurate"],
}


def run(args: list[str]) -> tuple[float, dict]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mlwf.cli", *args, *STORE, "--json"], cwd=ROOT,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    if done.returncode:
        raise SystemExit(f"failed: mlwf {' '.join(args)}\n{done.stderr[-2000:]}")
    return wall, json.loads(done.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated candidate names (default: all)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/issue16/preset_search.json"))
    a = p.parse_args()
    names = a.only.split(",") if a.only else list(CANDIDATES)
    out = Path(a.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    for name in names:
        for _ in range(a.repeats):
            prefix = f"ml-inference/model-preset-{name}"
            load = os.getloadavg()[0]
            wall, train = run(["run", "ml-training", "ml-training/fashion-60k", "4", "16", *CANDIDATES[name],
                               "--model-prefix", prefix])
            _, infer = run(["run", "ml-inference", prefix, "ml-inference/fashion-test-10k", "16"])
            row = {"name": name, "options": CANDIDATES[name], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "cold_wall_s": round(wall, 2), "e2e_s": round(train["e2e_ms"] / 1e3, 2),
                   "stage_s": {s: round(v / 1e3, 2) for s, v in train["stage_ms"].items()},
                   "validation_accuracy": train["validation_accuracy"], "test_accuracy": infer["accuracy"],
                   "model_bytes": train["model_bytes"], "digest": train["model_digest"],
                   "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}
            rows.append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=2))
            print(f"{name:22} cold {wall:6.1f} s  test {100 * infer['accuracy']:.2f} %  held-out "
                  f"{100 * train['validation_accuracy']:.2f} %  stages {row['stage_s']}  load {row['load_average_1min']}",
                  flush=True)


if __name__ == "__main__":
    main()
