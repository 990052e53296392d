"""Both workflows end to end, warm and cold, against the same work in one process and the reference's figures.

Usage (from the repository root, with mlwf installed):

    python benchmarks/workflows.py [--repeats 5] [--fashion DIR] [--out benchmarks/results/workflows]

ml-training on 2,000 Fashion-MNIST images ``2 8`` and ml-inference on 1,000
test images with 16 functions (the reference's inputs; its published
latencies: 22.0 s and 2.0 s on Faasm), plus the throughput of ml-inference on
all 10,000 test images, on the local backend. Cold runs are fresh ``mlwf``
processes timed from start to exit; warm runs reuse one ``mlwf.Engine``. The
same-run baseline (``mlwf.bench.baseline``) does the same work in one process
with plain scikit-learn on the same PNG files. Every figure is the median of
``--repeats`` runs with its min–max. Writes ``workflows.json`` into ``--out``
and prints the table of the results page.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import (TEST10K, TEST1K, TRAIN, arguments, command, load_average, machine, now, prepare, stats, warm,
                    write)


def cold(args: list[str], repeats: int) -> dict:
    walls, e2e, reports = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "mlwf.cli", *args, "--json"], check=True,
                             capture_output=True, text=True)
        walls.append((time.perf_counter() - t) * 1e3)
        reports.append(json.loads(out.stdout))
        e2e.append(reports[-1]["e2e_ms"])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    # RUSAGE_CHILDREN sees the driver (the workers are the fork server's children).
    return {"wall_ms": stats(walls), "e2e_ms": stats(e2e), "largest_process_mb": round(peak, 1),
            "last": reports[-1]}


def main() -> None:
    a = arguments(__doc__, "workflows").parse_args()

    from mlwf.bench import baseline
    from mlwf.engine.driver import Engine

    store = prepare(a.fashion, a.data)
    base = ["--store", store, "--bucket", "tless"]
    results: dict = {"machine": machine(), "date": now(), "command": command(), "repeats": a.repeats,
                     "load_average_at_start": load_average()}

    # --- training 2k `2 8`
    results["training_cold"] = cold(["run", "ml-training", TRAIN, "2", "8", *base], a.repeats)
    with Engine(store, "tless") as engine:
        results["training_warm"] = warm(lambda: engine.run_training(TRAIN, 2, 8), a.repeats)
        bucket = Path(store) / "tless"
        results["baseline_training"] = warm(lambda: baseline.train(str(bucket / TRAIN), 2, 8), a.repeats)
        base_model = results["baseline_training"]["last"].pop("model")
        single = baseline.single_forest(str(bucket / TRAIN))

        # --- inference 1k `16` with the model just published
        results["inference_warm"] = warm(lambda: engine.run_inference("ml-inference/model", TEST1K, 16),
                                         a.repeats)
        results["baseline_inference"] = warm(lambda: baseline.infer(base_model, str(bucket / TEST1K)), a.repeats)
        results["single_forest"] = {"ms": round(single["ms"], 1),
                                    "accuracy_1k": baseline.infer(single["model"], str(bucket / TEST1K))["accuracy"]}
        # --- throughput on 10k
        results["inference_10k_warm"] = warm(lambda: engine.run_inference("ml-inference/model", TEST10K, 16),
                                             max(1, a.repeats // 2))
        results["baseline_inference_10k"] = baseline.infer(base_model, str(bucket / TEST10K))
    results["inference_cold"] = cold(["run", "ml-inference", "ml-inference/model", TEST1K, "16", *base], a.repeats)

    results["load_average_at_end"] = load_average()
    for r in results.values():
        if isinstance(r, dict) and "last" in r and isinstance(r["last"], dict):
            r["last"].pop("confusion", None)
    write(a.out, "workflows.json", results)
    print(table(results))


def table(r: dict) -> str:
    tc, tw, bt = r["training_cold"], r["training_warm"], r["baseline_training"]
    ic, iw, bi = r["inference_cold"], r["inference_warm"], r["baseline_inference"]
    i10, b10 = r["inference_10k_warm"], r["baseline_inference_10k"]

    def ms(s):
        return f"{s['median']:.0f} ms ({s['min']:.0f}–{s['max']:.0f})"

    n10 = i10["last"]["num_images"]
    rows = [
        "| workflow | measure | mlwf | same-run baseline | ratio mlwf/baseline | target | reference, published "
        "(Faasm / Knative) |",
        "|---|---|---|---|---|---|---|",
        f"| training 2k `2 8` | cold, process start to exit | {ms(tc['wall_ms'])} | | | ≤ 3 s | 22.0 s / 25.2 s |",
        f"| training 2k `2 8` | warm (Python API) | {ms(tw['wall_ms'])} | {ms(bt['wall_ms'])} | "
        f"{tw['wall_ms']['median'] / bt['wall_ms']['median']:.2f} | ≤ 1 s, ≤ 1.5× | |",
        f"| training 2k `2 8` | held-out accuracy (each on its own 20 % split) | {100 * tw['last']['validation_accuracy']:.1f} % | "
        f"{100 * bt['last']['validation_accuracy']:.1f} % | | within 1 point | |",
        f"| training 2k `2 8` | accuracy on 1k test images | {100 * iw['last']['accuracy']:.1f} % | "
        f"{100 * bi['last']['accuracy']:.1f} % | | within 1 point | |",
        f"| inference 1k `16` | cold, process start to exit | {ms(ic['wall_ms'])} | | | ≤ 2.5 s | 2.0 s / 28.1 s |",
        f"| inference 1k `16` | warm (Python API) | {ms(iw['wall_ms'])} | {ms(bi['wall_ms'])} | "
        f"{iw['wall_ms']['median'] / bi['wall_ms']['median']:.2f} | ≤ 0.4 s | |",
        f"| inference 10k `16` | warm throughput | {n10 / i10['wall_ms']['median'] * 1e3:.0f} images/s | "
        f"{b10['num_images'] / b10['ms'] * 1e3:.0f} images/s | | ≥ 5,000 images/s | |",
        f"| inference 10k `16` | accuracy on 10k test images | {100 * i10['last']['accuracy']:.1f} % | "
        f"{100 * b10['accuracy']:.1f} % | | within 1 point | |",
        f"| training 2k `2 8` | peak memory | driver {tc['largest_process_mb']:.0f} MB (cold run); "
        f"workers {tw['last']['memory']['worker_peak_mb']:.0f} MB each × {tw['last']['memory']['workers']} | | | | |",
        f"| training 2k `2 8` | state transfer (serialize + store + deserialize, warm) | "
        f"{tw['last']['state_transfer_ms']:.0f} ms = "
        f"{100 * tw['last']['state_transfer_ms'] / tw['wall_ms']['median']:.1f} % of end-to-end | | | | |",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
