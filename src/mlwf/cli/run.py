"""``mlwf run WORKFLOW ...``: run a workflow and print its report."""

from __future__ import annotations

import contextlib
import sys

from mlwf.cli.options import (Parser, allow_unvalidated_argument, backend_config, common, emit, engine_options,
                              inference_arguments, training_arguments, training_config)


def add_parsers(sub) -> None:
    """``mlwf run ml-training|ml-inference``."""
    run = sub.add_parser("run", help="run a workflow")
    wf = run.add_subparsers(dest="workflow", required=True, parser_class=Parser)
    tr = wf.add_parser("ml-training", help="partition → PCA ×P → random forest ×T → validation, then publish",
                       description="Train on labelled images under DATA_PREFIX (class folders "
                                   "DATA_PREFIX/<label>/<image>) and publish the model.")
    training_arguments(tr)
    allow_unvalidated_argument(tr)
    engine_options(tr)
    common(tr)

    inf = wf.add_parser("ml-inference", help="{partition ‖ load} → predict ×N over a batch of images",
                        description="Classify the images under DATA_PREFIX with the model at MODEL_PREFIX.")
    inference_arguments(inf)
    engine_options(inf)
    common(inf)



def handle(args) -> int:
    if args.backend == "local":
        from mlwf.backends import forkserver

        # First, so the fork server's imports run beside the driver's own, on another core (it reads
        # what the workflow's stages import from the definition itself: the driver does not import it).
        forkserver.start(args.workflow)
    from mlwf.engine.driver import Engine
    from mlwf.engine.trace import StageClock
    from mlwf.ui import StageBars

    # Under --json only the report goes to stdout (Ray prints worker-death notices there).
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet, StageBars(enabled=not args.json) as progress, \
            Engine(args.store, args.bucket, backend=backend_config(args),
                   transfer=args.transfer, retries=args.retries, timeout=args.timeout,
                   progress=(clock := StageClock(progress))) as engine:
        if args.workflow == "ml-training":
            report = engine.run_training(args.data_prefix, args.num_pca, args.num_train,
                                         config=training_config(args),
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
    emit(args, report)
    return 0
