"""``--transfer payload`` on the wire: a call's (and a reply's) state as raw bytes after its JSON.

In payload mode every input of a call rides inside its request, and every
output inside the reply (RMMap's "rpc"): nothing of the intermediate state
touches the store. In CloudEvents' binary content mode the HTTP body *is*
the event's data and ``Content-Type`` its ``datacontenttype``, so the data
may be any bytes. A payload call's data is :data:`FRAMES_TYPE`::

    header JSON (one line: {"call": ..., "context": ...} or an Outcome) | b"\\n" | blob 0 | blob 1 | ...

In the header, every :class:`~mlwf.engine.calls.Ref` whose bytes travel
inline has ``"data": null`` and ``"key": null``; the blobs follow in the order
those references appear (:func:`mlwf.engine.calls.refs_in` over the call's
arguments, or the outcome's outputs), each ``nbytes`` long. The signature
(:mod:`mlwf.backends.knative.events`) covers the header, which names each
blob's SHA-256, and each blob is checked against it on arrival: so the
signature covers every byte, as it does for a JSON call.

Why not JSON. The JSON the store mode sends holds a Ref's bytes in base64
(``Ref.to_json``), and structured mode must (the CloudEvents JSON format
carries binary data as ``data_base64``). On the project's 2-core machine, one
call carrying 32 MiB of float32 state cost 839 ms to make as JSON (base64
encode, the canonical JSON its signature hashes, the SDK's serialization)
and 570 ms to take apart (parse, canonical JSON again, base64 decode), and the
reply pays both again: 44.7 MB on the wire, 1.4 s a direction. Framed, the
same call takes 42 ms to make and 63 ms to take apart (a copy, and a SHA-256
of the bytes), 33.6 MB on the wire: 13× less (2026-12-06, best of 3-5, timing
these functions and :func:`mlwf.backends.knative.events.to_http` /
``from_http`` on the call). So binary mode carries the frames; structured
mode, which cannot, keeps the JSON (a payload run with ``structured=True``
works, at that price).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable

from mlwf import codec
from mlwf.backends.knative import events
from mlwf.engine.calls import Call, Outcome, Ref, is_refs, refs_in

#: The ``datacontenttype`` (and HTTP ``Content-Type``) of a framed payload call or reply.
FRAMES_TYPE = "application/vnd.mlwf.frames"
#: The most bytes a frame's header may take (a call's arguments and references, not its state).
MAX_HEADER = 16 << 20


class FrameError(ValueError):
    """A framed body that does not hold what its header says."""


def is_frames(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == FRAMES_TYPE


def _strip(value, blobs: list):
    """``value`` (a Ref, a list of Refs, or anything else) with inline bytes moved to ``blobs``."""
    if isinstance(value, Ref):
        if value.data is None:
            return value
        blobs.append(value.data)
        return dataclasses.replace(value, data=None)
    if is_refs(value):
        return [_strip(r, blobs) for r in value]
    return value


def split_call(call: Call) -> tuple[Call, list[bytes]]:
    """The call with its inline inputs taken out (in :func:`refs_in` order), and those bytes."""
    blobs: list[bytes] = []
    args = {name: _strip(v, blobs) for name, v in call.args.items()}
    return dataclasses.replace(call, args=args), blobs


def split_outcome(outcome: Outcome) -> tuple[Outcome, list[bytes]]:
    """The outcome with its inline outputs taken out (in :meth:`Outcome.refs` order), and those bytes."""
    blobs: list[bytes] = []
    outputs = {name: _strip(v, blobs) for name, v in outcome.outputs.items()}
    return dataclasses.replace(outcome, outputs=outputs), blobs


def frame(header: dict, blobs: Iterable[bytes]) -> bytes:
    """The body: ``header`` as one line of JSON, then the blobs."""
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    return b"".join([head, b"\n", *blobs])


def split_body(body: bytes | bytearray) -> tuple[bytes, memoryview]:
    """``(header line, the bytes after it)`` of a framed body (the header is parsed apart, after its cost is
    counted: :func:`parse_header`); :class:`FrameError` if there is no header line."""
    end = body.find(b"\n", 0, MAX_HEADER + 1)
    if end < 0:
        raise FrameError(f"no header line within the first {MAX_HEADER} bytes")
    view = memoryview(body)
    return bytes(view[:end]), view[end + 1:]


def parse_header(head: bytes) -> dict:
    """The header line as a JSON object; :class:`FrameError` if it is not one."""
    try:
        header = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise FrameError(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise FrameError("the header is not a JSON object")
    return header


def to_http(event, blobs: Iterable[bytes]) -> tuple[dict[str, str], bytes]:
    """Headers and body of ``event`` (whose data is the header) in binary content mode, framed."""
    attributes = {**event.get_attributes(), "datacontenttype": FRAMES_TYPE}
    headers, _ = events.to_http(events.make_event(attributes, None), structured=False)
    return headers, frame(event.get_data(), blobs)


def from_http(headers, body: bytes | bytearray):
    """``(event whose data is the header, the blobs' bytes)`` of a framed binary-mode message."""
    head, rest = split_body(body)
    return event_from_http(headers, head), rest


def event_from_http(headers, head: bytes):
    """The event of a framed message: its attributes from the headers, its data the header line."""
    bare = events.from_http(headers, b"")
    return events.make_event(bare.get_attributes(), parse_header(head))


def _fill(value, rest: memoryview, at: list[int]):
    """``value`` with each key-less, data-less Ref given the next ``nbytes`` of ``rest``, checked."""
    if isinstance(value, Ref):
        if value.key is not None or value.data is not None:
            return value
        if type(value.nbytes) is not int or value.nbytes < 0 or at[0] + value.nbytes > len(rest):
            raise FrameError(f"the body ends before the {value.nbytes} bytes of an output of {value.producer}")
        start, end = at[0], at[0] + value.nbytes
        data = bytes(rest[start:end])
        if codec.digest(data) != value.sha256:
            raise FrameError(f"an output of {value.producer} does not match its SHA-256 {value.sha256}")
        at[0] = end
        return dataclasses.replace(value, data=data)
    if is_refs(value):
        return [_fill(r, rest, at) for r in value]
    return value


def join_call(call: Call, rest: memoryview) -> Call:
    """The call with its inline inputs put back from ``rest``, each checked against its SHA-256."""
    at = [0]
    args = {name: _fill(v, rest, at) for name, v in call.args.items()}
    _check_end(at[0], rest)
    return dataclasses.replace(call, args=args)


def join_outcome(outcome: Outcome, rest: memoryview) -> Outcome:
    """The outcome with its inline outputs put back from ``rest``, each checked against its SHA-256."""
    at = [0]
    outputs = {name: _fill(v, rest, at) for name, v in outcome.outputs.items()}
    _check_end(at[0], rest)
    return dataclasses.replace(outcome, outputs=outputs)


def _check_end(used: int, rest: memoryview) -> None:
    if used != len(rest):
        raise FrameError(f"{len(rest) - used} bytes after the last inline output")


def inline_bytes(values) -> int:
    """Bytes carried inline by the Refs among ``values``."""
    return sum(r.nbytes for r in refs_in(values) if r.data is not None)
