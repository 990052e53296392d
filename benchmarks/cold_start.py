"""Where a cold run's time goes, before and after a change, measured in the same session.

Usage (from the repository root, with mlwf installed and ``python benchmarks/run.py``
run once so that benchmarks/data/store holds the Fashion-MNIST images):

    python benchmarks/cold_start.py [--before COMMIT] [--repeats 7] [--out benchmarks/results/cold_start.json]

Each repeat runs ``mlwf run ml-training ml-training/fashion-2k 2 8 --json`` as a
fresh process twice, alternating: once with the source of ``--before`` (default:
the commit before the cold-start change, extracted with ``git archive`` and put
first on ``PYTHONPATH``) and once with the working tree. Figures are medians
with their min–max: wall time from process start to exit, the run's end-to-end
time, its worker start-up (reported separately only by the new code), each
stage's time, and the part of the run that belongs to no stage.
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

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["run", "ml-training", "ml-training/fashion-2k", "2", "8", "--store", "benchmarks/data/store",
        "--model-prefix", "ml-inference/model-cold-start", "--json"]
BEFORE = "b1c0f27"  # the branch point: partition carried the worker start-up, the driver imported scikit-learn


def cold_run(src: Path | None) -> dict:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mlwf.cli", *ARGS], capture_output=True, text=True, env=env,
                          cwd=ROOT, check=True)
    wall = (time.perf_counter() - t) * 1e3
    report = json.loads(done.stdout)
    stages = report["stage_ms"]
    startup = report.get("startup_ms") or 0.0
    return {"wall_ms": wall, "e2e_ms": report["e2e_ms"], "startup_ms": report.get("startup_ms"),
            **{f"{s}_ms": v for s, v in stages.items()},
            "outside_stages_ms": report["e2e_ms"] - startup - sum(stages.values())}


def summary(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        if values:
            out[key] = {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
                        "max": round(max(values), 1)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default=BEFORE, help=f"the commit to compare with (default {BEFORE})")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/cold_start.json"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", a.before, "src"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        before_src = Path(tmp) / "src"
        cold_run(before_src), cold_run(None)  # page in both, not counted
        before, after = [], []
        for _ in range(a.repeats):
            before.append(cold_run(before_src))
            after.append(cold_run(None))
    result = {"command": "mlwf " + " ".join(ARGS), "before": a.before, "repeats": a.repeats,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
              "before_runs": summary(before), "after_runs": summary(after)}
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"{'median (min–max), ms':<22} {'before ' + a.before:>24} {'after':>24}")
    for key in result["after_runs"]:
        cells = []
        for side in ("before_runs", "after_runs"):
            s = result[side].get(key)
            cells.append(f"{s['median']:.0f} ({s['min']:.0f}–{s['max']:.0f})" if s else "—")
        print(f"{key:<22} {cells[0]:>24} {cells[1]:>24}")


if __name__ == "__main__":
    main()
