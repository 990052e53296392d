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
datatype, shape or data, an empty batch or an undecodable image; 404 for an
unknown model, version or path; 408 for a request (head and body) not
received within ``--request-timeout``; 413 for a body over ``--max-body``, a batch over
``--max-batch`` or more decoded pixels than ``--max-pixels``; 415 for an
unsupported ``Content-Encoding``; 503 when ``--max-in-flight`` requests are
already being received or computed, or while shutting down. Connections are
bounded as for ``mlwf serve``, by :mod:`mlwf.httpguard` (request heads of at
most 16 KiB, ``--max-connections`` and ``--max-client-connections``, idle and
half-sent connections closed first).

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
import base64
import binascii
import contextlib
import io
import json
import logging
import math
import os
import struct
import threading
import time
import uuid
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlwf.errors import MlwfError, UsageError
from mlwf.httpguard import ConnectionGuard
from mlwf.serving.settings import DEFAULT_NAME, DEFAULT_PORT, Limits

log = logging.getLogger("mlwf.model.serve")

INPUT = "image"
LABEL = "label"
PROBABILITIES = "probabilities"
OUTPUTS = (LABEL, PROBABILITIES)
HEADER_LENGTH = "inference-header-content-length"
_MAX_ID = 256
_MAX_ERROR = 500


class ProtocolError(Exception):
    """A refused request: an HTTP status and the protocol's ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message[:_MAX_ERROR]


# --------------------------------------------------------------------------- the model being served
@dataclass(frozen=True)
class Served:
    """One loaded, checked model and what the protocol says about it. Never changed once built."""

    model: Any
    version: str
    classes: tuple[str, ...]
    image_size: int


class ModelSlot:
    """The model a server answers with: loaded once, replaced whole on reload.

    ``source`` is what :func:`mlwf.model.load` takes: a model prefix in the
    store (``store``/``bucket``), or a ``.mlwf`` file.
    """

    def __init__(self, source: str, *, store=None, bucket: str | None = None):
        self.source = source
        self._store_arg = store
        self._bucket = bucket
        self._store = None
        # Decided once, as mlwf.model.load decides: a file that disappears later is a failed reload, not a prefix.
        self._file = store is None and os.path.isfile(source)
        self._lock = threading.Lock()  # one reload at a time
        self.current: Served | None = None

    def _is_file(self) -> bool:
        return self._file

    def describe(self) -> str:
        if self._is_file():
            return f"file {self.source}"
        store = self._open_store()
        return f"{self.source!r} in bucket {store.bucket!r} of {store.url}"

    def _open_store(self):
        if self._store is None:
            from mlwf.storage import Store, StoreSpec

            store = self._store_arg
            self._store = store if isinstance(store, Store) else StoreSpec.resolve(store, self._bucket).open()
        return self._store

    def _published_digest(self) -> str | None:
        """The digest the store's manifest names now (None for a file source: read it to know)."""
        if self._is_file():
            return None
        import mlwf.model

        store = self._open_store()
        return mlwf.model.read_manifest(store.get, self.source, where=f"bucket {store.bucket!r} of {store.url}"
                                        ).get("sha256")

    def reload(self) -> tuple[Served, bool]:
        """Load the model at the source if it is not the one being served; check it; swap it in.

        Returns the model now served and whether it changed.

        Raises
        ------
        ModelError, StoreError
            If there is no model, or it cannot be trusted; the current model stays.
        """
        import mlwf.model

        with self._lock:
            current = self.current
            published = self._published_digest()
            if current is not None and published is not None and published == current.version:
                return current, False
            if self._is_file():
                model = mlwf.model.load(self.source)
            else:
                model = mlwf.model.load(self.source, store=self._open_store())
            if current is not None and model.digest == current.version:
                return current, False
            # A first prediction here, not in the first request: it must work, and it fills the model's caches.
            proba = model.proba_from_pixels(np.zeros((1, model.image_size**2), np.float32))
            if proba.shape != (1, len(model.classes)) or not np.all(np.isfinite(proba)):
                raise mlwf.model.ModelError(f"the model from {self.source} gives no probabilities; not serving it")
            served = Served(model, model.digest, tuple(model.classes), int(model.image_size))
            self.current = served
            return served, True


