"""Measure both workflows on Fashion-MNIST against the same-run baseline.

Usage (from the repository root, with mlwf installed):

    python benchmarks/run.py [--fashion DIR] [--repeats 5] [--out benchmarks/results]

DIR holds the Fashion-MNIST IDX files (default ../shared/datasets/fashion-mnist).
The images are written once as PNG class folders into a local store under
benchmarks/data/ (ignored by git). Every figure is the median of --repeats runs
with its min–max; cold runs are fresh `mlwf` processes timed from start to
exit, warm runs reuse one `mlwf.Engine` in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mlwf.bench import baseline  # noqa: E402

TRAIN = "ml-training/fashion-2k"
TEST1K = "ml-inference/images-inference-1k"
TEST10K = "ml-inference/fashion-test-10k"


def prepare(fashion: Path, data: Path, extra: list[tuple[str, str, int, int]] = ()) -> str:
    """Write the image sets (and ``extra`` ones: ``(prefix, "train"|"t10k", n, offset)``) into the store."""
    from mlwf import bulk, datasets
    from mlwf.storage import StoreSpec

    store_url = str(data / "store")
    store = StoreSpec(store_url, "tless").open()
    sets = [
        (TRAIN, "train", 2000, 0),
        (TEST1K, "t10k", 1000, 0),
        (TEST10K, "t10k", 10000, 0),
        *extra,
    ]
    for prefix, kind, n, offset in sets:
        folder = data / prefix.replace("/", "_")
        if not folder.exists():
            datasets.write_idx(fashion / f"{kind}-images-idx3-ubyte.gz", fashion / f"{kind}-labels-idx1-ubyte.gz",
                               folder, n=n, offset=offset)
        bulk.upload_dir(store, folder, prefix, create_bucket=True)
    return store_url


def stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1), "runs": [round(v, 1) for v in values]}


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


def warm(fn, repeats: int) -> dict:
    fn()  # warm-up run, not counted
    times, reports = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        reports.append(fn())
        times.append((time.perf_counter() - t) * 1e3)
    return {"wall_ms": stats(times), "last": reports[-1]}


def machine() -> dict:
    import numpy
    import sklearn

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__}


def arguments(doc: str, repeats: int = 5) -> argparse.ArgumentParser:
    """The options every benchmark script shares: where the data is and goes, and how often to run."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fashion", type=Path, default=HERE.parent.parent / "shared/datasets/fashion-mnist",
                   help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--data", type=Path, default=HERE / "data", help="where the PNG store is built (git-ignored)")
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--out", type=Path, default=HERE / "results")
    return p


def main() -> None:
    a = arguments(__doc__).parse_args()

    from mlwf.engine.driver import Engine

    store = prepare(a.fashion, a.data)
    base = ["--store", store, "--bucket", "tless"]
    results: dict = {"machine": machine(), "repeats": a.repeats,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

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

    a.out.mkdir(parents=True, exist_ok=True)
    for r in results.values():
        if isinstance(r, dict) and "last" in r and isinstance(r["last"], dict):
            r["last"].pop("confusion", None)
    (a.out / "workflows.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def table(r: dict) -> str:
    tc, tw, bt = r["training_cold"], r["training_warm"], r["baseline_training"]
    ic, iw, bi = r["inference_cold"], r["inference_warm"], r["baseline_inference"]
    i10, b10 = r["inference_10k_warm"], r["baseline_inference_10k"]

    def ms(s):
        return f"{s['median']:.0f} ms ({s['min']:.0f}–{s['max']:.0f})"

    n10 = i10["last"]["num_images"]
    rows = [
        "| workflow | measure | mlwf | same-run baseline | ratio mlwf/baseline | target |",
        "|---|---|---|---|---|---|",
        f"| training 2k `2 8` | cold, process start to exit | {ms(tc['wall_ms'])} | | | ≤ 3 s |",
        f"| training 2k `2 8` | warm (Python API) | {ms(tw['wall_ms'])} | {ms(bt['wall_ms'])} | "
        f"{tw['wall_ms']['median'] / bt['wall_ms']['median']:.2f} | ≤ 1 s, ≤ 1.5× |",
        f"| training 2k `2 8` | held-out accuracy (each on its own 20 % split) | {100 * tw['last']['validation_accuracy']:.1f} % | "
        f"{100 * bt['last']['validation_accuracy']:.1f} % | | within 1 point |",
        f"| training 2k `2 8` | accuracy on 1k test images | {100 * iw['last']['accuracy']:.1f} % | "
        f"{100 * bi['last']['accuracy']:.1f} % | | within 1 point |",
        f"| inference 1k `16` | cold, process start to exit | {ms(ic['wall_ms'])} | | | ≤ 2.5 s |",
        f"| inference 1k `16` | warm (Python API) | {ms(iw['wall_ms'])} | {ms(bi['wall_ms'])} | "
        f"{iw['wall_ms']['median'] / bi['wall_ms']['median']:.2f} | ≤ 0.4 s |",
        f"| inference 10k `16` | warm throughput | {n10 / i10['wall_ms']['median'] * 1e3:.0f} images/s | "
        f"{b10['num_images'] / b10['ms'] * 1e3:.0f} images/s | | ≥ 5,000 images/s |",
        f"| inference 10k `16` | accuracy on 10k test images | {100 * i10['last']['accuracy']:.1f} % | "
        f"{100 * b10['accuracy']:.1f} % | | within 1 point |",
        f"| training 2k `2 8` | peak memory | driver {tc['largest_process_mb']:.0f} MB (cold run); "
        f"workers {tw['last']['memory']['worker_peak_mb']:.0f} MB each × {tw['last']['memory']['workers']} | | | |",
        f"| training 2k `2 8` | state transfer (serialize + store + deserialize, warm) | "
        f"{tw['last']['state_transfer_ms']:.0f} ms = "
        f"{100 * tw['last']['state_transfer_ms'] / tw['wall_ms']['median']:.1f} % of end-to-end | | | |",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
