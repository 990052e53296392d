"""Run one stage call wherever the backend put it: resolve inputs, run, hand on outputs.

This is the only place where stage functions meet a store. It is the same code
in a local worker process, a Ray task and the HTTP function server, so every
backend moves state the same way and records the same timings.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import resource
import socket
import threading
import time
import warnings
from collections import OrderedDict
from typing import Any

from mlwf import codec
from mlwf.engine.calls import Call, Outcome, Ref, RunContext
from mlwf.engine.faults import maybe_inject
from mlwf.errors import DataError, StageError
from mlwf.storage import Store, StoreSpec, join_key
from mlwf.workflows import stage_function
from mlwf.workflows.base import Blob, StageOutput

_stores: dict[tuple[str, str, int], Store] = {}
_decoded: OrderedDict[tuple[str, str], Any] = OrderedDict()
_DECODED_MAX = 8
_signatures: dict[Any, frozenset[str]] = {}


_warning_sink = threading.local()
_MAX_WARNINGS = 5


def _route_warning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` while a stage runs: into the running call's list, else printed as usual."""
    sink = getattr(_warning_sink, "caught", None)
    if sink is None:
        return _route_warning.previous(message, category, filename, lineno, file, line)
    text = f"{category.__name__}: {str(message).splitlines()[0] if str(message) else ''}"[:300]
    if text not in sink and len(sink) < _MAX_WARNINGS:
        sink.append(text)


_route_warning.previous = warnings.showwarning


@contextlib.contextmanager
def _collected_warnings():
    """Collect the warnings the current thread raises (calls run in threads in the HTTP server)."""
    if warnings.showwarning is not _route_warning:
        _route_warning.previous = warnings.showwarning
        warnings.showwarning = _route_warning
    _warning_sink.caught = caught = []
    try:
        yield caught
    finally:
        _warning_sink.caught = None


def store_for(url: str, bucket: str) -> Store:
    """The process's store for ``url``/``bucket``, opened once and reused."""
    key = (url, bucket, os.getpid())
    store = _stores.get(key)
    if store is None:
        store = _stores[key] = StoreSpec(url, bucket).open()
    return store


def decode_ref_bytes(data, ref: Ref) -> Any:
    """Turn a reference's bytes into the value a stage receives."""
    if ref.kind == "raw":
        return bytes(data)
    if ref.kind == "model":
        from mlwf.model import from_bytes

        return from_bytes(data, source=ref.key or f"model {ref.sha256[:12]}")
    return codec.decode(data, what=ref.key or f"output of {ref.producer}")


