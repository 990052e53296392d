"""What crosses between the driver and a worker: calls, references and outcomes.

All three are plain data that survive JSON (for the Knative backend) as well as
pickling between local processes. A :class:`Ref` names one output of a finished
call; it carries the output's bytes inline or the store key where they were
put, and always their SHA-256, so a consumer can verify and cache them.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field, replace
from typing import Any

#: How a consumer turns a reference's bytes back into a value.
KINDS = ("codec", "raw", "model")


@dataclass(frozen=True)
class Ref:
    """One output of a finished call."""

    sha256: str
    nbytes: int
    kind: str = "codec"
    key: str | None = None  # where it is in the object store
    data: bytes | None = None  # or the bytes themselves
    producer: str = ""  # stage that made it, for per-edge accounting
    #: Or a backend's own handle on it (a Ray ObjectRef): opaque, never in JSON.
    handle: Any = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict:
        d = asdict(replace(self, handle=None))
        del d["handle"]
        if self.data is not None:
            d["data"] = base64.b64encode(self.data).decode()
        return d

    @classmethod
    def from_json(cls, d: dict) -> Ref:
        d = dict(d)
        if d.get("data") is not None:
            d["data"] = base64.b64decode(d["data"])
        return cls(**d)


@dataclass(frozen=True)
class RunContext:
    """What every call of one run shares."""

    run_id: str
    workflow: str
    store_url: str
    bucket: str
    outputs_prefix: str  # e.g. ml-training/outputs/<run-id>
    transfer: str = "store"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Call:
    """One invocation of a stage function.

    ``args`` maps the stage function's parameters to values: JSON-able data, a
    :class:`Ref`, or a list of :class:`Ref`.
    """

    workflow: str
    stage: str
    index: int
    args: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.stage}[{self.index}]"

    def to_json(self) -> dict:
        return {"workflow": self.workflow, "stage": self.stage, "index": self.index,
                "args": {k: _arg_to_json(v) for k, v in self.args.items()}}

    @classmethod
    def from_json(cls, d: dict) -> Call:
        return cls(d["workflow"], d["stage"], int(d["index"]),
                   {k: _arg_from_json(v) for k, v in d["args"].items()})


def _arg_to_json(v):
    if isinstance(v, Ref):
        return {"__ref__": v.to_json()}
    if isinstance(v, list) and v and all(isinstance(x, Ref) for x in v):
        return {"__refs__": [x.to_json() for x in v]}
    return v


def _arg_from_json(v):
    if isinstance(v, dict) and "__ref__" in v:
        return Ref.from_json(v["__ref__"])
    if isinstance(v, dict) and "__refs__" in v:
        return [Ref.from_json(x) for x in v["__refs__"]]
    return v


@dataclass
class Outcome:
    """What a finished call reports back.

    ``timings`` holds milliseconds and byte counts: ``fetch_ms``/``fetch_bytes``
    (store reads the stage asked for), ``input_get_ms``/``input_bytes`` and
    ``input_decode_ms`` (its inputs arriving), ``compute_ms``, ``encode_ms``,
    ``put_ms``/``output_bytes`` (its outputs leaving). ``spans`` are
    ``(name, start_s, end_s)`` on the worker's wall clock (``time.time()``), as
    are ``start`` and ``end``.
    """

    outputs: list[Ref]
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    input_edges: list[dict] = field(default_factory=list)
    spans: list[tuple[str, float, float]] = field(default_factory=list)
    worker: str = ""
    start: float = 0.0
    end: float = 0.0
    rss_kb: int = 0  # the worker process's peak resident memory so far

    def to_json(self) -> dict:
        d = asdict(self)
        d["outputs"] = [r.to_json() for r in self.outputs]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Outcome:
        d = dict(d)
        d["outputs"] = [Ref.from_json(r) for r in d["outputs"]]
        d["spans"] = [tuple(s) for s in d.get("spans", [])]
        return cls(**d)
