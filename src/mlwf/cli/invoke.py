"""``mlwf invoke WORKFLOW ...``: start a choreographed run with one event, and follow it (``--wait``)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Any

from mlwf.cli.options import (Parser, allow_unvalidated_argument, check_prefix_arguments, common, emit,
                              inference_arguments, open_store, state_argument,
                              training_arguments, training_config)


def add_parsers(sub) -> None:
    """``mlwf invoke ml-training|ml-inference``."""
    inv = sub.add_parser("invoke", help="start a choreographed run on Knative with one event (no driver)")
    wf = inv.add_subparsers(dest="workflow", required=True, parser_class=Parser)
    tr = wf.add_parser("ml-training", help="start ml-training DATA_PREFIX NUM_PCA NUM_TRAIN")
    training_arguments(tr)
    allow_unvalidated_argument(tr)
    inf = wf.add_parser("ml-inference", help="start ml-inference MODEL_PREFIX DATA_PREFIX NUM_FUNCS")
    inference_arguments(inf)
    for p in (tr, inf):
        state_argument(p)
        p.add_argument("--endpoint", metavar="URL",
                       help="the service (mlwf serve --sink ...) or Broker that takes the start event")
        p.add_argument("--wait", action="store_true",
                       help="follow the run through the store until it ends; print its report as 'mlwf run' does")
        p.add_argument("--timeout", type=float, default=3600.0,
                       help="with --wait: seconds to wait for the run to end (default 3600)")
        common(p)


def invocation(args) -> dict[str, Any]:
    """The driver's arguments and settings as a start event carries them (the same as 'mlwf run').

    ``--state`` is carried only when heavy, so a light start event is what it was.
    """
    state = {"state": args.state} if args.state != "light" else {}
    if args.workflow == "ml-training":
        return {"args": [args.data_prefix, args.num_pca, args.num_train],
                "options": {"config": asdict(training_config(args)), "model_prefix": args.model_prefix,
                            "publish": not args.no_publish, "allow_unvalidated": args.allow_unvalidated, **state}}
    return {"args": [args.model_prefix, args.data_prefix, args.num_funcs], "options": state}


def handle(args) -> int:
    from mlwf.choreography import invoke
    from mlwf.engine.driver import MAX_TIMEOUT_S, check_seconds
    from mlwf.settings import Settings
    from mlwf.storage import StoreSpec

    check_prefix_arguments(args)
    if args.wait:
        check_seconds("--timeout", args.timeout, MAX_TIMEOUT_S)
    settings = Settings.resolve(store=args.store, bucket=args.bucket)
    run_id = invoke.invoke(args.workflow, invocation(args), args.endpoint, StoreSpec.from_settings(settings),
                           secret=settings.function_secret)
    if not args.wait:
        print(json.dumps({"run_id": run_id, "workflow": args.workflow, "status": "started"}) if args.json else run_id)
        return 0
    if not args.json:
        print(f"started {args.workflow} run {run_id}; waiting for it to end", file=sys.stderr)
    store = open_store(args)
    try:
        report = invoke.wait(store, args.workflow, run_id, timeout=args.timeout)
    finally:
        store.close()
    emit(args, report)
    return 0