# --------------------------------------------------------------------------- request → pixels
@dataclass
class InferRequest:
    id: str
    pixels: np.ndarray
    outputs: list[tuple[str, bool]]  # (name, binary)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_request(body: bytes, header_length: str | None, served: Served, limits: Limits) -> InferRequest:
    """Check an inference request and decode its images to ``float32[N, image_size²]``.

    Raises
    ------
    ProtocolError
        For anything the protocol or the limits refuse.
    """
    if header_length is not None:
        try:
            json_size = int(header_length)
        except ValueError:
            raise ProtocolError(400, "Inference-Header-Content-Length must be a whole number of bytes") from None
        if not 0 < json_size <= len(body):
            raise ProtocolError(400, f"Inference-Header-Content-Length {json_size} does not fit in the "
                                     f"{len(body)}-byte body")
    else:
        json_size = len(body)
    binary = memoryview(body)[json_size:]
    try:
        request = json.loads(bytes(body[:json_size]), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(400, f"the request is not valid JSON ({_short(e)})") from None
    if not isinstance(request, dict):
        raise ProtocolError(400, "the request must be a JSON object with \"inputs\"")
    request_id = request.get("id", None)
    if request_id is None:
        request_id = uuid.uuid4().hex
    elif not isinstance(request_id, str) or len(request_id) > _MAX_ID:
        raise ProtocolError(400, f"\"id\" must be a string of at most {_MAX_ID} characters")
    parameters = _object(request.get("parameters"), "parameters")
    binary_default = parameters.get("binary_data_output", False) is True
    outputs = _requested_outputs(request.get("outputs"), binary_default)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(400, f"\"inputs\" must hold exactly one input, {INPUT!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise ProtocolError(400, f"unknown input {_short(tensor.get('name'))!r}: this model takes one input, "
                                 f"{INPUT!r}")
    datatype, shape = tensor.get("datatype"), _shape(tensor.get("shape"))
    input_params = _object(tensor.get("parameters"), "input parameters")
    raw = None
    if "binary_data_size" in input_params:
        size = input_params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(400, "binary_data_size must be a whole number of bytes")
        if size != len(binary):
            raise ProtocolError(400, f"binary_data_size says {size} bytes but the body carries {len(binary)} "
                                     "bytes after the JSON header")
        if "data" in tensor:
            raise ProtocolError(400, f"input {INPUT!r} has both \"data\" and binary data")
        raw = binary
    elif len(binary):
        raise ProtocolError(400, f"{len(binary)} bytes of binary data follow the JSON header, but no input "
                                 "declares binary_data_size")
    elif "data" not in tensor:
        raise ProtocolError(400, f"input {INPUT!r} has no \"data\"")
    if datatype == "BYTES":
        pixels = _bytes_input(shape, tensor.get("data"), raw, served.image_size, limits)
    elif datatype == "UINT8":
        pixels = _uint8_input(shape, tensor.get("data"), raw, served.image_size, limits)
    else:
        raise ProtocolError(400, f"input {INPUT!r} has datatype {_short(datatype)!r}: send BYTES [N] (encoded "
                                 "image files) or UINT8 [N, H, W] (grayscale pixels)")
    return InferRequest(request_id, pixels, outputs)


def _object(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(400, f"\"{what}\" must be a JSON object")
    return value


def _requested_outputs(value, binary_default: bool) -> list[tuple[str, bool]]:
    if value is None:
        return [(name, binary_default) for name in OUTPUTS]
    if not isinstance(value, list) or not value:
        raise ProtocolError(400, "\"outputs\" must be a non-empty list of {\"name\": ...}")
    chosen: list[tuple[str, bool]] = []
    for item in value:
        if not isinstance(item, dict) or item.get("name") not in OUTPUTS:
            name = item.get("name") if isinstance(item, dict) else item
            raise ProtocolError(400, f"unknown output {_short(name)!r}: this model gives {LABEL!r} and "
                                     f"{PROBABILITIES!r}")
        params = _object(item.get("parameters"), "output parameters")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ProtocolError(400, "binary_data must be true or false")
        if any(name == item["name"] for name, _ in chosen):
            raise ProtocolError(400, f"output {item['name']!r} requested twice")
        chosen.append((item["name"], binary))
    return chosen


def _shape(value) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise ProtocolError(400, f"input {INPUT!r} needs a \"shape\": a list of whole numbers")
    if any(d < 0 for d in value):
        raise ProtocolError(400, f"input {INPUT!r} has a negative dimension in its shape {value[:8]}")
    return value


def _check_batch(n: int, limits: Limits) -> None:
    if n == 0:
        raise ProtocolError(400, "empty batch: send at least one image")
    if n > limits.max_batch:
        raise ProtocolError(413, f"batch of {n} images is over this server's limit of {limits.max_batch} "
                                 "(--max-batch): split it")


def _bytes_input(shape, data, raw, image_size: int, limits: Limits) -> np.ndarray:
    if len(shape) != 1:
        raise ProtocolError(400, f"a BYTES input {INPUT!r} has shape [N] (one encoded image per element), "
                                 f"got {shape[:8]}")
    n = shape[0]
    _check_batch(n, limits)
    if raw is not None:
        blobs = _split_bytes_tensor(raw, n)
    else:
        if not isinstance(data, list) or len(data) != n:
            raise ProtocolError(400, f"input {INPUT!r} has shape [{n}] but \"data\" is not a list of {n} "
                                     "base64 strings")
        blobs = []
        for i, item in enumerate(data):
            if not isinstance(item, str):
                raise ProtocolError(400, f"image {i}: in JSON each BYTES element is the image file in base64")
            try:
                blobs.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise ProtocolError(400, f"image {i} is not valid base64 (in JSON each BYTES element is the "
                                         "image file in base64; raw bytes need the binary data extension)") from None
    return _decode(blobs, image_size, limits)


def _split_bytes_tensor(raw: memoryview, n: int) -> list[bytes]:
    """A BYTES tensor in the binary extension: each element a 4-byte little-endian length, then its bytes."""
    blobs, offset = [], 0
    for i in range(n):
        if offset + 4 > len(raw):
            raise ProtocolError(400, f"binary BYTES data ends before element {i} of {n}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ProtocolError(400, f"binary BYTES element {i} says {length} bytes but the data ends first")
        blobs.append(bytes(raw[offset : offset + length]))
        offset += length
    if offset != len(raw):
        raise ProtocolError(400, f"{len(raw) - offset} bytes of binary data left over after {n} BYTES elements")
    return blobs


def _decode(blobs: list[bytes], image_size: int, limits: Limits) -> np.ndarray:
    from PIL import Image

    from mlwf.images import ImageDecodeError, decode

    budget = limits.max_pixels
    out = np.empty((len(blobs), image_size * image_size), dtype=np.float32)
    for i, blob in enumerate(blobs):
        if not blob:
            raise ProtocolError(400, f"image {i} is empty")
        try:
            # The header alone gives the size: refuse before decoding what would take too long.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(blob)) as header:
                    width, height = header.size
        except Image.DecompressionBombError:
            raise ProtocolError(413, f"image {i} has more pixels than any image this server decodes") from None
        except Exception:  # Pillow raises many kinds (and names its buffer) for a file that is not an image
            raise ProtocolError(400, f"image {i} is not an image file (PNG, JPEG, ...) that Pillow can read") \
                from None
        budget -= width * height
        if budget < 0:
            raise ProtocolError(413, f"the images of this request have more than {limits.max_pixels} pixels "
                                     f"together (--max-pixels), at image {i} ({width}x{height}): send smaller "
                                     "or fewer images")
        try:
            out[i] = decode(blob, image_size)
        except ImageDecodeError as e:
            raise ProtocolError(400, f"image {i} cannot be decoded: {_short(e)}") from None
    return out


def _uint8_input(shape, data, raw, image_size: int, limits: Limits) -> np.ndarray:
    from mlwf.serving.prepare import prepare

    if len(shape) != 3:
        raise ProtocolError(400, f"a UINT8 input {INPUT!r} has shape [N, H, W] (grayscale pixels), got {shape[:8]}")
    n, height, width = shape
    _check_batch(n, limits)
    if height < 1 or width < 1:
        raise ProtocolError(400, f"images of {height}x{width} pixels have no pixels")
    if n * height * width > limits.max_pixels:
        raise ProtocolError(413, f"{n} images of {height}x{width} are more than {limits.max_pixels} pixels "
                                 "(--max-pixels): send smaller or fewer images")
    count = n * height * width
    if raw is not None:
        if len(raw) != count:
            raise ProtocolError(400, f"shape {shape} needs {count} bytes of UINT8 data, got {len(raw)}")
        pixels = np.frombuffer(raw, dtype=np.uint8)
    else:
        pixels = _json_uint8(data, count, shape)
    return prepare(pixels.reshape(n, height, width), image_size)


def _json_uint8(data, count: int, shape) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(400, f"\"data\" of input {INPUT!r} must be a list of {count} integers 0..255")
    flat = data
    while flat and isinstance(flat[0], list):  # nested lists, row-major
        if not all(isinstance(row, list) for row in flat):
            raise ProtocolError(400, "\"data\" mixes lists and numbers")
        flat = [x for row in flat for x in row]
        if len(flat) > count:
            break
    if len(flat) != count:
        raise ProtocolError(400, f"shape {shape} needs {count} values, \"data\" has {len(flat)}")
    if not all(type(x) is int for x in flat):
        raise ProtocolError(400, "UINT8 data must be whole numbers 0..255")
    values = np.asarray(flat, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ProtocolError(400, "UINT8 data must be whole numbers 0..255")
    return values.astype(np.uint8)


# --------------------------------------------------------------------------- probabilities → response
def encode_response(request: InferRequest, proba: np.ndarray, served: Served, model_name: str
                    ) -> tuple[bytes, dict[str, str]]:
    """The inference response body and its headers (JSON, or JSON + binary sections)."""
    n = len(proba)
    proba32 = np.ascontiguousarray(proba, dtype=np.float32)
    labels = [served.classes[i] for i in np.argmax(proba, axis=1)]
    outputs, sections = [], []
    for name, binary in request.outputs:
        if name == LABEL:
            entry: dict[str, Any] = {"name": LABEL, "datatype": "BYTES", "shape": [n]}
            if binary:
                encoded = [s.encode() for s in labels]
                section = b"".join(struct.pack("<I", len(b)) + b for b in encoded)
            else:
                entry["data"] = labels
        else:
            entry = {"name": PROBABILITIES, "datatype": "FP32", "shape": [n, len(served.classes)]}
            if binary:
                section = proba32.astype("<f4").tobytes()
            else:
                entry["data"] = proba32.ravel().tolist()
        if binary:
            entry["parameters"] = {"binary_data_size": len(section)}
            sections.append(section)
        outputs.append(entry)
    header = json.dumps({"model_name": model_name, "model_version": served.version, "id": request.id,
                         "outputs": outputs}, separators=(",", ":")).encode()
    if not sections:
        return header, {"content-type": "application/json"}
    return header + b"".join(sections), {"content-type": "application/octet-stream",
                                         HEADER_LENGTH: str(len(header))}


def _short(value, n: int = 120) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= n else text[: n - 1] + "…"


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
        self._watcher: asyncio.Task | None = None

        @contextlib.asynccontextmanager
        async def lifespan(app):
            sweeper = asyncio.create_task(self.guard.run())
            self.ready = True
            if self.watch:
                self._watcher = asyncio.create_task(self._watch_loop())
            try:
                yield
            finally:
                self.ready = False
                sweeper.cancel()
                self.guard.flush_log()
                if self._watcher is not None:
                    self._watcher.cancel()

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
            message = {404: f"no such endpoint: {request.method} {_short(request.url.path, 200)}",
                       405: f"{request.method} is not allowed on {_short(request.url.path, 200)}"}
            return _error(exc.status_code, message.get(exc.status_code, _short(exc.detail)))

        async def internal_error(request, exc: Exception):
            log.exception("internal error on %s", _short(request.url.path, 200))
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
            raise ProtocolError(404, f"unknown model {_short(name, 80)!r}: this server serves {self.name!r}")
        served = self.slot.current
        version = request.path_params.get("version")
        if version is not None and version != served.version:
            raise ProtocolError(404, f"model {self.name!r} has no version {_short(version, 80)!r}; it serves "
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

        from mlwf.server import Refusal, _read_body

        t0 = time.perf_counter()
        status, n, version = 500, 0, "-"
        if self.in_flight >= self.limits.max_in_flight:
            log.info("infer status=503 busy in_flight=%d", self.in_flight)
            return _error(503, f"busy: {self.in_flight} requests in progress (--max-in-flight); retry shortly")
        self.in_flight += 1
        try:
            if self.draining:
                raise ProtocolError(503, "shutting down: send the request to another instance")
            served = self._served(request)  # the one model this request uses, start to end
            version = served.version[:12]
            encoding = request.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("identity", "gzip", "deflate"):
                raise ProtocolError(415, f"Content-Encoding {_short(encoding, 40)!r} is not supported: send "
                                         "identity, gzip or deflate")
            try:
                body = await _read_body(request, self.limits.max_body)
            except Refusal as r:
                raise ProtocolError(r.status, f"{r.error}: split the batch or raise --max-body") from None
            except ClientDisconnect:
                # Gone, or closed by the guard (408 past --request-timeout): nobody to answer.
                raise ProtocolError(408, "the client went away before sending its whole request") from None
            header_length = request.headers.get(HEADER_LENGTH)
            loop = asyncio.get_running_loop()
            payload, headers, n = await loop.run_in_executor(
                self.pool, self._infer_sync, body, encoding, header_length, served)
            status = 200
            return Response(payload, status_code=200, headers=headers)
        except ProtocolError as e:
            status = e.status
            return _error(e.status, e.message)
        finally:
            self.in_flight -= 1
            log.info("infer status=%d images=%d model=%s ms=%.1f", status, n, version,
                     (time.perf_counter() - t0) * 1e3)

    def _infer_sync(self, body: bytes, encoding: str, header_length: str | None, served: Served):
        """Parse, decode, predict, encode: in a worker thread, off the event loop."""
        if encoding != "identity":
            body = _inflate(body, encoding, self.limits.max_body)
        parsed = parse_request(body, header_length, served, self.limits)
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

        from mlwf.server import Refusal, _read_body

        if request.path_params["name"] != self.name:
            return _error(404, f"unknown model {_short(request.path_params['name'], 80)!r}: this server serves "
                               f"{self.name!r}")
        try:
            body = await _read_body(request, 64 << 10)
        except (Refusal, ClientDisconnect):
            return _error(400, "a load request carries at most an empty JSON object")
        if body.strip():
            try:
                options = json.loads(body)
            except (ValueError, RecursionError):
                return _error(400, "the load request is not valid JSON")
            if not isinstance(options, dict) or options.get("parameters"):
                # Model files or configs sent over the network are never loaded: only MODEL_PREFIX is.
                return _error(400, f"this server loads only {self.slot.source!r} from its store; it takes no "
                                   "model files, configs or parameters")
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


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise ProtocolError(400, f"the body is not valid {encoding} data ({_short(e)})") from None
    if len(data) > limit:
        raise ProtocolError(413, f"the body inflates to more than {limit} bytes (--max-body)")
    if not inflater.eof:
        raise ProtocolError(400, f"the {encoding} body is truncated")
    return data


def _json(content, status: int = 200):
    from starlette.responses import Response

    return Response(json.dumps(content, separators=(",", ":")), status_code=status,
                    media_type="application/json")


def _error(status: int, message: str):
    return _json({"error": message[:_MAX_ERROR]}, status)


# --------------------------------------------------------------------------- running it
def serve(source: str, *, store=None, bucket: str | None = None, host: str = "0.0.0.0",
          port: int | None = None, name: str = DEFAULT_NAME, limits: Limits = Limits(),
          threads: int | None = None, watch: float | None = None, grace: float = 30.0) -> int:
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

    Raises
    ------
    UsageError
        For bad options, a port that cannot be bound, or missing server libraries.
    ModelError, StoreError
        If the model cannot be loaded at start.
    """
    import re

    from mlwf.server import _bind, _Server, _setup_logging

    try:
        import uvicorn
    except ModuleNotFoundError:
        raise UsageError("mlwf model serve needs its server libraries: pip install 'mlwf[serve]'") from None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name or ""):
        raise UsageError(f"--name {name!r}: use letters, digits, '_', '.' and '-' (it goes in the URL)")
    if port is None:
        raw = os.environ.get("PORT", str(DEFAULT_PORT))
        try:
            port = int(raw)
        except ValueError:
            raise UsageError(f"PORT={raw!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port number")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    if watch is not None and not (math.isfinite(watch) and watch >= 0.1):
        raise UsageError(f"--watch must be at least 0.1 seconds, got {watch}")
    if not (math.isfinite(grace) and grace >= 0):
        raise UsageError(f"--grace must be 0 or more seconds, got {grace}")
    limits.check()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from threadpoolctl import threadpool_limits

    # Parallelism is the concurrent requests, one BLAS thread each (as in mlwf serve).
    threadpool_limits(1)
    slot = ModelSlot(source, store=store, bucket=bucket)
    served, _ = slot.reload()
    sock = _bind(host, port)
    _setup_logging()
    app = App(slot, name=name, limits=limits, threads=threads, watch=watch)
    connections = app.guard.limits
    log.info("mlwf model serve on %s:%d: model %r = %s (%d classes, %dx%d images) from %s; max batch %d, "
             "max body %d bytes; request timeout %g s; max connections %d (%d per client); %d inference "
             "threads%s", host, sock.getsockname()[1], name, served.version, len(served.classes),
             served.image_size, served.image_size, slot.describe(), limits.max_batch, limits.max_body,
             connections.request_timeout, connections.max_connections, connections.max_client_connections,
             app.threads, f"; watching every {watch:g} s" if watch else "")
    # Connections and time bounds are mlwf.httpguard's, as for mlwf serve (see its docstring for why).
    uconfig = uvicorn.Config(app.asgi, http=app.guard.protocol_class(), ws="none", log_config=None,
                             access_log=False, lifespan="on", timeout_graceful_shutdown=grace,
                             limit_concurrency=None, timeout_keep_alive=connections.keep_alive,
                             h11_max_incomplete_event_size=connections.max_header_bytes, server_header=False,
                             proxy_headers=False)
    logging.getLogger("uvicorn.error").setLevel(logging.ERROR)
    server = _Server(uconfig, app)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        app.close()
    log.info("mlwf model serve stopped")
    return 0
