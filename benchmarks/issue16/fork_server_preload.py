"""Issue 16 (cold start): the fork server's preload alone, before and after, in fresh processes.

    python benchmarks/issue16/fork_server_preload.py [--before 26794ab] [--repeats 9]

Each round runs, in a shuffled order, one fresh Python process per side that
does what the local backend's fork server does before it can fork a worker
for ``mlwf run ml-training``: ``before`` imports the modules the source of
``--before`` preloads (its ``forkserver.preload(sklearn=True)``, garbage
collector on); ``after`` imports this tree's ``mlwf.backends.local.preload``
for ml-training (collector off, then frozen); ``collector on`` imports the
same modules as ``after`` with the collector left on (what the collector
alone costs). Each prints its wall and CPU time from its first line to the
end of the preload (the interpreter's own start is the same on both sides).
Medians (min–max) in ms; writes benchmarks/results/issue16/fork_server_preload.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMED = """
import os, time
t, c = time.perf_counter(), time.process_time()
{body}
print(round((time.perf_counter() - t) * 1e3, 1), round((time.process_time() - c) * 1e3, 1))
"""
BEFORE = "from mlwf.backends import forkserver\nfor m in forkserver.preload(sklearn=True): __import__(m)"
AFTER = "os.environ['MLWF_PRELOAD_WORKFLOW'] = 'ml-training'\nimport mlwf.backends.local.preload"
COLLECTOR_ON = ("from mlwf.backends.forkserver import preload_modules\n"
                "for m in preload_modules('ml-training'): __import__(m)")
BODIES = {"before": BEFORE, "after": AFTER, "collector on": COLLECTOR_ON}


def one(side: str, before_src: Path) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(before_src if side == "before" else ROOT / "src")
    body = BODIES[side]
    out = subprocess.run([sys.executable, "-c", TIMED.format(body=body)], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="main")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/issue16/fork_server_preload.json"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", a.before, "src"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        before_src = Path(tmp) / "src"
        sides = list(BODIES)
        for side in sides:  # page everything in once, not counted
            one(side, before_src)
        runs: dict[str, list] = {s: [] for s in sides}
        loads = []
        rng = random.Random(16)
        for _ in range(a.repeats):
            rng.shuffle(sides)
            for side in sides:
                runs[side].append(one(side, before_src))
            loads.append(os.getloadavg()[0])
    summary = {}
    for side, rows in runs.items():
        summary[side] = {k: {"median": statistics.median(r[i] for r in rows), "min": min(r[i] for r in rows),
                             "max": max(r[i] for r in rows)} for i, k in enumerate(("wall_ms", "cpu_ms"))}
    result = {"before": a.before, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeats": a.repeats,
              "load_average_1min": {"min": min(loads), "max": max(loads)}, "summary": summary, "runs": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"{a.repeats} rounds; load average {min(loads):.1f}–{max(loads):.1f}")
    for side in BODIES:
        w, c = summary[side]["wall_ms"], summary[side]["cpu_ms"]
        print(f"{side:13} wall {w['median']:7.0f} ({w['min']:.0f}–{w['max']:.0f})  cpu {c['median']:7.0f} "
              f"({c['min']:.0f}–{c['max']:.0f})")
    for k in ("wall_ms", "cpu_ms"):
        print(f"after/before {k}: {summary['after'][k]['median'] / summary['before'][k]['median']:.3f}; "
              f"after/collector on: {summary['after'][k]['median'] / summary['collector on'][k]['median']:.3f}")


if __name__ == "__main__":
    main()
