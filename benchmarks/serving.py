"""Serving: onnxruntime against mlwf's own predict, and ``mlwf model serve`` against in-process calls.

Usage (from the repository root, with mlwf[onnx,serve] and tritonclient[http] installed):

    python benchmarks/serving.py [--parts engines,serving] [--models 2k,60k] [--before COMMIT]
        [--repeats 5] [--requests 300] [--rounds 3] [--fashion DIR] [--out benchmarks/results/serving]

1. Trains the models of ``--models`` on Fashion-MNIST with the defaults
   (64×64 images, 10 components, 100 trees of depth 10 per forest): ``2k``
   is 2,000 images `2 8` (8 members), ``60k`` all 60,000 `4 16` (16
   members); each is trained once and kept in the store.
2. ``engines``: each model exported with ``mlwf model export --format onnx``;
   on the 10k test images decoded once (decoding is the same for both and is
   timed apart), ``Model.proba_from_pixels`` against an onnxruntime session on
   the exported file, each with one thread and with every core, alternating,
   ``--repeats`` times; agreement on all 10k (same labels, largest
   probability difference).
3. ``serving``: ``mlwf model serve`` in its own process on 127.0.0.1, spoken
   to by NVIDIA's tritonclient (binary tensors, PNG files as sent by a
   client), with batches of 1 and 64 images, one client at a time and four at
   once, against ``mlwf.model.load(...).predict`` on the same PNG bytes in
   this process; ``--rounds`` rounds, the ways alternating within each round:
   requests/s and p50/p99 latency (medians over the rounds). In process,
   calls run with one BLAS thread each, the server's own setting. With
   ``--before COMMIT``, a second server runs the ``src`` of COMMIT (extracted
   with ``git archive``) on the same model, measured in the same rounds: what
   a change to the server costs. Every server runs with its defaults (after
   issue 24: a 512 MiB memory budget); no MLWF_ variable is passed on.

Writes ``serving.json`` into ``--out`` and prints the tables of the results page.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from common import (TEST10K, TRAIN, TRAIN60K, Server, arguments, before_argument, command, load_average, machine,
                    now, prepare, short_commit, side_env, source_of, write)

MODELS = {"2k": ("2k `2 8`", TRAIN, 2, 8, "ml-inference/model-serving-2k"),
          "60k": ("60k `4 16`", TRAIN60K, 4, 16, "ml-inference/model-serving-60k")}


def _stats(values: list[float]) -> dict:
    values = sorted(values)
    return {"median": round(statistics.median(values), 2), "min": round(values[0], 2),
            "max": round(values[-1], 2), "runs": [round(v, 2) for v in values]}


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def train(store: str, models: list[str]) -> dict:
    """The models of ``models``, each trained once (same data, same seed, same model) and kept in the store."""
    import mlwf.model
    from mlwf.engine.driver import Engine
    from mlwf.storage import StoreSpec

    made = {}
    published = StoreSpec(store, "tless").open()
    with Engine(store, "tless") as engine:
        for key in models:
            name, data, p, t, prefix = MODELS[key]
            try:
                manifest = mlwf.model.read_manifest(published.get, prefix)
                made[name] = {"prefix": prefix, "digest": manifest["sha256"],
                              "validation_accuracy": manifest["summary"]["validation_accuracy"]}
                continue
            except (mlwf.model.ModelError, KeyError):
                pass
            t0 = time.perf_counter()
            report = engine.run_training(data, p, t, model_prefix=prefix)
            made[name] = {"prefix": prefix, "digest": report["model_digest"],
                          "validation_accuracy": report["validation_accuracy"],
                          "train_s": round(time.perf_counter() - t0, 1)}
    return made


def export(store: str, made: dict, out: Path) -> None:
    """Each model as an ONNX file, with ``mlwf model export`` (timed as a process)."""
    for info in made.values():
        path = out / (info["prefix"].rsplit("/", 1)[1] + ".onnx")
        t0 = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "mlwf.cli", "model", "export", info["prefix"], "--format",
                              "onnx", "-o", str(path), "--store", store, "--json"], check=True,
                             capture_output=True, text=True)
        info["export"] = {**json.loads(cli.stdout), "process_s": round(time.perf_counter() - t0, 1)}
        info["onnx_path"] = str(path)


def engines(store: str, made: dict, blobs: list[bytes], labels: np.ndarray, repeats: int) -> dict:
    """mlwf's predict and onnxruntime on the same decoded pixels; 1 thread and every core."""
    import onnxruntime
    from threadpoolctl import threadpool_limits

    import mlwf.model
    from mlwf.serving.prepare import prepare as prepare_pixels

    out = {}
    from mlwf.serving.onnx import to_onnx

    for name, info in made.items():
        model = mlwf.model.load(info["prefix"], store=store)
        t0 = time.perf_counter()
        pixels = prepare_pixels(blobs, model.image_size)
        decode_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        graph = to_onnx(model).SerializeToString()
        build_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
        session_ms = (time.perf_counter() - t0) * 1e3
        result = {"images": len(pixels), "decode_ms": round(decode_ms, 1), "graph_build_ms": round(build_ms, 1),
                  "session_create_ms": round(session_ms, 1)}
        for threads in (1, os.cpu_count() or 1):
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(info["onnx_path"], options, providers=["CPUExecutionProvider"])
            times = {"mlwf": [], "onnxruntime": []}
            with threadpool_limits(threads):
                model.proba_from_pixels(pixels[:256])  # warm-up, not counted
                session.run(None, {"pixels": pixels[:256]})
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    expected = model.proba_from_pixels(pixels)
                    times["mlwf"].append((time.perf_counter() - t0) * 1e3)
                    t0 = time.perf_counter()
                    label, proba = session.run(["label", "probabilities"], {"pixels": pixels})
                    times["onnxruntime"].append((time.perf_counter() - t0) * 1e3)
                # Batches of 64, as a predict call of the inference workflow or a served request gets them.
                batch64 = {"mlwf": [], "onnxruntime": []}
                for start in range(0, 64 * 40, 64):
                    rows = pixels[start : start + 64]
                    t0 = time.perf_counter()
                    model.proba_from_pixels(rows)
                    batch64["mlwf"].append((time.perf_counter() - t0) * 1e3)
                    t0 = time.perf_counter()
                    session.run(None, {"pixels": rows})
                    batch64["onnxruntime"].append((time.perf_counter() - t0) * 1e3)
            ours, theirs = _stats(times["mlwf"]), _stats(times["onnxruntime"])
            result[f"{threads}_thread"] = {
                "mlwf_ms": ours, "onnxruntime_ms": theirs,
                "mlwf_images_per_s": round(len(pixels) / ours["median"] * 1e3),
                "onnxruntime_images_per_s": round(len(pixels) / theirs["median"] * 1e3),
                "speed_up": round(ours["median"] / theirs["median"], 2),
                "batch_64_mlwf_ms": round(statistics.median(batch64["mlwf"]), 2),
                "batch_64_onnxruntime_ms": round(statistics.median(batch64["onnxruntime"]), 2)}
        best = np.argmax(expected, axis=1)
        result["agreement"] = {"same_labels": int(np.sum(label == best)), "of": len(label),
                               "max_abs_diff": float(np.max(np.abs(proba.astype(np.float64) - expected))),
                               "accuracy_mlwf": float(np.mean(np.asarray(model.classes)[best] == labels)),
                               "accuracy_onnxruntime": float(np.mean(np.asarray(model.classes)[label] == labels))}
        out[name] = result
    return out


