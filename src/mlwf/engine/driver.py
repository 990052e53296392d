"""The driver: runs a workflow's stages on a backend and accounts for every call.

An :class:`Engine` owns a backend (its worker pool) and a store; it is reused
across runs, so a second run in one process is warm. Each run gets a
:class:`Run`: a run id, its own output prefix, and :meth:`Run.stages`, which
runs the calls of one or more stages concurrently and returns when all are
done (the barrier the reference's driver has between stages).
"""

from __future__ import annotations

import datetime as _dt
import json
import resource
import secrets
import time
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlwf.engine.calls import Call, Outcome, Ref, RunContext
from mlwf.engine.runner import decode_ref_bytes
from mlwf.errors import MlwfError, StageError, UsageError
from mlwf.storage import StoreSpec, join_key

from mlwf.engine import BACKENDS, TRANSFERS, make_backend


class Progress(Protocol):
    """What the driver tells a progress display."""

    def stage_started(self, stage: str, total: int) -> None: ...
    def call_done(self, stage: str) -> None: ...
    def stage_done(self, stage: str) -> None: ...


class _NoProgress:
    def stage_started(self, stage, total): pass
    def call_done(self, stage): pass
    def stage_done(self, stage): pass


def new_run_id() -> str:
    """A sortable, unique run id such as ``20261126T121500Z-3f9a1c``."""
    now = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{secrets.token_hex(3)}"


@dataclass
class StageStats:
    calls: int = 0
    wall_ms: float = 0.0
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    attempts: int = 0


