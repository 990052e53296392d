"""Choreography against the driver on Knative, as the fan-out grows: 16-, 200-, 500- and 1,000-way, in one run.

Usage (from the repository root, mlwf installed with its knative extra and matplotlib):

    python benchmarks/choreography.py [--sizes 16 200 500 1000] [--repeats 3] [--timeout 300]
        [--fashion DIR] [--data DIR] [--out benchmarks/results/choreography]

Two ``mlwf serve`` processes on 127.0.0.1, each running its calls in worker
processes (one per core), with per-stage sinks so they serve both modes
(server A: partition, pca, validation, load; server B: train, score, predict), on
the local store of ``common.prepare()``. The fan-out is
ml-inference's predict stage: ``ml-inference ml-inference/model
ml-inference/images-inference-1k N`` for each N of ``--sizes`` (one call per
image at 1,000), with the model a warm-up ``ml-training 2 8`` published. The
seed's training size, ``ml-training 2 8`` on 2,000 images (not published),
is measured too.

Each point is run ``--repeats`` times per mode, the modes alternating
(driver, choreography, driver, ...) so both see the same machine, after one
warm-up of each; the median is plotted, the runs are kept. The driver mode is
``Engine(backend="knative")`` with per-stage endpoints; the choreographed
mode is one start event (``mlwf.choreography.invoke``) and following the
run's record in the store every 5 ms until it has succeeded. Times are wall
clock in this process, from the first request to holding the report. A run
that does not finish within ``--timeout`` seconds is recorded as such (no
time) and the next one goes on (against an older mlwf this shows where it
stalls). Both modes must give the same accuracy.

Writes ``choreography.json`` (the machine, the command, every run, the
medians and their ratios) and ``choreography.png`` (time against fan-out,
both modes) into ``--out``, and prints a markdown table.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

from common import TEST1K, TRAIN, arguments, command, free_port, load_average, machine, now, prepare, stats, write
from knative import function_server

A_STAGES = "ml-training/partition,ml-training/pca,ml-training/validation,ml-inference/partition,ml-inference/load"
B_STAGES = "ml-training/train,ml-training/score,ml-inference/predict"
SIZES = (16, 200, 500, 1000)


def main() -> None:
    p = arguments(__doc__, "choreography", repeats=3)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="fan-outs (NUM_FUNCS) to measure")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take before it counts as "
                                                               "not finished (default 300)")
    a = p.parse_args()

    from mlwf.choreography.invoke import invoke, wait
    from mlwf.engine.driver import Engine
    from mlwf.errors import MlwfError
    from mlwf.storage import StoreSpec

    store_url = prepare(a.fashion, a.data)
    spec = StoreSpec(store_url, "tless")
    store = spec.open()
    secret = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLWF_", "S3_"))}
    env["MLWF_FUNCTION_SECRET"] = os.environ["MLWF_FUNCTION_SECRET"] = secret
    logs = Path(tempfile.mkdtemp(prefix="mlwf-choreography-bench-"))
    cores = str(os.cpu_count() or 1)
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    sinks = [x for stage in A_STAGES.split(",") for x in ("--sink", f"{stage}={url_a}")]
    sinks += [x for stage in B_STAGES.split(",") for x in ("--sink", f"{stage}={url_b}")]
    servers = [function_server(env, logs / "a.log", store_url, "--stages", A_STAGES, "--workers", cores, *sinks,
                               port=port_a),
               function_server(env, logs / "b.log", store_url, "--stages", B_STAGES, "--workers", cores, *sinks,
                               port=port_b)]
    endpoints = [f"{stage}={url_a}" for stage in A_STAGES.split(",")] + \
                [f"{stage}={url_b}" for stage in B_STAGES.split(",")]
    results: dict = {"machine": machine(), "date": now(), "command": command(),
                     "mlwf": machine()["mlwf"], "repeats": a.repeats, "timeout_s": a.timeout, "logs": str(logs),
                     "load_average_at_start": load_average(),  # a shared machine is noisy
                     "inference": {}, "training_seed": {}}
    import httpx

    client = httpx.Client()  # one keep-alive client for the start events, as the driver keeps its own

    def timed(fn) -> tuple[float | None, dict | None, str | None]:
        t = time.perf_counter()
        try:
            report = fn()
        except MlwfError as e:
            return None, None, str(e).splitlines()[0][:300]
        return (time.perf_counter() - t) * 1e3, report, None

    try:
        with Engine(store_url, "tless", backend="knative", backend_options={"endpoints": endpoints}) as engine:
            engine.run_training(TRAIN, 2, 8)  # publishes the model inference uses; warms both servers

            def driver(invocation) -> dict:
                workflow, args, options = invocation
                if workflow == "ml-training":
                    return engine.run_training(*args, **options)
                return engine.run_inference(*args)

            def choreographed(invocation) -> dict:
                workflow, args, options = invocation
                run_id = invoke(workflow, {"args": list(args), "options": options}, url_a, spec, client=client)
                return wait(store, workflow, run_id, timeout=a.timeout, poll=0.005)

            points = [("training_seed", "2 8", ("ml-training", (TRAIN, 2, 8), {"publish": False}))]
            points += [("inference", str(n), ("ml-inference", ("ml-inference/model", TEST1K, n), {}))
                       for n in a.sizes]
            for group, label, invocation in points:
                entry: dict = {"driver": [], "choreography": [], "failures": {"driver": [], "choreography": []}}
                accuracy: dict[str, object] = {}
                for mode, fn in (("driver", driver), ("choreography", choreographed)):
                    timed(lambda: fn(invocation))  # warm-up, not counted
                for _ in range(a.repeats):
                    for mode, fn in (("driver", driver), ("choreography", choreographed)):
                        ms, report, failure = timed(lambda: fn(invocation))
                        if failure is not None:
                            entry["failures"][mode].append(failure)
                            print(f"{group} {label} {mode}: {failure}", file=sys.stderr, flush=True)
                            continue
                        entry[mode].append(round(ms, 1))
                        accuracy[mode] = report.get("accuracy", report.get("model_digest"))
                for mode in ("driver", "choreography"):
                    entry[f"{mode}_ms"] = stats(entry[mode]) if entry[mode] else None
                if entry["driver_ms"] and entry["choreography_ms"]:
                    entry["ratio"] = round(entry["choreography_ms"]["median"] / entry["driver_ms"]["median"], 3)
                entry["same_result"] = len(set(map(str, accuracy.values()))) == 1 if len(accuracy) == 2 else None
                results[group][label] = entry
                print(f"{group} {label}: driver {_median(entry['driver_ms'])} ms, choreography "
                      f"{_median(entry['choreography_ms'])} ms", file=sys.stderr, flush=True)
    finally:
        results["server_exits"] = [s.stop() for s in servers]
        results["load_average_at_end"] = load_average()
        store.close()
        client.close()
    write(a.out, "choreography.json", results)
    plot(results, a.out / "choreography.png")
    print(table(results))


def _median(stats: dict | None) -> str:
    return "not finished" if stats is None else f"{stats['median']:.0f}"


def table(r: dict) -> str:
    """The medians as a markdown table (ranges in brackets)."""
    def cell(s):
        return "did not finish" if s is None else f"{s['median']:.0f} ms ({s['min']:.0f}–{s['max']:.0f})"

    rows = ["| run (warm, two loopback servers) | driver (`--backend knative`) | choreography (`mlwf invoke`) "
            "| ratio | same result |", "|---|---|---|---|---|"]
    for group, what in (("training_seed", "ml-training 2k `{}`"), ("inference", "ml-inference 1k, {}-way")):
        for label, e in r[group].items():
            ratio = f"{e['ratio']:.2f}" if "ratio" in e else "–"
            same = {True: "yes", False: "NO", None: "–"}[e["same_result"]]
            rows.append(f"| {what.format(label)} | {cell(e['driver_ms'])} | {cell(e['choreography_ms'])} | {ratio} "
                        f"| {same} |")
    return "\n".join(rows)


def plot(r: dict, path: Path) -> None:
    """Time against fan-out, both modes: medians joined, every run a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for mode, colour, label in (("driver", "#4e79a7", "driver (--backend knative)"),
                                ("choreography", "#e15759", "choreography (mlwf invoke)")):
        xs, medians = [], []
        for size, e in r["inference"].items():
            for ms in e[mode]:
                ax.scatter(int(size), ms / 1e3, s=10, color=colour, alpha=0.4)
            if e[f"{mode}_ms"] is not None:
                xs.append(int(size))
                medians.append(e[f"{mode}_ms"]["median"] / 1e3)
            elif e["failures"][mode]:
                ax.annotate("did not finish", (int(size), 0), color=colour, fontsize=7, rotation=90,
                            va="bottom", ha="center")
        ax.plot(xs, medians, marker="o", color=colour, label=label)
    ax.set_xscale("log")
    sizes = [int(s) for s in r["inference"]]
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("fan-out (ml-inference predict functions, 1,000 images)")
    ax.set_ylabel("end to end, seconds (median)")
    m = r["machine"]
    ax.set_title(f"Choreography vs driver on two loopback servers\n{m['cores']} cores, {m['cpu'][:40]}, "
                 f"mlwf {r['mlwf']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
