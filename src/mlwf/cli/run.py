"""``mlwf run WORKFLOW ...``: run a workflow and print its report."""

from __future__ import annotations

import contextlib
import json
import sys

from mlwf.cli.options import (INTERRUPTED_EXIT, Parser, allow_unvalidated_argument, backend_config,
                              check_prefix_arguments, common, emit, engine_options, inference_arguments,
                              resume_command, state_argument, training_arguments, training_config)


def add_parsers(sub) -> None:
    """``mlwf run ml-training|ml-inference``."""
    run = sub.add_parser("run", help="run a workflow")
    wf = run.add_subparsers(dest="workflow", required=True, parser_class=Parser)
    tr = wf.add_parser("ml-training", help="partition → PCA ×P → random forest ×T → validation, then publish",
                       description="Train on labelled images under DATA_PREFIX (class folders "
                                   "DATA_PREFIX/<label>/<image>) and publish the model.")
    training_arguments(tr)
    allow_unvalidated_argument(tr)
    state_argument(tr)
    engine_options(tr)
    common(tr)

    inf = wf.add_parser("ml-inference", help="{partition ‖ load} → predict ×N over a batch of images",
                        description="Classify the images under DATA_PREFIX with the model at MODEL_PREFIX.")
    inference_arguments(inf)
    state_argument(inf)
    engine_options(inf)
    common(inf)



def handle(args) -> int:
    """Run the workflow; on Ctrl-C, one line naming the run and the command that resumes it (exit 130)."""
    check_prefix_arguments(args)
    engine = None
    try:
        if args.backend == "local":
            from mlwf.backends import forkserver

            # First, so the fork server's imports run beside the driver's own, on another core (it reads
            # what the workflow's stages import from the definition itself: the driver does not import it).
            forkserver.start(args.workflow)
        from mlwf.engine.driver import Engine
        from mlwf.engine.trace import StageClock
        from mlwf.terminal import StageBars

        # Under --json only the report goes to stdout (Ray prints worker-death notices there).
        quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
        with quiet, StageBars(enabled=not args.json) as progress, \
                Engine(args.store, args.bucket, backend=backend_config(args),
                       transfer=args.transfer, retries=args.retries, timeout=args.timeout,
                       progress=(clock := StageClock(progress)), command=getattr(args, "argv", None)) as engine:
            if args.workflow == "ml-training":
                report = engine.run_training(args.data_prefix, args.num_pca, args.num_train,
                                             config=training_config(args),
                                             model_prefix=args.model_prefix, publish=not args.no_publish,
                                             allow_unvalidated=args.allow_unvalidated, resume=args.resume,
                                             state=args.state)
            else:
                report = engine.run_inference(args.model_prefix, args.data_prefix, args.num_funcs,
                                              resume=args.resume, state=args.state)
            trace_path = None
            if args.trace and not report.get("already_done"):
                from mlwf.engine import trace

                trace_path = trace.write(trace.build(engine.last_run, report, clock), args.trace)
    except KeyboardInterrupt as e:
        return interrupted(args, e, engine)
    if report.get("already_done"):
        return already_done(args, report)
    # Printed once the progress display has ended, so they stand on their own lines.
    if trace_path is not None and not args.json:
        print(f"trace written to {trace_path} (open it in https://ui.perfetto.dev, or: mlwf trace plot "
              f"{trace_path})", file=sys.stderr)
    if not args.json:  # under --json they are in the report
        for text in report.get("warnings", []):
            print(f"mlwf: warning: {text}", file=sys.stderr)
    emit(args, report)
    return 0


def already_done(args, report: dict) -> int:
    """``--resume`` of a run that had succeeded: say so, change nothing (its report under ``--json``)."""
    run_id = report["run_id"]
    if args.json:
        print(json.dumps(report))
    else:
        print(f"run {run_id} already succeeded: nothing to do, nothing changed "
              f"('mlwf runs show {run_id}' shows it)")
    return 0


def interrupted(args, error: KeyboardInterrupt, engine=None) -> int:
    """After Ctrl-C: one line on stderr naming the run and how to resume it; exit status 130.

    The run is already recorded ``interrupted`` and its workers stopped (by the engine).
    """
    from mlwf.errors import Interrupted

    run = getattr(engine, "last_run", None)
    if isinstance(error, Interrupted):
        run_id, status = error.run_id, error.status
    else:  # before the engine started the run, or after it had ended
        run_id, status = (run.run_id, run.status) if run is not None else (None, None)
    resume = resume_command(args, run_id) if run_id else None
    if run_id is None:
        line = "interrupted before the run started: nothing was written; run the same command to start it"
    elif status in ("succeeded", "failed"):
        line = f"interrupted after run {run_id} had {status}: 'mlwf runs show {run_id}' shows it"
    else:
        line = f"interrupted run {run_id}; resume it with: {resume}"
    print(f"mlwf: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps({"interrupted": True, "run_id": run_id, "status": status,
                          "resume": resume if status not in ("succeeded", "failed") else None}))
    return INTERRUPTED_EXIT
