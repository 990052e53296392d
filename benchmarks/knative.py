"""Knative: the function server under load, and ml-training through two servers against the local backend.

Usage (from the repository root, with mlwf installed with its knative extra):

    python benchmarks/knative.py [--repeats 5] [--rounds 5] [--concurrency 200]
        [--fashion DIR] [--out benchmarks/results/knative]

1. Load: one ``mlwf serve`` process on 127.0.0.1; ``--concurrency`` (200)
   signed invocations of ml-inference's ``partition`` over a 16-image prefix
   sent at once (binary CloudEvents over httpx, one connection each), for
   ``--rounds`` rounds after a warm-up round: requests/s, p50/p99 latency and
   errors (which must be 0).
2. ml-training ``2 8`` on 2,000 Fashion-MNIST images (from ``common.prepare()``),
   warm, through two ``mlwf serve`` processes with per-stage
   endpoints (partition, pca and validation on one, train and score on the other),
   against the local backend, warm, on the same local store (a local store
   is shared by loopback servers; a cluster would use S3/MinIO). Target:
   knative ≤ 2× local.

Writes ``knative.json`` into ``--out`` and prints a markdown table.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

from common import TEST1K, TRAIN, Server, arguments, command, load_average, machine, now, prepare, warm, write

TINY = "ml-inference/tiny-16"


def function_server(env: dict, log: Path, store: str, *args: str, port: int | None = None) -> Server:
    """``mlwf serve`` on 127.0.0.1 over the local store ``store``, ready."""
    return Server(["serve", "--store", store, "--bucket", "tless", *args], ready="/readyz", env=env, log=log,
                  port=port, timeout=60)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = max(0, min(len(values) - 1, int(round(q / 100 * len(values) + 0.5)) - 1))
    return values[k]


async def load_round(url: str, store: str, secret: str, n: int) -> tuple[list[float], int, float]:
    import httpx

    from mlwf.backends.knative import events
    from mlwf.engine.calls import Call, RunContext

    run_id = f"bench-{time.time_ns()}"
    ctx = RunContext(run_id, "ml-inference", store, "tless", f"ml-inference/outputs/{run_id}").to_json()
    messages = []
    for i in range(n):
        call = Call("ml-inference", "partition", i, {"prefix": TINY, "num_funcs": 2}).to_json()
        messages.append(events.to_http(events.call_event(call, ctx, secret)))
    latencies, errors = [], 0
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        async def one(headers, body):
            nonlocal errors
            t = time.perf_counter()
            try:
                resp = await client.post(url, content=body, headers=headers)
                ok = resp.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append((time.perf_counter() - t) * 1e3)
            errors += not ok

        t0 = time.perf_counter()
        await asyncio.gather(*(one(h, b) for h, b in messages))
        wall = time.perf_counter() - t0
    return latencies, errors, wall


def main() -> None:
    p = arguments(__doc__, "knative", repeats=5)
    p.add_argument("--concurrency", type=int, default=200, help="invocations sent at once (default 200)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of load after a warm-up round (default 5)")
    a = p.parse_args()

    from mlwf import bulk
    from mlwf.engine.driver import Engine
    from mlwf.storage import StoreSpec

    store_url = prepare(a.fashion, a.data)
    store = StoreSpec(store_url, "tless").open()
    folder = a.data / TEST1K.replace("/", "_")
    tiny = sorted(folder.rglob("*.png"))[:16]
    with tempfile.TemporaryDirectory() as tmp:
        for png in tiny:
            (Path(tmp) / png.parent.name).mkdir(exist_ok=True)
            (Path(tmp) / png.parent.name / png.name).write_bytes(png.read_bytes())
        bulk.upload_dir(store, tmp, TINY)

    secret = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLWF_", "S3_"))}
    env["MLWF_FUNCTION_SECRET"] = secret
    os.environ["MLWF_FUNCTION_SECRET"] = secret
    logs = Path(tempfile.mkdtemp(prefix="mlwf-knative-bench-"))
    results: dict = {"machine": machine(), "date": now(), "command": command(), "repeats": a.repeats,
                     "load_average_at_start": load_average(), "logs": str(logs)}

    # --- 1. load: `concurrency` signed invocations at once, several rounds
    server = function_server(env, logs / "load.log", store_url)
    try:
        asyncio.run(load_round(server.url, store_url, secret, a.concurrency))  # warm-up
        lat, errors, walls = [], 0, []
        for _ in range(a.rounds):
            lats, e, w = asyncio.run(load_round(server.url, store_url, secret, a.concurrency))
            lat += lats
            errors += e
            walls.append(w)
    finally:
        load_exit = server.stop()
    results["load"] = {"stage": "ml-inference/partition (16 images)", "concurrency": a.concurrency,
                       "rounds": a.rounds, "requests": len(lat), "errors": errors,
                       "requests_per_s": round(len(lat) / sum(walls), 1),
                       "p50_ms": round(pct(lat, 50), 1), "p99_ms": round(pct(lat, 99), 1),
                       "max_ms": round(max(lat), 1), "server_exit": load_exit}

    # --- 2. ml-training `2 8` on 2k images, warm: two loopback servers vs the local backend
    # CPU-bound stages: each server runs its calls in worker processes (one per core), as the local backend does.
    cores = str(os.cpu_count() or 1)
    a_srv = function_server(env, logs / "a.log", store_url, "--stages",
                            "ml-training/partition,ml-training/pca,ml-training/validation", "--workers", cores)
    b_srv = function_server(env, logs / "b.log", store_url, "--stages", "ml-training/train,ml-training/score",
                            "--workers", cores)
    try:
        endpoints = [f"ml-training/partition={a_srv.url}", f"ml-training/pca={a_srv.url}",
                     f"ml-training/validation={a_srv.url}", f"ml-training/train={b_srv.url}",
                     f"ml-training/score={b_srv.url}"]
        with Engine(store_url, "tless", backend="knative", backend_options={"endpoints": endpoints}) as engine:
            kn = warm(lambda: engine.run_training(TRAIN, 2, 8, publish=False), a.repeats)
    finally:
        exits = [a_srv.stop(), b_srv.stop()]
    with Engine(store_url, "tless") as engine:
        local = warm(lambda: engine.run_training(TRAIN, 2, 8, publish=False), a.repeats)
    for r in (kn, local):
        r["last"] = {k: r["last"][k] for k in ("backend", "e2e_ms", "stage_ms", "state_transfer_ms",
                                               "validation_accuracy", "model_digest")}
    results["training_knative_warm"] = kn
    results["training_local_warm"] = local
    results["training_ratio"] = round(kn["wall_ms"]["median"] / local["wall_ms"]["median"], 2)
    results["same_model"] = kn["last"]["model_digest"] == local["last"]["model_digest"]
    results["server_exits"] = exits

    results["load_average_at_end"] = load_average()
    write(a.out, "knative.json", results)
    print(table(results))
    if errors or not results["same_model"]:
        sys.exit(1)


def table(r: dict) -> str:
    ld, kn, lo = r["load"], r["training_knative_warm"], r["training_local_warm"]

    def ms(s):
        return f"{s['median']:.0f} ms ({s['min']:.0f}–{s['max']:.0f})"

    rows = [
        "| measure | knative backend (loopback) | local backend | ratio | target |",
        "|---|---|---|---|---|",
        f"| {ld['concurrency']} concurrent signed invocations ({ld['stage']}), {ld['requests']} in all | "
        f"{ld['requests_per_s']:.0f} requests/s; p50 {ld['p50_ms']:.0f} ms, p99 {ld['p99_ms']:.0f} ms; "
        f"{ld['errors']} errors | | | 0 errors |",
        f"| ml-training 2k `2 8`, warm, 2 servers per stage | {ms(kn['wall_ms'])} | {ms(lo['wall_ms'])} | "
        f"{r['training_ratio']:.2f} | ≤ 2× |",
        f"| same model bytes | {'yes' if r['same_model'] else 'NO'} ({kn['last']['model_digest'][:12]}…) | | | yes |",
        f"| state transfer, last warm run | {kn['last']['state_transfer_ms']:.0f} ms | "
        f"{lo['last']['state_transfer_ms']:.0f} ms | | |",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
