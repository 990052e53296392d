"""Issue 16 (cold start): how long a cold ``mlwf run`` takes to be gone once its work is done, three ways.

    python benchmarks/issue16/exit_cost.py [--repeats 9]

Each round runs, in a shuffled order, one fresh process per way of ending
``mlwf run ml-training ml-training/fashion-2k 2 8 --json`` (output read
through a pipe, as the other scripts and ``mlwf bench --cold`` read it):

* ``normal``: ``mlwf.cli.main`` returns and the interpreter exits as usual;
* ``freeze``: what the ``mlwf`` executable does (``mlwf.cli.command``): the heap
  is frozen for the garbage collector before the interpreter exits;
* ``os._exit``: the process leaves with ``os._exit`` after its atexit handlers.

Each process notes when ``main`` returned; the figure is from then to the
process being gone (its pipes closed, waited for). Medians (min–max) in ms;
writes benchmarks/results/issue16/exit_cost.json.
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
STORE = ROOT / "benchmarks/data/store"
ARGS = ["run", "ml-training", "ml-training/fashion-2k", "2", "8", "--store", str(STORE),
        "--model-prefix", "ml-inference/model-exit-cost", "--json"]
ENDING = """
import atexit, gc, os, sys, time
way, marks = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
status = []
if way == "os._exit":  # registered first, so it runs after every other atexit handler
    atexit.register(lambda: (sys.stdout.flush(), sys.stderr.flush(), os._exit(status[0])))
from mlwf.cli import main
status.append(main(sys.argv[1:]))
with open(marks, "w") as f:
    f.write(repr(time.time()))
if way == "freeze":
    gc.freeze()
sys.exit(status[0])
"""
WAYS = ("normal", "freeze", "os._exit")


def one(way: str) -> float:
    with tempfile.NamedTemporaryFile("r") as marks:
        subprocess.run([sys.executable, "-c", ENDING, way, marks.name, *ARGS], capture_output=True, check=True,
                       cwd=ROOT, stdin=subprocess.DEVNULL)
        gone = time.time()
        return (gone - float(Path(marks.name).read_text())) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/issue16/exit_cost.json"))
    a = p.parse_args()
    ways = list(WAYS)
    rng = random.Random(16)
    runs: dict[str, list[float]] = {w: [] for w in WAYS}
    loads = []
    for _ in range(a.repeats):
        rng.shuffle(ways)
        for way in ways:
            runs[way].append(one(way))
        loads.append(os.getloadavg()[0])
    summary = {w: {"median": round(statistics.median(r), 1), "min": round(min(r), 1), "max": round(max(r), 1)}
               for w, r in runs.items()}
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeats": a.repeats,
              "load_average_1min": {"min": min(loads), "max": max(loads)}, "summary": summary, "runs": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"{a.repeats} rounds; load average {min(loads):.1f}–{max(loads):.1f}; main returned → process gone, ms")
    for way, s in summary.items():
        print(f"{way:10} {s['median']:6.0f} ({s['min']:.0f}–{s['max']:.0f})")


if __name__ == "__main__":
    main()
