"""``mlwf serve`` (every stage as a function) and ``mlwf deploy knative|kserve`` (the manifests)."""

from __future__ import annotations

import argparse
import json
import os

from mlwf.cli.options import BUCKET_HELP, Parser
from mlwf.serving import kserve

DEFAULT_PREFIX = "ml-inference/model"


def add_parsers(sub) -> None:
    """``mlwf serve`` and ``mlwf deploy knative|kserve``."""
    sv = sub.add_parser("serve", help="run every stage as an HTTP CloudEvents function (Knative runtime contract)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface, "
                         "as a container does)")
    sv.add_argument("--port", type=int, help="port (default: $PORT, else 8080)")
    sv.add_argument("--stages", default="all", help="stages served: all (default) or WORKFLOW[/STAGE],...")
    sv.add_argument("--store", help="the one store this server acts on: a directory, file://DIR or s3:// "
                                    "(default: $MLWF_STORE, else ~/.local/share/mlwf/store); calls naming "
                                    "another store are refused")
    sv.add_argument("--bucket", help=BUCKET_HELP + "; calls naming another bucket are refused")
    sv.add_argument("--max-body", default="1MiB",
                    help="largest request body, e.g. 1MiB (default, ample for --transfer store, whose calls carry "
                         "store keys); a --transfer payload call carries its inputs, so give it the largest call's "
                         "state (up to 2GiB, with --max-memory to match); more: 413")
    sv.add_argument("--max-memory", metavar="SIZE",
                    help="memory requests may make the server hold at once, shared by all of them, e.g. 512MiB "
                         "(default: $MLWF_MAX_MEMORY, else 512MiB); a request needing more alone: 413, while "
                         "others hold it: 503")
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
    sv.add_argument("--sink-connections", type=int,
                    help="choreography: events in flight to each sink at most, each on its own connection (default "
                         "64; keep it below the receiver's --max-client-connections)")
    sv.add_argument("--run-deadline", type=float,
                    help="choreography: seconds after its start a stale run is given up (failed) instead of resumed "
                         "(default 86400)")
    sv.add_argument("--insecure-no-auth", action="store_true",
                    help="accept unsigned calls (local experiments only: anyone who can connect runs stages)")
    sv.add_argument("--debug", action="store_true", help="show tracebacks")

    dp = sub.add_parser("deploy", help="render deployment manifests")
    dps = dp.add_subparsers(dest="deploy_target", required=True, parser_class=Parser)
    kn = dps.add_parser("knative", help="Knative Services running 'mlwf serve', their Secret and driver Jobs")
    _cluster_target(kn)
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
    ks = dps.add_parser("kserve", help="a KServe InferenceService running 'mlwf model serve', and its Secret")
    _cluster_target(ks)
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

def _cluster_target(p) -> None:
    """The flags every manifest renderer takes: the image, the namespace, the S3 endpoint and bucket."""
    p.add_argument("--image", required=True, help="the image built from the Dockerfile, e.g. ghcr.io/you/mlwf:0.1.0")
    p.add_argument("--namespace", required=True)
    p.add_argument("--s3-host", required=True, help="S3/MinIO host as seen from the cluster")
    p.add_argument("--s3-port", type=int, required=True)
    p.add_argument("--bucket", default="tless", help="bucket (default tless)")


def handle(args) -> int:
    if args.command == "serve":
        from mlwf import budget
        from mlwf.backends.knative import events, server

        max_body = server.parse_size(args.max_body, events.MAX_BODY)
        return server.serve(host=args.host, port=args.port, stages=args.stages, store=args.store,
                            bucket=args.bucket, max_body=max_body, threads=args.threads,
                            grace=args.grace, insecure_no_auth=args.insecure_no_auth, max_age=args.max_age,
                            request_timeout=args.request_timeout, max_connections=args.max_connections,
                            max_client_connections=args.max_client_connections, workers=args.workers,
                            sinks=args.sink, dead_letter=args.dead_letter, delivery_retries=args.delivery_retries,
                            claim_lease=args.claim_lease, retries=args.retries,
                            max_memory=None if args.max_memory is None
                            else budget.parse_size(args.max_memory, budget.FLAG),
                            sink_connections=args.sink_connections, run_deadline=args.run_deadline)
    if args.deploy_target == "kserve":
        return deploy_kserve(args)
    from mlwf.backends.knative.deploy import render
    from mlwf.settings import Settings

    files = render(image=args.image, namespace=args.namespace, s3_host=args.s3_host, s3_port=args.s3_port,
                   bucket=args.bucket, per_stage=args.per_stage, min_scale=args.min_scale,
                   workflow_modules=Settings.resolve().workflow_modules, choreography=args.choreography)
    args.out = args.out or ("deploy/knative-choreography" if args.choreography else "deploy/knative")
    then = (f"start a run with kubectl create -f {args.out}/run/ml-training.yaml" if args.choreography
            else f"flags for mlwf run in {args.out}/endpoints.txt")
    return _write(args, files, "mlwf deploy knative",
                  f"kubectl apply -f {args.out}/ (after creating the Secret, see {args.out}/templates/secret.yaml); "
                  + then)


def deploy_kserve(args: argparse.Namespace) -> int:
    files = kserve.render(image=args.image, namespace=args.namespace, s3_host=args.s3_host, s3_port=args.s3_port,
                          bucket=args.bucket, model_prefix=args.model_prefix, name=args.name,
                          min_scale=args.min_scale, max_scale=args.max_scale, watch=args.watch)
    return _write(args, files, "mlwf deploy kserve",
                  f"create the Secret (see {args.out}/templates/secret.yaml), then kubectl apply -f {args.out}/")


def _write(args, files, command: str, next_step: str) -> int:
    """Write rendered manifests into ``--out``; say where (JSON with ``--json``) and what to do next."""
    from mlwf import deploy

    written = deploy.write(files, args.out, command=command)
    if args.json:
        print(json.dumps({"out": os.path.abspath(args.out), "files": [str(p) for p in written]}))
    else:
        print(f"wrote {len(written)} files to {args.out}/: {next_step}")
    return 0
