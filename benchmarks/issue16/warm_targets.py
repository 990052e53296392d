"""Issue 16: warm 60k `4 16` training, warm 10k inference with its model, and the default path, before and after.

Usage (from the repository root, after ``python benchmarks/run.py`` prepared
benchmarks/data/store; run it under ``nice`` on a shared machine)::

    python benchmarks/issue16/warm_targets.py [--before main] [--rounds 2] [--repeats 3] [--only train_2k,infer_1k]

Each round starts one fresh process per side, alternating (``before``: the
source of ``--before`` extracted with ``git archive`` and put first on
``PYTHONPATH``; ``after``: the working tree). Each process opens one
``mlwf.Engine`` (the default local backend, one worker per core) and, after
one untimed warm-up run of each, times ``--repeats`` runs of:

* ``train_60k``: ml-training on all 60,000 Fashion-MNIST training images, `4 16`;
* ``infer_10k_60k``: ml-inference of the 10,000 test images with that model, 16 functions;
* ``train_2k`` and ``infer_1k``: the default path (2k `2 8`, 1k `16` with the 2k model).

Figures are medians over every timed run of a side, with min–max; both sides
must publish the same model bytes (digests are compared). For the 60k run the
script reads the CPU time the driver and its workers used during each run
(``/proc/PID/stat``): that CPU time ÷ the cores is the machine's limit for
the run (what it would take if every core were busy with it all the time). Writes
benchmarks/results/issue16/warm_targets.json.
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

ROOT = Path(__file__).resolve().parents[2]
STORE = str(ROOT / "benchmarks/data/store")
MEASURES = ("train_60k", "infer_10k_60k", "train_2k", "infer_1k")


def cpu_seconds(engine) -> dict[int, float]:
    """CPU seconds (user + system) used so far by this process and each of the engine's workers."""
    pids = [os.getpid(), *getattr(engine.backend._pool, "_processes", {})]
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return out


def child(repeats: int, side: str, only: list[str]) -> None:
    """Run in a fresh process: time each measure on one warm engine, print JSON."""
    import mlwf
    from mlwf.engine.driver import Engine

    prefix60, prefix2 = f"ml-inference/model-i16-60k-{side}", f"ml-inference/model-i16-2k-{side}"
    jobs = {
        "train_60k": lambda e: e.run_training("ml-training/fashion-60k", 4, 16, model_prefix=prefix60),
        "infer_10k_60k": lambda e: e.run_inference(prefix60, "ml-inference/fashion-test-10k", 16),
        "train_2k": lambda e: e.run_training("ml-training/fashion-2k", 2, 8, model_prefix=prefix2),
        "infer_1k": lambda e: e.run_inference(prefix2, "ml-inference/images-inference-1k", 16),
    }
    if "infer_10k_60k" in only and "train_60k" not in only:
        only = ["train_60k", *only]  # the 60k model must be trained first
    out: dict = {"mlwf": mlwf.__file__}
    with Engine(STORE, "tless") as engine:
        for name, job in ((n, j) for n, j in jobs.items() if n in only):
            job(engine)  # warm-up
            runs = []
            for _ in range(repeats):
                cpu0 = cpu_seconds(engine)
                t = time.perf_counter()
                report = job(engine)
                wall = (time.perf_counter() - t) * 1e3
                cpu1 = cpu_seconds(engine)
                cpu = sum(v - cpu0.get(pid, 0.0) for pid, v in cpu1.items()) * 1e3
                runs.append({"wall_ms": wall, "cpu_ms": cpu, "stage_ms": report["stage_ms"],
                             "compute_ms": {s: v.get("compute_ms") for s, v in report["stages"].items()},
                             "digest": report.get("model_digest"), "accuracy": report.get("validation_accuracy",
                                                                                         report.get("accuracy"))})
            out[name] = runs
    print(json.dumps(out))


def run_side(src: Path | None, repeats: int, side: str, only: list[str]) -> dict:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    done = subprocess.run([sys.executable, __file__, "--child", side, "--repeats", str(repeats),
                           "--only", ",".join(only)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def med(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1), "n": len(values)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="main", help="the commit to compare with (default: main)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default=",".join(MEASURES), help=f"measures to take, of {', '.join(MEASURES)}")
    p.add_argument("--child")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/issue16/warm_targets.json"))
    a = p.parse_args()
    only = [m for m in a.only.split(",") if m]
    if not only or set(only) - set(MEASURES):
        raise SystemExit(f"--only takes measures from {', '.join(MEASURES)}")
    if a.child:
        return child(a.repeats, a.child, only)
    measures = [m for m in MEASURES if m in only]
    commit = subprocess.run(["git", "rev-parse", "--short", a.before], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    runs: dict[str, dict[str, list]] = {"before": {m: [] for m in measures}, "after": {m: [] for m in measures}}
    loads = [os.getloadavg()[0]]
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", commit, "src"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        for _ in range(a.rounds):
            for side, src in (("before", Path(tmp) / "src"), ("after", None)):
                result = run_side(src, a.repeats, side, only)
                if side == "after" and not result["mlwf"].startswith(str(ROOT / "src")):
                    raise SystemExit(f"the after side imported {result['mlwf']}, not this tree")
                for m in measures:
                    runs[side][m] += result[m]
                loads.append(os.getloadavg()[0])
    summary: dict = {}
    for m in measures:
        row = {}
        for side in ("before", "after"):
            r = runs[side][m]
            row[side] = med([x["wall_ms"] for x in r])
            row[side]["stage_ms"] = {s: round(statistics.median(x["stage_ms"][s] for x in r), 1) for s in r[0]["stage_ms"]}
            row[side]["digests"] = sorted({x["digest"] for x in r if x["digest"]})
            row[side]["accuracy"] = r[-1]["accuracy"]
            row[side]["cpu_ms"] = med([x["cpu_ms"] for x in r])
            row[side]["limit_ms"] = round(row[side]["cpu_ms"]["median"] / (os.cpu_count() or 1), 1)
        row["after_over_before"] = round(row["after"]["median"] / row["before"]["median"], 3)
        row["same_model_bytes"] = row["before"]["digests"] == row["after"]["digests"]
        summary[m] = row
    images = {"infer_10k_60k": 10000, "infer_1k": 1000}
    for m, n in ((m, n) for m, n in images.items() if m in summary):
        for side in ("before", "after"):
            summary[m][side]["images_per_s"] = round(n / summary[m][side]["median"] * 1e3)
    result = {"before": commit, "rounds": a.rounds, "repeats": a.repeats, "cores": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
              "minutes": round((time.time() - started) / 60, 1),
              "load_average_1min": {"min": min(loads), "max": max(loads)}, "summary": summary, "runs": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"before {commit}; {a.rounds} rounds × {a.repeats} runs per side; load {min(loads):.1f}–{max(loads):.1f}")
    for m, row in summary.items():
        b, f = row["before"], row["after"]
        extra = f"  {b.get('images_per_s', '')} → {f.get('images_per_s', '')} images/s" if "images_per_s" in f else ""
        print(f"{m:14} before {b['median']:8.0f} ({b['min']:.0f}–{b['max']:.0f})  after {f['median']:8.0f} "
              f"({f['min']:.0f}–{f['max']:.0f})  ×{row['after_over_before']:.2f}  same bytes: {row['same_model_bytes']}"
              f"  limit after {f['limit_ms']:.0f} ms{extra}")
        print(f"{'':14} stages before {b['stage_ms']}\n{'':14} stages after  {f['stage_ms']}")


if __name__ == "__main__":
    main()
