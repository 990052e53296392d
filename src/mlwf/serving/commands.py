"""The command-line side of serving: ``mlwf model export``, ``mlwf model serve``, ``mlwf deploy kserve``.

:mod:`mlwf.cli` adds these parsers to its ``model`` and ``deploy`` groups and
hands the parsed arguments here; each function parses nothing itself, calls
:mod:`mlwf.serving` and prints.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

from mlwf.serving import kserve, settings

DEFAULT_PREFIX = "ml-inference/model"
_SOURCE_HELP = "published model prefix (default ml-inference/model), or a .mlwf file"


def add_model_commands(models, common: Callable[..., None]) -> None:
    """``export`` and ``serve`` under ``mlwf model``; ``common`` adds --store/--bucket/--json/--debug."""
    export = models.add_parser("export", help="write the model as one ONNX graph (run it with onnxruntime)")
    export.add_argument("source", nargs="?", default=DEFAULT_PREFIX, metavar="MODEL_PREFIX", help=_SOURCE_HELP)
    export.add_argument("--format", required=True, choices=("onnx",), help="onnx (the only format)")
    export.add_argument("-o", "--output", required=True, metavar="FILE", help="the .onnx file to write")
    export.add_argument("--no-check", action="store_true",
                        help="skip running the file with onnxruntime against mlwf before writing it")
    common(export)

    serve = models.add_parser("serve", help="serve the model over the Open Inference Protocol (v2 REST)")
    serve.add_argument("source", nargs="?", default=DEFAULT_PREFIX, metavar="MODEL_PREFIX", help=_SOURCE_HELP)
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
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
                       help=f"requests received or computed at once (default {settings.DEFAULT_MAX_IN_FLIGHT}); "
                            "more: 503")
    serve.add_argument("--threads", type=int, help="inference threads (default: one per core)")
    serve.add_argument("--watch", type=float, metavar="SECONDS",
                       help="check the published manifest every SECONDS and serve a new model once it is checked")
    serve.add_argument("--grace", type=float, default=30.0,
                       help="seconds requests in flight may take to finish after SIGTERM (default 30)")
    common(serve, json_flag=False)


def add_deploy_command(targets) -> None:
    """``kserve`` under ``mlwf deploy``."""
    ks = targets.add_parser("kserve", help="a KServe InferenceService running 'mlwf model serve', and its Secret")
    ks.add_argument("--image", required=True, help="the image built from the Dockerfile, e.g. ghcr.io/you/mlwf:0.1.0")
    ks.add_argument("--namespace", required=True)
    ks.add_argument("--s3-host", required=True, help="S3/MinIO host as seen from the cluster")
    ks.add_argument("--s3-port", type=int, required=True)
    ks.add_argument("--bucket", default="tless", help="bucket (default tless)")
    ks.add_argument("--model-prefix", default=DEFAULT_PREFIX, help="the published model (default ml-inference/model)")
    ks.add_argument("--name", default=kserve.DEFAULT_NAME,
                    help="InferenceService name, also the model's name in /v2/models/NAME (default mlwf)")
    ks.add_argument("--min-scale", type=int, default=1, help="pods kept running (default 1; 0 scales to zero)")
    ks.add_argument("--max-scale", type=int, default=4, help="most pods (default 4)")
    ks.add_argument("--watch", type=int, default=kserve.DEFAULT_WATCH, metavar="SECONDS",
                    help=f"pods check for a newly published model every SECONDS (default {kserve.DEFAULT_WATCH}; "
                         "0: never)")
    ks.add_argument("--out", default=kserve.DEFAULT_OUT, help=f"output folder (default {kserve.DEFAULT_OUT})")
    ks.add_argument("--json", action="store_true")
    ks.add_argument("--debug", action="store_true")


def model_export(args: argparse.Namespace) -> int:
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


def model_serve(args: argparse.Namespace) -> int:
    from mlwf.server import parse_size
    from mlwf.serving import oip

    limits = settings.Limits(max_batch=args.max_batch, max_body=parse_size(args.max_body),
                             max_pixels=args.max_pixels, max_in_flight=args.max_in_flight,
                             request_timeout=args.request_timeout, max_connections=args.max_connections,
                             max_client_connections=args.max_client_connections)
    return oip.serve(args.source, store=args.store, bucket=args.bucket, host=args.host, port=args.port,
                     name=args.name, limits=limits, threads=args.threads, watch=args.watch, grace=args.grace)


def deploy_kserve(args: argparse.Namespace) -> int:
    from mlwf import deploy

    files = kserve.render(image=args.image, namespace=args.namespace, s3_host=args.s3_host, s3_port=args.s3_port,
                          bucket=args.bucket, model_prefix=args.model_prefix, name=args.name,
                          min_scale=args.min_scale, max_scale=args.max_scale, watch=args.watch)
    written = deploy.write(files, args.out, command="mlwf deploy kserve")
    if args.json:
        print(json.dumps({"out": os.path.abspath(args.out), "files": [str(p) for p in written]}))
    else:
        print(f"wrote {len(written)} files to {args.out}/: create the Secret (see {args.out}/templates/secret.yaml), "
              f"then kubectl apply -f {args.out}/")
    return 0
