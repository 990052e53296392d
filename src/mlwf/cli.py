"""The ``mlwf`` command: parse, call, print. Kept thin (and light to import)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

from mlwf.errors import MlwfError, UsageError

SEED_BUCKET_HELP = "bucket (default: $MLWF_BUCKET, else 'tless')"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not a usage block."""

    def error(self, message: str):  # noqa: D401
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    p.add_argument("--store", help="store: a directory, file://DIR or s3:// (default: $MLWF_STORE, "
                                   "else ~/.local/share/mlwf/store)")
    p.add_argument("--bucket", help=SEED_BUCKET_HELP)
    if json_flag:
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="local", help="where stages run: local (default), ray or knative")
    p.add_argument("--transfer", default="store", choices=("store", "direct"),
                   help="how state moves between stages: through the object store (default, as in the seed) "
                        "or directly from call to call")
    p.add_argument("--workers", type=int, help="worker processes for the local backend (default: one per core)")
    p.add_argument("--retries", type=int, default=2, help="extra attempts for a failed call (default 2)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a call may run before it is retried (default 600)")
    p.add_argument("--resume", metavar="RUN_ID",
                   help="finish an interrupted run: reuse its calls whose outputs verify, rerun the rest")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray instance for the run)")
    p.add_argument("--shared-store", action="store_true",
                   help="ray backend: the directory store is mounted at the same path on every node")
    p.add_argument("--stage-cpus", action="append", default=[], metavar="STAGE=N",
                   help="ray backend: CPUs per call of STAGE (default 1; repeatable)")
    p.add_argument("--stage-memory", action="append", default=[], metavar="STAGE=MB",
                   help="ray backend: memory per call of STAGE in MB (repeatable)")
    p.add_argument("--endpoint", action="append", default=[], metavar="URL|STAGE=URL",
                   help="knative backend: the function service URL, or STAGE=URL per stage (repeatable)")
    p.add_argument("--trace", metavar="FILE",
                   help="write the run as a Chrome/Perfetto trace (JSON) to FILE; draw it with 'mlwf trace plot'")


def _training_options(p: argparse.ArgumentParser) -> None:
    """ml-training's arguments and settings (mlwf run and mlwf bench)."""
    p.add_argument("data_prefix", metavar="DATA_PREFIX")
    p.add_argument("num_pca", metavar="NUM_PCA", type=int)
    p.add_argument("num_train", metavar="NUM_TRAIN", type=int)
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0): same seed and data, same model bytes")
    p.add_argument("--image-size", type=int, default=64, help="images are resized to N×N (default 64)")
    p.add_argument("--components", type=int, default=10, help="PCA components (default 10)")
    p.add_argument("--trees", type=int, default=100, help="trees per forest (default 100)")
    p.add_argument("--max-depth", type=int, default=10, help="tree depth (default 10)")
    p.add_argument("--min-samples-split", type=int, default=5,
                   help="fewest samples a node needs to be split (default 5)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction held out for validation (default 0.2)")
    p.add_argument("--model-prefix", default="ml-inference/model",
                   help="where the model is published (default ml-inference/model)")
    p.add_argument("--no-publish", action="store_true", help="train and validate, but publish nothing")


