"""``mlwf serve`` as a process: its options, the stage code loaded up front, the socket, uvicorn, the drain."""

from __future__ import annotations

import logging
import os
import sys

from mlwf import workflows
from mlwf.backends.knative import events
from mlwf.backends.knative.server.app import (DEFAULT_GRACE, DEFAULT_MAX_BODY, DEFAULT_MAX_CONNECTIONS,
                                              DEFAULT_PORT, DEFAULT_REQUEST_TIMEOUT, MAX_WORKERS,
                                              App, ServeConfig)
from mlwf.errors import UsageError
from mlwf.httpserver import bind, resolve_port, run_guarded, setup_logging
from mlwf.settings import Settings, single_threaded_blas

log = logging.getLogger("mlwf.serve")


def parse_stages(spec: str | None) -> frozenset[tuple[str, str]] | None:
    """``all`` (or empty) → None; else ``WORKFLOW/STAGE`` or ``WORKFLOW`` entries, comma-separated."""
    if not spec or spec.strip() == "all":
        return None
    known = workflows.known_stages()
    chosen: set[tuple[str, str]] = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        workflow, _, stage = item.partition("/")
        if workflow not in known or (stage and stage not in known[workflow]):
            names = ", ".join(f"{w}/{s}" for w, ss in known.items() for s in ss)
            raise UsageError(f"--stages: unknown stage {item!r}: use 'all', a workflow, or WORKFLOW/STAGE "
                             f"from {names}")
        chosen |= {(workflow, s) for s in ([stage] if stage else known[workflow])}
    if not chosen:
        raise UsageError("--stages is empty: give 'all' or WORKFLOW/STAGE,...")
    return frozenset(chosen)


# --------------------------------------------------------------------------- running it
def preload() -> None:
    """Import every stage's code now (not at the first call) and pin BLAS to one thread per call."""
    import importlib

    importlib.import_module("mlwf.engine.runner")
    for name in workflows.modules_to_preload():
        importlib.import_module(name)
    from threadpoolctl import threadpool_limits

    # Parallelism is the concurrent calls, as in the local backend's workers; one
    # BLAS thread also keeps the model bytes identical to the other backends'.
    threadpool_limits(1)


