"""Cold start: a fresh ``mlwf run`` from process start to exit, against the same work as a one-process script.

Usage (from the repository root, with mlwf installed; under ``nice`` on a shared machine):

    python benchmarks/cold_start.py [--repeats 9] [--before COMMIT] [--imports] [--fashion DIR]
        [--out benchmarks/results/cold_start]

Each round runs, in a shuffled order, one fresh process of each side:

* ``baseline``: a cold one-process script (``mlwf.bench.baseline`` loaded
  alone: NumPy, Pillow, scikit-learn) training the same ensemble on the same
  2,000 PNG files, ``2 8``, as a user would write it;
* ``after``: ``python -m mlwf.cli run ml-training ml-training/fashion-2k 2 8
  --json`` with this tree;
* ``before`` (with ``--before COMMIT``): the same command with the ``src``
  of COMMIT (extracted with ``git archive``, first on ``PYTHONPATH``).

One untimed run of each pages everything in first. Wall times are taken from
just before a process starts to just after it exits; CPU is that of every
process of the run (driver, fork server, workers: this script adopts and
reaps them all). From the run's report: its end-to-end time, the worker
start-up (``startup_ms``), each stage, and what belongs to no stage. Figures
are medians over the rounds with min–max; ratios are of medians over the same
rounds; every run of a side must give the same model bytes.

With ``--imports``: what the fork server imports before any worker exists,
in fresh interpreters (``--repeats`` of them, wall time), and the self time
per top-level package of one more under ``python -X importtime`` (which
inflates every figure; read the shares).

Writes ``cold_start.json`` into ``--out`` and prints markdown tables.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (ROOT, TRAIN, arguments, before_argument, command, load_average, machine, now, prepare,
                    short_commit, side_env, source_of, write)

BASELINE = r"""
import time
T0 = time.time()
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("baseline", sys.argv[1])
baseline = importlib.util.module_from_spec(spec)
sys.modules["baseline"] = baseline
spec.loader.exec_module(baseline)
imported = time.time()
result = baseline.train(sys.argv[2], 2, 8)
print(json.dumps({"imports_ms": round((imported - T0) * 1e3, 1), "work_ms": round(result["ms"], 1),
                  "validation_accuracy": result["validation_accuracy"]}))
