"""Our S3 store (obstore + asyncio) against a plain concurrent boto3 client.

Uploads N small PNG images (about 800 bytes each) to an S3 endpoint, then
measures, as the median of R runs:

(a) boto3 reader: list_objects_v2 pages + get_object on a ThreadPoolExecutor
    (32 threads, one shared client, max_pool_connections=64);
(b) ours: ``S3Store.list`` + ``S3Store.get_many``;
(c) boto3 uploader (same pool) against ``S3Store.put_many``.

Besides wall time it reports the CPU time of this (client) process: against
a slow local server that is the fairer measure of client overhead.

The endpoint comes from the environment as for ``s3://`` stores (``S3_HOST``/
``S3_PORT``/``S3_USER``/``S3_PASSWORD`` or ``AWS_ENDPOINT_URL``/``AWS_*``);
with none set, a moto server is started on 127.0.0.1 (a Python server: it is
then the bottleneck, so the ratio says more than the absolute rates).

    python benchmarks/s3_client.py [--n 2000] [--runs 3] [--threads 32]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))


def make_pngs(n: int, seed: int = 0) -> list[bytes]:
    """n distinct 16x16 noisy PNGs, about 800-900 bytes each."""
    from PIL import Image

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img = Image.frombytes("RGB", (16, 16), bytes(rng.getrandbits(8) for _ in range(16 * 16 * 3)))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def boto3_client(endpoint: str | None, region: str, user: str | None, password: str | None, pool: int):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=user,
        aws_secret_access_key=password,
        config=Config(max_pool_connections=pool, retries={"max_attempts": 5, "mode": "standard"}),
    )


def median_time(fn, runs: int) -> tuple[float, float]:
    """Median wall time and median CPU time of this (client) process, in seconds."""
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="objects (default 2000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement, median reported (default 3)")
    parser.add_argument("--threads", type=int, default=32, help="boto3 threads (default 32)")
    args = parser.parse_args()

    from mlwf.storage.s3 import S3Store, _env_credentials, _env_endpoint

    server = None
    if not (os.environ.get("S3_HOST") or os.environ.get("AWS_ENDPOINT_URL")):
        from tests.s3server import MotoServer

        server = MotoServer().start()
        os.environ.update(server.env())
        print(f"no endpoint in the environment: started moto on {server.endpoint}", file=sys.stderr)
    try:
        endpoint, _ = _env_endpoint()
        creds = _env_credentials()
        region = os.environ.get("AWS_REGION") or "us-east-1"
        bucket = os.environ.get("S3_BENCH_BUCKET") or f"bench-{uuid.uuid4().hex[:8]}"
        store = S3Store.from_url("s3://", bucket)
        store.create_bucket()
        client = boto3_client(
            endpoint, region, creds.access_key if creds else None, creds.secret_key if creds else None, 64
        )
        pool = ThreadPoolExecutor(args.threads)

        images = make_pngs(args.n)
        avg = sum(map(len, images)) / len(images)
        prefix = f"bench-{uuid.uuid4().hex[:6]}/imgs/"
        keys = [f"{prefix}{i:05d}.png" for i in range(args.n)]
        store.put_many(zip(keys, images))
        print(
            f"endpoint {store.url}, bucket {bucket}: {args.n} objects of {avg:.0f} bytes on average, "
            f"median of {args.runs} runs, boto3 with {args.threads} threads, ours with "
            f"{store.concurrency} requests in flight",
            file=sys.stderr,
        )

        def boto3_read():
            found = []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                found += [o["Key"] for o in page.get("Contents", [])]
            data = list(pool.map(lambda k: client.get_object(Bucket=bucket, Key=k)["Body"].read(), found))
            assert data == images, "boto3 read back different bytes"

        def ours_read():
            found = [o.key for o in store.list(prefix)]
            data = store.get_many(found)
            assert data == images, "S3Store read back different bytes"

        up = {"n": 0}

        def upload_keys() -> list[str]:
            up["n"] += 1
            return [f"bench-up/{up['n']}/{i:05d}.png" for i in range(args.n)]

        def boto3_write():
            ks = upload_keys()
            list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), zip(ks, images)))

        def ours_write():
            store.put_many(zip(upload_keys(), images))

        # warm up connections on both sides
        boto3_read()
        ours_read()
        rows = []
        for label, theirs, ours in (
            ("list + get all", boto3_read, ours_read),
            ("put all", boto3_write, ours_write),
        ):
            t_theirs, cpu_theirs = median_time(theirs, args.runs)
            t_ours, cpu_ours = median_time(ours, args.runs)
            rows.append((label, t_theirs, t_ours, cpu_theirs, cpu_ours))

        print(f"\n{args.n} objects of ~{avg:.0f} B, endpoint {store.url}, median of {args.runs} runs\n")
        print(
            "| operation | boto3 (s) | boto3 obj/s | ours (s) | ours obj/s | ours/boto3 time "
            "| client CPU boto3 (s) | client CPU ours (s) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for label, t_theirs, t_ours, cpu_theirs, cpu_ours in rows:
            print(
                f"| {label} | {t_theirs:.3f} | {args.n / t_theirs:,.0f} | {t_ours:.3f} | "
                f"{args.n / t_ours:,.0f} | {t_ours / t_theirs:.2f} | {cpu_theirs:.2f} | {cpu_ours:.2f} |"
            )
        pool.shutdown()
        store.close()
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
