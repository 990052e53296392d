"""``mlwf bench`` (latency per backend and transfer) and ``mlwf trace plot``."""

from __future__ import annotations

import json
import sys

from mlwf.cli.options import (INTERRUPTED_EXIT, Parser, check_prefix_arguments, common, inference_arguments,
                              training_arguments, training_config)


def add_parsers(sub) -> None:
    """``mlwf bench ml-training|ml-inference|plot`` and ``mlwf trace plot``."""
    bench = sub.add_parser("bench", help="end-to-end latency per backend and transfer, with breakdown and plots")
    bs = bench.add_subparsers(dest="bench_workflow", required=True, parser_class=Parser)
    btr = bs.add_parser("ml-training", help="benchmark ml-training DATA_PREFIX NUM_PCA NUM_TRAIN")
    training_arguments(btr)
    binf = bs.add_parser("ml-inference", help="benchmark ml-inference MODEL_PREFIX DATA_PREFIX NUM_FUNCS")
    inference_arguments(binf)
    for b in (btr, binf):
        b.add_argument("--backend", default="local",
                       help="backends, comma-separated: local,ray,knative (default local)")
        b.add_argument("--transfer", default="store",
                       help="transfers, comma-separated: store,direct,payload,shm (default store; each backend "
                            "takes its own: docs/transfer.md)")
        b.add_argument("--state", default="light",
                       help="state variants, comma-separated: light,heavy (default light: stages hand each other "
                            "keys; heavy: decoded pixels and feature matrices)")
        b.add_argument("--repeats", type=int, default=5, help="measured runs per configuration (default 5)")
        b.add_argument("--cold", action="store_true", help="also time fresh 'mlwf run' processes, start to exit")
        b.add_argument("--baseline", action="store_true",
                       help="also time the same work as plain scikit-learn in this process (mlwf/bench/baseline.py)")
        b.add_argument("--out", required=True, metavar="DIR", help="folder for the CSVs, traces and plots")
        b.add_argument("--no-plots", action="store_true", help="write the CSVs only")
        b.add_argument("--workers", type=int, help="worker processes for the local backend (default: one per core)")
        b.add_argument("--endpoint", action="append", default=[], metavar="URL|STAGE=URL",
                       help="knative backend: the function service URL, or STAGE=URL per stage (repeatable)")
        b.add_argument("--ray-address", default=None, help="ray backend: the cluster to join")
        common(b)
    bp = bs.add_parser("plot", help="redraw the plots of a benchmark folder from its CSVs")
    bp.add_argument("dir", metavar="DIR", help="a folder 'mlwf bench --out DIR' wrote")
    bp.add_argument("--debug", action="store_true")

    tc = sub.add_parser("trace", help="draw a trace written by 'mlwf run --trace'")
    tcs = tc.add_subparsers(dest="trace_command", required=True, parser_class=Parser)
    tp = tcs.add_parser("plot", help="a Gantt chart PNG: a row per worker, a bar per call coloured by stage")
    tp.add_argument("file", metavar="FILE", help="a trace written by 'mlwf run --trace FILE'")
    tp.add_argument("--out", metavar="PNG", help="output PNG (default: FILE with .png)")
    tp.add_argument("--debug", action="store_true")



def bench(args) -> int:
    from mlwf import bench

    if args.bench_workflow == "plot":
        written = bench.plot_dir(args.dir)
        for path in written:
            print(path)
        return 0
    check_prefix_arguments(args)
    if args.bench_workflow == "ml-training":
        positional = [args.data_prefix, args.num_pca, args.num_train]
        extra = dict(config=training_config(args), model_prefix=args.model_prefix, publish=not args.no_publish)
    else:
        positional = [args.model_prefix, args.data_prefix, args.num_funcs]
        extra = {}
    spec = bench.BenchSpec(workflow=args.bench_workflow, args=positional, out=args.out, backends=args.backend,
                           transfers=args.transfer, states=args.state, repeats=args.repeats, cold=args.cold, baseline=args.baseline,
                           store=args.store, bucket=args.bucket, workers=args.workers, endpoints=args.endpoint,
                           ray_address=args.ray_address, plots=not args.no_plots, **extra)
    try:
        result = bench.run(spec, progress=not args.json)
    except KeyboardInterrupt as e:
        return interrupted(args, e)
    if args.json:
        print(json.dumps(result))
    else:
        from mlwf.terminal import print_bench

        print_bench(result)
    return 0


def interrupted(args, error: KeyboardInterrupt) -> int:
    """After Ctrl-C: one line on stderr naming the run it stopped and the command that finishes
    that run; exit status 130. The benchmark's own files (CSVs, summary) are written only at its end."""
    run_id = getattr(error, "run_id", None)
    status = getattr(error, "status", None)
    resume = getattr(error, "resume", None)
    if run_id is None:
        line = "interrupted mlwf bench before a run had started (or in its baseline); no CSV was written"
    elif status in ("succeeded", "failed") or not resume:
        line = f"interrupted mlwf bench after run {run_id} had {status or 'ended'}; no CSV was written"
    else:
        line = (f"interrupted mlwf bench during run {run_id}; no CSV was written; finish that run with: "
                f"{resume}")
    print(f"mlwf: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps({"interrupted": True, "run_id": run_id, "status": status, "resume": resume}))
    return INTERRUPTED_EXIT


def trace(args) -> int:
    from mlwf import plots
    from mlwf.engine import trace

    doc = trace.load(args.file)
    out = args.out or (args.file[:-5] if args.file.endswith(".json") else args.file) + ".png"
    print(plots.gantt(doc, out))
    return 0


def handle(args) -> int:
    return bench(args) if args.command == "bench" else trace(args)
