"""The wire protocol between the Knative backend and ``mlwf serve``: CloudEvents, signed.

A stage invocation is a CloudEvent (spec 1.0, JSON data, binary or structured
HTTP mode) of type ``dev.mlwf.<workflow>.<stage>`` whose data is
``{"call": Call.to_json(), "context": RunContext.to_json()}``. The reply is a
CloudEvent of type ``dev.mlwf.<workflow>.<stage>.done`` whose data is
``Outcome.to_json()`` and whose id is ``<request id>.done``.

Authenticated chaining: both carry two extension attributes (so they survive
either HTTP mode and any CloudEvents-aware proxy):

* ``mlwftime``: the signing time, whole Unix seconds, as a string;
* ``mlwfsignature``: ``v1=`` + hex HMAC-SHA256, keyed with the shared secret
  (``MLWF_FUNCTION_SECRET``), over the length-prefixed fields
  ``mlwf-v1, kind ("call" or "done"), workflow, stage, run id,
  SHA-256 of the canonical JSON of the data, event id, mlwftime``.

Canonical JSON is ``json.dumps(data, sort_keys=True, separators=(",", ":"),
ensure_ascii=True)``, so the signature covers every byte of the call (its
arguments, input checksums and store context), not just its name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from typing import Any

from mlwf.errors import UsageError

SECRET_ENV = "MLWF_FUNCTION_SECRET"
TYPE_PREFIX = "dev.mlwf."
DONE_SUFFIX = ".done"
SIGNATURE_ATTR = "mlwfsignature"
TIME_ATTR = "mlwftime"
#: What a request is, when it is not a driver's call: ``event`` (a choreographed stage event) or
#: ``start`` (a choreographed run's start event); the kind is part of the signed message.
KIND_ATTR = "mlwfkind"
#: A dead letter mlwf itself sends (:mod:`mlwf.choreography.sinks`) signs the whole of it, the error
#: attributes included, here (see :func:`sign_dead_letter`); Knative's dead letters have no such attribute.
DEAD_SIGNATURE_ATTR = "mlwfdeadsignature"
#: The attributes Knative adds to a dead letter: where it gave up, the last status, the last answer (base64).
ERROR_ATTRS = ("knativeerrordest", "knativeerrorcode", "knativeerrordata")
#: Signatures older than this many seconds are refused (and event ids are remembered this long).
DEFAULT_MAX_AGE = 300
#: Signing times this far ahead of the server's clock are refused.
MAX_FUTURE_SKEW = 60
MIN_SECRET_CHARS = 16
#: What the rendered Secret template holds until someone puts a real secret in it.
PLACEHOLDER_SECRET = "CHANGE-ME-run-openssl-rand-hex-32"
JSON_TYPE = "application/json"
#: The largest body ``mlwf serve --max-body`` allows. A store-mode call carries keys (kilobytes); a
#: ``--transfer payload`` call carries its inputs, so the limit must admit the largest call of the
#: state-heavy workflows: 2k images ``2 8`` is about 32 MB per edge set, 60k about 1 GB, which one
#: gathering call may take whole. Every body is held in memory while it is checked, so what really
#: bounds a server is its memory budget (``--max-memory``), which every request is counted against.
MAX_BODY = 2 << 30
STRUCTURED_TYPE = "application/cloudevents+json"


def read_secret(value: str | None, *, who: str) -> str:
    """The shared secret ``value`` (the settings' ``MLWF_FUNCTION_SECRET``), checked; :class:`UsageError`
    if it is missing or unusable."""
    secret = (value or "").strip()
    if not secret:
        raise UsageError(f"{who} needs the shared secret in {SECRET_ENV} (the same value as the cluster's "
                         "Secret, e.g. from 'openssl rand -hex 32')")
    if secret == PLACEHOLDER_SECRET:
        raise UsageError(f"{SECRET_ENV} still holds the template's placeholder: put a real secret in it "
                         "(e.g. 'openssl rand -hex 32')")
    if len(secret) < MIN_SECRET_CHARS:
        raise UsageError(f"{SECRET_ENV} is too short ({len(secret)} characters): use at least "
                         f"{MIN_SECRET_CHARS}, e.g. 'openssl rand -hex 32'")
    return secret


def size_arg(n: int) -> str:
    """``n`` bytes as a size a flag takes (``64MiB``, ``2GiB``, ``1536KiB``, ``1000``)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def event_type(workflow: str, stage: str, *, done: bool = False) -> str:
    return f"{TYPE_PREFIX}{workflow}.{stage}{DONE_SUFFIX if done else ''}"


def parse_type(value: Any) -> tuple[str, str] | None:
    """``(workflow, stage)`` of a request type ``dev.mlwf.<workflow>.<stage>``, or None."""
    if not isinstance(value, str) or not value.startswith(TYPE_PREFIX):
        return None
    workflow, sep, stage = value[len(TYPE_PREFIX):].partition(".")
    if not sep or not workflow or not stage or "." in stage:
        return None
    return workflow, stage


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _message(kind: str, workflow: str, stage: str, run_id: str, data: Any, event_id: str, timestamp: str) -> bytes:
    fields = [b"mlwf-v1", kind.encode(), workflow.encode(), stage.encode(), run_id.encode(),
              hashlib.sha256(canonical_json(data)).hexdigest().encode(), event_id.encode(), timestamp.encode()]
    return b"".join(b"%d:%s" % (len(f), f) for f in fields)


def sign(secret: str, kind: str, workflow: str, stage: str, run_id: str, data: Any, event_id: str,
         timestamp: str) -> str:
    mac = hmac.new(secret.encode(), _message(kind, workflow, stage, run_id, data, event_id, timestamp),
                   hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(secret: str, signature: Any, kind: str, workflow: str, stage: str, run_id: str, data: Any,
           event_id: str, timestamp: str) -> bool:
    if not isinstance(signature, str):
        return False
    expected = sign(secret, kind, workflow, stage, run_id, data, event_id, timestamp)
    return hmac.compare_digest(expected.encode(), signature.encode())


def dead_letter_fields(attributes: dict[str, Any], data: Any) -> dict[str, Any]:
    """What a dead letter's signature covers besides the event's own fields: its data, its original
    signature and every error attribute (absent ones as null), so that no part of it can be changed."""
    return {"data": data, "signature": attributes.get(SIGNATURE_ATTR),
            "errors": {name: attributes.get(name) for name in ERROR_ATTRS}}


def sign_dead_letter(secret: str, kind: str, workflow: str, stage: str, run_id: str, attributes: dict[str, Any],
                     data: Any) -> str:
    """The signature of a whole dead letter (``attributes``: the event's, with the error attributes).

    The message is the one of :func:`sign` with kind ``dead-<kind>`` and, as
    the data, :func:`dead_letter_fields`; the event id and ``mlwftime`` are
    the original event's.
    """
    return sign(secret, f"dead-{kind}", workflow, stage, run_id, dead_letter_fields(attributes, data),
                str(attributes.get("id")), str(attributes.get(TIME_ATTR)))


def verify_dead_letter(secret: str, signature: Any, kind: str, workflow: str, stage: str, run_id: str,
                       attributes: dict[str, Any], data: Any) -> bool:
    """Whether ``signature`` signs this whole dead letter (see :func:`sign_dead_letter`)."""
    if not isinstance(signature, str):
        return False
    expected = sign_dead_letter(secret, kind, workflow, stage, run_id, attributes, data)
    return hmac.compare_digest(expected.encode(), signature.encode())


def new_event_id() -> str:
    return uuid.uuid4().hex


def now_stamp() -> str:
    return str(int(time.time()))


def make_event(attributes: dict[str, Any], data: dict[str, Any]):
    from cloudevents.core.v1.event import CloudEvent

    return CloudEvent(attributes, data)


def call_event(call_json: dict, ctx_json: dict, secret: str | None, *, source: str = "/mlwf/driver",
               event_id: str | None = None, timestamp: str | None = None, kind: str = "call"):
    """The signed CloudEvent that invokes ``call_json`` (``secret=None``: unsigned).

    ``kind="event"``: a choreographed stage event (whose server emits what comes next).
    """
    data = {"call": call_json, "context": ctx_json}
    event_id = event_id or new_event_id()
    timestamp = timestamp or now_stamp()
    attrs: dict[str, Any] = {"type": event_type(call_json["workflow"], call_json["stage"]), "source": source,
                             "id": event_id, "datacontenttype": JSON_TYPE,
                             "subject": f"{call_json['stage']}[{call_json['index']}]", TIME_ATTR: timestamp}
    if kind != "call":
        attrs[KIND_ATTR] = kind
    if secret is not None:
        attrs[SIGNATURE_ATTR] = sign(secret, kind, call_json["workflow"], call_json["stage"],
                                     ctx_json["run_id"], data, event_id, timestamp)
    return make_event(attrs, data)


def to_http(event, structured: bool = False) -> tuple[dict[str, str], bytes]:
    """Headers and body of ``event`` in binary (default) or structured content mode."""
    from cloudevents.core.bindings import http

    message = http.to_structured_event(event) if structured else http.to_binary_event(event)
    return dict(message.headers), message.body


def from_http(headers, body: bytes):
    """Parse a CloudEvents 1.0 HTTP message (either mode); raises on anything malformed."""
    from cloudevents.core.bindings import http
    from cloudevents.core.formats.json import JSONFormat
    from cloudevents.core.v1.event import CloudEvent

    message = http.HTTPMessage(headers={k.lower(): v for k, v in dict(headers).items()}, body=body)
    event = http.from_http(message, JSONFormat(), CloudEvent)
    if not hasattr(event, "get_attributes"):
        raise ValueError("not a CloudEvent")
    return event


def is_structured(headers) -> bool:
    h = {k.lower(): v for k, v in dict(headers).items()}
    return not any(k.startswith("ce-") for k in h) and h.get("content-type", "").startswith(STRUCTURED_TYPE)


def plain_json(value: Any) -> Any:
    """``value`` with NumPy scalars and arrays turned into plain JSON types."""
    import numpy as np

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, (bytes, bytearray)):
            raise TypeError("bytes in an outcome's info")
        raise TypeError(f"{type(o).__name__} is not JSON")

    return json.loads(json.dumps(value, default=default))
