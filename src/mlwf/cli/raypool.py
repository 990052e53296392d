"""``mlwf ray pool start|status|stop``: the warm worker pool the Ray backend uses on a cluster
(:mod:`mlwf.backends.ray.pool`)."""

from __future__ import annotations

import contextlib
import json
import math
import sys

from mlwf.cli.options import Parser
from mlwf.errors import UsageError


def add_parsers(sub) -> None:
    """``mlwf ray pool start|status|stop``."""
    ray_parser = sub.add_parser("ray", help="the Ray cluster's mlwf worker pool (warm workers kept across runs)")
    rs = ray_parser.add_subparsers(dest="ray_command", required=True, parser_class=Parser)
    pool = rs.add_parser("pool", help="start, look at or stop the worker pool",
                         description="A pool of warm mlwf workers on a running Ray cluster: 'mlwf run --backend ray' "
                                     "from any machine sends them its calls instead of starting Ray workers "
                                     "that import scikit-learn in every run.")
    ps = pool.add_subparsers(dest="pool_command", required=True, parser_class=Parser)
    start = ps.add_parser("start", help="start the pool: one worker per CPU of the cluster (or --size)")
    start.add_argument("--size", type=int, help="workers (default: one per CPU of the cluster's nodes)")
    start.add_argument("--timeout", type=float, default=300.0,
                       help="seconds the workers may take to start (default 300)")
    status = ps.add_parser("status", help="the pool's code, workers and the calls each has run")
    stop = ps.add_parser("stop", help="remove the pool (calls still running on it fail, and are retried as tasks)")
    for p in (start, status, stop):
        p.add_argument("--ray-address", default=None,
                       help="the Ray cluster (HOST:PORT of the head's GCS; default: $RAY_ADDRESS)")
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
        p.add_argument("--debug", action="store_true", help="show tracebacks")


def handle(args) -> int:
    from mlwf.settings import Settings

    settings = Settings.resolve(ray_address=args.ray_address)
    address = _address(settings, args.pool_command)
    if args.pool_command == "start" and (args.size is not None and args.size < 1):
        raise UsageError(f"--size {args.size}: give a number of workers of at least 1")
    if args.pool_command == "start" and not (math.isfinite(args.timeout) and 0 < args.timeout <= 3600):
        raise UsageError(f"--timeout {args.timeout:g}: give seconds between 0 and 3600")
    from mlwf.backends import backend_class

    backend_class("ray")  # a one-line hint if Ray is not installed
    from mlwf.backends.ray import cluster

    timeout = cluster.connect_timeout(settings)
    # Under --json only the answer goes to stdout (Ray prints worker-death notices there).
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet:
        doc, text = _act(args, address, timeout, settings)
    print(json.dumps(doc) if args.json else text)
    return 0


def _act(args, address: str, timeout: float, settings) -> tuple[dict, str]:
    """Join the cluster, do the command, leave; returns the answer as JSON and as text."""
    from mlwf.backends.ray import cluster, pool

    cluster.join(address, timeout, token_missing=settings.ray_token_missing, local_fallback=False)
    try:
        if args.pool_command == "start":
            described = pool.start(args.size, settings.workflow_modules, args.timeout)
            described.pop("workers", None)
            return ({"started": True, "address": address, **described},
                    f"started the mlwf worker pool on the Ray cluster at {address}: {described['size']} workers, "
                    + pool.describe_code(described["version"], described["fingerprint"],
                                         described["workflow_modules"]))
        if args.pool_command == "status":
            found = pool.status()
            if found is None:
                return {"running": False, "address": address}, f"no mlwf worker pool on the Ray cluster at {address}"
            return {"running": True, "address": address, **found}, _status_text(address, found)
        found = pool.stop()
        if found is None:
            return ({"stopped": False, "address": address},
                    f"no mlwf worker pool on the Ray cluster at {address}: nothing to stop")
        return ({"stopped": True, "address": address, **found},
                f"stopped the mlwf worker pool on the Ray cluster at {address} ({found.get('size', '?')} workers)")
    finally:
        cluster.leave()


def _address(settings, command: str) -> str:
    """The cluster the command acts on: named by --ray-address or RAY_ADDRESS, never guessed."""
    from mlwf.backends.ray.cluster import check_address

    address = (settings.ray_address or "").strip()
    if not address or address == "local":
        raise UsageError(f"mlwf ray pool {command}: which Ray cluster? Give --ray-address HOST:PORT (the head's GCS "
                         "address) or set RAY_ADDRESS")
    check_address(address)
    if command == "stop" and address == "auto":
        raise UsageError("mlwf ray pool stop --ray-address auto: name the cluster whose pool to stop as HOST:PORT "
                         "(the head's GCS address)")
    return address


def _status_text(address: str, found: dict) -> str:
    from mlwf.backends.ray import pool

    state = "ready" if found["ready"] else "starting"
    lines = [f"mlwf worker pool on the Ray cluster at {address}: {found['size']} workers, {state}, "
             + pool.describe_code(found["version"], found["fingerprint"], found["workflow_modules"])]
    for i, info in enumerate(found["workers"]):
        if info is None:
            lines.append(f"  worker {i}: not answering (restarting, or its node is gone)")
        else:
            lines.append(f"  worker {i}: node {info['node_id'][:12]} ({info['node_ip']}), pid {info['pid']}, "
                         f"{info['calls']} calls" + (", busy" if info["busy"] else ""))
    return "\n".join(lines)
