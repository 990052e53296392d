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
import math
import os
import resource
import secrets
import threading
import time
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlwf.codec import digest
from mlwf.engine.calls import Call, Outcome, Ref, RunContext
from mlwf.engine.runner import decode_ref_bytes
from mlwf.errors import MlwfError, NotFoundError, StageError, StoreError, TransientStoreError, UsageError
from mlwf.runs import (DEFAULT_HEARTBEAT_S, DEFAULT_LEASE_S, RECORD, RUN_ID, effective_status, now_utc,
                       timestamp)
from mlwf.storage import StoreSpec, join_key

from mlwf.engine import BACKENDS, TRANSFERS, make_backend


#: Upper bounds of the engine's settings: beyond them a value is a typo, not a plan.
MAX_WORKERS = 1024
MAX_RETRIES = 100
MAX_TIMEOUT_S = 30 * 24 * 3600.0


def check_count(name: str, value: Any, low: int, high: int) -> int:
    """Return ``value`` if it is an integer in ``[low, high]``, else raise :class:`UsageError`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"{name} must be an integer from {low} to {high:,}, got {value!r}")
    return value


def check_seconds(name: str, value: Any, high: float) -> float:
    """Return ``value`` if it is a finite number of seconds in ``(0, high]``, else raise :class:`UsageError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= high:
        raise UsageError(f"{name} must be a positive, finite number of seconds up to {high:,.0f}, got {value!r}")
    return float(value)


def _from_env(value: float | None, variable: str, default: float) -> Any:
    if value is not None:
        return value
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        return text  # refused with the variable's name by check_seconds


class Progress(Protocol):
    """What the driver tells a progress display."""

    def stage_started(self, stage: str, total: int) -> None: ...
    def call_done(self, stage: str) -> None: ...
    def stage_done(self, stage: str) -> None: ...


class _NoProgress:
    def stage_started(self, stage, total): pass
    def call_done(self, stage): pass
    def stage_done(self, stage): pass


def call_digest(call: Call) -> str:
    """What identifies a call's work: its stage, index and arguments (with input checksums)."""
    return digest(json.dumps(call.to_json(), sort_keys=True).encode())


def done_key(outputs_prefix: str, call: Call) -> str:
    """Where a finished call's record lives: ``<run folder>/<stage>/<index>.done.json``."""
    return join_key(outputs_prefix, call.stage, f"{call.index}.done.json")


def done_record(call: Call, outcome: Outcome) -> bytes:
    """The bytes of a finished call's record: what it was (digest) and what it made (outcome)."""
    return json.dumps({"call": call_digest(call), "outcome": outcome.to_json()}).encode()


def new_run_id() -> str:
    """A unique run id that sorts by start time, such as ``20261126T121500.123456Z-3f9a1c``."""
    now = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{now}-{secrets.token_hex(3)}"


@dataclass
class StageStats:
    calls: int = 0
    wall_ms: float = 0.0
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    attempts: int = 0
    reused: int = 0


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
    backend_options : backend-specific settings (e.g. ``address`` for Ray, ``endpoints``).
    timeout : seconds a call may run before it counts as failed (default 600, at most
        :data:`MAX_TIMEOUT_S`).
    stage_timeouts : per-stage overrides of ``timeout``, e.g. ``{"train": 120}``.
    retries : extra attempts for a failed call (not for bad input; at most :data:`MAX_RETRIES`).
    heartbeat_s, lease_s : how often a running run renews its lease in ``run.json``, and
        how long the lease lasts (default ``MLWF_HEARTBEAT_S`` and ``MLWF_LEASE_S``, else
        15 and 120 s; see :mod:`mlwf.runs`).
    progress : an object with ``stage_started``, ``call_done``, ``stage_done``.
    preload_sklearn : import scikit-learn once in the local fork server (worth it
        for training; a process that only runs inference starts faster without).
    """

    def __init__(self, store: str | None = None, bucket: str | None = None, *, backend: str = "local",
                 workers: int | None = None, transfer: str = "store", retries: int = 2, progress=None,
                 preload_sklearn: bool = True, backend_options: dict[str, Any] | None = None,
                 timeout: float = 600.0, stage_timeouts: dict[str, float] | None = None,
                 heartbeat_s: float | None = None, lease_s: float | None = None):
        if backend not in BACKENDS:
            raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if transfer not in TRANSFERS:
            raise UsageError(f"unknown transfer {transfer!r}: choose one of {', '.join(TRANSFERS)}")
        if workers is not None:
            check_count("--workers", workers, 1, MAX_WORKERS)
        check_count("--retries", retries, 0, MAX_RETRIES)
        self.timeout = check_seconds("--timeout", timeout, MAX_TIMEOUT_S)
        self.stage_timeouts = {stage: check_seconds(f"the timeout of stage {stage}", t, MAX_TIMEOUT_S)
                               for stage, t in (stage_timeouts or {}).items()}
        self.heartbeat_s = check_seconds("the heartbeat interval (MLWF_HEARTBEAT_S)",
                                         _from_env(heartbeat_s, "MLWF_HEARTBEAT_S", DEFAULT_HEARTBEAT_S),
                                         MAX_TIMEOUT_S)
        self.lease_s = check_seconds("the run lease (MLWF_LEASE_S)",
                                     _from_env(lease_s, "MLWF_LEASE_S", DEFAULT_LEASE_S), MAX_TIMEOUT_S)
        if self.lease_s < 2 * self.heartbeat_s:
            raise UsageError(f"the run lease ({self.lease_s:g} s) must last at least two heartbeats "
                             f"({self.heartbeat_s:g} s each): raise MLWF_LEASE_S or lower MLWF_HEARTBEAT_S")
        self.spec = StoreSpec.resolve(store, bucket)
        self.store = self.spec.open()
        self.transfer = transfer
        self.retries = retries
        #: Record each finished call for --resume (switch off only to measure what it costs).
        self.checkpoints = True
        self.progress = progress or _NoProgress()
        self.backend = make_backend(backend, workers=workers, preload_sklearn=preload_sklearn,
                                    options=backend_options)
        if transfer not in self.backend.transfers:
            raise UsageError(f"the {backend} backend cannot do --transfer {transfer}: use "
                             f"{' or '.join(self.backend.transfers)}")
        self.backend.start()

    def timeout_for(self, stage: str) -> float:
        return self.stage_timeouts.get(stage, self.timeout)

    def start_run(self, workflow: str, params: dict[str, Any], resume: str | None = None) -> Run:
        """A new run, or with ``resume`` the run of that id, checked to be the same work."""
        if resume is None:
            return Run(self, workflow, params)
        if self.transfer != "store":
            raise UsageError("--resume needs --transfer store: a direct-transfer run keeps no outputs to reuse")
        record = find_run(self.store, resume)
        if record is None:
            raise UsageError(f"unknown run id {resume!r} in bucket {self.spec.bucket!r} of {self.spec.url}: "
                             "see 'mlwf runs ls'")
        if effective_status(record) == "running":
            raise UsageError(f"run {resume} is still running (its driver renewed its lease at "
                             f"{record.get('heartbeat_at') or record.get('updated_at')}): resume it once it has "
                             f"finished or failed, or once it shows as abandoned in 'mlwf runs ls'")
        if record["workflow"] != workflow:
            raise UsageError(f"run {resume} is a {record['workflow']} run, not {workflow}: resume it with "
                             f"'mlwf run {record['workflow']} … --resume {resume}'")
        differ = sorted(k for k in set(params) | set(record["params"])
                        if params.get(k) != record["params"].get(k))
        if differ:
            was = ", ".join(f"{k}={record['params'].get(k)!r}" for k in differ)
            raise UsageError(f"run {resume} was started with other parameters ({was}): "
                             "resume it with the same command line")
        return Run(self, workflow, params, run_id=resume)

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


def find_run(store, run_id: str) -> dict[str, Any] | None:
    """The ``run.json`` record of the run living in ``<workflow>/outputs/<run_id>/``, or None.

    Raises :class:`UsageError` if that record is unreadable (see :func:`mlwf.runs.read_record`).
    """
    from mlwf.runs import read_record
    from mlwf.workflows import WORKFLOWS

    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        return None  # not an id mlwf makes (and never a path to follow)
    for workflow in WORKFLOWS:
        try:
            return read_record(store, workflow, run_id)
        except NotFoundError:
            continue
        except StoreError:
            return None  # not a key at all (control characters, too long)
        except ValueError as e:
            raise UsageError(f"the record of run {run_id} is not a run record mlwf can read (its {e}): start a "
                             f"new run instead, and delete its folder with 'mlwf s3 clear-dir --prefix "
                             f"{workflow}/outputs/{run_id}'") from None
    return None


class Run:
    """One run of a workflow: its id, output prefix, stage calls and accounting."""

    def __init__(self, engine: Engine, workflow: str, params: dict[str, Any], run_id: str | None = None):
        self.engine = engine
        self.workflow = workflow
        self.params = params
        self.resumed = run_id is not None
        self.run_id = run_id or new_run_id()
        self.outputs_prefix = join_key(workflow, "outputs", self.run_id)
        self.ctx = RunContext(self.run_id, workflow, engine.spec.url, engine.spec.bucket,
                              self.outputs_prefix, engine.transfer)
        self._init_accounting()
        self._workers_ready = False
        self.t0 = time.perf_counter()
        engine.last_run = self  # the latest run, kept so a trace can be built from it (mlwf.trace)
        self.started_at = timestamp(now_utc())
        self._record_lock = threading.Lock()
        self._final = False
        self._record("running")
        self._stop_heartbeat = threading.Event()
        self._heartbeat = threading.Thread(target=self._renew_lease, name=f"mlwf-lease-{self.run_id}", daemon=True)
        self._heartbeat.start()

    def _init_accounting(self) -> None:
        """What :meth:`_account` adds up and :meth:`report` reports (also used by choreographed runs)."""
        self.stats: dict[str, StageStats] = {}
        self.edges: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.outcomes: list[tuple[Call, Outcome]] = []
        #: Worker start-up this run waited for before its first stage: ms (0 when the
        #: workers were already running; None for a backend that starts them elsewhere)
        #: and its span on the wall clock.
        self.startup_ms: float | None = None
        self.startup_span: tuple[float, float] | None = None
        #: (stage, warning) -> how many calls raised it
        self.warnings: dict[tuple[str, str], int] = defaultdict(int)

    def elapsed_ms(self) -> float:
        """Milliseconds since the run started (its ``e2e_ms``)."""
        return (time.perf_counter() - self.t0) * 1e3

    @property
    def store(self):
        return self.engine.store

    # ------------------------------------------------------------------ calls
    def stages(self, **calls: list[dict[str, Any]]) -> dict[str, list[Outcome]]:
        """Run every call of the given stages concurrently; return outcomes in call order.

        ``calls`` maps a stage name to the argument dicts of its calls. A call
        that fails (its stage raised something other than bad-input errors,
        its worker died, or it ran past its stage's timeout) is retried up to
        the engine's ``retries`` with exponential backoff; its outputs have
        fixed keys and bytes, so a retry writes exactly what the first attempt
        would have. On a resumed run, a call whose recorded outputs still
        match their checksums is not run again.
        """
        backend = self.engine.backend
        progress = self.engine.progress
        if not self._workers_ready:
            self._start_workers()
        pending: dict[Any, tuple[Call, int, float]] = {}
        results: dict[str, list[Outcome | None]] = {s: [None] * len(c) for s, c in calls.items()}
        started: dict[str, float] = {}
        remaining = {s: len(c) for s, c in calls.items()}

        def finished(call: Call, outcome: Outcome) -> None:
            results[call.stage][call.index] = outcome
            progress.call_done(call.stage)
            remaining[call.stage] -= 1
            if remaining[call.stage] == 0:
                self.stats[call.stage].wall_ms = (time.perf_counter() - started[call.stage]) * 1e3
                progress.stage_done(call.stage)

        def submit(call: Call, attempt: int, pause: bool = False) -> None:
            if pause:
                time.sleep(min(0.05 * 2**attempt, 2.0))
            deadline = time.monotonic() + self.engine.timeout_for(call.stage)
            pending[backend.submit(call, self.ctx)] = (call, attempt, deadline)

        def give_up_or_restart(call: Call, attempt: int, why: str) -> None:
            """The backend lost or stuck a worker: restart it and resubmit everything in flight."""
            if attempt >= self.engine.retries:
                raise StageError(f"{self.workflow} stage {call.name} failed: {why} "
                                 f"({attempt + 1} attempts)")
            in_flight = [(c, a) for c, a, _ in pending.values()] + [(call, attempt)]
            for fut in pending:
                fut.cancel()
            pending.clear()
            backend.reset()
            for c, a in in_flight:
                submit(c, a + 1)

        for stage, arg_list in calls.items():
            self.stats[stage] = StageStats(calls=len(arg_list))
            progress.stage_started(stage, len(arg_list))
            started[stage] = time.perf_counter()
        for stage, arg_list in calls.items():
            for i, args in enumerate(arg_list):
                call = Call(self.workflow, stage, i, args)
                reused = self._reuse(call)
                if reused is not None:
                    self.stats[stage].reused += 1
                    self._account(call, reused)
                    finished(call, reused)
                else:
                    submit(call, 0)
        for s, arg_list in calls.items():
            if not arg_list:
                progress.stage_done(s)
        try:
            while pending:
                timeout = max(0.0, min(d for _, _, d in pending.values()) - time.monotonic())
                done, _ = wait(list(pending), timeout=timeout, return_when=FIRST_COMPLETED)
                if not done:
                    fut, (call, attempt, _) = min(pending.items(), key=lambda kv: kv[1][2])
                    self.stats[call.stage].attempts += 1
                    del pending[fut]
                    give_up_or_restart(call, attempt, f"timed out after {self.engine.timeout_for(call.stage):g} s")
                    continue
                for fut in done:
                    if fut not in pending:
                        continue  # cancelled by a restart in this same batch
                    call, attempt, _ = pending.pop(fut)
                    self.stats[call.stage].attempts += 1
                    try:
                        outcome = fut.result()
                    except MlwfError as e:
                        if not isinstance(e, (StageError, TransientStoreError)) or attempt >= self.engine.retries:
                            raise
                        submit(call, attempt + 1, pause=True)
                        continue
                    except BrokenProcessPool:
                        give_up_or_restart(call, attempt, "its worker process died")
                        break
                    except Exception as e:  # an engine failure, not the stage's own error
                        if attempt >= self.engine.retries:
                            raise StageError(f"{self.workflow} stage {call.name} failed: "
                                             f"{type(e).__name__}: {e}") from e
                        submit(call, attempt + 1, pause=True)
                        continue
                    self._account(call, outcome)
                    self._mark_done(call, outcome)
                    finished(call, outcome)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
        return {s: list(r) for s, r in results.items()}  # type: ignore[arg-type]

    def _start_workers(self) -> None:
        """Start the backend's workers before the first stage, timed as the run's start-up.

        A cold run would otherwise charge the fork server's imports and the
        workers' start to whichever stage happened to run first.
        """
        self._workers_ready = True
        warm_up = getattr(self.engine.backend, "warm_up", None)
        if warm_up is None:
            return
        start = time.time()
        started = warm_up()
        end = time.time()
        self.startup_ms = (end - start) * 1e3 if started else 0.0
        if started:
            self.startup_span = (start, end)

    # ------------------------------------------------------------------ resume
    def _done_key(self, call: Call) -> str:
        return done_key(self.outputs_prefix, call)

    def _mark_done(self, call: Call, outcome: Outcome) -> None:
        """Record a finished call so a resumed run can reuse it (store transfer only)."""
        if self.engine.transfer != "store" or not self.engine.checkpoints:
            return
        self.store.put(self._done_key(call), done_record(call, outcome))

    def _reuse(self, call: Call) -> Outcome | None:
        """On a resumed run, the recorded outcome of ``call`` if its outputs verify."""
        if not self.resumed:
            return None
        try:
            doc = json.loads(self.store.get(self._done_key(call)))
            if doc["call"] != call_digest(call):
                return None
            outcome = Outcome.from_json(doc["outcome"])
            for ref in outcome.outputs:
                if ref.key is None or digest(self.store.get(ref.key)) != ref.sha256:
                    return None
        except (MlwfError, ValueError, KeyError, TypeError):
            return None
        outcome.timings = {}
        outcome.input_edges = []
        return outcome

    def _account(self, call: Call, outcome: Outcome) -> None:
        if any(ref.data is not None for ref in outcome.outputs):
            # Direct transfer: the outputs rode back with the outcome; the wall
            # clock from the worker's end to here is their transfer time.
            outcome.timings["return_ms"] = max(0.0, (time.time() - outcome.end) * 1e3)
        self.outcomes.append((call, outcome))
        for text in outcome.info.get("warnings", []):
            self.warnings[(call.stage, text)] += 1
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
        data = self.read_bytes(ref)
        t1 = time.perf_counter()
        value = decode_ref_bytes(data, ref)
        edge = self.edges[(ref.producer, "driver")]
        edge["bytes"] += ref.nbytes
        edge["transfer_ms"] += (t1 - t) * 1e3
        edge["deserialize_ms"] += (time.perf_counter() - t1) * 1e3
        return value

    def read_bytes(self, ref: Ref) -> bytes:
        if ref.data is None and ref.handle is not None:  # held by the backend (Ray's object store)
            return self.engine.backend.fetch(ref)
        return ref.data if ref.data is not None else self.store.get(ref.key)

    # ------------------------------------------------------------------ report
    def report(self, **extra: Any) -> dict[str, Any]:
        """The run's summary: end-to-end time, per-stage and per-edge figures."""
        e2e = self.elapsed_ms()
        stages = {}
        for name, st in self.stats.items():
            stages[name] = {"calls": st.calls, "attempts": st.attempts, "reused": st.reused,
                            "wall_ms": round(st.wall_ms, 3),
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
        out_bytes = defaultdict(int)
        for e in edges:
            out_bytes[e["from"]] += e["bytes"]
        for e in edges:
            share = e["bytes"] / (out_bytes[e["from"]] or 1)
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
            "startup_ms": None if self.startup_ms is None else round(self.startup_ms, 3),
            "stage_ms": {k: v["wall_ms"] for k, v in stages.items()},
            "state_transfer_ms": round(transfer_ms, 3),
            "memory": {"driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                       "worker_peak_mb": round(max(workers.values(), default=0) / 1024, 1),
                       "workers": len(workers)},
            "stages": stages,
            "edges": edges,
            "warnings": [f"{stage}: {text} ({n} of {self.stats[stage].calls} calls)"
                         for (stage, text), n in sorted(self.warnings.items())],
        }
        return report

    def finish(self, report: dict[str, Any]) -> None:
        self._stop_heartbeat.set()
        self._record("succeeded", report=report)

    def fail(self, error: BaseException) -> None:
        self._stop_heartbeat.set()
        try:
            self._record("failed", error=str(error))
        except MlwfError:
            pass  # the store itself may be what failed; the original error matters more

    def _renew_lease(self) -> None:
        """Rewrite ``run.json`` every heartbeat while the run is going (a background thread)."""
        while not self._stop_heartbeat.wait(self.engine.heartbeat_s):
            try:
                self._record("running")
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one; the lease allows for it
                pass

    def _record(self, status: str, **extra: Any) -> None:
        with self._record_lock:
            if self._final:
                return  # a late heartbeat never overwrites how the run ended
            self._final = status != "running"
            now = timestamp(now_utc())
            doc = {"run_id": self.run_id, "workflow": self.workflow, "status": status,
                   "params": self.params, "transfer": self.engine.transfer, "resumed": self.resumed,
                   "started_at": self.started_at, "updated_at": now, "heartbeat_at": now,
                   "lease_s": self.engine.lease_s, **extra}
            self.store.put(join_key(self.outputs_prefix, RECORD), json.dumps(doc, indent=2).encode())
