"""Run one stage call wherever the backend put it: resolve inputs, run, hand on outputs.

This is the only place where stage functions meet a store. It is the same code
in a local worker process, a Ray task and the HTTP function server, so every
backend moves state the same way and records the same timings. It knows no
workflow: the stage's definition (:mod:`mlwf.workflows.definition`) says
which function runs, how each input is decoded and cached, and how the
outputs are named; :mod:`mlwf.engine.layout` says where they are stored.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import resource
import secrets
import socket
import threading
import time
import warnings
from collections import OrderedDict
from typing import Any

from mlwf import budget, codec, workflows
from mlwf.engine import shm
from mlwf.engine.calls import Call, Outcome, Ref, RunContext, is_refs
from mlwf.engine.faults import maybe_inject
from mlwf.engine.layout import RunLayout
from mlwf.errors import DataError, MlwfError, StageError
from mlwf.settings import Settings
from mlwf.storage import Store, StoreSpec
from mlwf.workflows.base import Blob, StageOutput
from mlwf.workflows.definition import Input, Stage, load_function

_stores: dict[tuple, Store] = {}
_process_settings: tuple[int, Settings] | None = None
_decoded: OrderedDict[tuple, Any] = OrderedDict()
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


def store_for(spec: StoreSpec, settings: Settings) -> Store:
    """The process's store for ``spec``, opened once (with these settings) and reused."""
    key = (spec, settings.s3, settings.store_faults, os.getpid())
    store = _stores.get(key)
    if store is None:
        store = _stores[key] = spec.open(settings)
    return store


def forget_stores() -> None:
    """Close and drop the stores this process opened (a long-lived worker keeps no credentials between calls)."""
    stores = list(_stores.values())
    _stores.clear()
    for store in stores:
        with contextlib.suppress(Exception):
            store.close()


def forget_decoded() -> None:
    """Drop the decoded inputs this process keeps (a long-lived worker: one run's data is not kept for the next)."""
    _decoded.clear()


def decode(data, decoder: str, what: str, *, verify: bool = True) -> Any:
    """Turn bytes into the value a stage receives, as its input's ``decode`` says (``verify``: see
    :func:`mlwf.codec.decode`)."""
    if decoder == "raw":
        return bytes(data)
    if decoder == "codec":
        return codec.decode(data, what=what, verify=verify)
    return load_function(decoder)(data, source=what)


class _Clock:
    """Durations in ms, byte counts, and spans on the wall clock (comparable across processes and hosts)."""

    def __init__(self):
        self.ms: dict[str, float] = {}
        self.bytes: dict[str, int] = {}
        self.spans: list[tuple[str, float, float]] = []

    def add(self, name: str, start: float, nbytes: int | None = None, bytes_name: str | None = None):
        end = time.time()
        self.ms[name + "_ms"] = self.ms.get(name + "_ms", 0.0) + (end - start) * 1e3
        if nbytes is not None:
            k = bytes_name or name + "_bytes"
            self.bytes[k] = self.bytes.get(k, 0) + nbytes
        self.spans.append((name, start, end))
        return end


def _settings() -> Settings:
    global _process_settings
    if _process_settings is None or _process_settings[0] != os.getpid():
        _process_settings = (os.getpid(), Settings.resolve())
    return _process_settings[1]


