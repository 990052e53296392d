"""The Ray backend's worker side: running one call in a Ray worker, as a task or in a pool worker
(:class:`mlwf.backends.ray.pool.PoolWorker`), the same way."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import ray

from mlwf.engine import runner
from mlwf.engine.calls import Call, Ref, RunContext, is_refs, refs_in
from mlwf.settings import Settings, keep_forwarded

_thread_limit: int | None = None


def _prepare_worker(env_names: list[str], cpus: float) -> None:
    """Match the driver's environment (runtime_env added its variables) and pin BLAS threads."""
    global _thread_limit
    keep_forwarded(env_names)
    limit = max(1, int(cpus))
    if _thread_limit != limit:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limit)
        _thread_limit = limit


def _fetch_inputs(call: Call, held: dict[str, Any]) -> tuple[Call, list[float], tuple[float, float, int] | None]:
    """Give every input the backend holds its bytes, from Ray's object store (zero-copy where Ray can).

    ``held`` maps the checksum of each such input to its ObjectRef. Returns the
    call, the get time (ms) of each input reference in the order
    :func:`runner.execute` resolves them, and the span of the gets.
    """
    order = list(refs_in(call.args.values()))
    wanted = [r for r in order if r.held_by_backend]
    if not wanted:
        return call, [0.0] * len(order), None
    t = time.time()
    values = ray.get([held[r.sha256] for r in wanted])
    t1 = time.time()
    total = sum(r.nbytes for r in wanted) or 1
    got = {id(r): v for r, v in zip(wanted, values)}
    ms = [((t1 - t) * 1e3 * r.nbytes / total) if id(r) in got else 0.0 for r in order]

    def swap(r: Ref) -> Ref:
        return replace(r, data=got[id(r)]) if id(r) in got else r

    args = {}
    for name, v in call.args.items():
        if isinstance(v, Ref):
            args[name] = swap(v)
        elif is_refs(v):
            args[name] = [swap(x) for x in v]
        else:
            args[name] = v
    return replace(call, args=args), ms, (t, t1, sum(r.nbytes for r in wanted))


def _run_call(call: Call, ctx: RunContext, env_names: list[str], cpus: float, held: dict[str, Any]):
    """The Ray task: run one call with the variables the driver's ``runtime_env`` set (see :func:`run_call`)."""
    _prepare_worker(env_names, cpus)
    yield from run_call(call, ctx, Settings.resolve(), held)


def run_call(call: Call, ctx: RunContext, settings: Settings, held: dict[str, Any]):
    """Run one call with ``settings``; yield each inline output (in :meth:`Outcome.refs` order), then the Outcome.

    ``held`` maps the checksum of each input held in Ray's object store to its ObjectRef.
    """
    call, get_ms, span = _fetch_inputs(call, held)
    outcome = runner.execute(call, ctx, settings)
    if span is not None:
        t, t1, nbytes = span
        outcome.durations_ms["input_get_ms"] = outcome.durations_ms.get("input_get_ms", 0.0) + (t1 - t) * 1e3
        outcome.bytes["input_bytes"] = outcome.bytes.get("input_bytes", 0) + nbytes
        outcome.spans.insert(0, ("input_get", t, t1))
        if len(get_ms) == len(outcome.input_edges):
            for edge, ms in zip(outcome.input_edges, get_ms):
                edge["transfer_ms"] += ms
    parts = []

    def keep(ref: Ref) -> Ref:
        if ref.data is None:
            return ref
        parts.append(np.frombuffer(ref.data, dtype=np.uint8))
        return replace(ref, data=None)  # held by the backend from now on

    outcome.outputs = {name: [keep(r) for r in v] if isinstance(v, list) else keep(v)
                       for name, v in outcome.outputs.items()}
    if parts:
        # Ray serializes and stores each yielded part before it resumes us.
        t = time.time()
        for part in parts:
            yield part
        t1 = time.time()
        outcome.durations_ms["put_ms"] = outcome.durations_ms.get("put_ms", 0.0) + (t1 - t) * 1e3
        outcome.spans.append(("put", t, t1))
    yield outcome


remote_call = ray.remote(_run_call)
