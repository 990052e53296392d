"""The one byte format for everything that crosses a process, a store or the network.

A payload is a JSON value in which NumPy arrays stand as ``{"__array__": i}``,
followed by the raw bytes of the arrays::

    b"MLWF" | u32 format version | u64 header length | header JSON | pad | arrays

The header lists each array's dtype, shape, offset and length, and the SHA-256
of the array section. Decoding parses JSON and reinterprets raw bytes with a
whitelisted dtype: nothing in a payload is ever executed, which is why stored or
received bytes never go through pickle. Encoding is deterministic (sorted keys,
fixed alignment), so equal content gives equal bytes and equal digests.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any

import numpy as np

from mlwf.errors import MlwfError

MAGIC = b"MLWF"
VERSION = 1
_ALIGN = 64
_PREAMBLE = struct.Struct("<4sIQ")
#: Largest header :func:`decode` reads unless told otherwise; a stage's key lists make the largest.
MAX_HEADER = 64 << 20
#: Deepest nesting of the header's JSON :func:`decode` accepts unless told otherwise.
MAX_DEPTH = 32
_MAX_NDIM = 32
_DTYPES = frozenset(
    ["|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"]
)


#: What a header holds instead of its body's SHA-256 when nothing was hashed (:meth:`Plan.write_into`
#: with ``checksum=False``): as long as a digest, and no digest, so a verifying :func:`decode` refuses it.
UNCHECKED = "-" * 64

#: Types a JSON header holds as they are.
_PLAIN = frozenset([str, int, float, bool, type(None)])


class CodecError(MlwfError):
    """Bytes that are not a valid payload (truncated, corrupt or tampered with)."""


def encode(value: Any) -> bytes:
    """Serialize a JSON-like value that may hold NumPy arrays.

    Parameters
    ----------
    value : dict, list, str, int, float, bool, None or numpy.ndarray, nested.
        Dict keys must be strings. Arrays must have a numeric or bool dtype.

    Returns
    -------
    bytes
        The payload; equal values give equal bytes.

    Raises
    ------
    TypeError
        If the value holds something else (objects, non-string keys).
    """
    plan = Plan(value)
    body = b"".join(plan.body_pieces())
    return plan.header(hashlib.sha256(body).hexdigest()) + body


class Plan:
    """The layout of one value's payload, worked out before a byte of it is written.

    :func:`encode` and :meth:`write_into` both follow it, so their bytes are the
    same. Its :attr:`size` is known before the arrays are copied anywhere: a
    caller can make a buffer of that size (a shared-memory segment) and have
    the payload written straight into it, each array copied once
    (``--transfer shm``). The header's length does not depend on the body's
    SHA-256 (always 64 hex digits), so the header can be sized first and
    written last, once the body it describes is in place.

    Raises
    ------
    TypeError
        As :func:`encode`.
    """

    def __init__(self, value: Any):
        arrays: list[np.ndarray] = []
        self.meta = _lift(value, arrays)
        self.arrays: list[np.ndarray] = []
        self.descs: list[dict] = []
        offset = 0
        for a in arrays:
            dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
            if dt.str not in _DTYPES:
                raise TypeError(f"cannot encode arrays of dtype {a.dtype}")
            offset += (-offset) % _ALIGN
            nbytes = a.size * dt.itemsize
            # A 0-d array is written as shape [1], as NumPy's ascontiguousarray always made it here.
            shape = list(a.shape) if a.ndim else [1]
            self.descs.append({"dtype": dt.str, "shape": shape, "offset": offset, "nbytes": nbytes})
            self.arrays.append(a)
            offset += nbytes
        self.body_size = offset
        self.head_size = len(self.header("0" * 64))
        #: Bytes of the whole payload.
        self.size = self.head_size + self.body_size

    def header(self, body_sha256: str) -> bytes:
        """Preamble, header JSON and padding, for a body of this SHA-256."""
        header = {"arrays": self.descs, "meta": self.meta, "sha256": body_sha256}
        hjson = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
        head_len = _PREAMBLE.size + len(hjson)
        return b"".join([_PREAMBLE.pack(MAGIC, VERSION, len(hjson)), hjson, b"\0" * ((-head_len) % _ALIGN)])

    def body_pieces(self):
        """The body as bytes pieces (padding, then each array's bytes): :func:`encode`'s way."""
        offset = 0
        for a, d in zip(self.arrays, self.descs):
            if d["offset"] > offset:
                yield b"\0" * (d["offset"] - offset)
            yield np.ascontiguousarray(a).astype(d["dtype"], copy=False).tobytes()
            offset = d["offset"] + d["nbytes"]

    def unchecked_pieces(self):
        """The payload as pieces to write in order, with no checksum (:data:`UNCHECKED` in the header)
        and nothing hashed: each array's own buffer where it is contiguous and little-endian (no copy
        here), else a contiguous copy of it. Read back only with ``decode(..., verify=False)``."""
        yield self.header(UNCHECKED)
        offset = 0
        for a, d in zip(self.arrays, self.descs):
            if d["offset"] > offset:
                yield bytes(d["offset"] - offset)
            if d["nbytes"]:
                yield np.ascontiguousarray(a).astype(d["dtype"], copy=False).reshape(-1).view(np.uint8)
            offset = d["offset"] + d["nbytes"]

    def write_into(self, buf, *, checksum: bool = True) -> str | None:
        """Write the payload into ``buf`` (writable, exactly :attr:`size` bytes); return the SHA-256 of
        the whole payload.

        Each array is copied once, from wherever it is (strided or big-endian
        arrays too) into its place in ``buf``; the body's SHA-256 is then taken
        over what ``buf`` holds, and the header is written in front of it.
        With ``checksum=False`` nothing is hashed: the header says
        :data:`UNCHECKED` where the body's SHA-256 would be, only
        ``decode(..., verify=False)`` reads the payload, and None is returned
        (``--transfer shm``: a segment read only where it was written).
        """
        out = memoryview(buf).cast("B")
        if len(out) != self.size:
            raise ValueError(f"a payload of {self.size:,} bytes needs a buffer of that size, not {len(out):,}")
        start = self.head_size
        offset = 0
        for a, d in zip(self.arrays, self.descs):
            if d["offset"] > offset:
                out[start + offset : start + d["offset"]] = bytes(d["offset"] - offset)
            if d["nbytes"]:
                dst = np.ndarray(tuple(d["shape"]), dtype=d["dtype"], buffer=out, offset=start + d["offset"])
                np.copyto(dst, a, casting="equiv")  # a big-endian array swapped on the way, nothing else cast
            offset = d["offset"] + d["nbytes"]
        body = out[start:]
        if not checksum:
            out[:start] = self.header(UNCHECKED)
            return None
        head = self.header(hashlib.sha256(body).hexdigest())
        out[:start] = head
        hasher = hashlib.sha256(head)
        hasher.update(body)
        return hasher.hexdigest()


def _lift(value: Any, arrays: list[np.ndarray]) -> Any:
    """The header's JSON for ``value``: each array replaced by ``{"__array__": i}`` and put in ``arrays``."""

    def lift(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            arrays.append(v)
            return {"__array__": len(arrays) - 1}
        if isinstance(v, dict):
            if "__array__" in v:
                raise TypeError("dict key '__array__' is reserved")
            out = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    raise TypeError(f"dict keys must be str, got {type(k).__name__}")
                out[k] = lift(x)
            return out
        if isinstance(v, (list, tuple)):
            # A list of keys or labels: nothing to lift (the driver's merge of 10,000 predictions: 11 ms less).
            if all(type(x) in _PLAIN for x in v):
                return list(v)
            return [lift(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        if v is None or isinstance(v, (str, int, float, bool)):
            return v
        raise TypeError(f"cannot encode {type(v).__name__}")

    return lift(value)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # '1e999' parses as inf
        raise ValueError(f"non-finite number {text}")
    return value


def decode(data: bytes | bytearray | memoryview, *, what: str = "payload", max_header: int = MAX_HEADER,
           max_depth: int = MAX_DEPTH, verify: bool = True) -> Any:
    """Parse a payload made by :func:`encode`, trusting nothing in it.

    Arrays come back as read-only views of ``data`` (no copy). Every claim in
    the header is checked against what the bytes can honestly hold before
    anything is built from it: the header is at most ``max_header`` bytes and
    nested at most ``max_depth`` deep, its numbers are finite, each array lies
    inside the body, arrays do not overlap, and each is referenced at most
    once, so the arrays a payload yields never add up to more than its size.
    ``verify=False`` leaves out only the body's SHA-256 (every bound above is
    checked all the same): for a payload the run wrote itself and reads where
    it was written (a shared-memory segment of this user's, mapped read-only:
    ``--transfer shm``), where hashing every byte again would be the whole
    cost of reading it.

    Raises
    ------
    CodecError
        If the bytes are truncated, corrupt, tampered with, of another format
        version, or break one of the bounds above; ``what`` names the object
        in the message.
    """
    buf = memoryview(data).cast("B")
    if len(buf) < _PREAMBLE.size:
        raise CodecError(f"{what} is truncated ({len(buf)} bytes)")
    magic, version, hlen = _PREAMBLE.unpack_from(buf)
    if magic != MAGIC:
        raise CodecError(f"{what} is not an mlwf payload (bad magic bytes)")
    if version != VERSION:
        raise CodecError(f"{what} has payload format version {version}; this mlwf reads version {VERSION}")
    if hlen > max_header:
        raise CodecError(f"{what} is corrupt (its header claims {hlen:,} bytes, more than the {max_header:,} allowed)")
    if _PREAMBLE.size + hlen > len(buf):
        raise CodecError(f"{what} is truncated (header runs past the end)")
    try:
        header = json.loads(bytes(buf[_PREAMBLE.size : _PREAMBLE.size + hlen]),
                            parse_constant=_refuse_constant, parse_float=_finite_float)
        descs = header["arrays"]
        digest = header["sha256"]
        meta = header["meta"]
        if not isinstance(descs, list) or not isinstance(digest, str):
            raise TypeError
    except RecursionError:
        raise CodecError(f"{what} is corrupt (header nested too deeply)") from None
    except (ValueError, KeyError, TypeError):
        raise CodecError(f"{what} is corrupt (unreadable header)") from None
    start = _PREAMBLE.size + hlen
    start += (-start) % _ALIGN
    body = buf[start:]
    if verify and digest == UNCHECKED:
        raise CodecError(f"{what} carries no checksum (a shared-memory payload, read only where it was "
                         "written): refused")
    if verify and hashlib.sha256(body).hexdigest() != digest:
        raise CodecError(f"{what} is corrupt or was modified (checksum mismatch)")
    arrays = []
    spans = []
    try:
        for d in descs:
            dtype, shape, off, nbytes = d["dtype"], tuple(d["shape"]), d["offset"], d["nbytes"]
            if dtype not in _DTYPES or len(shape) > _MAX_NDIM or not all(_is_count(s) for s in shape):
                raise ValueError
            dt = np.dtype(dtype)
            if not (_is_count(off) and _is_count(nbytes)) or off + nbytes > len(body):
                raise ValueError
            if math.prod(shape) * dt.itemsize != nbytes:
                raise ValueError
            spans.append((off, nbytes))
            arrays.append(np.frombuffer(body[off : off + nbytes], dtype=dt).reshape(shape))
    except (ValueError, KeyError, TypeError):
        raise CodecError(f"{what} is corrupt (bad array table)") from None
    spans.sort()
    if any(a_off + a_len > b_off for (a_off, a_len), (b_off, _) in zip(spans, spans[1:]) if a_len):
        raise CodecError(f"{what} is corrupt (arrays overlap)")
    used = set()

    def lower(v: Any, depth: int) -> Any:
        if depth > max_depth:
            raise CodecError(f"{what} is corrupt (header nested more than {max_depth} deep)")
        if isinstance(v, dict):
            if set(v) == {"__array__"}:
                i = v["__array__"]
                if not _is_count(i) or not i < len(arrays):
                    raise CodecError(f"{what} is corrupt (bad array reference)")
                if i in used:
                    raise CodecError(f"{what} is corrupt (array {i} is referenced more than once)")
                used.add(i)
                return arrays[i]
            return {k: lower(x, depth + 1) for k, x in v.items()}
        if isinstance(v, list):
            if depth < max_depth and not any(isinstance(x, (dict, list)) for x in v):
                return v  # only scalars (a list of keys): nothing to lower, nothing nested too deep
            return [lower(x, depth + 1) for x in v]
        return v

    return lower(meta, 1)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def digest(data: bytes | memoryview) -> str:
    """The SHA-256 hex digest used to name and check payloads."""
    return hashlib.sha256(data).hexdigest()
