"""``mlwf model serve``: the model behind the Open Inference Protocol (v2) REST API.

Endpoints (``NAME`` is ``--name``, default ``mlwf``)::

    GET  /v2                                   server metadata
    GET  /v2/health/live                       200 while the process runs
    GET  /v2/health/ready                      200 once the model is loaded, 400 while draining
    GET  /v2/models/NAME[/versions/V]          model metadata: inputs, outputs, classes
    GET  /v2/models/NAME[/versions/V]/ready
    POST /v2/models/NAME[/versions/V]/infer    inference
    POST /v2/repository/models/NAME/load       reload MODEL_PREFIX if a new model was published
    POST /v2/repository/models/NAME/unload     400: the one model is never unloaded
    POST /v2/repository/index                  the one model and its state

Inference takes one input named ``image``:

* ``BYTES`` of shape ``[N]``: each element one encoded image file (PNG, JPEG,
  anything Pillow reads), decoded exactly as the workflows decode
  (:mod:`mlwf.images`). With the binary tensor data extension the elements are
  the raw file bytes (each preceded by its 4-byte little-endian length, as
  every client library sends them); in plain JSON each element is the file in
  base64.
* ``UINT8`` of shape ``[N, H, W]``: grayscale pixels, resized as in training.

It returns ``label`` (``BYTES [N]``, class names) and ``probabilities``
(``FP32 [N, C]``, columns in the order of the metadata's ``classes``), in JSON
or, when the request asks for it (``binary_data_output``, or ``binary_data``
on a requested output), in the binary extension. ``model_version`` in every
answer is the SHA-256 of the model that computed it.

Bad input is a 4xx with the protocol's error object ``{"error": "..."}``, and
the server keeps serving: 400 for malformed JSON, a wrong input name,
datatype, shape or data (a UINT8 value outside 0..255, however large, names
the input), an empty batch, an undecodable image or corrupt compressed data;
404 for an unknown model, version or path; 408 for a request (head and body)
not received within ``--request-timeout``; 413 for a body over ``--max-body``
(counted again as a compressed body inflates), a batch over ``--max-batch``,
more decoded pixels than ``--max-pixels``, or a request that alone needs more
memory than ``--max-memory``; 415 for a ``Content-Encoding`` other than gzip
or deflate; 503 (retry) when ``--max-in-flight`` requests whose bodies have
arrived are being computed, when other requests hold the memory budget, or
while shutting down.

Bounded by design. What a request makes the process hold is taken from one
memory budget per process (:mod:`mlwf.budget`, ``--max-memory``) before it
is allocated, and given back when the request ends: its body as it arrives
(a compressed body inflated and counted piece by piece, never inflated whole
and then measured), the parse of its JSON (bounded from the text before
parsing, :func:`mlwf.httpserver.json_cost`), its tensors (shape × item size)
and every array preparing them makes (:func:`mlwf.serving.protocol.preparation_bytes`).
A request counts against ``--max-in-flight`` only once its body has
arrived, so clients that send their bodies slowly hold connections, which
:mod:`mlwf.httpguard` bounds (request heads of at most 16 KiB, whole
requests within ``--request-timeout``, ``--max-connections`` and
``--max-client-connections``, idle and half-sent connections closed first),
never the slots of requests ready to run.

The model is loaded and checked once at start (:func:`mlwf.model.load` checks
the format, checksum and every tree, then one prediction is run), and again
only on ``POST .../load`` or, with ``--watch SECONDS``, when the published
manifest names another model. A reload builds and checks the new model
completely and then swaps one reference: a request uses the model it started
with from its first pixel to its last probability, so every answer comes from
exactly one model; a model that fails its checks is never served.

Why this is written on Starlette and uvicorn (the stack of ``mlwf serve``)
rather than on KServe's ``kserve.ModelServer``: with kserve 0.21.0, (1) its
REST server always binds ``0.0.0.0`` (``kserve/protocol/rest/server.py``
hard-codes ``host="0.0.0.0"``), so ``--host 127.0.0.1`` cannot be honoured;
(2) importing ``kserve.model_server`` parses the process's ``sys.argv``
(``parser.parse_known_args()`` at import time), so it reads mlwf's own command
line; (3) it sets no limit on the request body (FastAPI reads it whole before
any check), and a request that fails its schema is answered 422 with
FastAPI's ``{"detail": [...]}``, not the protocol's ``{"error": ...}``
(measured: ``{"inputs": 3}``); (4) it requires ``protobuf<7``, ``psutil<6``,
``pandas``, ``kubernetes``, ``grpcio`` and ``grpcio-tools`` (about thirty
more packages) for a server that needs none of them. Compatibility with the
protocol's clients is tested with NVIDIA's ``tritonclient[http]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

from mlwf import budget
from mlwf.errors import MlwfError, UsageError
from mlwf.httpguard import ConnectionGuard
from mlwf.httpserver import guarded_lifespan
from mlwf.serving.protocol import (HEADER_LENGTH, INPUT, LABEL, MAX_ERROR, PROBABILITIES, ProtocolError,
                                   encode_response, parse_request, short)
from mlwf.serving.settings import DEFAULT_NAME, DEFAULT_PORT, Limits
from mlwf.serving.slot import ModelSlot, Served

log = logging.getLogger("mlwf.model.serve")


# --------------------------------------------------------------------------- the ASGI application
class App:
    """The Open Inference Protocol endpoints for one model."""

    def __init__(self, slot: ModelSlot, *, name: str = DEFAULT_NAME, limits: Limits = Limits(),
                 threads: int | None = None, watch: float | None = None):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        import mlwf

        if slot.current is None:
            raise ValueError("load the model (slot.reload()) before building the app")
        self.slot = slot
        self.name = name
        self.limits = limits
        self.watch = watch
        self.version = mlwf.__version__
        self.threads = threads or (os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="mlwf-infer")
        self.guard = ConnectionGuard(limits.connection_limits())
        self.ready = False
        self.draining = False
        self.in_flight = 0

        lifespan = guarded_lifespan(self, self._watch_loop if self.watch else None)

        model = "/v2/models/{name}"
        version = "/v2/models/{name}/versions/{version}"
        routes = [Route("/v2", self.server_metadata, methods=["GET"]),
                  Route("/v2/health/live", self.live, methods=["GET"]),
                  Route("/v2/health/ready", self.server_ready, methods=["GET"]),
                  Route("/v2/repository/index", self.repository_index, methods=["POST"]),
                  Route("/v2/repository/models/{name}/load", self.load, methods=["POST"]),
                  Route("/v2/repository/models/{name}/unload", self.unload, methods=["POST"])]
        for prefix in (model, version):
            routes += [Route(prefix, self.model_metadata, methods=["GET"]),
                       Route(prefix + "/ready", self.model_ready, methods=["GET"]),
                       Route(prefix + "/infer", self.infer, methods=["POST"])]

        async def http_error(request, exc: HTTPException):
            message = {404: f"no such endpoint: {request.method} {short(request.url.path, 200)}",
                       405: f"{request.method} is not allowed on {short(request.url.path, 200)}"}
            return _error(exc.status_code, message.get(exc.status_code, short(exc.detail)))

        async def internal_error(request, exc: Exception):
            log.exception("internal error on %s", short(request.url.path, 200))
            return _error(500, f"internal error ({type(exc).__name__}); the server keeps serving")

        self.asgi = Starlette(routes=routes, lifespan=lifespan,
                              exception_handlers={HTTPException: http_error, Exception: internal_error})

    # ------------------------------------------------------------------ health and metadata
    async def server_metadata(self, request):
        return _json({"name": "mlwf", "version": self.version,
                      "extensions": ["binary_tensor_data", "model_repository"]})

    async def live(self, request):
        return _json({"live": True})

    async def server_ready(self, request):
        ready = self.ready and not self.draining
        return _json({"ready": ready}, 200 if ready else 400)

    def _served(self, request) -> Served:
        name = request.path_params["name"]
        if name != self.name:
            raise ProtocolError(404, f"unknown model {short(name, 80)!r}: this server serves {self.name!r}")
        served = self.slot.current
        version = request.path_params.get("version")
        if version is not None and version != served.version:
            raise ProtocolError(404, f"model {self.name!r} has no version {short(version, 80)!r}; it serves "
                                     f"{served.version}")
        return served

    async def model_metadata(self, request):
        try:
            served = self._served(request)
        except ProtocolError as e:
            return _error(e.status, e.message)
        c = len(served.classes)
        return _json({
            "name": self.name, "versions": [served.version], "platform": "mlwf",
            "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": LABEL, "datatype": "BYTES", "shape": [-1]},
                        {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, c]}],
            "parameters": {"classes": list(served.classes), "image_size": served.image_size,
                           "model_digest": served.version,
                           "inputs_also_accepted": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, -1, -1]}]},
        })

    async def model_ready(self, request):
        try:
            self._served(request)
        except ProtocolError as e:
            return _error(e.status, e.message)
        ready = self.ready and not self.draining
        return _json({"name": self.name, "ready": ready}, 200 if ready else 400)

    # ------------------------------------------------------------------ inference
    async def infer(self, request):
        from starlette.requests import ClientDisconnect
        from starlette.responses import Response

        from mlwf.httpserver import Refusal, read_body

        t0 = time.perf_counter()
        status, n, version = 500, 0, "-"
        counted = False
        # Everything this request makes the process hold (its body, its parsed JSON, its tensors) is
        # taken from the one budget first, and given back when it ends, whatever its end.
        reservation = budget.MEMORY.reserve(0, "this request")
        try:
            if self.draining:
                raise ProtocolError(503, "shutting down: send the request to another instance")
            served = self._served(request)  # the one model this request uses, start to end
            version = served.version[:12]
            try:
                body = await read_body(request, self.limits.max_body, reservation)
            except Refusal as r:
                raise ProtocolError(r.status, r.error) from None
            except ClientDisconnect:
                # Gone, or closed by the guard (408 past --request-timeout): nobody to answer.
                raise ProtocolError(408, "the client went away before sending its whole request") from None
            # In flight once its body has arrived, not before: clients still sending (or trickling)
            # their bodies take connections, which the guard bounds, never the slots of requests ready
            # to run.
            if self.in_flight >= self.limits.max_in_flight:
                log.info("infer status=503 busy in_flight=%d", self.in_flight)
                raise ProtocolError(503, f"busy: {self.in_flight} requests being computed (--max-in-flight "
                                         f"{self.limits.max_in_flight}); retry shortly, or raise --max-in-flight")
            self.in_flight += 1
            counted = True
            header_length = request.headers.get(HEADER_LENGTH)
            loop = asyncio.get_running_loop()
            payload, headers, n = await loop.run_in_executor(
                self.pool, self._infer_sync, body, header_length, served, reservation)
            status = 200
            return Response(payload, status_code=200, headers=headers)
        except ProtocolError as e:
            status = e.status
            return _error(e.status, e.message)
        finally:
            if counted:
                self.in_flight -= 1
            reservation.release()
            log.info("infer status=%d images=%d model=%s ms=%.1f", status, n, version,
                     (time.perf_counter() - t0) * 1e3)

    def _infer_sync(self, body: bytearray, header_length: str | None, served: Served, reservation):
        """Parse, decode, predict, encode: in a worker thread, off the event loop."""
        try:
            parsed = parse_request(body, header_length, served, self.limits, reservation)
        except budget.BudgetExceeded as e:
            raise ProtocolError(503 if e.busy else 413, str(e)) from None
        proba = served.model.proba_from_pixels(parsed.pixels)
        payload, headers = encode_response(parsed, proba, served, self.name)
        return payload, headers, len(parsed.pixels)

    # ------------------------------------------------------------------ model repository
    async def repository_index(self, request):
        served = self.slot.current
        return _json([{"name": self.name, "version": served.version,
                       "state": "READY" if self.ready and not self.draining else "UNAVAILABLE", "reason": ""}])

    async def load(self, request):
        from starlette.requests import ClientDisconnect

        from mlwf.httpserver import Refusal, json_cost, read_body

        if request.path_params["name"] != self.name:
            return _error(404, f"unknown model {short(request.path_params['name'], 80)!r}: this server serves "
                               f"{self.name!r}")
        with budget.MEMORY.reserve(0, "a load request") as reservation:
            try:
                body = await read_body(request, 64 << 10, reservation)
                reservation.grow(json_cost(body), "the JSON of a load request")
            except budget.BudgetExceeded as e:
                return _error(503 if e.busy else 413, str(e))
            except (Refusal, ClientDisconnect):
                return _error(400, "a load request carries at most an empty JSON object")
            if body.strip():
                try:
                    options = json.loads(body)
                except (ValueError, RecursionError):
                    return _error(400, "the load request is not valid JSON")
                if not isinstance(options, dict) or options.get("parameters"):
                    # Model files or configs sent over the network are never loaded: only MODEL_PREFIX is.
                    return _error(400, f"this server loads only {self.slot.source!r} from its store; it takes "
                                       "no model files, configs or parameters")
        before = self.slot.current.version
        try:
            served, changed = await asyncio.get_running_loop().run_in_executor(None, self.slot.reload)
        except MlwfError as e:
            log.error("reload refused, still serving %s: %s", before[:12], e)
            return _error(400, f"reload failed, still serving {before}: {e}")
        if changed:
            log.info("reloaded: serving %s (was %s)", served.version[:12], before[:12])
        return _json({"name": self.name, "version": served.version, "changed": changed})

    async def unload(self, request):
        return _error(400, "this server serves one model and does not unload it: stop the server instead")

    async def _watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.watch)
            before = self.slot.current.version
            try:
                served, changed = await loop.run_in_executor(None, self.slot.reload)
            except MlwfError as e:
                log.error("--watch: the published model cannot be served, still serving %s: %s", before[:12], e)
                continue
            except Exception:  # a store hiccup must not end the watch
                log.exception("--watch: checking for a new model failed; still serving %s", before[:12])
                continue
            if changed:
                log.info("--watch: new model published, serving %s (was %s)", served.version[:12], before[:12])

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _json(content, status: int = 200):
    from starlette.responses import Response

    return Response(json.dumps(content, separators=(",", ":")), status_code=status,
                    media_type="application/json")


def _error(status: int, message: str):
    return _json({"error": message[:MAX_ERROR]}, status)


# --------------------------------------------------------------------------- running it
def serve(source: str, *, store=None, bucket: str | None = None, host: str = "127.0.0.1",
          port: int | None = None, name: str = DEFAULT_NAME, limits: Limits = Limits(),
          threads: int | None = None, watch: float | None = None, grace: float = 30.0,
          max_memory: int | str | None = None) -> int:
    """Serve the model at ``source`` until SIGTERM/SIGINT; returns the exit status.

    Parameters
    ----------
    source : model prefix in the store (e.g. ``ml-inference/model``) or a ``.mlwf`` file.
    store, bucket : the store (URL or directory) and bucket; default ``MLWF_STORE``/``MLWF_BUCKET``.
    host, port : where to listen; ``port`` defaults to ``$PORT``, else 8080.
    name : the model's name in the URLs.
    limits : request and connection limits (:class:`Limits`).
    threads : inference threads (default: one per core).
    watch : check the published manifest every this many seconds and reload on a change.
    grace : seconds requests in flight get to finish after SIGTERM.
    max_memory : the process's memory budget for what requests make it hold (bytes, or a size such as
        ``512MiB``; :mod:`mlwf.budget`); default ``MLWF_MAX_MEMORY``, else 512 MiB.

    Raises
    ------
    UsageError
        For bad options, a port that cannot be bound, or missing server libraries.
    ModelError, StoreError
        If the model cannot be loaded at start.
    """
    import re

    from mlwf.httpserver import bind, resolve_port, run_guarded, setup_logging
    from mlwf.settings import Settings, single_threaded_blas

    settings = Settings.resolve()

    try:
        import uvicorn  # noqa: F401 - here for the install hint; run_guarded uses it
    except ModuleNotFoundError:
        raise UsageError("mlwf model serve needs its server libraries: pip install 'mlwf[serve]'") from None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name or ""):
        raise UsageError(f"--name {name!r}: use letters, digits, '_', '.' and '-' (it goes in the URL)")
    port = resolve_port(port, settings, DEFAULT_PORT)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    if watch is not None and not (math.isfinite(watch) and watch >= 0.1):
        raise UsageError(f"--watch must be at least 0.1 seconds, got {watch}")
    if not (math.isfinite(grace) and grace >= 0):
        raise UsageError(f"--grace must be 0 or more seconds, got {grace}")
    limits.check()
    memory = budget.configure(max_memory if max_memory is not None else settings.max_memory)
    single_threaded_blas()
    from threadpoolctl import threadpool_limits

    # Parallelism is the concurrent requests, one BLAS thread each (as in mlwf serve).
    threadpool_limits(1)
    slot = ModelSlot(source, store=store, bucket=bucket)
    served, _ = slot.reload()
    sock = bind(host, port)
    setup_logging()
    app = App(slot, name=name, limits=limits, threads=threads, watch=watch)
    connections = app.guard.limits
    log.info("mlwf model serve on %s:%d: model %r = %s (%d classes, %dx%d images) from %s; max batch %d, "
             "max body %d bytes; memory budget %s (--max-memory); request timeout %g s; max connections %d "
             "(%d per client); %d inference threads%s", host, sock.getsockname()[1], name, served.version,
             len(served.classes), served.image_size, served.image_size, slot.describe(), limits.max_batch,
             limits.max_body, budget.human(memory), connections.request_timeout, connections.max_connections,
             connections.max_client_connections, app.threads, f"; watching every {watch:g} s" if watch else "")
    try:
        run_guarded(app, sock, grace)
    finally:
        app.close()
    log.info("mlwf model serve stopped")
    return 0
