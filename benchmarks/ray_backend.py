"""Warm training runs on the Ray backend against the local backend, both transfers.

Usage (from the repository root, with mlwf[ray] installed):

    python benchmarks/ray_backend.py [--fashion DIR] [--repeats 5] [--out benchmarks/results]

Data: the 2,000 Fashion-MNIST training images as PNG objects in the local store
that ``benchmarks/run.py`` builds (``prepare()``: benchmarks/data/store, prefix
ml-training/fashion-2k). Workload: ml-training ``2 8`` with the default settings.

All four engines (local/Ray × direct/store) live in this one process; the Ray
ones share one local Ray instance (started by the first, shut down by the last).
Each does one warm-up run, then the engines take turns for ``--repeats`` rounds,
so drift on the machine hits all of them alike. Figures are medians with their
min–max; the per-edge breakdown (bytes, serialize, transfer, deserialize) is the
median over the measured runs, from the run reports.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import TRAIN, arguments, machine, prepare, stats  # noqa: E402

CONFIGS = [("local", "direct"), ("ray", "direct"), ("local", "store"), ("ray", "store")]


def edge_medians(reports: list[dict]) -> list[dict]:
    keys = sorted({(e["from"], e["to"]) for r in reports for e in r["edges"]})
    rows = []
    for src, dst in keys:
        found = [e for r in reports for e in r["edges"] if (e["from"], e["to"]) == (src, dst)]
        rows.append({"from": src, "to": dst, **{k: round(statistics.median(e[k] for e in found), 3)
                                               for k in ("bytes", "serialize_ms", "transfer_ms", "deserialize_ms")}})
    return rows


def main() -> None:
    a = arguments(__doc__, repeats=5).parse_args()

    import ray

    from mlwf.engine.driver import Engine

    store = prepare(a.fashion, a.data)
    load_before = os.getloadavg()
    engines = {}
    t = time.perf_counter()
    startup = {}
    try:
        for backend, transfer in CONFIGS:
            t = time.perf_counter()
            engines[(backend, transfer)] = Engine(store, "tless", backend=backend, transfer=transfer)
            startup[f"{backend}/{transfer}"] = round((time.perf_counter() - t) * 1e3, 1)
        warmup = {}
        for key, engine in engines.items():
            t = time.perf_counter()
            engine.run_training(TRAIN, 2, 8)  # warm-up run, not counted
            warmup["/".join(key)] = round((time.perf_counter() - t) * 1e3, 1)
        times = {key: [] for key in engines}
        reports = {key: [] for key in engines}
        for _ in range(a.repeats):
            for key, engine in engines.items():
                t = time.perf_counter()
                reports[key].append(engine.run_training(TRAIN, 2, 8))
                times[key].append((time.perf_counter() - t) * 1e3)
        ray_cpus = ray.cluster_resources().get("CPU")
    finally:
        for engine in reversed(list(engines.values())):
            engine.close()

    digests = {r["model_digest"] for rs in reports.values() for r in rs}
    results = {
        "machine": machine(), "repeats": a.repeats, "ray": ray.__version__, "ray_cpus": ray_cpus,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "workload": f"ml-training {TRAIN} 2 8 (default settings), {reports[CONFIGS[0]][0]['num_images']} images",
        "same_model_everywhere": len(digests) == 1,
        "engine_start_ms": startup, "warmup_run_ms": warmup,
        "runs": {},
    }
    for key in engines:
        last = reports[key][-1]
        results["runs"]["/".join(key)] = {
            "wall_ms": stats(times[key]),
            "e2e_ms": stats([r["e2e_ms"] for r in reports[key]]),
            "stage_ms": last["stage_ms"],
            "state_transfer_ms": stats([r["state_transfer_ms"] for r in reports[key]]),
            "validation_accuracy": last["validation_accuracy"],
            "model_digest": last["model_digest"],
            "edges": edge_medians(reports[key]),
        }
    for transfer in ("direct", "store"):
        ray_ms = results["runs"][f"ray/{transfer}"]["wall_ms"]["median"]
        local_ms = results["runs"][f"local/{transfer}"]["wall_ms"]["median"]
        results[f"ratio_{transfer}"] = round(ray_ms / local_ms, 2)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ray.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def table(r: dict) -> str:
    def ms(s):
        return f"{s['median']:.0f} ms ({s['min']:.0f}–{s['max']:.0f})"

    runs = r["runs"]
    rows = ["| training 2k `2 8`, warm | local backend | Ray backend | ratio Ray/local | target |",
            "|---|---|---|---|---|"]
    for transfer in ("direct", "store"):
        rows.append(f"| `--transfer {transfer}` | {ms(runs[f'local/{transfer}']['wall_ms'])} | "
                    f"{ms(runs[f'ray/{transfer}']['wall_ms'])} | {r[f'ratio_{transfer}']:.2f} | ≤ 1.5× |")
    rows += ["", "| transfer | backend | edge | bytes | serialize ms | transfer ms | deserialize ms |",
             "|---|---|---|---|---|---|---|"]
    for transfer in ("direct", "store"):
        for backend in ("local", "ray"):
            for e in runs[f"{backend}/{transfer}"]["edges"]:
                rows.append(f"| {transfer} | {backend} | {e['from']} → {e['to']} | {int(e['bytes']):,} | "
                            f"{e['serialize_ms']:.1f} | {e['transfer_ms']:.1f} | {e['deserialize_ms']:.1f} |")
    rows.append("")
    rows.append(f"Same model bytes on every engine: {'yes' if r['same_model_everywhere'] else 'NO'}. "
                f"Median of {r['repeats']} warm runs (min–max), after one warm-up run each; "
                f"{r['machine']['cores']} cores, Ray {r['ray']} with {r['ray_cpus']:g} CPUs.")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
