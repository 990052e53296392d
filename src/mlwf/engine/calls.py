"""What crosses between the driver and a worker: calls, references and outcomes.

All of it is plain data that survives JSON (for the Knative backend) as well
as pickling between processes; none of it holds a backend's own object. A
:class:`Ref` names one output of a finished call: the store key where it was
put, or its bytes inline, or the shared-memory segment that holds them
(``--transfer shm``: :mod:`mlwf.engine.shm`), or none of these (a backend
holds it, e.g. in Ray's object store, and finds it by its checksum); always
its SHA-256, so a consumer can verify and cache it, except for a payload in a
shared-memory segment, which nothing hashes: its ``sha256`` is a random id,
unique to it (why: :mod:`mlwf.engine.shm`).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Ref:
    """One output of a finished call."""

    sha256: str
    nbytes: int
    key: str | None = None  # where it is in the object store
    data: bytes | None = None  # or the bytes themselves
    producer: str = ""  # stage that made it, for per-edge accounting
    shm: str | None = None  # or the name of the shared-memory segment holding them (mlwf.engine.shm)

    @property
    def held_by_backend(self) -> bool:
        """Not in the store, inline or shared memory: the backend that ran the call holds it (``direct``)."""
        return self.key is None and self.data is None and self.shm is None

    def to_json(self) -> dict:
        # Written out rather than dataclasses.asdict (which deep-copies field by field): a choreographed
        # replay digests every call of a batch, each naming its input Refs. Same keys, same order.
        return {"sha256": self.sha256, "nbytes": self.nbytes, "key": self.key,
                "data": None if self.data is None else base64.b64encode(self.data).decode(),
                "producer": self.producer, **({"shm": self.shm} if self.shm is not None else {})}

    @classmethod
    def from_json(cls, d: dict) -> Ref:
        d = dict(d)
        if d.get("data") is not None:
            d["data"] = base64.b64decode(d["data"])
        return cls(**d)


def is_refs(value: Any) -> bool:
    """Whether ``value`` is a non-empty list of :class:`Ref` (a gathered input, a ``many`` output)."""
    return isinstance(value, list) and bool(value) and all(isinstance(x, Ref) for x in value)


def refs_in(values) -> Iterator[Ref]:
    """Every :class:`Ref` among ``values`` (each a Ref, a list of them, or anything else), in order."""
    for v in values:
        if isinstance(v, Ref):
            yield v
        elif is_refs(v):
            yield from v


@dataclass(frozen=True)
class RunContext:
    """What every call of one run shares: the run, its store (the canonical name) and the transfer.

    ``shm_owner`` (``--transfer shm`` only) is the driver's ``<pid>.<start time>``, which every
    shared-memory segment of the run is named after (:mod:`mlwf.engine.shm`).
    """

    run_id: str
    workflow: str
    store_url: str
    bucket: str
    outputs_prefix: str  # <workflow>/outputs/<run-id> (mlwf.engine.layout)
    transfer: str = "store"
    shm_owner: str = ""

    @property
    def store(self):
        """The run's store as a :class:`~mlwf.storage.StoreSpec`."""
        from mlwf.storage import StoreSpec

        return StoreSpec(self.store_url, self.bucket)

    def to_json(self) -> dict:
        d = asdict(self)
        if not self.shm_owner:
            del d["shm_owner"]  # the same JSON as before shm existed, for every other transfer
        return d


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
    if is_refs(v):
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

    ``outputs`` maps each output of the stage, by name, to its :class:`Ref`
    (a list of them for a ``many`` output). ``durations_ms`` holds
    milliseconds: ``fetch_ms`` (store reads the stage asked for),
    ``input_get_ms`` and ``input_decode_ms`` (its inputs arriving),
    ``compute_ms``, ``encode_ms``, ``put_ms`` (its outputs leaving);
    ``bytes`` the byte counts that go with them: ``fetch_bytes``,
    ``input_bytes``, ``output_bytes``. ``spans`` are ``(name, start_s,
    end_s)`` on the worker's wall clock (``time.time()``), as are ``start``
    and ``end``.
    """

    outputs: dict[str, Ref | list[Ref]]
    info: dict[str, Any] = field(default_factory=dict)
    durations_ms: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    input_edges: list[dict] = field(default_factory=list)
    spans: list[tuple[str, float, float]] = field(default_factory=list)
    worker: str = ""
    start: float = 0.0
    end: float = 0.0
    rss_kb: int = 0  # the worker process's peak resident memory so far

    def refs(self) -> Iterator[Ref]:
        """Every output reference, in the order the stage's outputs are defined."""
        return refs_in(self.outputs.values())

    def figures(self) -> dict[str, float]:
        """Durations and byte counts together, as a run report shows them per stage."""
        return {**self.durations_ms, **self.bytes}

    def to_json(self) -> dict:
        d = asdict(self)
        d["outputs"] = {name: [r.to_json() for r in v] if isinstance(v, list) else v.to_json()
                        for name, v in self.outputs.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> Outcome:
        d = dict(d)
        d["outputs"] = {name: [Ref.from_json(r) for r in v] if isinstance(v, list) else Ref.from_json(v)
                        for name, v in d["outputs"].items()}
        d["spans"] = [tuple(s) for s in d.get("spans", [])]
        return cls(**d)