"""

FORK_SERVER_IMPORTS = r"""
import os, time
os.environ["MLWF_PRELOAD_WORKFLOW"] = "ml-training"
t = time.perf_counter()
import multiprocessing.forkserver
import mlwf.backends.local.preload
print(round((time.perf_counter() - t) * 1e3, 1))
"""


def adopt_orphans() -> None:
    """Become the reaper of every process a run leaves behind (Linux), so that the CPU time of the fork
    server, its workers and the resource tracker counts in :func:`children_cpu` too."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_orphans(seconds: float = 10.0) -> None:
    """Wait for the processes the run left (they exit once its driver has gone)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)


def children_cpu() -> float:
    r = os.times()
    return r.children_user + r.children_system


def one(side: str, store: str, src: Path | None, args: list[str]) -> dict:
    """One cold process of ``side``: its wall and CPU time, and what its report says."""
    if side == "baseline":
        cmd = [sys.executable, "-c", BASELINE, str(ROOT / "src/mlwf/bench/baseline.py"), str(Path(store) / "tless"
                                                                                           / TRAIN)]
    else:
        cmd = [sys.executable, "-m", "mlwf.cli", *args]
    cpu = children_cpu()
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=side_env(src), cwd=ROOT, stdin=subprocess.DEVNULL)
    wall = (time.perf_counter() - t) * 1e3
    reap_orphans()
    if done.returncode:
        sys.exit(f"cold_start: the {side} side failed:\n{done.stderr[-3000:]}")
    r = json.loads(done.stdout)
    row = {"wall_ms": wall, "cpu_ms": (children_cpu() - cpu) * 1e3}
    if side == "baseline":
        return {**row, "imports_ms": r["imports_ms"], "work_ms": r["work_ms"], "accuracy": r["validation_accuracy"]}
    startup = r.get("startup_ms") or 0.0
    return {**row, "e2e_ms": r["e2e_ms"], "startup_ms": r.get("startup_ms"),
            **{f"{stage}_ms": ms for stage, ms in r["stage_ms"].items()},
            "outside_stages_ms": r["e2e_ms"] - startup - sum(r["stage_ms"].values()),
            "digest": r["model_digest"], "accuracy": r["validation_accuracy"]}


def summary(rows: list[dict]) -> dict:
    out: dict = {}
    for key in rows[0]:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values and key != "accuracy":
            out[key] = {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
                        "max": round(max(values), 1)}
    if "digest" in rows[0]:
        out["same_model_bytes"] = len({r["digest"] for r in rows}) == 1
        out["digest"] = rows[0]["digest"]
    out["accuracy"] = rows[-1]["accuracy"]
    return out


def imports(repeats: int) -> dict:
    """The fork server's imports in fresh interpreters, and one ``-X importtime`` run's self time per package."""
    def run(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *flags, "-c", FORK_SERVER_IMPORTS], env=side_env(None), cwd=ROOT,
                              capture_output=True, text=True, check=True)

    walls = [float(run().stdout) for _ in range(repeats)]
    per: collections.Counter = collections.Counter()
    for line in run("-X", "importtime").stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            per[m.group(2).split(".")[0]] += int(m.group(1)) / 1e3
    return {"fork_server_imports_ms": {"median": round(statistics.median(walls), 1), "min": round(min(walls), 1),
                                       "max": round(max(walls), 1)},
            "importtime_self_ms_by_package": {k: round(v, 1) for k, v in per.most_common(12)}}


def tables(r: dict) -> str:
    res, sides = r["results"], list(r["results"])
    lines = [f"| cold 2k `2 8`, {r['repeats']} rounds | wall, median (min–max) | × baseline "
             "| CPU of all its processes |",
             "|---|---|---|---|"]
    for side in sides:
        w = res[side]["wall_ms"]
        name = {"baseline": "one-process scikit-learn script", "after": "mlwf (this tree)",
                "before": f"mlwf before (`{r['before']}`)"}[side]
        lines.append(f"| {name} | {w['median']:,.0f} ms ({w['min']:,.0f}–{w['max']:,.0f}) | "
                     f"{res[side]['ratio_to_baseline']:.2f} | {res[side]['cpu_ms']['median']:,.0f} ms |")
    mlwf_sides = [s for s in sides if s != "baseline"]
    lines += ["", "| from the run's report (medians, ms) | " + " | ".join(mlwf_sides) + " |",
              "|---|" + "---|" * len(mlwf_sides)]
    keys = [k for k in res["after"] if k.endswith("_ms") and k not in ("wall_ms", "cpu_ms")]
    for key in keys:
        cells = [f"{res[s][key]['median']:,.0f}" if key in res[s] else "–" for s in mlwf_sides]
        lines.append(f"| {key[:-3].replace('_', ' ')} | " + " | ".join(cells) + " |")
    if "imports" in r:
        i = r["imports"]
        f = i["fork_server_imports_ms"]
        lines += ["", f"The fork server's imports: {f['median']:,.0f} ms ({f['min']:,.0f}–{f['max']:,.0f}); "
                      "self time by package under -X importtime: "
                  + ", ".join(f"{k} {v:,.0f}" for k, v in i["importtime_self_ms_by_package"].items()) + " ms."]
    return "\n".join(lines)


def main() -> None:
    p = arguments(__doc__, "cold_start", repeats=9)
    before_argument(p)
    p.add_argument("--imports", action="store_true", help="also time the fork server's imports")
    p.add_argument("--seed", type=int, default=16, help="seed of the shuffled order (default 16)")
    a = p.parse_args()
    store = prepare(a.fashion, a.data)
    args = ["run", "ml-training", TRAIN, "2", "8", "--store", store, "--model-prefix",
            "ml-inference/model-cold-start", "--json"]
    adopt_orphans()
    sides = ["baseline", "after"] + (["before"] if a.before else [])
    rng = random.Random(a.seed)
    rows: dict[str, list[dict]] = {side: [] for side in sides}
    loads = [load_average()]
    result: dict = {"machine": machine(), "date": now(), "command": command(), "run": "mlwf " + " ".join(args),
                    "before": short_commit(a.before) if a.before else None, "repeats": a.repeats}

    def rounds(before_src: Path | None) -> None:
        srcs = {"baseline": None, "after": None, "before": before_src}
        for side in sides:  # page everything in once, not counted
            one(side, store, srcs[side], args)
        for i in range(a.repeats):
            order = sides[:]
            rng.shuffle(order)
            for side in order:
                rows[side].append(one(side, store, srcs[side], args))
            loads.append(load_average())
            print(f"round {i + 1} of {a.repeats} (load {loads[-1][0]})", file=sys.stderr, flush=True)

    if a.before:
        with source_of(a.before) as before_src:
            rounds(before_src)
    else:
        rounds(None)
    result["load_average_1min"] = {"min": min(x[0] for x in loads), "max": max(x[0] for x in loads)}
    result["results"] = {side: summary(r) for side, r in rows.items()}
    base = result["results"]["baseline"]["wall_ms"]["median"]
    for s in result["results"].values():
        s["ratio_to_baseline"] = round(s["wall_ms"]["median"] / base, 3)
    if a.imports:
        result["imports"] = imports(a.repeats)
    result["runs"] = rows
    write(a.out, "cold_start.json", result)
    print(f"{result['date']}; load average (1 min) {result['load_average_1min']['min']:.1f}–"
          f"{result['load_average_1min']['max']:.1f}")
    print(tables(result))


if __name__ == "__main__":
    main()
