"""S3: mlwf's S3 client against plain boto3, and ml-training on S3 against the local store.

Usage (from the repository root, with mlwf[s3] and moto[server] installed):

    python benchmarks/s3.py [--runs 3] [--threads 32] [--fast-n 5000] [--fashion DIR]
        [--out benchmarks/results/s3]

Four measurements, all in one run (the ratios are what matter: moto, the
default server, is a Python server doing a few hundred small requests/s, so it
is the bottleneck of every moto figure):

1. **read**: ``S3Store.list`` + ``S3Store.get_many`` of the 2,000 Fashion-MNIST
   training PNGs (``ml-training/fashion-2k`` in bucket ``tless``, copied from
   the local store that ``common.prepare()`` builds) against a plain
   concurrent boto3 reader (``list_objects_v2`` pages + ``get_object`` on a
   32-thread pool, one shared client, ``max_pool_connections=64``): the ceiling.
   Target: our rate ≥ 90 % of boto3's.
2. **upload-dir**: ``mlwf.bulk.upload_dir`` of the same 2,000 files (the path
   ``mlwf s3 upload-dir`` takes) into a fresh bucket, against a plain
   concurrent boto3 uploader (walk the folder, read, ``put_object`` on the
   same pool) into another fresh bucket. Target: ≥ 90 %.
3. **ml-training `2 8`** (default settings) with all state in S3 against the
   same run on a local store holding the same images, both warm
   (``Engine.run_training``; one warm-up run, then the runs alternate). The
   extra cost (S3 − local) is set against the boto3 reader's time for the
   2,000 objects. Target: extra ≤ 1.5 × reader time.
4. **client ceiling**: a no-op S3-ish responder on 127.0.0.1 (a separate
   process; raw asyncio HTTP/1.1 with keep-alive: every GET answers 200 with
   a fixed 800-byte body, every PUT 200 + ETag), so the client is the
   bottleneck: ``get_many``/``put_many`` of 5,000 keys against the boto3
   threaded reader/uploader. What a user would see against a fast server
   (e.g. MinIO); there is no target, it is a statement.

Every figure is the median of ``--runs`` runs (with min–max) after a warm-up;
ours and boto3 alternate (ABBA…) so a drifting server hurts both alike.
Client CPU is this process's CPU time (obstore's Rust threads included);
server CPU is read from /proc for the server process.

The moto server is started here on 127.0.0.1 unless an endpoint is set in the
environment (``S3_HOST``/``S3_PORT``/``S3_USER``/``S3_PASSWORD`` or
``AWS_ENDPOINT_URL``/``AWS_*``). Writes ``s3.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from common import default_fashion  # noqa: E402

TRAIN = "ml-training/fashion-2k"
BUCKET = "tless"
NOOP_BODY = bytes(range(256)) * 3 + bytes(32)  # 800 bytes
LOOPBACK = "127.0.0.1"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- helpers
def boto3_client(endpoint: str | None, region: str, user: str | None, password: str | None, pool: int):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=user,
        aws_secret_access_key=password,
        config=Config(max_pool_connections=pool, retries={"max_attempts": 5, "mode": "standard"},
                      connect_timeout=10, read_timeout=60),
    )


def proc_cpu(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` (0.0 if unknown)."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def summary(values: list[float], digits: int = 3) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": [round(v, digits) for v in values]}


def measure(cases: dict, runs: int, server_pid: int | None = None) -> dict:
    """Time each case ``runs`` times, alternating the order every round, after one warm-up each.

    ``cases`` maps a label to a function ``prep() -> fn``: ``prep`` (untimed)
    sets up one run (a fresh bucket, say), ``fn()`` is timed and may return a
    check function, called untimed afterwards.
    """
    out = {label: {"wall": [], "cpu": [], "server_cpu": []} for label in cases}
    labels = list(cases)
    for label in labels:  # warm-up
        check = cases[label]()()
        if callable(check):
            check()
    for r in range(runs):
        for label in (labels if r % 2 == 0 else labels[::-1]):
            fn = cases[label]()
            s0 = proc_cpu(server_pid)
            c0, t0 = time.process_time(), time.perf_counter()
            check = fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            out[label]["wall"].append(wall)
            out[label]["cpu"].append(cpu)
            out[label]["server_cpu"].append(proc_cpu(server_pid) - s0)
            if callable(check):
                check()
    return {label: {k: summary(v) for k, v in d.items()} for label, d in out.items()}


def machine() -> dict:
    import boto3
    import obstore

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {"python": platform.python_version(), "boto3": boto3.__version__,
                "obstore": getattr(obstore, "__version__", "?")}
    try:
        import moto

        versions["moto"] = moto.__version__
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "memory_gib": round(mem, 1), **versions}


# --------------------------------------------------------------------------- no-op S3 responder
class _NoopS3(asyncio.Protocol):
    """HTTP/1.1 with keep-alive: GET → 200 + NOOP_BODY, PUT → 200 + ETag, anything else → 200.

    Bounded: a request head over 64 KiB or a body over 64 MiB closes the connection.
    """

    HEAD_LIMIT = 64 * 1024
    BODY_LIMIT = 64 * 1024 * 1024
    COMMON = (b"ETag: \"0123456789abcdef0123456789abcdef\"\r\n"
              b"Last-Modified: Wed, 26 Nov 2025 12:00:00 GMT\r\n"
              b"x-amz-request-id: 0\r\nServer: noop\r\n")
    GET = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + COMMON
           + b"Content-Length: " + str(len(NOOP_BODY)).encode() + b"\r\n\r\n" + NOOP_BODY)
    HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + COMMON
            + b"Content-Length: " + str(len(NOOP_BODY)).encode() + b"\r\n\r\n")
    OTHER = b"HTTP/1.1 200 OK\r\n" + COMMON + b"Content-Length: 0\r\n\r\n"

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buf = bytearray()
        self.method = b""
        self.body_left = -1  # -1: reading the head; >= 0: plain body bytes left
        self.chunked = False
        self.close_after = False

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self._step():
            pass

    def _step(self) -> bool:
        """Advance the parser; True if it made progress and may continue."""
        if self.body_left < 0 and not self.chunked:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > self.HEAD_LIMIT:
                    self.transport.close()
                return False
            head = bytes(self.buf[:end]).split(b"\r\n")
            del self.buf[: end + 4]
            self.method = head[0].split(b" ", 1)[0].upper()
            headers = {}
            for line in head[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip().lower()
            self.close_after = headers.get(b"connection") == b"close"
            if headers.get(b"expect") == b"100-continue":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if b"chunked" in headers.get(b"transfer-encoding", b""):
                self.chunked, self.body_left = True, -1
            else:
                try:
                    self.body_left = int(headers.get(b"content-length", b"0"))
                except ValueError:
                    self.transport.close()
                    return False
                if self.body_left > self.BODY_LIMIT:
                    self.transport.close()
                    return False
            return True
        if self.chunked:
            return self._chunk()
        take = min(self.body_left, len(self.buf))
        del self.buf[:take]
        self.body_left -= take
        if self.body_left:
            return False
        self._respond()
        return True

    def _chunk(self) -> bool:
        eol = self.buf.find(b"\r\n")
        if eol < 0:
            if len(self.buf) > self.HEAD_LIMIT:
                self.transport.close()
            return False
        try:
            size = int(bytes(self.buf[:eol]).split(b";", 1)[0].strip() or b"0", 16)
        except ValueError:
            self.transport.close()
            return False
        if size > self.BODY_LIMIT:
            self.transport.close()
            return False
        if size:
            if len(self.buf) < eol + 2 + size + 2:
                return False
            del self.buf[: eol + 2 + size + 2]
            return True
        # last chunk: optional trailer lines, then an empty line
        if self.buf[eol + 2 : eol + 4] == b"\r\n":
            end = eol + 4
        else:
            end = self.buf.find(b"\r\n\r\n", eol + 2)
            if end < 0:
                if len(self.buf) > self.HEAD_LIMIT:
                    self.transport.close()
                return False
            end += 4
        del self.buf[:end]
        self.chunked = False
        self.body_left = 0
        self._respond()
        return True

    def _respond(self) -> None:
        m = self.method
        self.transport.write(self.GET if m == b"GET" else self.HEAD if m == b"HEAD" else self.OTHER)
        self.body_left = -1
        if self.close_after:
            self.transport.close()


def serve_noop(port: int) -> None:
    """Run the no-op responder on 127.0.0.1:port until terminated."""

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_NoopS3, LOOPBACK, port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class NoopServer:
    """The responder in a separate process (this script with ``--serve-noop``)."""

    def __init__(self) -> None:
        from tests.s3server import free_port

        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 15.0) -> NoopServer:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-noop", str(self.port)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"no-op responder exited with code {self.proc.returncode}")
            try:
                conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=1)
                conn.request("GET", "/noop/probe")
                ok = conn.getresponse().read() == NOOP_BODY
                conn.close()
                if ok:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"no-op responder did not answer on {self.endpoint} within {timeout} s")

    def stop(self) -> None:
        from tests.s3server import stop_process

        proc, self.proc = self.proc, None
        stop_process(proc)


# --------------------------------------------------------------------------- data
def local_images(data: Path, fashion: Path) -> tuple[Path, Path, list[str], list[bytes]]:
    """The prepared local store, the upload folder, and the training keys and bytes (sorted by key)."""
    from mlwf.storage import StoreSpec

    store_root, folder = data / "store", data / TRAIN.replace("/", "_")
    if not (store_root / BUCKET / TRAIN).is_dir() or not folder.is_dir():
        log(f"preparing the Fashion-MNIST local store under {data} (common.prepare)")
        import common

        common.prepare(fashion, data)
    local = StoreSpec(str(store_root), BUCKET).open()
    keys = [o.key for o in local.list(TRAIN + "/")]
    images = local.get_many(keys)
    local.close()
    n_files = sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if len(keys) != 2000 or n_files != 2000:
        raise SystemExit(f"expected 2,000 training images, found {len(keys)} in the store, {n_files} in {folder}")
    return store_root, folder, keys, images


# --------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement, median reported (default 3)")
    parser.add_argument("--threads", type=int, default=32, help="boto3 threads (default 32)")
    parser.add_argument("--fast-n", type=int, default=5000, help="keys against the no-op responder (default 5000)")
    parser.add_argument("--data", type=Path, default=HERE / "data", help="the benchmarks' data folder")
    parser.add_argument("--fashion", type=Path, default=default_fashion(),
                        help="Fashion-MNIST IDX files, used only if the data folder is not prepared yet")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "s3",
                        help="folder for s3.json (default benchmarks/results/s3)")
    parser.add_argument("--serve-noop", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_noop:
        serve_noop(args.serve_noop)
        return 0
    if not 1 <= args.runs <= 20 or not 1 <= args.fast_n <= 100_000 or not 1 <= args.threads <= 256:
        parser.error("--runs in [1, 20], --threads in [1, 256], --fast-n in [1, 100000]")

    t_start = time.perf_counter()
    from tests.s3server import MotoServer, free_port  # noqa: F401

    info = machine()
    store_root, folder, keys, images = local_images(args.data, args.fashion)
    avg = sum(map(len, images)) / len(images)
    log(f"{len(images)} Fashion-MNIST PNGs, {avg:.0f} bytes on average; {info['cpu']}, {info['cores']} cores")

    server = None
    if not (os.environ.get("S3_HOST") or os.environ.get("AWS_ENDPOINT_URL")):
        server = MotoServer().start()
        os.environ.update(server.env())  # before any Engine is created: workers read it
        log(f"started moto on {server.endpoint} (pid {server.proc.pid})")
    server_pid = server.proc.pid if server else None
    noop = None
    tmp_root = None
    engines: list = []
    results: dict = {"machine": info, "runs": args.runs, "threads": args.threads,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "objects": len(images), "avg_object_bytes": round(avg)}
    try:
        from mlwf import bulk
        from mlwf.settings import Settings
        from mlwf.storage.s3 import S3Store
        from mlwf.storage.s3.config import credentials_from, endpoint_from

        endpoint, _ = endpoint_from(Settings.resolve())
        creds = credentials_from(Settings.resolve())
        region = os.environ.get("AWS_REGION") or "us-east-1"
        user, password = (creds.access_key, creds.secret_key) if creds else (None, None)
        bucket = BUCKET if server else (os.environ.get("S3_BENCH_BUCKET") or f"bench-{uuid.uuid4().hex[:8]}")
        store = S3Store.from_url("s3://", bucket)
        store.create_bucket()
        store.put_many(zip(keys, images))
        client = boto3_client(endpoint, region, user, password, 64)
        pool = ThreadPoolExecutor(args.threads)
        results["endpoint"] = store.location
        results["server"] = "moto server started here, one process" if server else "endpoint from the environment"
        results["concurrency_ours"] = store.concurrency
        prefix = TRAIN + "/"

        # ---- 1. list + get the 2,000 images
        log(f"1/4 list + get {len(keys)} objects: S3Store vs boto3 ({args.runs} runs each + warm-up)")

        def boto3_read():
            found = []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                found += [o["Key"] for o in page.get("Contents", [])]
            data = list(pool.map(lambda k: client.get_object(Bucket=bucket, Key=k)["Body"].read(), found))
            return lambda: _check(data == images, "boto3 read back different bytes")

        def ours_read():
            data = store.get_many([o.key for o in store.list(prefix)])
            return lambda: _check(data == images, "S3Store read back different bytes")

        results["read"] = measure({"ours": lambda: ours_read, "boto3": lambda: boto3_read}, args.runs, server_pid)

        # ---- 2. upload-dir into a fresh bucket
        log(f"2/4 upload-dir of {len(keys)} files: mlwf.bulk.upload_dir vs boto3, each into a fresh bucket")
        files = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
        up_keys = [f"{TRAIN}/{p.relative_to(folder).as_posix()}" for p in files]
        made: list[str] = []

        def fresh_bucket() -> str:
            name = f"bench-up-{uuid.uuid4().hex[:10]}"
            client.create_bucket(Bucket=name)
            made.append(name)
            return name

        def count(name: str) -> int:
            n = 0
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix):
                n += len(page.get("Contents", []))
            return n

        def prep_ours():
            name = fresh_bucket()

            def run():
                s = S3Store.from_url("s3://", name)
                counts = bulk.upload_dir(s, folder, TRAIN)
                s.close()
                return lambda: _check(counts["uploaded"] == len(files) and count(name) == len(files),
                                      f"upload_dir stored {counts} in {name}")
            return run

        def prep_boto3():
            name = fresh_bucket()

            def put(i: int) -> None:
                client.put_object(Bucket=name, Key=up_keys[i], Body=files[i].read_bytes())

            def run():
                list(pool.map(put, range(len(files))))
                return lambda: _check(count(name) == len(files), f"boto3 uploader stored too few in {name}")
            return run

        results["upload_dir"] = measure({"ours": prep_ours, "boto3": prep_boto3}, args.runs, server_pid)
        for name in made:  # keep moto small for what follows (bounded: 2 × (runs + 1) buckets)
            S3Store.from_url("s3://", name).delete_many(up_keys)
            client.delete_bucket(Bucket=name)

        # ---- 3. ml-training `2 8`, state in S3 vs on the local store
        log("3/4 ml-training `2 8`: S3 (moto) vs local store, warm (one warm-up, then alternating runs)")
        from mlwf.engine.driver import Engine
        from mlwf.storage import StoreSpec

        tmp_root = Path(tempfile.mkdtemp(prefix="s3bench-store-", dir=args.data))
        local_copy = StoreSpec(str(tmp_root), BUCKET).open()  # a private copy: the shared store's model stays
        local_copy.create_bucket()
        local_copy.put_many(zip(keys, images))
        local_copy.close()
        s3_engine = Engine("s3://", bucket)
        engines.append(s3_engine)
        local_engine = Engine(str(tmp_root), BUCKET)
        engines.append(local_engine)
        reports: dict[str, list] = {"s3": [], "local": []}

        def training(engine, label):
            def run():
                reports[label].append(engine.run_training(TRAIN, 2, 8))
            return lambda: run

        results["training"] = measure({"s3": training(s3_engine, "s3"), "local": training(local_engine, "local")},
                                      args.runs, server_pid)
        for label, rs in reports.items():
            last = rs[-1]
            results["training"][label]["last"] = {
                "validation_accuracy": last["validation_accuracy"], "model_digest": last["model_digest"],
                "num_images": last["num_images"], "e2e_ms": summary([r["e2e_ms"] for r in rs[1:]], 1)}
        for e in engines:
            e.close()
        engines.clear()

        # ---- 4. the client's ceiling against a no-op responder
        log(f"4/4 {args.fast_n} GETs and PUTs against a no-op responder on 127.0.0.1: S3Store vs boto3")
        noop = NoopServer().start()
        fast = S3Store("noop-bench", endpoint=noop.endpoint, region=region, credentials=creds)
        fclient = boto3_client(noop.endpoint, region, user, password, 64)
        fkeys = [f"imgs/{i:06d}.png" for i in range(args.fast_n)]
        payload = NOOP_BODY

        def f_ours_get():
            data = fast.get_many(fkeys)
            return lambda: _check(len(data) == len(fkeys) and data[-1] == NOOP_BODY, "no-op GET via S3Store")

        def f_boto3_get():
            data = list(pool.map(lambda k: fclient.get_object(Bucket="noop-bench", Key=k)["Body"].read(), fkeys))
            return lambda: _check(len(data) == len(fkeys) and data[-1] == NOOP_BODY, "no-op GET via boto3")

        def f_ours_put():
            fast.put_many((k, payload) for k in fkeys)

        def f_boto3_put():
            list(pool.map(lambda k: fclient.put_object(Bucket="noop-bench", Key=k, Body=payload), fkeys))

        noop_pid = noop.proc.pid
        results["fast_get"] = measure({"ours": lambda: f_ours_get, "boto3": lambda: f_boto3_get}, args.runs, noop_pid)
        results["fast_put"] = measure({"ours": lambda: f_ours_put, "boto3": lambda: f_boto3_put}, args.runs, noop_pid)
        results["fast_n"] = args.fast_n
        fast.close()
        pool.shutdown()
        store.close()
    finally:
        for e in engines:
            e.close()
        if noop is not None:
            noop.stop()
        if server is not None:
            server.stop()
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)

    results["total_s"] = round(time.perf_counter() - t_start, 1)
    text = table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    results["table"] = text
    (args.out / "s3.json").write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    log(f"wrote {args.out / 's3.json'} (total {results['total_s']} s)")
    return 0


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"check failed: {what}")


# --------------------------------------------------------------------------- report
def table(r: dict) -> str:
    n, fn = r["objects"], r.get("fast_n", 0)

    def t(s):  # a wall-time summary
        return f"{s['median']:.2f} s ({s['min']:.2f}–{s['max']:.2f})"

    def rate(s, count):
        return f"{count / s['median']:,.0f}/s ({count / s['max']:,.0f}–{count / s['min']:,.0f})"

    def cpu(d, count):
        return f"{d['cpu']['median'] * 1e6 / count:,.0f} µs/req"

    def ok(flag):
        return "✅" if flag else "❌"

    rows = [
        "| # | measure (median of %d, min–max) | mlwf | plain boto3 / local | ratio | target | met |" % r["runs"],
        "|---|---|---|---|---|---|---|",
    ]
    rd, up = r["read"], r["upload_dir"]
    for i, (label, d) in enumerate((("list + get_many, 2,000 PNGs (moto)", rd),
                                     ("upload-dir, 2,000 files, fresh bucket (moto)", up)), 1):
        ratio = d["boto3"]["wall"]["median"] / d["ours"]["wall"]["median"]
        r.setdefault("ratios", {})[("read" if i == 1 else "upload_dir")] = round(ratio, 3)
        rows.append(f"| {i} | {label}: wall | {t(d['ours']['wall'])} | {t(d['boto3']['wall'])} | | | |")
        rows.append(f"| {i} | {label}: objects/s | {rate(d['ours']['wall'], n)} | {rate(d['boto3']['wall'], n)} "
                    f"| **{100 * ratio:.0f} %** of boto3 | ≥ 90 % | {ok(ratio >= 0.9)} |")
        rows.append(f"| {i} | {label}: client CPU; server CPU | {d['ours']['cpu']['median']:.2f} s; "
                    f"{d['ours']['server_cpu']['median']:.2f} s | {d['boto3']['cpu']['median']:.2f} s; "
                    f"{d['boto3']['server_cpu']['median']:.2f} s | | | |")
    tr = r["training"]
    s3, loc = tr["s3"]["wall"], tr["local"]["wall"]
    extra = s3["median"] - loc["median"]
    paired = [a - b for a, b in zip(s3["runs"], loc["runs"])]
    reader = rd["boto3"]["wall"]["median"]
    r["ratios"]["training_extra_over_reader"] = round(extra / reader, 3)
    rows.append(f"| 3 | ml-training `2 8`, warm: S3 (moto) vs local store | {t(s3)} | {t(loc)} | | | |")
    rows.append(f"| 3 | ml-training `2 8`: server CPU during the run | {tr['s3']['server_cpu']['median']:.2f} s | | "
                f"| | |")
    rows.append(f"| 3 | extra cost S3 − local vs boto3 reader time ({reader:.2f} s) | "
                f"{extra:.2f} s ({min(paired):.2f}–{max(paired):.2f}) | 1.5 × {reader:.2f} = {1.5 * reader:.2f} s | "
                f"**{extra / reader:.2f} ×** reader | ≤ 1.5 × | {ok(extra <= 1.5 * reader)} |")
    acc_s3, acc_loc = tr["s3"]["last"]["validation_accuracy"], tr["local"]["last"]["validation_accuracy"]
    same = tr["s3"]["last"]["model_digest"] == tr["local"]["last"]["model_digest"]
    rows.append(f"| 3 | held-out accuracy / same model bytes | {100 * acc_s3:.1f} % | {100 * acc_loc:.1f} % | "
                f"{'identical model' if same else 'models differ'} | | |")
    for key, label in (("fast_get", f"get_many, {fn:,} keys, no-op responder"),
                       ("fast_put", f"put_many, {fn:,} keys, no-op responder")):
        d = r[key]
        ratio = d["boto3"]["wall"]["median"] / d["ours"]["wall"]["median"]
        r["ratios"][key] = round(ratio, 2)
        rows.append(f"| 4 | {label}: requests/s | {rate(d['ours']['wall'], fn)} | {rate(d['boto3']['wall'], fn)} "
                    f"| {ratio:.1f} × boto3 | (statement) | |")
        rows.append(f"| 4 | {label}: client CPU; server CPU | {cpu(d['ours'], fn)}; "
                    f"{d['ours']['server_cpu']['median']:.2f} s | {cpu(d['boto3'], fn)}; "
                    f"{d['boto3']['server_cpu']['median']:.2f} s | | | |")
    m = r["machine"]
    head = (f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['memory_gib']} GiB; "
            f"Python {m['python']}, boto3 {m['boto3']}, obstore {m['obstore']}, moto {m.get('moto', '-')}. "
            f"Endpoint {r['endpoint']} ({r['server']}); {n:,} objects of {r['avg_object_bytes']} B avg; "
            f"boto3 {r['threads']} threads / 64 connections, ours {r['concurrency_ours']} requests in flight. "
            f"Total {r['total_s']} s.")
    return head + "\n\n" + "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
