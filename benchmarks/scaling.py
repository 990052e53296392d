"""ml-training as the data grows: end-to-end time and peak memory against the same-run baseline.

Usage (from the repository root, with mlwf installed with its bench extra):

    python benchmarks/scaling.py [--sizes 2000,10000,60000] [--configs "2 8,4 16"] [--repeats 3]
                                 [--fashion DIR] [--out benchmarks/results/scaling] [--plot-only]

For each number of Fashion-MNIST training images (the first N of the 60k
training set, written once as PNG class folders into the benchmark store by
``common.prepare()``: ``ml-training/fashion-2k``, ``-10k``, ``-60k``) and
each function count ``P T``:

* mlwf, warm: one fresh process holds an ``Engine`` on the local backend
  (one worker per core), does one warm-up run, then ``--repeats`` timed runs
  (``Engine.run_training``, wall clock); the report's ``memory`` gives the
  driver's and the workers' peak resident memory;
* the same-run baseline (``baseline.train``: the same work in one process,
  plain scikit-learn), in a fresh process too, one warm-up and ``--repeats``
  timed runs; its peak memory is that process's.

Each measurement is its own process, so peak memory belongs to it alone.
The largest size with the last configuration (60k ``4 16``) also measures test
accuracy on the 10k Fashion-MNIST test images (``ml-inference/fashion-test-10k``):
mlwf publishes its model to ``ml-inference/model-scaling`` and classifies the
test set with ``ml-inference`` (16 functions, warm); the baseline classifies it
with ``baseline.infer``.

Before each measurement the script waits (at most ``--max-wait`` s) for the
1-minute load average to fall below ``--max-load``: the machine is shared. It
records the load averages it saw. Writes ``--out/scaling.json`` and
``--out/scaling.png``/``.svg`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import TEST10K, TRAIN, arguments, command, machine, now, prepare, stats, write

MODEL_PREFIX = "ml-inference/model-scaling"


def prefix_of(size: int) -> str:
    return f"ml-training/fashion-{size // 1000}k"


# --------------------------------------------------------------------------- one measurement, in its own process
def child_mlwf(store: str, size: int, num_pca: int, num_train: int, repeats: int, accuracy: bool) -> dict:
    from mlwf.engine.driver import Engine

    prefix = prefix_of(size)
    out: dict = {}
    with Engine(store, "tless") as engine:
        def once():
            return engine.run_training(prefix, num_pca, num_train, model_prefix=MODEL_PREFIX, publish=accuracy)

        once()  # warm-up, not counted
        times, reports = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            reports.append(once())
            times.append((time.perf_counter() - t) * 1e3)
        last = reports[-1]
        out = {"wall_ms": stats(times), "e2e_ms": stats([r["e2e_ms"] for r in reports]),
               "validation_accuracy": last["validation_accuracy"], "num_images": last["num_images"],
               "memory": {"driver_peak_mb": max(r["memory"]["driver_peak_mb"] for r in reports),
                          "worker_peak_mb": max(r["memory"]["worker_peak_mb"] for r in reports),
                          "workers": last["memory"]["workers"]},
               "stage_ms": last["stage_ms"], "stages": last["stages"],
               "state_transfer_ms": last["state_transfer_ms"]}
        if accuracy:
            engine.run_inference(MODEL_PREFIX, TEST10K, 16)  # warm-up
            t = time.perf_counter()
            inf = engine.run_inference(MODEL_PREFIX, TEST10K, 16)
            out["test"] = {"accuracy": inf["accuracy"], "num_images": inf["num_images"],
                           "wall_ms": round((time.perf_counter() - t) * 1e3, 1),
                           "model_digest": inf["model_digest"]}
    return out


def child_baseline(store: str, size: int, num_pca: int, num_train: int, repeats: int, accuracy: bool) -> dict:
    from mlwf.bench import baseline

    folder = str(Path(store) / "tless" / prefix_of(size))
    baseline.train(folder, num_pca, num_train)  # warm-up, not counted
    times, last = [], {}
    for _ in range(repeats):
        last = baseline.train(folder, num_pca, num_train)
        times.append(last["ms"])
    out = {"wall_ms": stats(times), "validation_accuracy": last["validation_accuracy"]}
    if accuracy:
        test = baseline.infer(last["model"], str(Path(store) / "tless" / TEST10K))
        out["test"] = {"accuracy": test["accuracy"], "num_images": test["num_images"], "wall_ms": round(test["ms"], 1)}
    out["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


# --------------------------------------------------------------------------- orchestration
def wait_for_quiet(max_load: float, max_wait: float) -> float:
    """Wait until the 1-minute load average is below ``max_load`` (or ``max_wait`` s passed); return it."""
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(5)
    return round(os.getloadavg()[0], 2)


def measure(kind: str, store: str, size: int, p: int, t: int, repeats: int, accuracy: bool, a) -> dict:
    load = wait_for_quiet(a.max_load, a.max_wait)
    argv = [sys.executable, __file__, "--child", kind, "--store", store, "--size", str(size),
            "--pca", str(p), "--train", str(t), "--repeats", str(repeats)] + (["--accuracy"] if accuracy else [])
    print(f"  {kind:8} {size:>6} images `{p} {t}` (load {load}) …", file=sys.stderr, flush=True)
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"scaling: {kind} {size} {p} {t} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_before"] = load
    result["load_after"] = round(os.getloadavg()[0], 2)
    return result


def table(results: list[dict]) -> str:
    rows = ["| training images | `P T` | mlwf warm | baseline (1 process) | ratio mlwf/baseline | "
            "mlwf peak memory: driver; each worker × workers | baseline peak memory | held-out accuracy mlwf / baseline |",
            "|---|---|---|---|---|---|---|---|"]

    def ms(s):
        return f"{s['median'] / 1e3:.2f} s ({s['min'] / 1e3:.2f}–{s['max'] / 1e3:.2f})"

    for r in results:
        m, b = r["mlwf"], r["baseline"]
        rows.append(f"| {r['size']:,} | `{r['pca']} {r['train']}` | {ms(m['wall_ms'])} | {ms(b['wall_ms'])} | "
                    f"{m['wall_ms']['median'] / b['wall_ms']['median']:.2f} | "
                    f"{m['memory']['driver_peak_mb']:.0f} MB; {m['memory']['worker_peak_mb']:.0f} MB × "
                    f"{m['memory']['workers']} | {b['peak_mb']:.0f} MB | "
                    f"{100 * m['validation_accuracy']:.1f} % / {100 * b['validation_accuracy']:.1f} % |")
    return "\n".join(rows)


def accuracy_table(r: dict) -> str:
    m, b = r["mlwf"], r["baseline"]
    return "\n".join([
        "| 60k `4 16` | mlwf | baseline (1 process) | target |",
        "|---|---|---|---|",
        f"| training, warm (median) | {m['wall_ms']['median'] / 1e3:.2f} s | {b['wall_ms']['median'] / 1e3:.2f} s "
        f"| ≤ 15 s |",
        f"| test accuracy, 10k Fashion-MNIST test images | {100 * m['test']['accuracy']:.2f} % | "
        f"{100 * b['test']['accuracy']:.2f} % | ≥ baseline − 1 point |",
        f"| inference over the 10k test images (16 functions, warm) | {m['test']['wall_ms'] / 1e3:.2f} s | "
        f"{b['test']['wall_ms'] / 1e3:.2f} s | |",
    ])


def plot(results: list[dict], out: Path) -> list[Path]:
    from mlwf import plots

    plt = plots.pyplot()
    from matplotlib.ticker import NullFormatter

    fig, (ax, mx) = plt.subplots(1, 2, figsize=(12, 4.6))
    configs = sorted({(r["pca"], r["train"]) for r in results})
    colours = ["#4e79a7", "#e15759", "#59a14f", "#f28e2b"]
    for (p, t), colour in zip(configs, colours):
        rs = sorted((r for r in results if (r["pca"], r["train"]) == (p, t)), key=lambda r: r["size"])
        sizes = [r["size"] for r in rs]
        for who, style in (("mlwf", "-o"), ("baseline", "--s")):
            med = [r[who]["wall_ms"]["median"] / 1e3 for r in rs]
            lo = [m - r[who]["wall_ms"]["min"] / 1e3 for m, r in zip(med, rs)]
            hi = [r[who]["wall_ms"]["max"] / 1e3 - m for m, r in zip(med, rs)]
            label = f"mlwf warm, {p} PCA {t} RF" if who == "mlwf" else f"baseline (1 process), {p} PCA {t} RF"
            ax.errorbar(sizes, med, yerr=[lo, hi], fmt=style, color=colour, capsize=3, label=label,
                        alpha=1 if who == "mlwf" else 0.7)
        mx.plot(sizes, [r["mlwf"]["memory"]["driver_peak_mb"] for r in rs], "-o", color=colour,
                label=f"mlwf driver, {p} PCA {t} RF")
        mx.plot(sizes, [r["mlwf"]["memory"]["worker_peak_mb"] for r in rs], "-^", color=colour, alpha=0.6,
                label=f"mlwf each worker, {p} PCA {t} RF")
        mx.plot(sizes, [r["baseline"]["peak_mb"] for r in rs], "--s", color=colour, alpha=0.5,
                label=f"baseline process, {p} PCA {t} RF")
    for a in (ax, mx):
        a.set_xscale("log")
        a.xaxis.set_minor_formatter(NullFormatter())
        a.set_xticks(sorted({r["size"] for r in results}))
        a.set_xticklabels([f"{s // 1000}k" for s in sorted({r["size"] for r in results})])
        a.set_xlabel("Fashion-MNIST training images (80 % train, 20 % held out)")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7.5)
    ax.set_yscale("log")
    ax.set_ylabel("ml-training end to end, s (log scale)")
    ax.set_title("time: median of the runs, bars min–max", fontsize=9)
    mx.set_ylabel("peak resident memory, MB")
    mx.set_title("peak memory per process", fontsize=9)
    fig.suptitle("ml-training scaling on this machine (local backend, warm) vs the same work in one process",
                 fontsize=10)
    fig.tight_layout()
    return plots.save(fig, out / "scaling")


def main() -> None:
    p = arguments(__doc__, "scaling", repeats=3)
    p.add_argument("--sizes", default="2000,10000,60000", help="training images (default 2000,10000,60000)")
    p.add_argument("--configs", default="2 8,4 16", help="function counts `P T` (default \"2 8,4 16\")")
    p.add_argument("--max-load", type=float, default=1.5, help="wait for the 1-minute load average to fall below "
                                                              "this before each measurement (default 1.5)")
    p.add_argument("--max-wait", type=float, default=120.0, help="… for at most this many seconds (default 120)")
    p.add_argument("--plot-only", action="store_true", help="redraw scaling.png from --out/scaling.json")
    # one measurement (internal)
    p.add_argument("--child", choices=("mlwf", "baseline"), help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--pca", type=int, help=argparse.SUPPRESS)
    p.add_argument("--train", type=int, help=argparse.SUPPRESS)
    p.add_argument("--accuracy", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.child:
        fn = child_mlwf if a.child == "mlwf" else child_baseline
        print(json.dumps(fn(a.store, a.size, a.pca, a.train, a.repeats, a.accuracy)))
        return
    if a.plot_only:
        doc = json.loads((a.out / "scaling.json").read_text())
        plot(doc["results"], a.out)
        print(table(doc["results"]))
        return

    sizes = [int(s) for s in a.sizes.split(",")]
    configs = [tuple(int(x) for x in c.split()) for c in a.configs.split(",")]
    extra = [(prefix_of(s), "train", s, 0) for s in sizes if prefix_of(s) != TRAIN]
    store = prepare(a.fashion, a.data, extra)
    doc = {"machine": machine(), "repeats": a.repeats, "date": now(), "command": command(), "results": []}
    for size in sizes:
        for num_pca, num_train in configs:
            accuracy = size == max(sizes) and (num_pca, num_train) == configs[-1]
            r = {"size": size, "pca": num_pca, "train": num_train}
            r["mlwf"] = measure("mlwf", store, size, num_pca, num_train, a.repeats, accuracy, a)
            r["baseline"] = measure("baseline", store, size, num_pca, num_train, a.repeats, accuracy, a)
            doc["results"].append(r)
            write(a.out, "scaling.json", doc)
    plot(doc["results"], a.out)
    print(table(doc["results"]))
    last = doc["results"][-1]
    if "test" in last["mlwf"]:
        print()
        print(accuracy_table(last))


if __name__ == "__main__":
    main()