class _Clock:
    """Durations in ms and spans on the wall clock (comparable across processes and hosts)."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self.spans: list[tuple[str, float, float]] = []

    def add(self, name: str, start: float, nbytes: int | None = None, bytes_name: str | None = None):
        end = time.time()
        self.t[name + "_ms"] = self.t.get(name + "_ms", 0.0) + (end - start) * 1e3
        if nbytes is not None:
            k = bytes_name or name + "_bytes"
            self.t[k] = self.t.get(k, 0) + nbytes
        self.spans.append((name, start, end))
        return end


def execute(call: Call, ctx: RunContext) -> Outcome:
    """Run ``call`` of the run described by ``ctx`` and return its :class:`Outcome`.

    Raises
    ------
    MlwfError
        Whatever the stage raised for bad data (not worth retrying).
    StageError
        For any other failure, with the call's name and the error in one line.
    """
    start = time.time()
    clock = _Clock()
    store = store_for(ctx.store_url, ctx.bucket)
    fn = stage_function(call.workflow, call.stage)
    edges: list[dict] = []

    def resolve(ref: Ref):
        cached = _decoded.get((ref.sha256, ref.kind))
        # A cached object read from the store moved no bytes; inline bytes always rode along.
        moved = ref.nbytes if cached is None or ref.data is not None else 0
        edge = {"from": ref.producer, "to": call.stage, "bytes": moved,
                "transfer_ms": 0.0, "deserialize_ms": 0.0, "cached": cached is not None}
        if cached is not None:
            try:
                _decoded.move_to_end((ref.sha256, ref.kind))
            except KeyError:  # evicted meanwhile by another thread (the HTTP server runs calls in threads)
                pass
            edges.append(edge)
            return cached
        t = time.time()
        if ref.data is not None:
            data = ref.data
        else:
            data = store.get(ref.key)
            edge["transfer_ms"] = (clock.add("input_get", t, len(data), "input_bytes") - t) * 1e3
            if codec.digest(data) != ref.sha256:
                # Also guards objects a run references rather than copies (the published model).
                raise DataError(f"{ref.key} in bucket {ctx.bucket!r} is not the object {ref.producer} handed "
                                f"on (SHA-256 {ref.sha256}): it was replaced or damaged since; run again")
        t = time.time()
        value = decode_ref_bytes(data, ref)
        edge["deserialize_ms"] = (clock.add("input_decode", t) - t) * 1e3
        edges.append(edge)
        if ref.kind == "model" or ref.nbytes > (1 << 20):
            _decoded[(ref.sha256, ref.kind)] = value
            while len(_decoded) > _DECODED_MAX:
                try:
                    _decoded.popitem(last=False)
                except KeyError:
                    break
        return value

    kwargs = {}
    for name, v in call.args.items():
        if isinstance(v, Ref):
            kwargs[name] = resolve(v)
        elif isinstance(v, list) and v and all(isinstance(x, Ref) for x in v):
            kwargs[name] = [resolve(x) for x in v]
        else:
            kwargs[name] = v

    params = _signatures.get(fn)
    if params is None:
        params = _signatures[fn] = frozenset(inspect.signature(fn).parameters)
    if "fetch" in params:
        def fetch(keys):
            t = time.time()
            blobs = store.get_many(list(keys))
            clock.add("fetch", t, sum(len(b) for b in blobs))
            return blobs
        kwargs["fetch"] = fetch
    if "list_keys" in params:
        def list_keys(prefix):
            t = time.time()
            found = [(o.key, o.size) for o in store.list(prefix)]
            clock.add("list", t)
            return found
        kwargs["list_keys"] = list_keys

    maybe_inject(call.stage, call.index, ctx.run_id)
    t = time.time()
    try:
        with _collected_warnings() as caught:
            result = fn(**kwargs)
    except Exception as e:
        from mlwf.errors import MlwfError

        if isinstance(e, MlwfError):
            raise
        raise StageError(f"{call.workflow} stage {call.name} failed: {type(e).__name__}: {e}") from e
    run_ms = (time.time() - t) * 1e3
    clock.spans.append(("compute", t, time.time()))
    io_inside = clock.t.get("fetch_ms", 0.0) + clock.t.get("list_ms", 0.0)
    clock.t["compute_ms"] = run_ms - io_inside
    if not isinstance(result, StageOutput):
        raise StageError(f"{call.workflow} stage {call.name} returned {type(result).__name__}, not StageOutput")
    if caught:
        # The libraries' warnings become facts of the call, reported once per run, never noise on stderr.
        result.info = {**result.info, "warnings": sorted(set(result.info.get("warnings", [])) | set(caught))}

    outputs = []
    for j, part in enumerate(result.parts):
        t = time.time()
        stored_at = None
        if isinstance(part, Blob):
            data, kind, stored_at = part.data, part.kind, part.stored_at
        else:
            data, kind = codec.encode(part), "codec"
        sha = codec.digest(data)
        clock.add("encode", t, len(data), "output_bytes")
        ref = Ref(sha256=sha, nbytes=len(data), kind=kind, producer=call.stage)
        if ctx.transfer == "store" and stored_at is not None:
            # Already an object in this store (the stage read these bytes from it): no copy.
            ref = Ref(sha256=sha, nbytes=len(data), kind=kind, key=stored_at, producer=call.stage)
        elif ctx.transfer == "store":
            key = join_key(ctx.outputs_prefix, call.stage, f"{call.index}-{j}.bin")
            t = time.time()
            store.put(key, data)
            clock.add("put", t)
            ref = Ref(sha256=sha, nbytes=len(data), kind=kind, key=key, producer=call.stage)
        else:
            ref = Ref(sha256=sha, nbytes=len(data), kind=kind, data=data, producer=call.stage)
        outputs.append(ref)
    end = time.time()
    return Outcome(outputs=outputs, info=result.info, timings=clock.t, input_edges=edges,
                   spans=clock.spans, worker=f"{socket.gethostname()}:{os.getpid()}", start=start, end=end,
                   rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
