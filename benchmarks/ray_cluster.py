"""Ray cluster: a fresh driver against a running two-node Ray cluster, with and without ``mlwf ray pool``.

Usage (from the repository root, with mlwf[ray] installed; under ``nice`` on a shared machine):

    python benchmarks/ray_cluster.py [--repeats 5] [--variants tasks,pool] [--fashion DIR]
        [--out benchmarks/results/ray_cluster]

For each variant a fresh two-node cluster (tests/raycluster.py: two raylets on
this host, 1 CPU each, token authentication) is started, one untimed run warms
it (its first job), and then each repeat times, alternately, a cold local run
(``mlwf run ml-training ml-training/fashion-2k 2 8``, a new process, process
start to exit) and a run from a new driver process against the cluster
(``--backend ray --ray-address …``, also process start to exit). Also timed: a
new process that only joins the cluster (``ray.init(address=…)``) and exits,
the floor of any fresh driver. The figure to read is the median of each
round's ratio (its two runs were back to back: the ratio cancels most of the
machine's drift).

Variants:

* ``tasks``: no worker pool on the cluster: each call a Ray task, each job
  starts its own workers.
* ``pool``: ``mlwf ray pool start`` (timed once, not counted) before the
  untimed first run; every timed run's report must say all its calls ran on
  the pool.

All runs must give the same model bytes. Writes ``ray_cluster.json`` into
``--out`` and prints medians (min–max).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, TRAIN, arguments, command, load_average, machine, now, prepare, stats, write

VARIANTS = ("tasks", "pool")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, dict | None]:
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    wall = (time.perf_counter() - t) * 1e3
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    try:
        return wall, json.loads(done.stdout)
    except ValueError:
        return wall, None


def measure(variant: str, repeats: int, run: list[str]) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.raycluster import RayCluster

    with tempfile.TemporaryDirectory(prefix="mlwf-bench-ray-") as tmp, \
            RayCluster(Path(tmp), nodes=2, cpus=1) as cluster:
        env = cluster.driver_env()
        mlwf = [sys.executable, "-m", "mlwf.cli"]
        remote_args = [*run, "--backend", "ray", "--ray-address", cluster.address,
                       "--model-prefix", f"ml-inference/model-ray-{variant}"]
        join = [sys.executable, "-c", f"import ray, logging; ray.init(address={cluster.address!r}, "
                                      "log_to_driver=False, logging_level=logging.ERROR)"]
        pool_start_ms = None
        if variant == "pool":
            pool_start_ms = round(timed([*mlwf, "ray", "pool", "start", "--ray-address", cluster.address, "--json"],
                                        env)[0])
        timed([*mlwf, *remote_args], env)  # the cluster's first job: not counted
        local, fresh, joins, digests = [], [], [], set()
        for _ in range(repeats):
            wall, report = timed([*mlwf, *run, "--model-prefix", "ml-inference/model-local-cold"], env)
            local.append(wall)
            digests.add(report["model_digest"])
            wall, report = timed([*mlwf, *remote_args], env)
            calls = sum(s["calls"] for s in report["stages"].values())
            pool = report.get("ray_pool") or {}
            if (variant == "pool") != (pool.get("pool_calls") == calls):
                raise SystemExit(f"{variant}: the run's calls did not run where expected: ray_pool={pool}")
            fresh.append({"wall_ms": wall, "e2e_ms": report["e2e_ms"], "stage_ms": report["stage_ms"]})
            digests.add(report["model_digest"])
            joins.append(timed(join, env)[0])
        if variant == "pool":
            timed([*mlwf, "ray", "pool", "stop", "--ray-address", cluster.address, "--json"], env)
    fresh_wall = [r["wall_ms"] for r in fresh]
    return {"variant": variant, "pool_start_ms": pool_start_ms, "local_cold_ms": stats(local, 0),
            "fresh_driver_ms": stats(fresh_wall, 0),
            "fresh_driver_e2e_ms": stats([r["e2e_ms"] for r in fresh], 0),
            "ratio_fresh_over_local": round(statistics.median(fresh_wall) / statistics.median(local), 2),
            # Each round's two runs were back to back: their ratio cancels most of the load's drift.
            "ratio_per_round": [round(f / c, 2) for f, c in zip(fresh_wall, local)],
            "median_ratio_per_round": round(statistics.median(f / c for f, c in zip(fresh_wall, local)), 2),
            "join_only_ms": stats(joins, 0), "same_model_bytes": len(digests) == 1,
            "stages_last_run": fresh[-1]["stage_ms"]}


def main() -> None:
    p = arguments(__doc__, "ray_cluster", repeats=5)
    p.add_argument("--variants", default=",".join(VARIANTS), help="tasks, pool (default both)")
    a = p.parse_args()
    variants = a.variants.split(",")
    if set(variants) - set(VARIANTS):
        sys.exit(f"ray_cluster.py: --variants takes {', '.join(VARIANTS)}")
    store = prepare(a.fashion, a.data)
    run = ["run", "ml-training", TRAIN, "2", "8", "--store", store, "--json"]
    results = {"machine": machine(), "date": now(), "command": command(), "repeats": a.repeats,
               "load_average_before": load_average(), "run": "mlwf " + " ".join(run),
               "cluster": "2 raylets on this host, 1 CPU each, token auth", "variants": []}
    for variant in variants:
        r = measure(variant, a.repeats, run)
        r["load_average_after"] = load_average()
        results["variants"].append(r)
        print(f"{variant:8} local cold {r['local_cold_ms']['median']} ms ({r['local_cold_ms']['min']}–"
              f"{r['local_cold_ms']['max']}), fresh driver on the cluster {r['fresh_driver_ms']['median']} ms "
              f"({r['fresh_driver_ms']['min']}–{r['fresh_driver_ms']['max']}), ratio "
              f"{r['ratio_fresh_over_local']} (per round: median {r['median_ratio_per_round']}, "
              f"{r['ratio_per_round']}); join only {r['join_only_ms']['median']} ms; same bytes "
              f"{r['same_model_bytes']}", flush=True)
    write(a.out, "ray_cluster.json", results)


if __name__ == "__main__":
    main()
