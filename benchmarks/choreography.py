"""Choreographed vs driver-orchestrated Knative, on the same two loopback ``mlwf serve`` processes.

Usage (from the repository root, with mlwf installed with its knative extra):

    python benchmarks/choreography.py [--fashion DIR] [--repeats 5] [--out benchmarks/results]

Two ``mlwf serve`` processes on 127.0.0.1, each running its calls in worker
processes (one per core), with per-stage sinks, so they serve both modes:
server A runs partition, pca, validation and load; server B runs train and
predict. On the same local store (``benchmarks/run.py``'s ``prepare()``):

* ml-training ``2 8`` on 2,000 Fashion-MNIST images (not published);
* ml-inference ``16`` on 1,000 images, with the model the first training
  run published;

each once warm-up, then ``--repeats`` times per mode, the modes alternating
(driver, choreography, driver, ...) so both see the same machine. The driver
mode is ``Engine(backend="knative")`` with per-stage endpoints (one POST per
call and its reply, the driver deciding every next stage); the choreographed
mode is one start event (``mlwf.choreography.invoke``, over one keep-alive
client, as the driver keeps its own) and following the run's record in the
store every 5 ms until it has succeeded. Both times are wall
clock in this process, from the first request to holding the report.

Writes ``--out/choreography.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (benchmarks/run.py)
from knative_load import Server  # noqa: E402

A_STAGES = "ml-training/partition,ml-training/pca,ml-training/validation,ml-inference/partition,ml-inference/load"
B_STAGES = "ml-training/train,ml-inference/predict"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fashion", type=Path, default=HERE.parent.parent / "shared/datasets/fashion-mnist")
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=HERE / "results")
    a = p.parse_args()

    from mlwf.choreography.invoke import invoke, wait
    from mlwf.engine.driver import Engine
    from mlwf.storage import StoreSpec

    store_url = str(Path(bench.prepare(a.fashion, a.data)).resolve())
    spec = StoreSpec(store_url, "tless")
    store = spec.open()
    secret = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLWF_", "S3_"))}
    env["MLWF_FUNCTION_SECRET"] = os.environ["MLWF_FUNCTION_SECRET"] = secret
    logs = Path(tempfile.mkdtemp(prefix="mlwf-choreography-bench-"))
    cores = str(os.cpu_count() or 1)

    from knative_load import free_port

    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    sinks = [x for stage in A_STAGES.split(",") for x in ("--sink", f"{stage}={url_a}")]
    sinks += [x for stage in B_STAGES.split(",") for x in ("--sink", f"{stage}={url_b}")]
    servers = [Server(env, logs / "a.log", store_url, "--stages", A_STAGES, "--workers", cores, *sinks, port=port_a),
               Server(env, logs / "b.log", store_url, "--stages", B_STAGES, "--workers", cores, *sinks, port=port_b)]
    endpoints = [f"{stage}={url_a}" for stage in A_STAGES.split(",")] + \
                [f"{stage}={url_b}" for stage in B_STAGES.split(",")]
    training = {"args": [bench.TRAIN, 2, 8], "options": {"publish": False}}
    inference = {"args": ["ml-inference/model", bench.TEST1K, 16], "options": {}}
    results: dict = {"machine": bench.machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "repeats": a.repeats, "logs": str(logs)}
    import httpx

    client = httpx.Client()  # one keep-alive client for the start events, as the driver keeps its own
    try:
        with Engine(store_url, "tless", backend="knative", backend_options={"endpoints": endpoints}) as engine:
            engine.run_training(bench.TRAIN, 2, 8)  # publishes the model inference uses; warms both servers

            def driver(workflow: str) -> dict:
                if workflow == "ml-training":
                    return engine.run_training(bench.TRAIN, 2, 8, publish=False)
                return engine.run_inference("ml-inference/model", bench.TEST1K, 16)

            def choreographed(workflow: str) -> dict:
                run_id = invoke(workflow, training if workflow == "ml-training" else inference, url_a, spec,
                                client=client)
                return wait(store, workflow, run_id, timeout=600, poll=0.005)

            for workflow in ("ml-training", "ml-inference"):
                times: dict[str, list[float]] = {"driver": [], "choreography": []}
                reports: dict[str, dict] = {}
                driver(workflow), choreographed(workflow)  # warm-up, not counted
                for _ in range(a.repeats):
                    for mode, fn in (("driver", driver), ("choreography", choreographed)):
                        t = time.perf_counter()
                        reports[mode] = fn(workflow)
                        times[mode].append((time.perf_counter() - t) * 1e3)
                entry = {mode: {"wall_ms": bench.stats(t), "e2e_ms_last": reports[mode]["e2e_ms"],
                                "stage_ms_last": reports[mode]["stage_ms"],
                                "model_digest": reports[mode]["model_digest"]} for mode, t in times.items()}
                entry["ratio"] = round(entry["choreography"]["wall_ms"]["median"]
                                       / entry["driver"]["wall_ms"]["median"], 3)
                entry["same_model"] = entry["driver"]["model_digest"] == entry["choreography"]["model_digest"]
                if workflow == "ml-inference":
                    entry["same_accuracy"] = reports["driver"]["accuracy"] == reports["choreography"]["accuracy"]
                results[workflow] = entry
    finally:
        results["server_exits"] = [s.stop() for s in servers]
        store.close()
        client.close()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "choreography.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    if not all(results[w]["same_model"] for w in ("ml-training", "ml-inference")):
        sys.exit(1)


def table(r: dict) -> str:
    def ms(s):
        return f"{s['median']:.0f} ms ({s['min']:.0f}–{s['max']:.0f})"

    rows = ["| workflow (warm, same two loopback servers) | driver (`--backend knative`) | choreography "
            "(`mlwf invoke --wait`) | ratio | same result |", "|---|---|---|---|---|"]
    for workflow, what in (("ml-training", "ml-training 2k `2 8`"), ("ml-inference", "ml-inference 1k `16`")):
        e = r[workflow]
        rows.append(f"| {what} | {ms(e['driver']['wall_ms'])} | {ms(e['choreography']['wall_ms'])} | "
                    f"{e['ratio']:.2f} | {'yes' if e['same_model'] and e.get('same_accuracy', True) else 'NO'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
