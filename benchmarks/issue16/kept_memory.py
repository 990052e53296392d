"""Issue 16: warm 60k `4 16` with local workers that keep the memory a call freed, and with workers that give it back.

Usage (from the repository root, after ``python benchmarks/run.py`` prepared
benchmarks/data/store)::

    python benchmarks/issue16/kept_memory.py [--rounds 2] [--repeats 3]

Each round starts one fresh process per side, alternating: ``given back``
(``LocalConfig(keep_freed_bytes=0)``, glibc's own behaviour: every array over
32 MiB is mapped when allocated and unmapped when freed) and ``kept`` (the
default: up to 1 GiB kept for the next call). Each process opens one
``mlwf.Engine``, trains once untimed, then times ``--repeats`` runs of
ml-training on all 60,000 Fashion-MNIST training images, `4 16`. For each run
it reads the workers' user and system CPU time and minor page faults
(``/proc/PID/stat``) and their resident size after the run. Figures are
medians over every timed run of a side (min–max); both sides must publish the
same model bytes. Writes benchmarks/results/issue16/kept_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STORE = str(ROOT / "benchmarks/data/store")
SIDES = {"given back": 0, "kept": None}


def worker_stats(engine) -> dict[int, tuple[float, float, int, int]]:
    """Each worker's user CPU s, system CPU s, minor faults and resident bytes so far."""
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    out = {}
    for pid in getattr(engine.backend._pool, "_processes", {}):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7]), int(fields[21]) * page)
        except (OSError, IndexError, ValueError):
            pass
    return out


def child(side: str, repeats: int) -> None:
    from mlwf.backends.local import LocalConfig
    from mlwf.engine.driver import Engine

    keep = SIDES[side]
    config = LocalConfig() if keep is None else LocalConfig(keep_freed_bytes=keep)
    prefix = f"ml-inference/model-kept-{side.replace(' ', '-')}"
    runs = []
    with Engine(STORE, "tless", backend=config) as engine:
        engine.run_training("ml-training/fashion-60k", 4, 16, model_prefix=prefix)  # warm-up
        for _ in range(repeats):
            before = worker_stats(engine)
            t = time.perf_counter()
            report = engine.run_training("ml-training/fashion-60k", 4, 16, model_prefix=prefix)
            wall = (time.perf_counter() - t) * 1e3
            after = worker_stats(engine)
            runs.append({
                "wall_ms": round(wall, 1),
                "user_s": round(sum(after[p][0] - before.get(p, (0, 0, 0, 0))[0] for p in after), 2),
                "system_s": round(sum(after[p][1] - before.get(p, (0, 0, 0, 0))[1] for p in after), 2),
                "minor_faults": sum(after[p][2] - before.get(p, (0, 0, 0, 0))[2] for p in after),
                "worker_rss_mb": [round(after[p][3] / 2**20) for p in after],
                "stage_ms": report["stage_ms"],
                "digest": report["model_digest"],
            })
    print(json.dumps(runs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/issue16/kept_memory.json"))
    args = p.parse_args()
    if args.child:
        child(args.child, args.repeats)
        return
    results: dict[str, list] = {side: [] for side in SIDES}
    load = []
    for _ in range(args.rounds):
        for side in SIDES:
            load.append(os.getloadavg()[0])
            proc = subprocess.run([sys.executable, __file__, "--child", side, "--repeats", str(args.repeats)],
                                  cwd=ROOT, capture_output=True, text=True, check=True)
            results[side] += json.loads(proc.stdout.splitlines()[-1])
    digests = {r["digest"] for runs in results.values() for r in runs}
    summary = {}
    for side, runs in results.items():
        walls = [r["wall_ms"] for r in runs]
        summary[side] = {
            "wall_ms": statistics.median(walls), "min": min(walls), "max": max(walls),
            "user_s": statistics.median(r["user_s"] for r in runs),
            "system_s": statistics.median(r["system_s"] for r in runs),
            "minor_faults": statistics.median(r["minor_faults"] for r in runs),
            "worker_rss_mb": statistics.median(max(r["worker_rss_mb"]) for r in runs),
        }
    out = {"command": " ".join(["python", "benchmarks/issue16/kept_memory.py", *sys.argv[1:]]),
           "machine": f"{os.cpu_count()} cores, Python {sys.version.split()[0]}",
           "load_1min": [min(load), max(load)], "same_bytes": len(digests) == 1,
           "summary": summary, "runs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"load {min(load):.1f}–{max(load):.1f}; same bytes: {len(digests) == 1}")
    for side, s in summary.items():
        print(f"{side:11} wall {s['wall_ms']:.0f} ms ({s['min']:.0f}–{s['max']:.0f})  workers: user {s['user_s']:.2f} s, "
              f"system {s['system_s']:.2f} s, minor faults {s['minor_faults']:.0f}, largest RSS {s['worker_rss_mb']:.0f} MB")
    ratio = summary["kept"]["wall_ms"] / summary["given back"]["wall_ms"]
    print(f"kept / given back: ×{ratio:.2f}")


if __name__ == "__main__":
    main()
