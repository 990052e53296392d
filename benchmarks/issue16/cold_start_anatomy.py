"""Issue 16 (a): where a cold ``mlwf run ml-training … 2 8`` spends its time, and what each prototype saves.

Usage (from the repository root, after ``python benchmarks/run.py`` prepared benchmarks/data/store)::

    python benchmarks/issue16/cold_start_anatomy.py [--repeats 9] [--before main] \
        [--variants today,nowait+fastexit] [--before-timeline]

Each round runs, in a shuffled order, one fresh process of each of:

* ``baseline``: the cold one-process scikit-learn script (baseline_cold.py) on
  the same 2,000 PNG files, process start to exit;
* ``before``: ``python -m mlwf.cli run ml-training ml-training/fashion-2k 2 8 --json``
  with the source of ``--before`` (extracted with ``git archive``, first on
  ``PYTHONPATH``);
* ``mlwf``: the same command with this tree, exactly as a user runs it (no probe);
* each variant: the same command through cold_probe.py with those prototype
  changes applied and time marks recorded (``today`` applies none: the probe's
  own cost is the difference between it and ``mlwf``);
* with ``--before-timeline``, ``before timeline``: the same for the source of
  ``--before``, through its own cold_probe.py (the timeline before a change).

Wall times are taken here from just before the process is started to just
after it has exited. Each variant's marks give its timeline: Python's own start,
the driver's imports, the fork server's start and imports (its Python, the
stage code, scikit-learn), the wait for the workers, the stages, and the end
(closing the engine, leaving the interpreter). Every figure is a median over
the rounds with its min–max; ratios are of medians over the same rounds. CPU
is the time of every process of a run (the driver, the fork server, the
workers, the resource tracker: this script reaps them all), which a loaded
machine moves much less than wall times.
Writes benchmarks/results/issue16/cold_start_anatomy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STORE = ROOT / "benchmarks/data/store"
FOLDER = STORE / "tless/ml-training/fashion-2k"
ARGS = ["run", "ml-training", "ml-training/fashion-2k", "2", "8", "--store", str(STORE),
        "--model-prefix", "ml-inference/model-cold-anatomy", "--json"]


def adopt_orphans() -> None:
    """Become the reaper of every process a run leaves behind (Linux), so that the CPU time of the
    fork server, its workers and the resource tracker counts in :func:`cpu_seconds` too."""
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


def run_process(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    t_spawn = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    t_exit = time.time()
    reap_orphans()
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return t_spawn, t_exit, done.stdout


def cpu_seconds() -> float:
    """CPU time of every process this one has reaped: with :func:`adopt_orphans`, a run's all."""
    r = os.times()
    return r.children_user + r.children_system


BEFORE_SRC: Path | None = None


def one(kind: str, variant: str | None) -> dict:
    env = dict(os.environ)
    if kind in ("before", "before timeline"):
        env["PYTHONPATH"] = str(BEFORE_SRC)
    cpu0 = cpu_seconds()
    if kind == "baseline":
        t0, t1, out = run_process([sys.executable, str(HERE / "baseline_cold.py"), str(FOLDER), "2", "8"], env)
        r = json.loads(out)
        return {"wall_ms": (t1 - t0) * 1e3, "cpu_ms": (cpu_seconds() - cpu0) * 1e3,
                "python_start_ms": (r["t_start"] - t0) * 1e3, "imports_ms": r["imports_ms"],
                "work_ms": r["train_ms"], "accuracy": r["validation_accuracy"]}
    if kind in ("mlwf", "before"):
        t0, t1, out = run_process([sys.executable, "-m", "mlwf.cli", *ARGS], env)
        r = json.loads(out)
        return {"wall_ms": (t1 - t0) * 1e3, "cpu_ms": (cpu_seconds() - cpu0) * 1e3, "e2e_ms": r["e2e_ms"],
                "startup_ms": r["startup_ms"], "digest": r["model_digest"], "accuracy": r["validation_accuracy"]}
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as marks:
        env["MLWF_PROBE_MARKS"] = marks.name
        probe = BEFORE_SRC.parent / "benchmarks/issue16/cold_probe.py" if kind == "before timeline" else \
            HERE / "cold_probe.py"
        t0, t1, out = run_process([sys.executable, str(probe), "--variant", variant.replace("+", ","),
                                   "--", *ARGS], env)
        cpu = (cpu_seconds() - cpu0) * 1e3
        events = [json.loads(line) for line in Path(marks.name).read_text().splitlines()]
    r = json.loads(out)
    at = {}
    for e in events:
        at.setdefault((e["who"], e["event"]), e["t"])
    worker_inits = sorted(e["t"] for e in events if e["event"] == "initializer ended")

    def ms(a: float, b: float) -> float:
        return (b - a) * 1e3

    asked = at[("driver", "fork server asked for")]
    run_finished = at[("driver", "run finished")]
    timeline = {
        "python_start_ms": ms(t0, at[("driver", "probe started")]),
        "driver_imports_done_at_ms": ms(t0, at[("driver", "driver imports done")]),
        "fork_server_asked_at_ms": ms(t0, asked),
        "fork_server_python_start_ms": ms(asked, at[("fork server", "preload begin")]),
        "fork_server_stage_code_ms": ms(at[("fork server", "preload begin")], at[("fork server", "preload light")]),
        "fork_server_sklearn_ms": ms(at[("fork server", "preload light")], at[("fork server", "preload heavy")]),
        "fork_server_rest_ms": ms(at[("fork server", "preload heavy")], at[("fork server", "preload end")]),
        "fork_server_ready_at_ms": ms(t0, at[("fork server", "preload end")]),
        "run_started_at_ms": ms(t0, at[("driver", "run started")]),
        "workers_ready_at_ms": ms(t0, at[("driver", "workers ready")]),
        "first_worker_ready_after_fork_server_ms": ms(at[("fork server", "preload end")], worker_inits[0]),
        "stages_ms": ms(at[("driver", "workers ready")], run_finished),
        "run_finished_at_ms": ms(t0, run_finished),
        "close_engine_ms": ms(at[("driver", "closing engine")], at[("driver", "engine closed")]),
        "after_run_to_exit_ms": ms(run_finished, t1),
    }
    return {"wall_ms": (t1 - t0) * 1e3, "cpu_ms": cpu, "e2e_ms": r["e2e_ms"], "startup_ms": r["startup_ms"],
            "stage_ms": r["stage_ms"], "digest": r["model_digest"], "accuracy": r["validation_accuracy"], **timeline}