def model_server(store: str, prefix: str, src: Path | None, log: Path) -> Server:
    """``mlwf model serve`` of ``src`` (None: this tree) on 127.0.0.1, with its defaults, ready."""
    return Server(["model", "serve", prefix, "--store", store], ready="/v2/health/ready", env=side_env(src), log=log)


def serving(store: str, made: dict, blobs: list[bytes], requests: int, rounds: int, out: Path,
            before: Path | None, in_process: bool = True) -> dict:
    """Each configuration ``rounds`` times, the ways (HTTP, HTTP to the code before, in process) alternating."""
    import tritonclient.http as triton
    from threadpoolctl import threadpool_limits

    import mlwf.model

    def over_http(client, images):
        tensor = triton.InferInput("image", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
        return client.infer("mlwf", [tensor]).as_numpy("label")

    def http_to(server: Server):
        def call(batches, clients):
            return _load(over_http, batches, clients,
                         lambda: triton.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=120))
        return call

    results = {}
    for name, info in made.items():
        model = mlwf.model.load(info["prefix"], store=store)
        servers = {"http": model_server(store, info["prefix"], None, out / "serving-server.log")}
        if before is not None:
            servers["http_before"] = model_server(store, info["prefix"], before, out / "serving-server-before.log")
        ways = {way: http_to(server) for way, server in servers.items()}
        if in_process:
            def local(batches, clients):
                with threadpool_limits(1):  # the server's own setting: one BLAS thread per call
                    return _load(lambda c, b: model.predict(b), batches, clients, lambda: None)
            ways["in_process"] = local
        try:
            per_model = {}
            for batch in (1, 64):
                n_requests = requests if batch == 1 else max(20, requests // 4)
                batches = [blobs[(i * batch) % (len(blobs) - batch):][:batch] for i in range(n_requests)]
                row = {}
                for clients in (1, 4):
                    runs: dict[str, list[dict]] = {way: [] for way in ways}
                    for r in range(rounds):
                        order = list(ways) if r % 2 == 0 else list(ways)[::-1]  # ABBA: drift hits every way alike
                        for way in order:
                            runs[way].append(ways[way](batches, clients))
                    for way, measured in runs.items():
                        row[f"{way}_{clients}_clients"] = {
                            key: round(statistics.median(m[key] for m in measured), 2)
                            for key in ("requests_per_s", "images_per_s", "p50_ms", "p99_ms")
                        } | {"requests": measured[0]["requests"], "rounds": rounds,
                             "p50_ms_runs": [m["p50_ms"] for m in measured],
                             "p99_ms_runs": [m["p99_ms"] for m in measured]}
                # Same answers every way (the check, not a timing).
                sample = batches[0]
                expected = model.predict(sample).tolist()
                row["same_labels"] = all(
                    [b.decode() for b in over_http(triton.InferenceServerClient(f"127.0.0.1:{server.port}"), sample)]
                    == expected for server in servers.values())
                per_model[f"batch_{batch}"] = row
            results[name] = per_model
        finally:
            for server in servers.values():
                server.stop()
    return results


def _load(call, batches, clients: int, make_client) -> dict:
    """Send every batch, from ``clients`` threads at once; latency per call, calls per second overall."""
    latencies: list[float] = []
    lock = threading.Lock()
    chunks = [batches[i::clients] for i in range(clients)]

    def worker(chunk):
        client = make_client()
        call(client, chunk[0])  # warm-up (connection, first decode), not counted
        mine = []
        for b in chunk:
            t0 = time.perf_counter()
            call(client, b)
            mine.append((time.perf_counter() - t0) * 1e3)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(latencies), "requests_per_s": round(len(latencies) / wall, 1),
            "images_per_s": round(len(latencies) * len(batches[0]) / wall, 1),
            "p50_ms": round(_pct(latencies, 50), 2), "p99_ms": round(_pct(latencies, 99), 2)}