class Engine:
    """Runs workflows; reuse one engine for warm runs.

    Parameters
    ----------
    store : store URL or directory (default ``MLWF_STORE`` or the default local store).
    bucket : bucket name (default ``MLWF_BUCKET`` or ``tless``).
    backend : ``"local"`` (default), ``"ray"`` or ``"knative"``.
    workers : worker processes for the local backend (default: one per core).
    transfer : how intermediate state moves between stages: ``"store"`` (every
        intermediate is an object in the store, as in the seed) or ``"direct"``
        (handed from call to call by the backend).
    backend_options : backend-specific settings (e.g. ``ray_address``, ``endpoints``).
    retries : extra attempts for a failed call (not for bad input).
    progress : an object with ``stage_started``, ``call_done``, ``stage_done``.
    preload_sklearn : import scikit-learn once in the local fork server (worth it
        for training; a process that only runs inference starts faster without).
    """

    def __init__(self, store: str | None = None, bucket: str | None = None, *, backend: str = "local",
                 workers: int | None = None, transfer: str = "store", retries: int = 2, progress=None,
                 preload_sklearn: bool = True, backend_options: dict[str, Any] | None = None):
        if backend not in BACKENDS:
            raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if transfer not in TRANSFERS:
            raise UsageError(f"unknown transfer {transfer!r}: choose one of {', '.join(TRANSFERS)}")
        if workers is not None and workers < 1:
            raise UsageError(f"--workers must be at least 1, got {workers}")
        self.spec = StoreSpec.resolve(store, bucket)
        self.store = self.spec.open()
        self.transfer = transfer
        self.retries = retries
        self.progress = progress or _NoProgress()
        self.backend = make_backend(backend, workers=workers, preload_sklearn=preload_sklearn,
                                    options=backend_options)
        if transfer not in self.backend.transfers:
            raise UsageError(f"the {backend} backend cannot do --transfer {transfer}: use "
                             f"{' or '.join(self.backend.transfers)}")
        self.backend.start()

    def start_run(self, workflow: str, params: dict[str, Any]) -> Run:
        return Run(self, workflow, params)

    def run_training(self, data_prefix: str, num_pca: int, num_train: int, **options) -> dict[str, Any]:
        """Run ml-training; see :func:`mlwf.workflows.training.drive` for the options."""
        from mlwf.workflows import training

        return training.drive(self, data_prefix, num_pca, num_train, **options)

    def run_inference(self, model_prefix: str, data_prefix: str, num_funcs: int, **options) -> dict[str, Any]:
        """Run ml-inference; see :func:`mlwf.workflows.inference.drive`."""
        from mlwf.workflows import inference

        return inference.drive(self, model_prefix, data_prefix, num_funcs, **options)

    def close(self) -> None:
        self.backend.close()
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Run:
    """One run of a workflow: its id, output prefix, stage calls and accounting."""

    def __init__(self, engine: Engine, workflow: str, params: dict[str, Any]):
        self.engine = engine
        self.workflow = workflow
        self.params = params
        self.run_id = new_run_id()
        self.outputs_prefix = join_key(workflow, "outputs", self.run_id)
        self.ctx = RunContext(self.run_id, workflow, engine.spec.url, engine.spec.bucket,
                              self.outputs_prefix, engine.transfer)
        self.stats: dict[str, StageStats] = {}
        self.edges: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.outcomes: list[tuple[Call, Outcome]] = []
        self.t0 = time.perf_counter()
        self._record("running")

    @property
    def store(self):
        return self.engine.store

    # ------------------------------------------------------------------ calls
    def stages(self, **calls: list[dict[str, Any]]) -> dict[str, list[Outcome]]:
        """Run every call of the given stages concurrently; return outcomes in call order.

        ``calls`` maps a stage name to the argument dicts of its calls.
        """
        backend = self.engine.backend
        progress = self.engine.progress
        pending: dict[Any, tuple[Call, int]] = {}
        results: dict[str, list[Outcome | None]] = {s: [None] * len(c) for s, c in calls.items()}
        started = {}
        for stage, arg_list in calls.items():
            self.stats[stage] = StageStats(calls=len(arg_list))
            progress.stage_started(stage, len(arg_list))
            started[stage] = time.perf_counter()
        for stage, arg_list in calls.items():
            for i, args in enumerate(arg_list):
                call = Call(self.workflow, stage, i, args)
                pending[backend.submit(call, self.ctx)] = (call, 0)
        remaining = {s: len(c) for s, c in calls.items()}
        for s, n in remaining.items():
            if n == 0:
                self.stats[s].wall_ms = 0.0
                progress.stage_done(s)
        try:
            while pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in done:
                    call, attempt = pending.pop(fut)
                    self.stats[call.stage].attempts += 1
                    try:
                        outcome = fut.result()
                    except MlwfError as e:
                        if not isinstance(e, StageError) or attempt >= self.engine.retries:
                            raise
                        pending[self._resubmit(call, attempt)] = (call, attempt + 1)
                        continue
                    except BrokenProcessPool:
                        if attempt >= self.engine.retries:
                            raise StageError(f"{self.workflow} stage {call.name} failed: its worker process "
                                             f"died {attempt + 1} times") from None
                        backend.reset()
                        pending = {self._resubmit(c, a, pause=False): (c, a + 1) for c, a in
                                   list(pending.values()) + [(call, attempt)]}
                        break
                    except Exception as e:  # an engine failure, not the stage's own error
                        if attempt >= self.engine.retries:
                            raise StageError(f"{self.workflow} stage {call.name} failed: "
                                             f"{type(e).__name__}: {e}") from e
                        pending[self._resubmit(call, attempt)] = (call, attempt + 1)
                        continue
                    self._account(call, outcome)
                    results[call.stage][call.index] = outcome
                    progress.call_done(call.stage)
                    remaining[call.stage] -= 1
                    if remaining[call.stage] == 0:
                        self.stats[call.stage].wall_ms = (time.perf_counter() - started[call.stage]) * 1e3
                        progress.stage_done(call.stage)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
        return {s: list(r) for s, r in results.items()}  # type: ignore[arg-type]

    def _resubmit(self, call: Call, attempt: int, pause: bool = True):
        if pause:
            time.sleep(min(0.05 * 2**attempt, 2.0))
        return self.engine.backend.submit(call, self.ctx)

    def _account(self, call: Call, outcome: Outcome) -> None:
        if any(ref.data is not None for ref in outcome.outputs):
            # Direct transfer: the outputs rode back with the outcome; the wall
            # clock from the worker's end to here is their transfer time.
            outcome.timings["return_ms"] = max(0.0, (time.time() - outcome.end) * 1e3)
        self.outcomes.append((call, outcome))
        st = self.stats[call.stage]
        for k, v in outcome.timings.items():
            st.timings[k] += v
        for e in outcome.input_edges:
            edge = self.edges[(e["from"], e["to"])]
            edge["bytes"] += e["bytes"]
            edge["transfer_ms"] += e["transfer_ms"]
            edge["deserialize_ms"] += e["deserialize_ms"]
        if "fetch_bytes" in outcome.timings:
            edge = self.edges[("store", call.stage)]
            edge["bytes"] += outcome.timings["fetch_bytes"]
            edge["transfer_ms"] += outcome.timings.get("fetch_ms", 0.0)

    def read(self, ref: Ref) -> Any:
        """Read an output in the driver (e.g. to merge results), with accounting."""
        t = time.perf_counter()
        data = ref.data if ref.data is not None else self.store.get(ref.key)
        t1 = time.perf_counter()
        value = decode_ref_bytes(data, ref)
        edge = self.edges[(ref.producer, "driver")]
        edge["bytes"] += ref.nbytes
        edge["transfer_ms"] += (t1 - t) * 1e3
        edge["deserialize_ms"] += (time.perf_counter() - t1) * 1e3
        return value

    def read_bytes(self, ref: Ref) -> bytes:
        return ref.data if ref.data is not None else self.store.get(ref.key)

    # ------------------------------------------------------------------ report
    def report(self, **extra: Any) -> dict[str, Any]:
        """The run's summary: end-to-end time, per-stage and per-edge figures."""
        e2e = (time.perf_counter() - self.t0) * 1e3
        stages = {}
        for name, st in self.stats.items():
            stages[name] = {"calls": st.calls, "attempts": st.attempts, "wall_ms": round(st.wall_ms, 3),
                            **{k: round(v, 3) for k, v in sorted(st.timings.items())}}
        edges = []
        for (src, dst), e in sorted(self.edges.items()):
            edges.append({"from": src, "to": dst, "bytes": int(e["bytes"]),
                          "serialize_ms": 0.0, "transfer_ms": round(e["transfer_ms"], 3),
                          "deserialize_ms": round(e["deserialize_ms"], 3)})
        by_producer = defaultdict(float)
        put_by_producer = defaultdict(float)
        for call, outcome in self.outcomes:
            by_producer[call.stage] += outcome.timings.get("encode_ms", 0.0)
            put_by_producer[call.stage] += outcome.timings.get("put_ms", 0.0) + outcome.timings.get("return_ms", 0.0)
        # A producer's serialization and puts are shared among its outgoing edges by bytes.
        for e in edges:
            outgoing = [x for x in edges if x["from"] == e["from"]]
            total = sum(x["bytes"] for x in outgoing) or 1
            share = e["bytes"] / total
            e["serialize_ms"] = round(by_producer.get(e["from"], 0.0) * share, 3)
            e["transfer_ms"] = round(e["transfer_ms"] + put_by_producer.get(e["from"], 0.0) * share, 3)
        transfer_ms = sum(e["serialize_ms"] + e["transfer_ms"] + e["deserialize_ms"]
                          for e in edges if e["from"] != "store")
        workers = {}
        for _, outcome in self.outcomes:
            workers[outcome.worker] = max(workers.get(outcome.worker, 0), outcome.rss_kb)
        report = {
            "workflow": self.workflow,
            "run_id": self.run_id,
            "backend": self.engine.backend.name,
            "transfer": self.engine.transfer,
            "store": self.engine.spec.url,
            "bucket": self.engine.spec.bucket,
            **extra,
            "e2e_ms": round(e2e, 3),
            "stage_ms": {k: v["wall_ms"] for k, v in stages.items()},
            "state_transfer_ms": round(transfer_ms, 3),
            "memory": {"driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                       "worker_peak_mb": round(max(workers.values(), default=0) / 1024, 1),
                       "workers": len(workers)},
            "stages": stages,
            "edges": edges,
        }
        return report

    def finish(self, report: dict[str, Any]) -> None:
        self._record("succeeded", report=report)

    def fail(self, error: BaseException) -> None:
        try:
            self._record("failed", error=str(error))
        except MlwfError:
            pass  # the store itself may be what failed; the original error matters more

    def _record(self, status: str, **extra: Any) -> None:
        doc = {"run_id": self.run_id, "workflow": self.workflow, "status": status,
               "params": self.params,
               "updated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), **extra}
        self.store.put(join_key(self.outputs_prefix, "run.json"), json.dumps(doc, indent=2).encode())
