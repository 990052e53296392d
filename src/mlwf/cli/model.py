"""``mlwf model show|rollback|export|serve``: the published model, and the model outside mlwf."""

from __future__ import annotations

import argparse
import json

from mlwf.cli.options import Parser, common, open_store
from mlwf.serving import settings

DEFAULT_PREFIX = "ml-inference/model"
_SOURCE_HELP = "published model prefix (default ml-inference/model), or a .mlwf file"


def add_parsers(sub) -> None:
    """``mlwf model show|rollback|export|serve``."""
    model = sub.add_parser("model", help="inspect, export or serve a published model")
    ms = model.add_subparsers(dest="model_command", required=True, parser_class=Parser)
    show = ms.add_parser("show", help="describe the model published at a prefix")
    show.add_argument("prefix", nargs="?", default=DEFAULT_PREFIX, metavar="MODEL_PREFIX")
    common(show)

    rb = ms.add_parser("rollback", help="make the previous published model current again")
    rb.add_argument("prefix", nargs="?", default=DEFAULT_PREFIX, metavar="MODEL_PREFIX")
    common(rb)
    export = ms.add_parser("export", help="write the model as one ONNX graph (run it with onnxruntime)")
    export.add_argument("source", nargs="?", default=DEFAULT_PREFIX, metavar="MODEL_PREFIX", help=_SOURCE_HELP)
    export.add_argument("--format", required=True, choices=("onnx",), help="onnx (the only format)")
    export.add_argument("-o", "--output", required=True, metavar="FILE", help="the .onnx file to write")
    export.add_argument("--no-check", action="store_true",
                        help="skip running the file with onnxruntime against mlwf before writing it")
    common(export)

    serve = ms.add_parser("serve", help="serve the model over the Open Inference Protocol (v2 REST)")
    serve.add_argument("source", nargs="?", default=DEFAULT_PREFIX, metavar="MODEL_PREFIX", help=_SOURCE_HELP)
    serve.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface, "
                         "as a container does)")
    serve.add_argument("--port", type=int, help="port (default: $PORT, else 8080)")
    serve.add_argument("--name", default=settings.DEFAULT_NAME, help="the model's name in the URLs (default mlwf)")
    serve.add_argument("--max-batch", type=int, default=settings.DEFAULT_MAX_BATCH,
                       help=f"most images in one request (default {settings.DEFAULT_MAX_BATCH}); more: 413")
    serve.add_argument("--max-body", default=f"{settings.DEFAULT_MAX_BODY >> 20}MiB",
                       help=f"largest request body (default {settings.DEFAULT_MAX_BODY >> 20}MiB); more: 413")
    serve.add_argument("--max-pixels", type=int, default=settings.DEFAULT_MAX_PIXELS,
                       help=f"most decoded pixels in one request (default {settings.DEFAULT_MAX_PIXELS}); more: 413")
    serve.add_argument("--request-timeout", type=float, default=settings.DEFAULT_REQUEST_TIMEOUT,
                       help="seconds a client has to send a whole request, head and body "
                            f"(default {settings.DEFAULT_REQUEST_TIMEOUT:g}); then 408")
    serve.add_argument("--max-connections", type=int, default=settings.DEFAULT_MAX_CONNECTIONS,
                       help=f"open connections at most (default {settings.DEFAULT_MAX_CONNECTIONS}); past it the "
                            "oldest idle or incomplete one is closed")
    serve.add_argument("--max-client-connections", type=int,
                       help="open connections from one address at most (default: half of --max-connections)")
    serve.add_argument("--max-in-flight", type=int, default=settings.DEFAULT_MAX_IN_FLIGHT,
                       help=f"requests computed at once, each counted once its body has arrived (default "
                            f"{settings.DEFAULT_MAX_IN_FLIGHT}); more: 503")
    serve.add_argument("--max-memory", metavar="SIZE",
                       help="memory requests may make the server hold at once, shared by all of them, e.g. 512MiB "
                            "(default: $MLWF_MAX_MEMORY, else 512MiB); a request needing more alone: 413, "
                            "while others hold it: 503")
    serve.add_argument("--threads", type=int, help="inference threads (default: one per core)")
    serve.add_argument("--watch", type=float, metavar="SECONDS",
                       help="check the published manifest every SECONDS and serve a new model once it is checked")
    serve.add_argument("--grace", type=float, default=30.0,
                       help="seconds requests in flight may take to finish after SIGTERM (default 30)")
    common(serve, json_flag=False)


def handle(args) -> int:
    if args.model_command == "export":
        return export(args)
    if args.model_command == "serve":
        return serve(args)
    return show_or_rollback(args)


def show_or_rollback(args) -> int:
    from mlwf import model as mlwf_model

    store = open_store(args)
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
                                                   where=f"bucket {store.bucket!r} of {store.location}")
        m = mlwf_model.from_bytes(data, source=manifest["object"])
    finally:
        store.close()
    info = {"prefix": args.prefix, **m.summary(), "run_id": manifest.get("run_id"),
            "published_at": manifest.get("published_at"), "object": manifest["object"],
            "bytes": manifest.get("size"), "history": manifest.get("history", [])}
    if args.json:
        print(json.dumps(info))
    else:
        from mlwf.terminal import print_model

        print_model(info)
    return 0


def export(args: argparse.Namespace) -> int:
    import mlwf.model
    from mlwf.serving import onnx as onnx_export

    model = mlwf.model.load(args.source, store=args.store, bucket=args.bucket)
    report = onnx_export.export(model, args.output, verify=not args.no_check)
    if args.json:
        print(json.dumps({"source": args.source, "format": args.format, **report}))
        return 0
    check = report.get("check")
    checked = (f"; checked with onnxruntime on {check['rows']} inputs: same labels, probabilities within "
               f"{check['max_abs_diff']:.1e}" if check else "; not checked (--no-check)")
    size = report["image_size"]
    print(f"wrote {report['path']} ({report['bytes']:,} bytes): {report['num_trees']} trees, "
          f"{len(report['classes'])} classes, input float32 [N, {size * size}] ({size}x{size} pixels)"
          f"{checked}; model {report['model_digest'][:16]}…")
    return 0


def serve(args: argparse.Namespace) -> int:
    from mlwf import budget
    from mlwf.httpserver import parse_size
    from mlwf.serving import oip

    limits = settings.Limits(max_batch=args.max_batch, max_body=parse_size(args.max_body),
                             max_pixels=args.max_pixels, max_in_flight=args.max_in_flight,
                             request_timeout=args.request_timeout, max_connections=args.max_connections,
                             max_client_connections=args.max_client_connections)
    return oip.serve(args.source, store=args.store, bucket=args.bucket, host=args.host, port=args.port,
                     name=args.name, limits=limits, threads=args.threads, watch=args.watch, grace=args.grace,
                     max_memory=None if args.max_memory is None else budget.parse_size(args.max_memory, budget.FLAG))
