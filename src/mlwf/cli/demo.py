"""``mlwf demo``: the digits dataset, trained and classified, in one command."""

from __future__ import annotations

import json

from mlwf.cli.options import common


def add_parsers(sub) -> None:
    """``mlwf demo``."""
    demo = sub.add_parser("demo", help="build the digits dataset, train, classify a held-out batch")
    demo.add_argument("--workers", type=int, help="local worker processes (default: one per core)")
    common(demo)


def handle(args) -> int:
    from mlwf.demo import run_demo

    report = run_demo(store=args.store, bucket=args.bucket, workers=args.workers, quiet=args.json)
    if args.json:
        print(json.dumps(report))
    return 0
