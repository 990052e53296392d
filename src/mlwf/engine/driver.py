"""The driver: runs a workflow's stages on a backend and accounts for every call.

An :class:`Engine` owns a backend (its worker pool) and a store; it is reused
across runs, so a second run in one process is warm. Each run gets a
:class:`Run`: a run id, its own folder (:mod:`~mlwf.engine.layout`), and
:meth:`Run.run_calls`, which runs the calls of one or more stages
concurrently, retrying as :mod:`~mlwf.engine.retry` says, and returns when
all are done (the barrier the reference's driver has between stages). What
the calls cost is counted by :mod:`~mlwf.engine.accounting`; finished calls
are kept on record for ``--resume`` by :mod:`~mlwf.engine.checkpoints`.

Worker start-up is reported apart. Before the first stage a run starts the
backend's workers (``warm_up``) and reports that wait as ``startup_ms`` (a
``worker start-up`` span in a trace; 0 on a warm engine), so every stage time
is the stage's own: before, ``partition`` (about 20 ms of work) showed about
1 s, the fork server's scikit-learn import and the first worker's start. The
driver never imports scikit-learn either (a model records its version from
the package metadata): that was 0.7 s of every cold run that belonged to no
stage. Both together: cold 2k ``2 8`` 3,076 → 2,186 ms, the same model bytes
(2026-11-28, ``benchmarks/cold_start.py --before b1c0f27``).

The run's lease costs one small put of ``run.json`` per heartbeat (15 s), from
a thread that sleeps in between.
"""

from __future__ import annotations

import json
import math
import resource
import threading
import time
from collections.abc import Sequence
from typing import Any

from mlwf import workflows
from mlwf.engine.calls import Call, Outcome, Ref, RunContext
from mlwf.engine.accounting import Accounts, StageStats
from mlwf.engine.checkpoints import Checkpoints
from mlwf.engine import shm
from mlwf.engine.interrupts import deferred
from mlwf.engine.layout import TRACE, RunLayout, new_run_id
from mlwf.engine.progress import SILENT, StageClock
from mlwf.engine.runner import decode
from mlwf.engine.retry import RetryPolicy
from mlwf.engine.scheduling import run_concurrently
from mlwf.errors import AlreadyDone, Interrupted, MlwfError, UsageError
from mlwf.runs import (DEFAULT_HEARTBEAT_S, DEFAULT_LEASE_S, RESUMABLE_STATUSES, effective_status, find_run,
                       latest_resumable, now_utc, recordable_command, timestamp)
from mlwf.settings import Settings
from mlwf.storage import StoreSpec

from mlwf.backends import NAMES, TRANSFERS, cannot_transfer, make_backend
from mlwf.backends.base import BackendConfig


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