def main() -> None:
    p = arguments(__doc__, "serving", repeats=5)
    p.add_argument("--parts", default="engines,serving", help="what to measure: engines, serving (default both)")
    p.add_argument("--models", default="2k,60k", help="models to measure: 2k, 60k (default both)")
    p.add_argument("--requests", type=int, default=300, help="requests of one image per configuration and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every serving configuration (medians)")
    p.add_argument("--no-in-process", action="store_true", help="serving: leave out the in-process calls")
    before_argument(p)
    a = p.parse_args()
    parts, models = a.parts.split(","), a.models.split(",")
    if set(parts) - {"engines", "serving"} or set(models) - set(MODELS):
        sys.exit("serving.py: --parts takes engines, serving; --models takes 2k, 60k")
    results = {"machine": machine(), "date": now(), "command": command(), "repeats": a.repeats,
               "rounds": a.rounds, "load_average": {"start": load_average()}}
    store = prepare(a.fashion, a.data, extra=[(TRAIN60K, "train", 60000, 0)] if "60k" in models else [])
    work = a.data / "serving"
    work.mkdir(parents=True, exist_ok=True)
    made = results["models"] = train(store, models)
    folder = a.data / TEST10K.replace("/", "_")
    files = sorted(folder.rglob("*.png"))
    blobs = [f.read_bytes() for f in files]
    labels = np.asarray([f.parent.name for f in files])
    if "engines" in parts:
        import onnxruntime

        export(store, made, work)
        results["versions"] = {"onnxruntime": onnxruntime.__version__}
        results["engines"] = engines(store, made, blobs, labels, a.repeats)
        for info in made.values():
            info.pop("onnx_path")
    if "serving" in parts:
        results["before"] = short_commit(a.before) if a.before else None
        if a.before:
            with source_of(a.before) as before:
                results["serving"] = serving(store, made, blobs, a.requests, a.rounds, work, before,
                                             not a.no_in_process)
        else:
            results["serving"] = serving(store, made, blobs, a.requests, a.rounds, work, None, not a.no_in_process)
    results["load_average"]["end"] = load_average()
    write(a.out, "serving.json", results)
    print(tables(results))