def _training_config(args):
    from mlwf.workflows.training import TrainingConfig

    return TrainingConfig(image_size=args.image_size, n_components=args.components, n_trees=args.trees,
                          max_depth=args.max_depth, min_samples_split=args.min_samples_split,
                          holdout=args.holdout, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mlwf", description="Serverless ML training and inference workflows.")
    parser.add_argument("--version", action="version", version=f"mlwf {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a workflow")
    wf = run.add_subparsers(dest="workflow", required=True, parser_class=_Parser)
    tr = wf.add_parser("ml-training", help="partition → PCA ×P → random forest ×T → validation, then publish",
                       description="Train on labelled images under DATA_PREFIX (class folders "
                                   "DATA_PREFIX/<label>/<image>) and publish the model.")
    _training_options(tr)
    tr.add_argument("--allow-unvalidated", action="store_true",
                    help="publish even if validated on fewer than 2 decodable held-out images of some class "
                         "(or none at all)")
    _engine_options(tr)
    _common(tr)

    inf = wf.add_parser("ml-inference", help="{partition ‖ load} → predict ×N over a batch of images",
                        description="Classify the images under DATA_PREFIX with the model at MODEL_PREFIX.")
    inf.add_argument("model_prefix", metavar="MODEL_PREFIX")
    inf.add_argument("data_prefix", metavar="DATA_PREFIX")
    inf.add_argument("num_funcs", metavar="NUM_FUNCS", type=int)
    _engine_options(inf)
    _common(inf)

    _invoke_parser(sub)

    ds = sub.add_parser("dataset", help="write a dataset as PNG class folders OUT/<label>/<index>.png")
    dss = ds.add_subparsers(dest="dataset", required=True, parser_class=_Parser)
    dg = dss.add_parser("digits", help="scikit-learn's bundled digits (1,797 8×8 images)")
    dg.add_argument("out", metavar="OUT")
    dg.add_argument("--n", type=int, help="only the first N images")
    dg.add_argument("--json", action="store_true")
    dg.add_argument("--debug", action="store_true")
    di = dss.add_parser("idx", help="an MNIST-format IDX pair (MNIST, Fashion-MNIST), gzipped or not")
    di.add_argument("images", metavar="IMAGES")
    di.add_argument("labels", metavar="LABELS")
    di.add_argument("out", metavar="OUT")
    di.add_argument("--n", type=int, help="only N images")
    di.add_argument("--offset", type=int, default=0, help="start at image K (default 0)")
    names = di.add_mutually_exclusive_group()
    names.add_argument("--names", choices=("fashion-mnist", "mnist"),
                       help="name the class folders with the known class names of this dataset "
                            "(default: label numbers 0, 1, …)")
    names.add_argument("--names-file", metavar="FILE",
                       help="name the class folders from FILE: one name per line, label 0 first")
    di.add_argument("--json", action="store_true")
    di.add_argument("--debug", action="store_true")

    s3 = sub.add_parser("s3", help="manage objects in the configured store (directory or S3)")
    s3s = s3.add_subparsers(dest="s3_command", required=True, parser_class=_Parser)
    up = s3s.add_parser("upload-dir", help="upload a folder (idempotent: unchanged objects are skipped)")
    up.add_argument("--host-path", required=True)
    up.add_argument("--s3-path", required=True)
    up.add_argument("--create-bucket", action="store_true", help="create the bucket if it does not exist")
    up.add_argument("--overwrite", action="store_true",
                    help="replace objects that hold other bytes (without it, such an upload is refused)")
    _common(up)
    down = s3s.add_parser("download-dir", help="download every object under a prefix into a folder")
    down.add_argument("--s3-path", required=True)
    down.add_argument("--host-path", required=True)
    down.add_argument("--overwrite", action="store_true",
                      help="replace local files that hold other bytes (without it, such a download is refused)")
    _common(down)
    cb = s3s.add_parser("clear-bucket", help="delete every object in the bucket")
    _common(cb)
    cd = s3s.add_parser("clear-dir", help="delete every object in a folder (PREFIX/…); never the whole bucket")
    cd.add_argument("--prefix", required=True)
    _common(cd)
    ls = s3s.add_parser("ls", help="list objects")
    ls.add_argument("--prefix", default="")
    _common(ls)

    model = sub.add_parser("model", help="inspect, export or serve a published model")
    ms = model.add_subparsers(dest="model_command", required=True, parser_class=_Parser)
    show = ms.add_parser("show", help="describe the model published at a prefix")
    show.add_argument("prefix", nargs="?", default="ml-inference/model", metavar="MODEL_PREFIX")
    _common(show)

    rb = ms.add_parser("rollback", help="make the previous published model current again")
    rb.add_argument("prefix", nargs="?", default="ml-inference/model", metavar="MODEL_PREFIX")
    _common(rb)
    from mlwf.serving import commands as serving

    serving.add_model_commands(ms, _common)

    runs = sub.add_parser("runs", help="runs kept in the store")
    rs = runs.add_subparsers(dest="runs_command", required=True, parser_class=_Parser)
    rls = rs.add_parser("ls", help="list runs with status (running, succeeded, failed, abandoned) and stage progress")
    _common(rls)
    rsh = rs.add_parser("show", help="one run: parameters, status, per-stage figures, accuracy, "
                                     "confusion matrix, where its outputs are")
    rsh.add_argument("run_id", metavar="RUN_ID")
    _common(rsh)
    rgc = rs.add_parser("gc", help="delete intermediate outputs of old finished or abandoned runs "
                                   "(never a run.json, results or a model)")
    rgc.add_argument("--keep", type=int, required=True, help="keep the N newest runs of each workflow")
    _common(rgc)

    sv = sub.add_parser("serve", help="run every stage as an HTTP CloudEvents function (Knative runtime contract)")
    sv.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    sv.add_argument("--port", type=int, help="port (default: $PORT, else 8080)")
    sv.add_argument("--stages", default="all", help="stages served: all (default) or WORKFLOW[/STAGE],...")
    sv.add_argument("--store", help="the one store this server acts on: a directory, file://DIR or s3:// "
                                    "(default: $MLWF_STORE, else ~/.local/share/mlwf/store); calls naming "
                                    "another store are refused")
    sv.add_argument("--bucket", help=SEED_BUCKET_HELP + "; calls naming another bucket are refused")
    sv.add_argument("--max-body", default="1MiB", help="largest request body, e.g. 1MiB (default); more: 413")
    sv.add_argument("--threads", type=int, help="calls run at once (default: cores + 4, at most 32)")
    sv.add_argument("--workers", type=int, default=0,
                    help="run calls in N worker processes instead of threads (CPU-bound stages on a multi-core host)")
    sv.add_argument("--grace", type=float, default=300.0,
                    help="seconds calls in flight may take to finish after SIGTERM (default 300)")
    sv.add_argument("--max-age", type=int, default=300, help="seconds a signed call stays valid (default 300)")
    sv.add_argument("--request-timeout", type=float, default=10.0,
                    help="seconds a client has to send a whole request, head and body (default 10)")
    sv.add_argument("--max-connections", type=int, default=512,
                    help="open connections at most (default 512); past it the oldest idle or incomplete one "
                         "is closed")
    sv.add_argument("--max-client-connections", type=int,
                    help="open connections from one address at most (default: half of --max-connections)")
    sv.add_argument("--sink", action="append", default=None, metavar="URL|STAGE=URL",
                    help="choreography: send the events that start each next stage to URL (a Broker, Channel or "
                         "the next service), or STAGE=URL per stage (repeatable; default: $K_SINK)")
    sv.add_argument("--dead-letter", metavar="URL", help="choreography: where events go that could not be delivered")
    sv.add_argument("--delivery-retries", type=int, help="choreography: redeliveries of an event (default 10)")
    sv.add_argument("--claim-lease", type=float,
                    help="choreography: seconds a server's claim on a call lasts unless renewed (default 30)")
    sv.add_argument("--retries", type=int,
                    help="choreography: extra attempts of a failed call here before its delivery is retried (default 2)")
    sv.add_argument("--insecure-no-auth", action="store_true",
                    help="accept unsigned calls (local experiments only: anyone who can connect runs stages)")
    sv.add_argument("--debug", action="store_true", help="show tracebacks")

    dp = sub.add_parser("deploy", help="render deployment manifests")
    dps = dp.add_subparsers(dest="deploy_target", required=True, parser_class=_Parser)
    kn = dps.add_parser("knative", help="Knative Services running 'mlwf serve', their Secret and driver Jobs")
    kn.add_argument("--image", required=True, help="the image built from the Dockerfile, e.g. ghcr.io/you/mlwf:0.1.0")
    kn.add_argument("--namespace", required=True)
    kn.add_argument("--s3-host", required=True, help="S3/MinIO host as seen from the cluster")
    kn.add_argument("--s3-port", type=int, required=True)
    kn.add_argument("--bucket", default="tless", help="bucket (default tless)")
    mode = kn.add_mutually_exclusive_group()
    mode.add_argument("--per-stage", dest="per_stage", action="store_true", default=True,
                      help="one Service per stage (default)")
    mode.add_argument("--single", dest="per_stage", action="store_false", help="one Service for every stage")
    kn.add_argument("--min-scale", type=int, default=0, help="pods kept warm per Service (default 0)")
    kn.add_argument("--choreography", action="store_true",
                    help="no driver: a Broker and a Trigger per stage, services emitting their successors' events "
                         "(K_SINK), and Jobs that start runs with one event")
    kn.add_argument("--out", help="output folder (default deploy/knative, or deploy/knative-choreography)")
    kn.add_argument("--json", action="store_true")
    kn.add_argument("--debug", action="store_true")
    serving.add_deploy_command(dps)

    bench = sub.add_parser("bench", help="end-to-end latency per backend and transfer, with breakdown and plots")
    bs = bench.add_subparsers(dest="bench_workflow", required=True, parser_class=_Parser)
    btr = bs.add_parser("ml-training", help="benchmark ml-training DATA_PREFIX NUM_PCA NUM_TRAIN")
    _training_options(btr)
    binf = bs.add_parser("ml-inference", help="benchmark ml-inference MODEL_PREFIX DATA_PREFIX NUM_FUNCS")
    binf.add_argument("model_prefix", metavar="MODEL_PREFIX")
    binf.add_argument("data_prefix", metavar="DATA_PREFIX")
    binf.add_argument("num_funcs", metavar="NUM_FUNCS", type=int)
    for b in (btr, binf):
        b.add_argument("--backend", default="local",
                       help="backends, comma-separated: local,ray,knative (default local)")
        b.add_argument("--transfer", default="store",
                       help="transfers, comma-separated: store,direct (default store)")
        b.add_argument("--repeats", type=int, default=5, help="measured runs per configuration (default 5)")
        b.add_argument("--cold", action="store_true", help="also time fresh 'mlwf run' processes, start to exit")
        b.add_argument("--baseline", action="store_true",
                       help="also time the same work as plain scikit-learn in this process (benchmarks/baseline.py)")
        b.add_argument("--out", required=True, metavar="DIR", help="folder for the CSVs, traces and plots")
        b.add_argument("--no-plots", action="store_true", help="write the CSVs only")
        b.add_argument("--workers", type=int, help="worker processes for the local backend (default: one per core)")
        b.add_argument("--endpoint", action="append", default=[], metavar="URL|STAGE=URL",
                       help="knative backend: the function service URL, or STAGE=URL per stage (repeatable)")
        b.add_argument("--ray-address", default=None, help="ray backend: the cluster to join")
        _common(b)
    bp = bs.add_parser("plot", help="redraw the plots of a benchmark folder from its CSVs")
    bp.add_argument("dir", metavar="DIR")
    bp.add_argument("--debug", action="store_true")

    tc = sub.add_parser("trace", help="draw a trace written by 'mlwf run --trace'")
    tcs = tc.add_subparsers(dest="trace_command", required=True, parser_class=_Parser)
    tp = tcs.add_parser("plot", help="a Gantt chart PNG: a row per worker, a bar per call coloured by stage")
    tp.add_argument("file", metavar="FILE")
    tp.add_argument("--out", metavar="PNG", help="output PNG (default: FILE with .png)")
    tp.add_argument("--debug", action="store_true")

    demo = sub.add_parser("demo", help="build the digits dataset, train, classify a held-out batch")
    demo.add_argument("--workers", type=int)
    _common(demo)
    return parser


#: Exit status after the reader of our output went away (as a process killed by SIGPIPE).
CLOSED_PIPE_EXIT = 141


def main(argv: list[str] | None = None) -> int:
    """Run the ``mlwf`` command line; return the exit status.

    A reader that stops early (``mlwf runs ls | head -1``) is a normal way to
    stop: the command then exits quietly with status 141, as a Unix tool
    stopped by SIGPIPE does.
    """
    try:
        return _main(argv)
    except BrokenPipeError:
        _quiet_closed_streams()
        return CLOSED_PIPE_EXIT


def _quiet_closed_streams() -> None:
    """Point stdout and stderr at /dev/null, so flushing them at exit raises nothing more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                os.dup2(devnull, stream.fileno())
            except (AttributeError, OSError, ValueError):
                pass  # not a file descriptor (a test's captured stream)
    finally:
        os.close(devnull)


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return _dispatch(args)
    except MlwfError as e:
        if debug:
            raise
        print(f"mlwf: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mlwf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # the reader went away: main() exits quietly
    except Exception as e:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            raise
        print(f"mlwf: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    if args.command == "run":
        return _run(args)
    if args.command == "dataset":
        return _dataset(args)
    if args.command == "s3":
        return _s3(args)
    if args.command == "model" and args.model_command in ("export", "serve"):
        from mlwf.serving import commands as serving

        return serving.model_export(args) if args.model_command == "export" else serving.model_serve(args)
    if args.command == "deploy" and args.deploy_target == "kserve":
        from mlwf.serving import commands as serving

        return serving.deploy_kserve(args)
    if args.command == "model":
        return _model(args)
    if args.command == "runs":
        return _runs(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "trace":
        return _trace(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "invoke":
        return _invoke(args)
    if args.command in ("serve", "deploy"):
        return _serve_or_deploy(args)
    raise UsageError(f"unknown command {args.command!r}")


# --------------------------------------------------------------------------- run
def _run(args) -> int:
    from mlwf.engine.driver import Engine
    from mlwf.engine.trace import StageClock
    from mlwf.ui import StageProgress

    # Under --json only the report goes to stdout (Ray prints worker-death notices there).
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet, StageProgress(enabled=not args.json) as progress, \
            Engine(args.store, args.bucket, backend=args.backend, workers=args.workers,
                   transfer=args.transfer, retries=args.retries, timeout=args.timeout,
                   progress=(clock := StageClock(progress)),
                   preload_sklearn=args.workflow == "ml-training",
                   backend_options=_backend_options(args)) as engine:
        if args.workflow == "ml-training":
            report = engine.run_training(args.data_prefix, args.num_pca, args.num_train,
                                         config=_training_config(args),
                                         model_prefix=args.model_prefix, publish=not args.no_publish,
                                         allow_unvalidated=args.allow_unvalidated, resume=args.resume)
        else:
            report = engine.run_inference(args.model_prefix, args.data_prefix, args.num_funcs,
                                          resume=args.resume)
        trace_path = None
        if args.trace:
            from mlwf.engine import trace

            trace_path = trace.write(trace.build(engine.last_run, report, clock), args.trace)
    # Printed once the progress display has ended, so they stand on their own lines.
    if trace_path is not None and not args.json:
        print(f"trace written to {trace_path} (open it in https://ui.perfetto.dev, or: mlwf trace plot "
              f"{trace_path})", file=sys.stderr)
    if not args.json:  # under --json they are in the report
        for text in report.get("warnings", []):
            print(f"mlwf: warning: {text}", file=sys.stderr)
    _emit(args, report)
    return 0


def _backend_options(args) -> dict[str, Any]:
    resources = _stage_resources(args)  # checked whatever the backend, so a bad value never passes silently
    if args.backend == "ray":
        from mlwf.storage import StoreSpec

        return {"address": args.ray_address or os.environ.get("RAY_ADDRESS"), "shared_store": args.shared_store,
                "stage_resources": resources,
                "store_url": StoreSpec.resolve(args.store, args.bucket).url}
    if args.backend == "knative":
        return {"endpoints": args.endpoint}
    return {}


_MAX_STAGE_CPUS = 4096
_MAX_STAGE_MB = 1 << 30  # 1 PiB: a bound that keeps the number finite, not a sizing rule


def _stage_resources(args) -> dict[str, dict[str, Any]]:
    """``--stage-cpus train=2 --stage-memory train=512`` as ``{"train": {"num_cpus": 2, "memory": 512 MiB}}``."""
    out: dict[str, dict[str, Any]] = {}
    for flag, items, key in (("--stage-cpus", args.stage_cpus, "num_cpus"),
                             ("--stage-memory", args.stage_memory, "memory")):
        for item in items:
            stage, sep, value = item.partition("=")
            try:
                number = float(value)
            except ValueError:
                number = -1.0
            high = _MAX_STAGE_CPUS if key == "num_cpus" else _MAX_STAGE_MB
            if not sep or not stage or not 0 < number <= high:  # also refuses nan and inf
                raise UsageError(f"{flag} {item!r}: expected STAGE={'N' if key == 'num_cpus' else 'MB'} "
                                 f"with a positive number up to {high:,}, e.g. train=2")
            out.setdefault(stage, {})[key] = number if key == "num_cpus" else int(number * 2**20)
    return out


def _emit(args, report: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(report, sort_keys=False))
        return
    from mlwf.ui import print_report

    print_report(report)


# --------------------------------------------------------------------------- invoke
def _invoke_parser(sub) -> None:
    inv = sub.add_parser("invoke", help="start a choreographed run on Knative with one event (no driver)")
    wf = inv.add_subparsers(dest="workflow", required=True, parser_class=_Parser)
    tr = wf.add_parser("ml-training", help="start ml-training DATA_PREFIX NUM_PCA NUM_TRAIN")
    _training_options(tr)
    tr.add_argument("--allow-unvalidated", action="store_true",
                    help="publish even if validated on fewer than 2 decodable held-out images of some class")
    inf = wf.add_parser("ml-inference", help="start ml-inference MODEL_PREFIX DATA_PREFIX NUM_FUNCS")
    inf.add_argument("model_prefix", metavar="MODEL_PREFIX")
    inf.add_argument("data_prefix", metavar="DATA_PREFIX")
    inf.add_argument("num_funcs", metavar="NUM_FUNCS", type=int)
    for p in (tr, inf):
        p.add_argument("--endpoint", metavar="URL",
                       help="the service (mlwf serve --sink ...) or Broker that takes the start event")
        p.add_argument("--wait", action="store_true",
                       help="follow the run through the store until it ends; print its report as 'mlwf run' does")
        p.add_argument("--timeout", type=float, default=3600.0,
                       help="with --wait: seconds to wait for the run to end (default 3600)")
        _common(p)


def _invocation(args) -> dict[str, Any]:
    """The driver's arguments and settings as a start event carries them (the same as 'mlwf run')."""
    from dataclasses import asdict

    if args.workflow == "ml-training":
        return {"args": [args.data_prefix, args.num_pca, args.num_train],
                "options": {"config": asdict(_training_config(args)), "model_prefix": args.model_prefix,
                            "publish": not args.no_publish, "allow_unvalidated": args.allow_unvalidated}}
    return {"args": [args.model_prefix, args.data_prefix, args.num_funcs], "options": {}}


def _invoke(args) -> int:
    from mlwf.choreography import invoke
    from mlwf.engine.driver import MAX_TIMEOUT_S, check_seconds
    from mlwf.storage import StoreSpec

    if args.wait:
        check_seconds("--timeout", args.timeout, MAX_TIMEOUT_S)
    spec = StoreSpec.resolve(args.store, args.bucket)
    run_id = invoke.invoke(args.workflow, _invocation(args), args.endpoint, spec)
    if not args.wait:
        print(json.dumps({"run_id": run_id, "workflow": args.workflow, "status": "started"}) if args.json else run_id)
        return 0
    if not args.json:
        print(f"started {args.workflow} run {run_id}; waiting for it to end", file=sys.stderr)
    store = spec.open()
    try:
        report = invoke.wait(store, args.workflow, run_id, timeout=args.timeout)
    finally:
        store.close()
    _emit(args, report)
    return 0


# --------------------------------------------------------------------------- dataset
def _dataset(args) -> int:
    from mlwf import datasets
    from mlwf.ui import count_progress

    with count_progress("writing images", enabled=not args.json) as progress:
        if args.dataset == "digits":
            n = datasets.write_digits(args.out, n=args.n, progress=progress)
        else:
            if args.names_file is not None:
                class_names = datasets.read_class_names(args.names_file)
            else:
                class_names = datasets.KNOWN_CLASS_NAMES.get(args.names)
            n = datasets.write_idx(args.images, args.labels, args.out, n=args.n, offset=args.offset,
                                   class_names=class_names, progress=progress)
    if args.json:
        print(json.dumps({"images": n, "out": os.path.abspath(args.out)}))
    else:
        print(f"wrote {n} images to {args.out}/<label>/<index>.png")
    return 0


# --------------------------------------------------------------------------- s3
def _open(args):
    from mlwf.storage import StoreSpec

    return StoreSpec.resolve(args.store, args.bucket).open()


def _s3(args) -> int:
    from mlwf import bulk
    from mlwf.ui import count_progress

    store = _open(args)
    try:
        cmd = args.s3_command
        if cmd == "ls":
            objects = store.list(args.prefix)
            if args.json:
                print(json.dumps({"bucket": store.bucket, "prefix": args.prefix, "count": len(objects),
                                  "bytes": sum(o.size for o in objects),
                                  "objects": [{"key": o.key, "size": o.size} for o in objects]}))
            else:
                for o in objects:
                    print(f"{o.size:>10}  {o.key}")
                print(f"{len(objects)} objects, {sum(o.size for o in objects)} bytes", file=sys.stderr)
            return 0
        with count_progress(cmd, enabled=not args.json) as progress:
            if cmd == "upload-dir":
                result = bulk.upload_dir(store, args.host_path, args.s3_path, create_bucket=args.create_bucket,
                                         overwrite=args.overwrite, progress=progress)
                text = (f"uploaded {result['uploaded']} of {result['files']} files to "
                        f"{store.bucket}/{args.s3_path} ({result['skipped']} unchanged, skipped"
                        + (f"; {result['replaced']} replaced" if result["replaced"] else "")
                        + (f"; {result['ignored']} links or special files ignored, e.g. "
                           f"{result['ignored_examples'][0]}" if result["ignored"] else "") + ")")
            elif cmd == "download-dir":
                result = bulk.download_dir(store, args.s3_path, args.host_path, overwrite=args.overwrite,
                                           progress=progress)
                text = (f"downloaded {result['written']} of {result['objects']} objects to {args.host_path} "
                        f"({result['unchanged']} already there, unchanged)")
            elif cmd == "clear-bucket":
                result = bulk.clear_bucket(store, progress=progress)
                text = f"deleted {result['deleted']} objects from bucket {store.bucket}"
            else:
                result = bulk.clear_prefix(store, args.prefix, progress=progress)
                text = f"deleted {result['deleted']} objects under {bulk.folder_prefix(args.prefix, flag='--prefix')}"
        print(json.dumps({"bucket": store.bucket, **result}) if args.json else text)
        return 0
    finally:
        store.close()


# --------------------------------------------------------------------------- model
def _model(args) -> int:
    from mlwf import model as mlwf_model

    store = _open(args)
    if args.model_command == "rollback":
        try:
            manifest = mlwf_model.rollback(store, args.prefix)
        finally:
            store.close()
        replaced = manifest["history"][0]
        result = {"prefix": args.prefix, "sha256": manifest["sha256"], "object": manifest["object"],
                  "run_id": manifest.get("run_id"), "replaced": replaced["sha256"]}
        print(json.dumps(result) if args.json else
              f"{args.prefix} now holds {manifest['sha256']} (run {manifest.get('run_id')}); "
              f"replaced {replaced['sha256']}")
        return 0
    try:
        data, manifest = mlwf_model.read_published(store.get, args.prefix,
                                                   where=f"bucket {store.bucket!r} of {store.url}")
        m = mlwf_model.from_bytes(data, source=manifest["object"])
    finally:
        store.close()
    info = {"prefix": args.prefix, **m.summary(), "run_id": manifest.get("run_id"),
            "published_at": manifest.get("published_at"), "object": manifest["object"],
            "bytes": manifest.get("size"), "history": manifest.get("history", [])}
    if args.json:
        print(json.dumps(info))
    else:
        from mlwf.ui import print_model

        print_model(info)
    return 0


# --------------------------------------------------------------------------- runs
def _runs(args) -> int:
    from mlwf import runs

    store = _open(args)
    try:
        store.require_bucket()
        if args.runs_command == "ls":
            found = runs.list_runs(store)
            if args.json:
                print(json.dumps({"runs": found}))
            else:
                for r in found:
                    progress = "  ".join(f"{s} {p}" for s, p in r["progress"].items())
                    if r["status"] == "unreadable":
                        progress = r["error"]
                    print(f"{r['run_id']}  {r['workflow']:<12}  {r['status']:<10}  {progress}")
            return 0
        if args.runs_command == "show":
            info = runs.show_run(store, args.run_id)
            if args.json:
                print(json.dumps(info))
            else:
                from mlwf.ui import print_run

                print_run(info)
            return 0
        result = runs.gc_runs(store, args.keep)
    finally:
        store.close()
    if args.json:
        print(json.dumps(result))
        return 0
    for s in result["skipped"]:
        if s["reason"].startswith("unreadable"):
            print(f"mlwf: warning: left {s['workflow']}/outputs/{s['run_id']}/ alone: {s['reason']}", file=sys.stderr)
    running = sum(s["reason"] == "running" for s in result["skipped"])
    print(f"deleted {result['deleted']} intermediate objects of {len(result['runs'])} runs "
          f"(kept the {len(result['kept'])} newest" + (f", {running} still running" if running else "")
          + (f", {len(result['skipped']) - running} unreadable" if len(result["skipped"]) > running else "") + ")")
    return 0


# --------------------------------------------------------------------------- bench, trace
def _bench(args) -> int:
    from mlwf import bench

    if args.bench_workflow == "plot":
        written = bench.plot_dir(args.dir)
        for path in written:
            print(path)
        return 0
    if args.bench_workflow == "ml-training":
        positional = [args.data_prefix, args.num_pca, args.num_train]
        extra = dict(config=_training_config(args), model_prefix=args.model_prefix, publish=not args.no_publish)
    else:
        positional = [args.model_prefix, args.data_prefix, args.num_funcs]
        extra = {}
    spec = bench.BenchSpec(workflow=args.bench_workflow, args=positional, out=args.out, backends=args.backend,
                           transfers=args.transfer, repeats=args.repeats, cold=args.cold, baseline=args.baseline,
                           store=args.store, bucket=args.bucket, workers=args.workers, endpoints=args.endpoint,
                           ray_address=args.ray_address, plots=not args.no_plots, **extra)
    result = bench.run(spec, progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        from mlwf.ui import print_bench

        print_bench(result)
    return 0


def _trace(args) -> int:
    from mlwf import plots
    from mlwf.engine import trace

    doc = trace.load(args.file)
    out = args.out or (args.file[:-5] if args.file.endswith(".json") else args.file) + ".png"
    print(plots.gantt(doc, out))
    return 0


# --------------------------------------------------------------------------- demo
def _demo(args) -> int:
    from mlwf.demo import run_demo

    report = run_demo(store=args.store, bucket=args.bucket, workers=args.workers, quiet=args.json)
    if args.json:
        print(json.dumps(report))
    return 0


# --------------------------------------------------------------------------- serve, deploy
def _serve_or_deploy(args) -> int:
    if args.command == "serve":
        from mlwf import server

        return server.serve(host=args.host, port=args.port, stages=args.stages, store=args.store,
                            bucket=args.bucket, max_body=server.parse_size(args.max_body), threads=args.threads,
                            grace=args.grace, insecure_no_auth=args.insecure_no_auth, max_age=args.max_age,
                            request_timeout=args.request_timeout, max_connections=args.max_connections,
                            max_client_connections=args.max_client_connections, workers=args.workers,
                            sinks=args.sink, dead_letter=args.dead_letter, delivery_retries=args.delivery_retries,
                            claim_lease=args.claim_lease, retries=args.retries)
    from mlwf import deploy

    files = deploy.render(image=args.image, namespace=args.namespace, s3_host=args.s3_host,
                          s3_port=args.s3_port, bucket=args.bucket, per_stage=args.per_stage,
                          min_scale=args.min_scale, choreography=args.choreography)
    out = args.out or ("deploy/knative-choreography" if args.choreography else "deploy/knative")
    written = deploy.write(files, out)
    if args.json:
        print(json.dumps({"out": os.path.abspath(out), "files": [str(p) for p in written]}))
    elif args.choreography:
        print(f"wrote {len(written)} files to {out}/: kubectl apply -f {out}/ (after creating the Secret, see "
              f"{out}/templates/secret.yaml); start a run with kubectl create -f {out}/run/ml-training.yaml")
    else:
        print(f"wrote {len(written)} files to {out}/: kubectl apply -f {out}/ (after creating the "
              f"Secret, see {out}/templates/secret.yaml); flags for mlwf run in {out}/endpoints.txt")
    return 0


def _version() -> str:
    from mlwf import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
