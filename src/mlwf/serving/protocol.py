"""The Open Inference Protocol's infer request and response: JSON or binary tensors in, probabilities out.

See :mod:`mlwf.serving.oip` for the protocol as served.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mlwf.httpserver import json_cost
from mlwf.serving.settings import Limits

if TYPE_CHECKING:
    from mlwf.budget import Reservation
    from mlwf.serving.slot import Served


INPUT = "image"


LABEL = "label"


PROBABILITIES = "probabilities"


OUTPUTS = (LABEL, PROBABILITIES)


HEADER_LENGTH = "inference-header-content-length"


_MAX_ID = 256


MAX_ERROR = 500


class ProtocolError(Exception):
    """A refused request: an HTTP status and the protocol's ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message[:MAX_ERROR]


# --------------------------------------------------------------------------- request → pixels
@dataclass
class InferRequest:
    id: str
    pixels: np.ndarray
    outputs: list[tuple[str, bool]]  # (name, binary)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_request(body: bytes | bytearray, header_length: str | None, served: Served, limits: Limits,
                  reservation: Reservation) -> InferRequest:
    """Check an inference request and decode its images to ``float32[N, image_size²]``.

    What the request makes this process hold is taken from ``reservation``
    before it is made: its JSON's parse (:func:`mlwf.httpserver.json_cost`),
    its tensor's data and every array preparing it makes; the caller gives it
    back when the request ends.

    Parameters
    ----------
    body : the request body (JSON, or a JSON header and binary data after it).
    header_length : the ``Inference-Header-Content-Length`` header (None: all JSON).
    served : the model the request is for (its image size).
    limits : the server's limits.
    reservation : the request's share of the process's memory budget.

    Returns
    -------
    InferRequest: the request's id, its pixels and the outputs it asks for.

    Raises
    ------
    ProtocolError
        For anything the protocol or the limits refuse.
    mlwf.budget.BudgetExceeded
        If what the request needs is not in the memory budget.
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
    text = body if json_size == len(body) else bytes(memoryview(body)[:json_size])  # all JSON: no copy
    reservation.grow(json_cost(text), "the JSON of this request")
    try:
        request = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(400, f"the request is not valid JSON ({short(e)})") from None
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
        raise ProtocolError(400, f"unknown input {short(tensor.get('name'))!r}: this model takes one input, "
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
        pixels = _bytes_input(shape, tensor.get("data"), raw, served.image_size, limits, reservation)
    elif datatype == "UINT8":
        pixels = _uint8_input(shape, tensor.get("data"), raw, served.image_size, limits, reservation)
    else:
        raise ProtocolError(400, f"input {INPUT!r} has datatype {short(datatype)!r}: send BYTES [N] (encoded "
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
            raise ProtocolError(400, f"unknown output {short(name)!r}: this model gives {LABEL!r} and "
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
                                 "(--max-batch): split it, or raise --max-batch")


def _bytes_input(shape, data, raw, image_size: int, limits: Limits, reservation: Reservation) -> np.ndarray:
    if len(shape) != 1:
        raise ProtocolError(400, f"a BYTES input {INPUT!r} has shape [N] (one encoded image per element), "
                                 f"got {shape[:8]}")
    n = shape[0]
    _check_batch(n, limits)
    if raw is not None:
        reservation.grow(len(raw), f"the {n} encoded images of input {INPUT!r}")  # each element is copied out
        blobs = _split_bytes_tensor(raw, n)
    else:
        if not isinstance(data, list) or len(data) != n:
            raise ProtocolError(400, f"input {INPUT!r} has shape [{n}] but \"data\" is not a list of {n} "
                                     "base64 strings")
        blobs = []
        for i, item in enumerate(data):
            if not isinstance(item, str):
                raise ProtocolError(400, f"image {i}: in JSON each BYTES element is the image file in base64")
            reservation.grow(len(item) * 3 // 4 + 33, f"image {i} of input {INPUT!r}, decoded from base64")
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
    """The images of a BYTES input, decoded as the workflows decode them (:mod:`mlwf.images`): each
    refused from its headers before any is decoded when it is not an image mlwf decodes (400), over a
    limit of its own or of this request's ``--max-pixels`` (413); then decoded within the process's
    memory budget (413 for an image over it, 503 while other requests hold it)."""
    from mlwf import images
    from mlwf.budget import BudgetExceeded

    left = limits.max_pixels
    for i, blob in enumerate(blobs):
        if not blob:
            raise ProtocolError(400, f"image {i} is empty")
        try:
            header = images.inspect(blob)
        except images.ImageDecodeError as e:
            raise _refusal(i, e) from None
        left -= header.pixels
        if left < 0:
            raise ProtocolError(413, f"the images of this request have more than {limits.max_pixels} pixels "
                                     f"together (--max-pixels), at image {i} ({header.width}x{header.height}): "
                                     "send smaller or fewer images")
    try:
        pixels, refused = images.decode_many(blobs, image_size)
    except BudgetExceeded as e:  # busy: other requests hold the budget now
        raise ProtocolError(503, short(e, MAX_ERROR)) from None
    if refused:
        first = min(refused)
        raise _refusal(first, refused[first])
    return pixels


def _refusal(i: int, error) -> ProtocolError:
    """413 for an image over a limit (the message names it and how to raise it), else 400."""
    from mlwf.images import ImageTooLarge

    if isinstance(error, ImageTooLarge):
        return ProtocolError(413, f"image {i} is too large to decode: {short(error, MAX_ERROR)}")
    return ProtocolError(400, f"image {i} is not an image mlwf decodes: {short(error, MAX_ERROR)}")


def _uint8_input(shape, data, raw, image_size: int, limits: Limits, reservation: Reservation) -> np.ndarray:
    from mlwf.serving.prepare import prepare

    if len(shape) != 3:
        raise ProtocolError(400, f"a UINT8 input {INPUT!r} has shape [N, H, W] (grayscale pixels), got {shape[:8]}")
    n, height, width = shape
    _check_batch(n, limits)
    if height < 1 or width < 1:
        raise ProtocolError(400, f"images of {height}x{width} pixels have no pixels")
    if n * height * width > limits.max_pixels:
        raise ProtocolError(413, f"{n} images of {height}x{width} are more than {limits.max_pixels} pixels "
                                 "(--max-pixels): send smaller or fewer images, or raise --max-pixels")
    count = n * height * width
    if raw is not None:
        if len(raw) != count:
            raise ProtocolError(400, f"input {INPUT!r}: shape {shape} needs {count} bytes of UINT8 data, "
                                     f"got {len(raw)}")
    # Everything below allocates, from the shape alone: take it all before the first array.
    work = preparation_bytes(n, height, width, image_size) + (0 if raw is not None else _JSON_PIXEL_BYTES * count)
    reservation.grow(work, f"input {INPUT!r} of shape [{n}, {height}, {width}] (UINT8), resized to "
                           f"{image_size}x{image_size}")
    if raw is not None:
        pixels = np.frombuffer(raw, dtype=np.uint8)
    else:
        pixels = _json_uint8(data, count, shape)
    return prepare(pixels.reshape(n, height, width), image_size)


#: Bytes per pixel of a UINT8 tensor in JSON, besides its parsed JSON: two lists of pointers while
#: nested rows are flattened, and the array made from them.
_JSON_PIXEL_BYTES = 17


def preparation_bytes(n: int, height: int, width: int, size: int) -> int:
    """The most bytes :func:`mlwf.serving.prepare.prepare` allocates for ``n`` gray images ``height × width``.

    Its arrays, from :func:`mlwf.images.as_pixels`: a copy of the pixels,
    the resized levels (1 byte a pixel) and their float32 scaling (4 bytes).
    Then what resizing makes, which the pixel count does not bound: the
    strips of :func:`mlwf.images.resize.resize_levels`, which resizes up to
    ``RESIZE_BATCH`` images at once in two passes, each pass making
    ``size × height`` or ``size × width`` bytes per image, then Pillow's
    copy of it and a transposed copy (255 images of 65536 × 1 resized to
    16 × 16: 800 MiB); the pass-order probe of a new shape (one noise image,
    both orders); and Pillow's filter weights for one resize, a double and
    an int32 for each of about two taps per pixel of the axis it reduces
    (one 1 × 60,000,000 image: 1.1 GB). All of it is counted here from the
    shape alone, before anything is allocated.

    Parameters
    ----------
    n, height, width : the tensor's shape.
    size : the side of the square the model takes.

    Returns
    -------
    int: bytes, at least the peak of what preparing the tensor allocates.
    """
    from mlwf.images.resize import RESIZE_BATCH

    strip = size * (height + width)  # both passes' output for one image, counted together
    together = min(n, RESIZE_BATCH)
    weights = 24 * (height + width)
    return (n * height * width + 5 * n * size * size + 3 * together * strip
            + 2 * height * width + 3 * strip + weights)


def _json_uint8(data, count: int, shape) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(400, f"\"data\" of input {INPUT!r} must be a list of {count} integers 0..255")
    flat = data
    while flat and isinstance(flat[0], list):  # nested lists, row-major
        if not all(isinstance(row, list) for row in flat):
            raise ProtocolError(400, f"\"data\" of input {INPUT!r} mixes lists and numbers")
        flat = [x for row in flat for x in row]
        if len(flat) > count:
            break
    if len(flat) != count:
        raise ProtocolError(400, f"input {INPUT!r}: shape {shape} needs {count} values, \"data\" has {len(flat)}")
    # Checked as Python values, before NumPy converts them: a value out of range (10**100, -1, 300),
    # a float (0.5, 1e400 which JSON reads as inf), a boolean or a string is the client's error, not an
    # OverflowError.
    if not all(type(x) is int for x in flat) or min(flat) < 0 or max(flat) > 255:
        i, bad = next((i, x) for i, x in enumerate(flat) if type(x) is not int or not 0 <= x <= 255)
        raise ProtocolError(400, f"input {INPUT!r}: UINT8 data must be whole numbers 0..255, got "
                                 f"{_value(bad)} at element {i}")
    return np.asarray(flat, dtype=np.uint8)


def _value(x) -> str:
    """A value from a request, shown short (an integer of 4,000 digits is not repeated back)."""
    if type(x) is int and abs(x) >= 10**12:
        return f"an integer of {len(str(abs(x)))} digits"
    return short(json.dumps(x), 40)


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


def short(value, n: int = 120) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= n else text[: n - 1] + "…"