def serve(*, host: str = "127.0.0.1", port: int | None = None, stages: str | None = None,
          store: str | None = None, bucket: str | None = None,
          max_body: int = DEFAULT_MAX_BODY, threads: int | None = None, grace: float = DEFAULT_GRACE,
          insecure_no_auth: bool = False, max_age: int = events.DEFAULT_MAX_AGE,
          max_connections: int = DEFAULT_MAX_CONNECTIONS, max_client_connections: int | None = None,
          request_timeout: float = DEFAULT_REQUEST_TIMEOUT, workers: int = 0, sinks: list[str] | None = None,
          dead_letter: str | None = None, delivery_retries: int | None = None, claim_lease: float | None = None,
          retries: int | None = None, max_memory: int | str | None = None, sink_connections: int | None = None,
          run_deadline: float | None = None) -> int:
    """Run the function server until SIGTERM/SIGINT; returns the exit status (0 after a clean drain).

    ``store``/``bucket`` (default ``MLWF_STORE``/``MLWF_BUCKET``, as every
    command) name the one store the server acts on. ``request_timeout``,
    ``max_connections`` and ``max_client_connections`` (default half of
    ``max_connections``) bound connections as :mod:`mlwf.httpguard` describes.
    ``sinks`` (``URL`` or ``STAGE=URL`` entries, default ``$K_SINK``) turn on
    choreography (:mod:`mlwf.choreography`), with ``dead_letter``,
    ``delivery_retries``, ``claim_lease``, the stage's own ``retries``,
    ``sink_connections`` (deliveries in flight per sink) and ``run_deadline``.
    ``max_memory`` (bytes or a size, default ``MLWF_MAX_MEMORY``, else
    512 MiB) is the process's budget for what requests make it hold
    (:mod:`mlwf.budget`), shared by all of them.

    Raises
    ------
    UsageError
        For a bad setting (port, counts, times, stages, store URL, secret).
    """
    from mlwf import budget
    from mlwf.errors import StoreError
    from mlwf.storage import StoreSpec
    from mlwf.httpguard import Limits

    single_threaded_blas()
    settings = Settings.resolve(store=store, bucket=bucket)
    workflows.use(settings.workflow_modules)
    try:
        import uvicorn  # noqa: F401 - here for the install hint; run_guarded uses it
    except ModuleNotFoundError:
        raise UsageError("mlwf serve needs its server libraries: pip install 'mlwf[knative]'") from None
    port = resolve_port(port, settings, DEFAULT_PORT)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    if not 0 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be 0 (threads) to {MAX_WORKERS} processes, got {workers}")
    if threads is not None and threads > MAX_WORKERS:
        raise UsageError(f"--threads must be at most {MAX_WORKERS}, got {threads}")
    if not 0 <= grace < 86_400:
        raise UsageError(f"--grace must be 0 or more seconds (under a day), got {grace}")
    if not 1 <= max_age <= 86_400:
        raise UsageError(f"--max-age must be between 1 and 86400 seconds, got {max_age}")
    limits = Limits(request_timeout=request_timeout, max_connections=max_connections,
                    max_client_connections=(max(1, max_connections // 2) if max_client_connections is None
                                            else max_client_connections))
    memory = budget.configure(max_memory if max_memory is not None else settings.max_memory)
    choreography = _choreography_config(sinks, settings.k_sink, dead_letter, delivery_retries, claim_lease, retries,
                                        sink_connections, run_deadline)
    spec = StoreSpec.from_settings(settings)
    try:
        spec.open(settings).close()  # a bad URL or bucket name fails here, not at the first call
    except StoreError as e:
        raise UsageError(f"mlwf serve --store/--bucket: {e}") from None
    if insecure_no_auth:
        secret = settings.function_secret
    else:
        secret = events.read_secret(settings.function_secret,
                                    who="mlwf serve (or pass --insecure-no-auth, for local experiments only)")
    # With --insecure-no-auth, a secret that is there anyway still signs the replies.
    config = ServeConfig(store=spec.canonical(), stages=parse_stages(stages), secret=secret,
                         insecure=insecure_no_auth, max_body=max_body, max_age=max_age, threads=threads,
                         workers=workers, limits=limits, settings=settings, choreography=choreography)
    setup_logging()
    if insecure_no_auth:
        warning = ("AUTHENTICATION DISABLED (--insecure-no-auth): anyone who can reach "
                   f"{host}:{port} can run stages with this server's store credentials")
        print(f"mlwf: WARNING: {warning}", file=sys.stderr, flush=True)
        log.warning(warning)
    sock = bind(host, port)
    preload()
    app = App(config)
    served = "all stages" if config.stages is None else ", ".join(sorted(f"{w}/{s}" for w, s in config.stages))
    log.info("mlwf serve on %s:%d: %s; store %s bucket %s; max body %d bytes; memory budget %s "
             "(--max-memory); request timeout %g s; max connections %d (%d per client); %s; auth %s", host,
             sock.getsockname()[1], served, config.store.url, config.store.bucket, max_body, budget.human(memory),
             limits.request_timeout, limits.max_connections,
             limits.max_client_connections,
             f"{workers} worker processes" if workers else f"{app.threads} worker threads",
             "off" if insecure_no_auth else "HMAC-SHA256")
    if choreography is not None:
        sink = choreography.sinks
        log.info("choreography: events to %s%s; dead letters to %s; %d delivery retries; %d deliveries in flight "
                 "per sink; claims last %g s; stale runs given up %g s after their start",
                 sink.default or "per-stage sinks", "".join(f", {w}/{st}={u}" for (w, st), u in sorted(sink.routes.items())),
                 sink.dead_letter or "nowhere", choreography.delivery_retries, choreography.sink_connections,
                 choreography.lease_s, choreography.run_deadline_s)
    run_guarded(app, sock, grace)
    if app.running:
        log.error("exiting with %d calls still running after the %s s grace period", app.running, grace)
        app.pool.shutdown(wait=False, cancel_futures=True)
        if app.processes is not None:
            app.processes.reset()
        logging.shutdown()
        os._exit(1)
    app.close()
    log.info("mlwf serve stopped cleanly")
    return 0


def _choreography_config(sinks, k_sink, dead_letter, delivery_retries, claim_lease, retries, sink_connections=None,
                         run_deadline=None):
    """The choreography settings of ``mlwf serve`` (None: no sink, a driver's function server only)."""
    from mlwf.choreography.service import ChoreographyConfig
    from mlwf.choreography.sinks import parse_sinks

    parsed = parse_sinks(sinks, k_sink=k_sink, dead_letter=dead_letter)
    flags = (("--delivery-retries", "delivery_retries", delivery_retries), ("--claim-lease", "lease_s", claim_lease),
             ("--retries", "stage_retries", retries), ("--sink-connections", "sink_connections", sink_connections),
             ("--run-deadline", "run_deadline_s", run_deadline))
    if parsed is None:
        for flag, _, value in flags:
            if value is not None:
                raise UsageError(f"{flag} is for choreography: give --sink URL (or set K_SINK) too")
        return None
    given = {name: value for _, name, value in flags if value is not None}
    return ChoreographyConfig(sinks=parsed, **given).check()