def execute(call: Call, ctx: RunContext, settings: Settings | None = None) -> Outcome:
    """Run ``call`` of the run described by ``ctx`` and return its :class:`Outcome`.

    ``settings`` are the worker process's (by default resolved once per
    process from its environment): its store credentials, the workflow
    modules it knows, test-only faults.

    Raises
    ------
    MlwfError
        Whatever the stage raised for bad data (not worth retrying).
    StageError
        For any other failure, with the call's name and the error in one line.
    """
    start = time.time()
    settings = settings or _settings()
    # Every process that runs calls (local and Ray workers, mlwf serve) bounds the work its inputs
    # cause (decoded images) by MLWF_MAX_MEMORY, from its first call on.
    budget.configure_once(settings.max_memory)
    workflows.use(settings.workflow_modules)
    clock = _Clock()
    store = store_for(ctx.store, settings)
    stage = workflows.get(call.workflow).stage(call.stage)
    fn = stage.load()
    edges: list[dict] = []

    def resolve(ref: Ref, inp: Input):
        # Inputs a workflow declares cacheable (the model) are kept across runs by content; any other
        # large input only within its run: a repeated run (a benchmark's) moves its state again, as a
        # new run on new data would, rather than finding it in the worker (--state heavy's pixels).
        cache_key = (ref.sha256, inp.decode) if inp.cache else (ctx.run_id, ref.sha256, inp.decode)
        cached = _decoded.get(cache_key)
        # A cached object read from the store moved no bytes; inline bytes always rode along.
        moved = ref.nbytes if cached is None or ref.data is not None else 0
        edge = {"from": ref.producer, "to": call.stage, "bytes": moved,
                "transfer_ms": 0.0, "deserialize_ms": 0.0, "cached": cached is not None}
        if cached is not None:
            try:
                _decoded.move_to_end(cache_key)
            except KeyError:  # evicted meanwhile by another thread (the HTTP server runs calls in threads)
                pass
            edges.append(edge)
            return cached
        t = time.time()
        if ref.data is not None:
            data = ref.data
        elif ref.shm is not None:
            # Mapped, not read: the arrays decode() makes are views of the producer's pages.
            data = shm.open_view(ref.shm, ref.nbytes, owner_tag=ctx.shm_owner, run_id=ctx.run_id,
                                 what=f"{call.workflow} stage {call.name}: input {inp.name} from {ref.producer}")
            edge["transfer_ms"] = (clock.add("input_get", t, ref.nbytes, "input_bytes") - t) * 1e3
        elif ref.key is not None:
            data = store.get(ref.key)
            edge["transfer_ms"] = (clock.add("input_get", t, len(data), "input_bytes") - t) * 1e3
            if codec.digest(data) != ref.sha256:
                # Also guards objects a run references rather than copies (the published model).
                raise DataError(f"{ref.key} in bucket {ctx.bucket!r} is not the object {ref.producer} handed "
                                f"on (SHA-256 {ref.sha256}): it was replaced or damaged since; run again")
        else:
            raise StageError(f"{call.workflow} stage {call.name}: input {inp.name} from {ref.producer} is held by "
                             "the backend that made it, which did not hand it over")
        t = time.time()
        value = decode(data, inp.decode, ref.key or ref.shm or f"output of {ref.producer}",
                       verify=ref.shm is None)
        edge["deserialize_ms"] = (clock.add("input_decode", t) - t) * 1e3
        edges.append(edge)
        if inp.cache or ref.nbytes > (1 << 20):
            _decoded[cache_key] = value
            while len(_decoded) > _DECODED_MAX:
                try:
                    _decoded.popitem(last=False)
                except KeyError:
                    break
        return value

    kwargs = {}
    for name, v in call.args.items():
        if isinstance(v, Ref) or is_refs(v):
            inp = stage.input(name)
            if inp is None:
                raise StageError(f"{call.workflow} stage {call.name}: argument {name} is a reference, but the "
                                 "stage defines no such input")
            kwargs[name] = resolve(v, inp) if isinstance(v, Ref) else [resolve(x, inp) for x in v]
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
            found = store.list_keys(prefix)
            clock.add("list", t)
            return found
        kwargs["list_keys"] = list_keys

    maybe_inject(settings.call_faults, call.stage, call.index, ctx.run_id)
    t = time.time()
    try:
        with _collected_warnings() as caught:
            result = fn(**kwargs)
    except Exception as e:
        if isinstance(e, MlwfError):
            raise
        raise StageError(f"{call.workflow} stage {call.name} failed: {type(e).__name__}: {e}") from e
    run_ms = (time.time() - t) * 1e3
    clock.spans.append(("compute", t, time.time()))
    io_inside = clock.ms.get("fetch_ms", 0.0) + clock.ms.get("list_ms", 0.0)
    clock.ms["compute_ms"] = run_ms - io_inside
    if not isinstance(result, StageOutput):
        raise StageError(f"{call.workflow} stage {call.name} returned {type(result).__name__}, not StageOutput")
    if caught:
        # The libraries' warnings become facts of the call, reported once per run, never noise on stderr.
        result.info = {**result.info, "warnings": sorted(set(result.info.get("warnings", [])) | set(caught))}
    outputs = _hand_on(call, ctx, stage, result, store, clock)
    end = time.time()
    return Outcome(outputs=outputs, info=result.info, durations_ms=clock.ms, bytes=clock.bytes, input_edges=edges,
                   spans=clock.spans, worker=f"{socket.gethostname()}:{os.getpid()}", start=start, end=end,
                   rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _hand_on(call: Call, ctx: RunContext, stage: Stage, result: StageOutput, store: Store,
             clock: _Clock) -> dict[str, Ref | list[Ref]]:
    """Encode each output and put it in the store, inline or in shared memory (as the transfer says); its
    references by name.

    With ``shm`` each output is written once, straight into its segment: the
    codec lays the payload out first (:class:`mlwf.codec.Plan`), the segment
    is made that size (counted as ``put``, as reserving the memory is what a
    put costs here) and the payload is written into it (``encode``, the
    serialization: arrays copied once, the checksum taken over what was
    written). A blob (already bytes, e.g. a model) is copied in once.
    """
    named = result.parts if isinstance(result.parts, dict) else {}
    defined = [o.name for o in stage.outputs]
    if sorted(named) != sorted(defined):
        raise StageError(f"{call.workflow} stage {call.name} returned outputs {sorted(named)}, not the "
                         f"{sorted(defined)} its definition names")
    layout = RunLayout(ctx.workflow, ctx.run_id)
    number = 0  # parts are numbered in definition order, every part of a many output counted

    def hand_on(part) -> Ref:
        nonlocal number
        j, number = number, number + 1
        if ctx.transfer == "shm":
            return _into_segment(call, ctx, part, j, clock)
        t = time.time()
        stored_at, sha = None, None
        if isinstance(part, Blob):
            data, stored_at, sha = part.data, part.stored_at, part.sha256
        else:
            data = codec.encode(part)
        sha = sha or codec.digest(data)
        clock.add("encode", t, len(data), "output_bytes")
        if ctx.transfer != "store":
            return Ref(sha256=sha, nbytes=len(data), data=data, producer=call.stage)
        if stored_at is None:
            # Already an object in this store otherwise (the stage read these bytes from it): no copy.
            stored_at = layout.output(call.stage, call.index, j)
            t = time.time()
            store.put(stored_at, data)
            clock.add("put", t)
        return Ref(sha256=sha, nbytes=len(data), key=stored_at, producer=call.stage)

    outputs: dict[str, Ref | list[Ref]] = {}
    for output in stage.outputs:
        value = named[output.name]
        if output.many:
            if not isinstance(value, list):
                raise StageError(f"{call.workflow} stage {call.name}: output {output.name} must be a list")
            outputs[output.name] = [hand_on(part) for part in value]
        else:
            outputs[output.name] = hand_on(value)
    return outputs


def _into_segment(call: Call, ctx: RunContext, part: Any, j: int, clock: _Clock) -> Ref:
    """Write output part ``j`` of ``call`` into its shared-memory segment (``--transfer shm``); its Ref."""
    t = time.time()
    plan = None
    if not isinstance(part, Blob):
        plan = codec.Plan(part)  # the layout (no array copied yet): serialization's first step
        t = clock.add("encode", t)
    size = len(part.data) if plan is None else plan.size
    segment = shm.Segment(shm.segment_name(ctx.shm_owner, ctx.run_id, call.stage, call.index, j), size)
    t = clock.add("put", t)
    try:
        if plan is None:
            segment.write([part.data])
            sha = part.sha256 or codec.digest(part.data)
        else:
            # Zero-copy means no pass over the bytes but the one copy: nothing is hashed (see
            # mlwf.engine.shm); the Ref's name for them is a random one, unique to this output.
            segment.write(plan.unchecked_pieces())
            sha = secrets.token_hex(32)
        t = clock.add("encode", t, size, "output_bytes")
        segment.publish()
    except BaseException:
        segment.discard()
        raise
    clock.add("put", t)
    return Ref(sha256=sha, nbytes=size, shm=segment.name, producer=call.stage)