WAYS = {"http": "over HTTP", "http_before": "over HTTP, before", "in_process": "in process"}


def tables(r: dict) -> str:
    lines: list[str] = []
    if "engines" in r:
        lines += ["| model | threads | 10k: mlwf predict | 10k: onnxruntime | speed-up | 64 images: mlwf | "
                  "64 images: onnxruntime | same labels (10k) | largest probability difference |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, e in r["engines"].items():
            agree = e["agreement"]
            for key in sorted(k for k in e if k.endswith("_thread")):
                row = e[key]
                lines.append(
                    f"| {name} | {key.split('_')[0]} | {row['mlwf_ms']['median']:.0f} ms "
                    f"({row['mlwf_images_per_s']:,}/s) | {row['onnxruntime_ms']['median']:.0f} ms "
                    f"({row['onnxruntime_images_per_s']:,}/s) | {row['speed_up']:.2f}× | "
                    f"{row['batch_64_mlwf_ms']:.1f} ms | {row['batch_64_onnxruntime_ms']:.1f} ms | "
                    f"{agree['same_labels']:,} of {agree['of']:,} | {agree['max_abs_diff']:.1e} |")
        lines += ["", "| model | decoding 10k PNG files | building the graph | onnxruntime session | file |",
                  "|---|---|---|---|---|"]
        for name, e in r["engines"].items():
            size = r["models"][name]["export"]["bytes"]
            lines.append(f"| {name} | {e['decode_ms']:.0f} ms | {e['graph_build_ms']:.0f} ms | "
                         f"{e['session_create_ms']:.0f} ms | {size / 2**20:.1f} MiB |")
        lines.append("")
    if "serving" in r:
        first = next(iter(next(iter(r["serving"].values())).values()))
        ways = [w for w in WAYS if f"{w}_1_clients" in first]
        label = {**WAYS, "http_before": f"over HTTP, before `{r.get('before')}`"}
        lines += ["| model | batch | clients | " + " | ".join(f"{label[w]}: requests/s | p50 | p99" for w in ways)
                  + " |", "|---|---|---|" + "---|---|---|" * len(ways)]
        for name, s in r["serving"].items():
            for batch, row in s.items():
                for clients in (1, 4):
                    cells = []
                    for w in ways:
                        m = row[f"{w}_{clients}_clients"]
                        cells.append(f"{m['requests_per_s']:.0f} | {m['p50_ms']:.1f} ms | {m['p99_ms']:.1f} ms")
                    lines.append(f"| {name} | {batch.split('_')[1]} | {clients} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