def summary(rows: list[dict]) -> dict:
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values and len(values) == len(rows):
            out[key] = {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
                        "max": round(max(values), 1)}
        elif key == "stage_ms":
            out[key] = {s: round(statistics.median(r[key][s] for r in rows), 1) for s in rows[0][key]}
    if "digest" in rows[0]:
        out["same_model_bytes"] = len({r["digest"] for r in rows}) == 1
        out["digest"] = rows[0]["digest"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--variants", default="today,nowait+fastexit")
    p.add_argument("--before-timeline", action="store_true",
                   help="also run --before through its own cold_probe.py, for its timeline")
    p.add_argument("--before", default="main", help="the commit to compare with (default: main)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/issue16/cold_start_anatomy.json"))
    p.add_argument("--seed", type=int, default=16)
    a = p.parse_args()
    global BEFORE_SRC
    adopt_orphans()
    tmp = tempfile.TemporaryDirectory()
    archive = subprocess.run(["git", "archive", a.before, "src", "benchmarks/issue16"], cwd=ROOT, capture_output=True,
                             check=True)
    subprocess.run(["tar", "-x", "-C", tmp.name], input=archive.stdout, check=True)
    BEFORE_SRC = Path(tmp.name) / "src"
    commit = subprocess.run(["git", "rev-parse", "--short", a.before], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    kinds = [("baseline", None), ("before", None), ("mlwf", None)]
    kinds += [("before timeline", "today")] if a.before_timeline else []
    kinds += [("probe", v) for v in a.variants.split(",") if v]  # --variants "": wall times only
    timelines = [(k, v) for k, v in kinds if v]
    rng = random.Random(a.seed)
    for kind, variant in kinds:  # page everything in once, not counted
        one(kind, variant)
    def row_name(kind: str, variant: str | None) -> str:
        return kind if kind != "probe" else variant

    rows: dict[str, list[dict]] = {row_name(k, v): [] for k, v in kinds}
    loads = []
    for _ in range(a.repeats):
        order = kinds[:]
        rng.shuffle(order)
        for kind, variant in order:
            rows[row_name(kind, variant)].append(one(kind, variant))
        loads.append(os.getloadavg()[0])
    result = {
        "command": "mlwf " + " ".join(ARGS), "before": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.processor()},
        "repeats": a.repeats, "load_average_1min": {"min": min(loads), "max": max(loads)},
        "results": {name: summary(r) for name, r in rows.items()},
        "runs": rows,
    }
    base = result["results"]["baseline"]["wall_ms"]["median"]
    for name, s in result["results"].items():
        s["ratio_to_baseline"] = round(s["wall_ms"]["median"] / base, 3)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"{a.repeats} rounds; load average {min(loads):.1f}–{max(loads):.1f}")
    print(f"{'':34}{'wall ms':>22}{'× baseline':>12}{'cpu ms':>9}")
    for name, s in result["results"].items():
        w = s["wall_ms"]
        print(f"{name:34}{w['median']:>8.0f} ({w['min']:.0f}–{w['max']:.0f}){s['ratio_to_baseline']:>12.2f}"
              f"{s['cpu_ms']['median']:>9.0f}")
    if not timelines:
        return
    last = result["results"][row_name(*timelines[-1])]
    keys = [k for k in last if k.endswith("_ms") and k not in ("wall_ms", "cpu_ms")]
    print()
    print(f"{'timeline (median ms)':40}" + "".join(f"{row_name(k, v):>16.16}" for k, v in timelines))
    for key in keys:
        cells = []
        for k, v in timelines:
            s = result["results"][row_name(k, v)].get(key)
            cells.append(f"{s['median']:>16.0f}" if isinstance(s, dict) and "median" in s else f"{'':>16}")
        print(f"{key:40}" + "".join(cells))


if __name__ == "__main__":
    main()
