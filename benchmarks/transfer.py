"""Transfer: what moving state between stages costs, per backend (local, Ray) and mode (store, direct).

Usage (from the repository root; the Ray backend needs mlwf[ray]):

    python benchmarks/transfer.py [--backends local,ray] [--repeats 5] [--fashion DIR]
        [--out benchmarks/results/transfer]

Data: the 2,000 Fashion-MNIST training images as PNG objects in the local
store ``common.prepare()`` builds. Workload: ml-training ``2 8`` with the
default settings.

Every engine (backend × ``--transfer direct|store``) lives in this one
process; the Ray ones share one local Ray instance (started by the first,
shut down by the last). Each does one warm-up run, then the engines take
turns for ``--repeats`` rounds, so drift on the machine hits all of them
alike. Figures are medians with their min–max; the per-edge breakdown
(bytes, serialize, transfer, deserialize) is the median over the measured
runs, from the run reports. All engines must give the same model bytes.
Writes ``transfer.json`` into ``--out`` and prints the tables of the results
page. (``mlwf bench --transfer store,direct`` measures the same two modes on
one backend, warm and cold, for both workflows: see the results page.)
"""

from __future__ import annotations

import statistics
import time

from common import TRAIN, arguments, command, load_average, machine, now, prepare, stats, write

TRANSFERS = ("direct", "store")


def edge_medians(reports: list[dict]) -> list[dict]:
    keys = sorted({(e["from"], e["to"]) for r in reports for e in r["edges"]})
    rows = []
    for src, dst in keys:
        found = [e for r in reports for e in r["edges"] if (e["from"], e["to"]) == (src, dst)]
        rows.append({"from": src, "to": dst, **{k: round(statistics.median(e[k] for e in found), 3)
                                               for k in ("bytes", "serialize_ms", "transfer_ms", "deserialize_ms")}})
    return rows


def main() -> None:
    p = arguments(__doc__, "transfer", repeats=5)
    p.add_argument("--backends", default="local,ray", help="backends to compare (default local,ray)")
    a = p.parse_args()
    backends = a.backends.split(",")
    configs = [(backend, transfer) for transfer in TRANSFERS for backend in backends]

    from mlwf.engine.driver import Engine

    store = prepare(a.fashion, a.data)
    load_before = load_average()
    ray_cpus = ray_version = None
    engines = {}
    t = time.perf_counter()
    startup = {}
    try:
        for backend, transfer in configs:
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
        if "ray" in backends:
            import ray

            ray_cpus, ray_version = ray.cluster_resources().get("CPU"), ray.__version__
    finally:
        for engine in reversed(list(engines.values())):
            engine.close()

    digests = {r["model_digest"] for rs in reports.values() for r in rs}
    results = {
        "machine": machine(), "date": now(), "command": command(), "repeats": a.repeats,
        "backends": backends, "ray": ray_version, "ray_cpus": ray_cpus,
        "load_average_before": load_before, "load_average_after": load_average(),
        "workload": f"ml-training {TRAIN} 2 8 (default settings), {reports[configs[0]][0]['num_images']} images",
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
    for transfer in TRANSFERS:
        local_ms = results["runs"][f"{backends[0]}/{transfer}"]["wall_ms"]["median"]
        for backend in backends[1:]:
            results[f"ratio_{backend}_{transfer}"] = round(results["runs"][f"{backend}/{transfer}"]["wall_ms"]["median"]
                                                           / local_ms, 2)
    write(a.out, "transfer.json", results)
    print(table(results))


def table(r: dict) -> str:
    def ms(s):
        return f"{s['median']:.0f} ms ({s['min']:.0f}–{s['max']:.0f})"

    runs, backends = r["runs"], r["backends"]
    first = backends[0]
    rows = ["| training 2k `2 8`, warm | " + " | ".join(f"{b} backend" for b in backends)
            + "".join(f" | ratio {b}/{first}" for b in backends[1:]) + " |",
            "|---" * (2 * len(backends)) + "|"]
    for transfer in TRANSFERS:
        rows.append(f"| `--transfer {transfer}` | "
                    + " | ".join(ms(runs[f"{b}/{transfer}"]["wall_ms"]) for b in backends)
                    + "".join(f" | {r[f'ratio_{b}_{transfer}']:.2f}" for b in backends[1:]) + " |")
    rows += ["", "| transfer | backend | edge | bytes | serialize ms | transfer ms | deserialize ms |",
             "|---|---|---|---|---|---|---|"]
    for transfer in TRANSFERS:
        for backend in backends:
            for e in runs[f"{backend}/{transfer}"]["edges"]:
                rows.append(f"| {transfer} | {backend} | {e['from']} → {e['to']} | {int(e['bytes']):,} | "
                            f"{e['serialize_ms']:.1f} | {e['transfer_ms']:.1f} | {e['deserialize_ms']:.1f} |")
    rows.append("")
    ray = f", Ray {r['ray']} with {r['ray_cpus']:g} CPUs" if r["ray"] else ""
    rows.append(f"Same model bytes on every engine: {'yes' if r['same_model_everywhere'] else 'NO'}. "
                f"Median of {r['repeats']} warm runs (min–max), after one warm-up run each; "
                f"{r['machine']['cores']} cores{ray}.")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