class Engine:
    """Runs workflows; reuse one engine for warm runs.

    Parameters
    ----------
    store : store URL or directory (default ``MLWF_STORE`` or the default local store).
    bucket : bucket name (default ``MLWF_BUCKET`` or ``tless``).
    backend : ``"local"`` (default), ``"ray"`` or ``"knative"``, or a backend's config
        (:class:`~mlwf.backends.local.LocalConfig`, :class:`~mlwf.backends.ray.RayConfig`,
        :class:`~mlwf.backends.knative.KnativeConfig`).
    workers : worker processes for the local backend (default: one per core); the same as
        ``backend=LocalConfig(workers=...)``.
    transfer : how intermediate state moves between stages: ``"store"`` (every
        intermediate is an object in the store, as in the reference), ``"direct"``
        (handed from call to call by the backend), ``"payload"`` (inline in each call and its reply;
        on the local backend the same path as ``direct``, on Knative each request's body) or ``"shm"``
        (the local backend: written once into shared memory, mapped read-only by the calls that read
        it; :mod:`mlwf.engine.shm`).
    backend_options : the fields of the named backend's config (e.g. ``address`` for Ray,
        ``endpoints`` for Knative).
    timeout : seconds a call may run before it counts as failed (default 600, at most
        :data:`MAX_TIMEOUT_S`).
    stage_timeouts : per-stage overrides of ``timeout``, e.g. ``{"train": 120}``.
    retries : extra attempts for a failed call (not for bad input; at most :data:`MAX_RETRIES`):
        a call is attempted at most ``1 + retries`` times in all, on every backend
        (:mod:`mlwf.engine.retry`).
    heartbeat_s, lease_s : how often a running run renews its lease in ``run.json``, and
        how long the lease lasts (default ``MLWF_HEARTBEAT_S`` and ``MLWF_LEASE_S``, else
        15 and 120 s; see :mod:`mlwf.runs`).
    progress : a :class:`~mlwf.engine.progress.RunProgress` (``stage_started``, ``call_done``, ``stage_done``).
    command : the ``mlwf run`` command line (its words after ``mlwf``) that started the runs, kept in their
        records so that ``mlwf runs show`` prints how to resume one (not kept if it holds credentials:
        :func:`mlwf.runs.recordable_command`).
    """

    def __init__(self, store: str | None = None, bucket: str | None = None, *,
                 backend: str | BackendConfig = "local", workers: int | None = None, transfer: str = "store",
                 retries: int = 2, progress=None, backend_options: dict[str, Any] | None = None,
                 timeout: float = 600.0, stage_timeouts: dict[str, float] | None = None,
                 heartbeat_s: float | None = None, lease_s: float | None = None,
                 command: Sequence[str] | None = None):
        if not isinstance(backend, BackendConfig) and backend not in NAMES:
            raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(NAMES)}")
        if transfer not in TRANSFERS:
            raise UsageError(f"unknown transfer {transfer!r}: choose one of {', '.join(TRANSFERS)}")
        if workers is not None:
            if backend != "local":
                raise UsageError("workers= is the local backend's: give other backends their config")
            backend_options = {**(backend_options or {}), "workers": workers}
        check_count("--retries", retries, 0, MAX_RETRIES)
        self.settings = Settings.resolve(store=store, bucket=bucket)
        self.timeout = check_seconds("--timeout", timeout, MAX_TIMEOUT_S)
        self.stage_timeouts = {stage: check_seconds(f"the timeout of stage {stage}", t, MAX_TIMEOUT_S)
                               for stage, t in (stage_timeouts or {}).items()}
        if heartbeat_s is None:
            heartbeat_s = self.settings.seconds("MLWF_HEARTBEAT_S", DEFAULT_HEARTBEAT_S)
        if lease_s is None:
            lease_s = self.settings.seconds("MLWF_LEASE_S", DEFAULT_LEASE_S)
        self.heartbeat_s = check_seconds("the heartbeat interval (MLWF_HEARTBEAT_S)", heartbeat_s, MAX_TIMEOUT_S)
        self.lease_s = check_seconds("the run lease (MLWF_LEASE_S)", lease_s, MAX_TIMEOUT_S)
        if self.lease_s < 2 * self.heartbeat_s:
            raise UsageError(f"the run lease ({self.lease_s:g} s) must last at least two heartbeats "
                             f"({self.heartbeat_s:g} s each): raise MLWF_LEASE_S or lower MLWF_HEARTBEAT_S")
        if self.settings.max_memory is not None:  # refused here, in one line, not by the first worker's call
            from mlwf import budget

            budget.parse_size(self.settings.max_memory)
        workflows.use(self.settings.workflow_modules)
        self.spec = StoreSpec.from_settings(self.settings)
        self.store = self.spec.open(self.settings)
        self.transfer = transfer
        self.retries = retries
        #: ``mlwf run``'s command line, kept in each run's record so that ``mlwf runs show`` can say
        #: how to resume it (None when it should not be kept: :func:`mlwf.runs.recordable_command`).
        self.command = recordable_command(command)
        self.retry_policy = RetryPolicy(retries)
        #: Record each finished call for --resume (switch off only to measure what it costs).
        self.checkpoints = True
        self.progress = progress or SILENT
        #: The latest run this engine started (a trace is built from it: mlwf.engine.trace).
        self.last_run: Run | None = None
        self.backend = make_backend(backend, self.settings, backend_options)
        if transfer not in self.backend.transfers:
            raise UsageError(cannot_transfer(type(self.backend), transfer))
        if transfer == "shm":
            shm.check_available()
            # Segments left by drivers that were killed (kill -9) go now; live drivers' are theirs.
            shm.remove_orphans()
        self.backend.start()

    def timeout_for(self, stage: str) -> float:
        return self.stage_timeouts.get(stage, self.timeout)

    def start_run(self, workflow: str, params: dict[str, Any], resume: str | None = None) -> Run:
        """A new run, or with ``resume`` the run of that id, checked to be the same work.

        ``resume="latest"`` names the newest interrupted (or abandoned) run of ``workflow`` with
        these parameters.

        Raises
        ------
        UsageError
            If the run to resume is unknown, still running, of another workflow or other
            parameters, or (``latest``) there is none.
        AlreadyDone
            If the run to resume has already succeeded: nothing is run or changed.
        """
        if resume is None:
            return Run(self, workflow, params)
        if self.transfer != "store":
            raise UsageError(f"--resume needs --transfer store: a {self.transfer}-transfer run keeps no outputs "
                             "to reuse")
        if resume == "latest":
            resume = self._latest_resumable(workflow, params)
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
        if record.get("status") == "succeeded":
            # Running it again would redo its merge and publish its model once more: change nothing.
            report = record.get("report") if isinstance(record.get("report"), dict) else {}
            raise AlreadyDone(f"run {resume} already succeeded (at {record.get('updated_at')}): nothing to do",
                              {**report, "workflow": workflow, "run_id": resume})
        return Run(self, workflow, params, run_id=resume)

    def _latest_resumable(self, workflow: str, params: dict[str, Any]) -> str:
        """The id of the newest interrupted or abandoned ``workflow`` run with ``params`` (``--resume latest``)."""
        where = f"bucket {self.spec.bucket!r} of {self.spec.url}"
        found, newest = latest_resumable(self.store, workflow, params)
        if found is not None:
            return found
        statuses = " or ".join(RESUMABLE_STATUSES)
        if newest is None:
            raise UsageError(f"--resume latest: no {statuses} {workflow} run in {where}, so nothing to resume: "
                             "run without --resume to start a new one ('mlwf runs ls' lists the runs)")
        was = ", ".join(f"{k}={newest['params'].get(k)!r}" for k in sorted(set(params) | set(newest["params"]))
                        if params.get(k) != newest["params"].get(k))
        raise UsageError(f"--resume latest: no {statuses} {workflow} run with these parameters in {where}; the "
                         f"newest one, {newest['run_id']}, was started with {was}: resume it with its own command "
                         f"line and '--resume {newest['run_id']}'")

    def run(self, workflow: str, *args, **options) -> dict[str, Any]:
        """Run the workflow called ``workflow`` with its positional arguments; returns its report.

        With ``resume=`` a run that has already succeeded is not run again: its recorded report
        is returned, with ``already_done: True``.

        Raises
        ------
        Interrupted
            On Ctrl-C (a :class:`KeyboardInterrupt`): the run is then recorded ``interrupted``
            (``--resume`` finishes it) and its workers are stopped.
        MlwfError
            Whatever makes the run fail, with one line saying what to fix.
        """
        before = self.last_run
        try:
            return workflows.get(workflow).run(self, *args, **options)
        except AlreadyDone as done:
            return {**done.report, "already_done": True}
        except KeyboardInterrupt:
            run = self.last_run if self.last_run is not before else None
            if run is not None:
                run.interrupted()  # once more: a workflow's driver may not have said so itself
            else:
                self.backend.cancel_all()
            raise Interrupted(workflow, run.run_id if run else None, run.status if run else None) from None

    def run_training(self, data_prefix: str, num_pca: int, num_train: int, **options) -> dict[str, Any]:
        """Run ml-training; see :func:`mlwf.workflows.training.drive` for the options."""
        return self.run("ml-training", data_prefix, num_pca, num_train, **options)

    def run_inference(self, model_prefix: str, data_prefix: str, num_funcs: int, **options) -> dict[str, Any]:
        """Run ml-inference; see :func:`mlwf.workflows.inference.drive`."""
        return self.run("ml-inference", model_prefix, data_prefix, num_funcs, **options)

    def close(self) -> None:
        self.backend.close()
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Run:
    """One run of a workflow: its id, output prefix, stage calls and accounting."""

    def __init__(self, engine: Engine, workflow: str, params: dict[str, Any], run_id: str | None = None):
        self.engine = engine
        self.workflow = workflow
        self.params = params
        self.resumed = run_id is not None
        self.run_id = run_id or new_run_id()
        self.layout = RunLayout(workflow, self.run_id)
        self.ctx = RunContext(self.run_id, workflow, engine.spec.url, engine.spec.bucket,
                              self.layout.folder, engine.transfer,
                              shm_owner=shm.owner() if engine.transfer == "shm" else "")
        self.accounts = Accounts()
        self.checkpoints = Checkpoints(engine.store, self.layout, enabled=engine.transfer == "store"
                                       and engine.checkpoints, resumed=self.resumed)
        #: Worker start-up this run waited for before its first stage: ms (0 when the
        #: workers were already running; None for a backend that starts them elsewhere)
        #: and its span on the wall clock.
        self.startup_ms: float | None = None
        self.startup_span: tuple[float, float] | None = None
        self._workers_ready = False
        self.t0 = time.perf_counter()
        engine.last_run = self  # the latest run, kept so a trace can be built from it (mlwf.trace)
        self.started_at = timestamp(now_utc())  # of this attempt, for a resumed run
        self._record_lock = threading.Lock()
        self._final = False
        #: Finished calls per stage (reused ones included), recorded in ``run.json``: how ``mlwf runs``
        #: shows the progress of a run whose transfer writes no done records (every one but ``store``).
        self.calls_done: dict[str, int] = {}
        #: The status last recorded in run.json.
        self.status: str | None = None
        #: Attempts per call (stage, index) of this run: a trace shows each call's retries.
        self.attempts: dict[tuple[str, int], int] = {}
        #: Calls not yet finished per stage of the batch going now: where a failure happened.
        self._remaining: dict[str, int] = {}
        self._record("running")
        self._stop_heartbeat = threading.Event()
        self._heartbeat = threading.Thread(target=self._renew_lease, name=f"mlwf-lease-{self.run_id}", daemon=True)
        self._heartbeat.start()

    @property
    def store(self):
        return self.engine.store

    def elapsed_ms(self) -> float:
        """Milliseconds since the run started (its ``e2e_ms``)."""
        return (time.perf_counter() - self.t0) * 1e3

    # ------------------------------------------------------------------ calls
    def run_calls(self, **calls: list[dict[str, Any]]) -> dict[str, list[Outcome]]:
        """Run every call of the given stages concurrently; return outcomes in call order.

        ``calls`` maps a stage name to the argument dicts of its calls. A call
        that fails retryably (its stage raised something other than bad-input
        errors, its worker died, or it ran past its stage's timeout) is
        attempted again, at most ``1 + retries`` times in all, as the engine's
        :class:`~mlwf.engine.retry.RetryPolicy` says; its outputs have fixed
        keys and bytes, so a retry writes exactly what the first attempt would
        have. On a resumed run, a call whose recorded outputs still
        match their checksums is not run again.
        """
        progress = self.engine.progress
        if not self._workers_ready:
            self._start_workers()
        results: dict[str, list[Outcome | None]] = {s: [None] * len(c) for s, c in calls.items()}
        started: dict[str, float] = {}
        remaining = self._remaining = {s: len(c) for s, c in calls.items()}

        def finished(call: Call, outcome: Outcome) -> None:
            results[call.stage][call.index] = outcome
            progress.call_done(call.stage)
            self.calls_done[call.stage] = self.calls_done.get(call.stage, 0) + 1
            remaining[call.stage] -= 1
            if remaining[call.stage] == 0:
                self.accounts.stats[call.stage].wall_ms = (time.perf_counter() - started[call.stage]) * 1e3
                progress.stage_done(call.stage)
                if not self.checkpoints.enabled:
                    self._record_progress()

        def attempted(call: Call) -> None:
            self.accounts.stats[call.stage].attempts += 1
            self.attempts[call.stage, call.index] = self.attempts.get((call.stage, call.index), 0) + 1

        def done(call: Call, outcome: Outcome) -> None:
            self.accounts.add(call, outcome)
            self.checkpoints.mark_done(call, outcome)
            finished(call, outcome)

        for stage, arg_list in calls.items():
            self.accounts.stats[stage] = StageStats(calls=len(arg_list))
            progress.stage_started(stage, len(arg_list))
            started[stage] = time.perf_counter()
        to_run = []
        for stage, arg_list in calls.items():
            for i, args in enumerate(arg_list):
                call = Call(self.workflow, stage, i, args)
                reused = self.checkpoints.reuse(call)
                if reused is not None:
                    self.accounts.stats[stage].reused += 1
                    self.accounts.add(call, reused)
                    finished(call, reused)
                else:
                    to_run.append(call)
        for s, arg_list in calls.items():
            if not arg_list:
                progress.stage_done(s)
        run_concurrently(to_run, backend=self.engine.backend, ctx=self.ctx, policy=self.engine.retry_policy,
                         timeout_for=self.engine.timeout_for, on_attempt=attempted, on_done=done)
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

    def read(self, ref: Ref, decoder: str = "codec") -> Any:
        """Read an output in the driver (e.g. to merge results), decoded as ``decoder`` says, with accounting."""
        t = time.perf_counter()
        data = self._view(ref) if ref.shm is not None else self.read_bytes(ref)
        t1 = time.perf_counter()
        value = decode(data, decoder, ref.key or ref.shm or f"output of {ref.producer}", verify=ref.shm is None)
        self.accounts.add_read(ref, (t1 - t) * 1e3, (time.perf_counter() - t1) * 1e3)
        return value

    def read_bytes(self, ref: Ref) -> bytes:
        """The bytes of an output: inline, from the store, from shared memory, or from the backend that
        holds them."""
        if ref.shm is not None:
            return bytes(self._view(ref))
        if ref.held_by_backend:
            return self.engine.backend.read(ref)
        return ref.data if ref.data is not None else self.store.get(ref.key)

    def _view(self, ref: Ref) -> memoryview:
        """An output in shared memory, mapped read-only (``--transfer shm``)."""
        return shm.open_view(ref.shm, ref.nbytes, owner_tag=self.ctx.shm_owner, run_id=self.run_id,
                             what=f"the {ref.producer} output the driver reads")

    # ------------------------------------------------------------------ report
    def report(self, **extra: Any) -> dict[str, Any]:
        """The run's summary: end-to-end time, per-stage and per-edge figures."""
        e2e = self.elapsed_ms()
        stages, edges, transfer_ms, workers = self.accounts.figures()
        notes = getattr(self.engine.backend, "notes", None)
        notes = dict(notes(self.run_id)) if notes is not None else {}
        backend_warnings = notes.pop("warnings", [])
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
            **notes,
            "warnings": self.accounts.warning_lines() + backend_warnings,
        }
        return report

    def finish(self, report: dict[str, Any]) -> None:
        """Record the run ``succeeded`` with its report (a Ctrl-C meanwhile waits until it is written)."""
        with deferred():
            self._stop_heartbeat.set()
            self.engine.backend.end_run(self.run_id)
            self._keep_trace(report)
            self._record("succeeded", report=report)

    def fail(self, error: BaseException) -> None:
        """Record the run ``failed`` with ``error`` (``interrupted`` for a Ctrl-C: see :meth:`interrupted`)."""
        if isinstance(error, KeyboardInterrupt):
            self.interrupted()
            return
        self._stop_heartbeat.set()
        self.engine.backend.end_run(self.run_id)
        stage = next((s for s, left in self._remaining.items() if left > 0), None)
        try:
            self._record("failed", error=str(error), failed_stage=stage)
        except MlwfError:
            return  # the store itself may be what failed (no trace then: one wait on it is enough)
        self._keep_trace(None)

    def interrupted(self) -> None:
        """After a Ctrl-C: stop the run's workers at once and record it ``interrupted`` (unless it had
        already ended); ``--resume`` finishes it. Calling it again does nothing more."""
        self._stop_heartbeat.set()
        if self._final:
            return
        # Killed, not drained: a worker busy with a call would hold the command for as long as it runs.
        self.engine.backend.cancel_all()
        self.engine.backend.end_run(self.run_id)
        try:
            self._record("interrupted")
        except MlwfError:
            pass  # the store failed: the record stays 'running' and shows as abandoned once its lease expires

    def _keep_trace(self, report: dict[str, Any] | None) -> None:
        """Write the run's trace (:mod:`mlwf.engine.trace`) as ``trace.json`` in its folder (before the
        record that ends a run that succeeded, after a failed run's): ``mlwf ui`` draws every call from it,
        whatever the backend. A trace that cannot be written costs the run nothing; a run that ran no call
        (refused at its start) keeps none. It costs a run ~3 ms (2k training, 32 KB of trace)."""
        from mlwf.engine import trace

        if not self.accounts.outcomes:
            return
        clock = self.engine.progress if isinstance(self.engine.progress, StageClock) else None
        try:
            doc = trace.build(self, report, clock)
            self.store.put(self.layout.result(TRACE), json.dumps(doc).encode())
        except Exception:  # noqa: BLE001 - the trace is an aid; the run's outcome is what matters
            pass

    def _renew_lease(self) -> None:
        """Rewrite ``run.json`` every heartbeat while the run is going (a background thread)."""
        while not self._stop_heartbeat.wait(self.engine.heartbeat_s):
            try:
                self._record("running")
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one; the lease allows for it
                pass

    def _record_progress(self) -> None:
        """Rewrite ``run.json`` as a stage ends, so its ``calls_done`` shows (no done records say it)."""
        try:
            self._record("running")
        except MlwfError:
            pass  # progress only: the next heartbeat or the run's end records it

    def _record(self, status: str, **extra: Any) -> None:
        with self._record_lock:
            if self._final:
                return  # a late heartbeat never overwrites how the run ended
            now = timestamp(now_utc())
            doc = {"run_id": self.run_id, "workflow": self.workflow, "status": status,
                   "params": self.params, "backend": self.engine.backend.name,
                   "transfer": self.engine.transfer, "resumed": self.resumed,
                   "started_at": self.started_at, "updated_at": now, "heartbeat_at": now,
                   "lease_s": self.engine.lease_s, "calls_done": dict(self.calls_done),
                   **({"command": self.engine.command} if self.engine.command else {}), **extra}
            self.store.put(self.layout.record, json.dumps(doc, indent=2).encode())
            # Final only once written: a put cut short (by a Ctrl-C) leaves room for the record that says so.
            self._final = status != "running"
            self.status = status
