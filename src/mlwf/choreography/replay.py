"""A choreographed run's state, read through the workflow's own driver function.

The drivers (:func:`mlwf.workflows.training.drive`,
:func:`mlwf.workflows.inference.drive`) say everything about a workflow's
shape: which stages run together, with which arguments, what is checked
between them, and what happens at the end. Choreography reuses them as they
are (in the manner of durable-execution engines): :func:`replay` runs the
driver against a :class:`ReplayEngine` whose ``run.run_calls(...)`` answers from
the calls recorded as done in the store (``<stage>/<index>.done.json``, the
same records the driver writes for ``--resume``) instead of running anything.

* The first stage batch with a call not done stops the replay with
  :class:`Pending`, which names the batch and the calls not done: the events
  to emit.
* When every stage is done, a planning replay stops with :class:`Complete` at
  the driver's first side effect (a store write, reading outputs, the
  report). A finishing replay (``finishing=True``, run by the one server that
  claimed the finish) goes on: it publishes, merges the results and returns
  the report, exactly as the driver would.
* Anything the driver raises (a parameter refused, a check between stages
  failing) is raised as it is: the run fails with that line.

A replay reads only what it needs: the done records of the batches before
the pending one, and the listing of the pending batch's stage folders (to see
which calls are not done). Done records never change once written (the
first one counts, :func:`mlwf.choreography.records.commit`), so a server
keeps the ones it has read (:data:`_DONE`): the replays that follow each call
of a 1,000-way batch decode the batches before it once, not once per call,
and list only the stage folders of batches not known to be done.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import threading
import time
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

from mlwf import workflows
from mlwf.engine.accounting import Accounts, StageStats
from mlwf.engine.calls import Call, Outcome, RunContext
from mlwf.engine.checkpoints import Checkpoints
from mlwf.engine.driver import Run
from mlwf.engine.layout import RunLayout
from mlwf.errors import NotFoundError, UsageError
from mlwf.runs import DEFAULT_LEASE_S, now_utc, timestamp
from mlwf.storage import Store, StoreSpec
from mlwf.workflows.definition import load_function


#: Done records this process has read: (store, bucket, key) → (call digest, outcome). They never change.
_DONE: OrderedDict[tuple[str, str, str], tuple[str, Outcome]] = OrderedDict()
_DONE_MAX = 20_000
_DONE_LOCK = threading.Lock()


def remember_done(store: Store, layout: RunLayout, call: Call, outcome_json: dict[str, Any]) -> None:
    """Keep the done record just written for ``call`` (its JSON form) as if read back (see the module)."""
    from mlwf.engine.checkpoints import call_digest

    outcome = Outcome.from_json(outcome_json)
    with _DONE_LOCK:
        _DONE[(store.location, store.bucket, layout.done(call.stage, call.index))] = (call_digest(call), outcome)
        while len(_DONE) > _DONE_MAX:
            _DONE.popitem(last=False)


class Pending(Exception):
    """The run's next stage batch has calls not done yet.

    ``batch`` names the batch (its stages joined by ``+``), ``calls`` are all
    its calls and ``missing`` those without a done record.
    """

    def __init__(self, batch: str, calls: list[Call], missing: list[Call]):
        super().__init__(f"waiting for {batch}")
        self.batch = batch
        self.calls = calls
        self.missing = missing


class Complete(Exception):
    """Every stage is done: the driver went on to its final steps (a planning replay stops here)."""


#: Options given as JSON objects, and the class each is rebuilt as.
OPTION_TYPES = {"config": "mlwf.workflows.training:TrainingConfig"}


def drive_function(workflow: str):
    """The driver function of ``workflow`` (its definition's ``drive``); :class:`UsageError` if unknown."""
    return load_function(workflows.get(workflow).drive)


def invocation_arguments(workflow: str, invocation: Any) -> tuple[list[Any], dict[str, Any]]:
    """The driver's positional and keyword arguments from an invocation ``{"args": [...], "options": {...}}``.

    Options are the driver's keyword-only parameters (``resume`` excepted);
    ``config`` of ml-training is a :class:`~mlwf.workflows.training.TrainingConfig`
    given as a JSON object.

    Raises
    ------
    UsageError
        For an invocation that is not of that shape, or names an unknown option.
    """
    drive = drive_function(workflow)
    if not isinstance(invocation, dict) or not isinstance(invocation.get("args"), list) \
            or not isinstance(invocation.get("options", {}), dict):
        raise UsageError("a start event's data must hold {\"args\": [...], \"options\": {...}}")
    params = inspect.signature(drive).parameters
    positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD][1:]  # after the engine
    allowed = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"resume"}
    args, options = list(invocation["args"]), dict(invocation.get("options", {}))
    if len(args) != len(positional):
        raise UsageError(f"{workflow} takes {len(positional)} arguments ({' '.join(p.upper() for p in positional)}), "
                         f"got {len(args)}")
    for name, value in zip(positional, args):
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in items):
            raise UsageError(f"{name.upper()} must be text, a whole number or a list of them, "
                             f"got {str(value)[:40]!r}")
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UsageError(f"unknown {workflow} option(s) {', '.join(map(repr, unknown))}: known are "
                         f"{', '.join(sorted(allowed))}")
    for name, value in options.items():
        default = params[name].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise UsageError(f"option {name!r} must be true or false, got {str(value)[:40]!r}")
        if isinstance(default, str) and not isinstance(value, str):
            raise UsageError(f"option {name!r} must be text, got {str(value)[:40]!r}")
    for name, kind in OPTION_TYPES.items():
        if name in options:
            if not isinstance(options[name], dict):
                raise UsageError(f"option {name!r} must be an object of settings")
            try:
                options[name] = load_function(kind)(**options[name])
            except TypeError as e:
                raise UsageError(f"bad settings in option {name!r} of the start event: {e}") from None
    return args, options


def replay(store: Store, spec: StoreSpec, workflow: str, run_id: str, invocation: Any, *,
           finishing: bool = False, start: dict[str, Any] | None = None) -> dict[str, Any]:
    """Replay the driver of ``workflow`` for run ``run_id``; return its report once it has finished.

    Parameters
    ----------
    store, spec : the store of the run and how it is named.
    invocation : the run's ``{"args", "options"}`` (as in its record).
    finishing : go past the last stage: publish, merge, report (only the
        server holding the run's finish claim does this).
    start : for the start event: the fields of the record to create
        (create-if-absent) when the driver starts the run.

    Raises
    ------
    Pending
        A stage batch has calls not done (the events to emit).
    Complete
        Every stage is done (planning replay only).
    MlwfError
        Whatever the driver raises.
    """
    args, options = invocation_arguments(workflow, invocation)
    engine = ReplayEngine(store, spec, run_id, finishing=finishing, start=start)
    return drive_function(workflow)(engine, *args, **options)


class _GatedStore:
    """The run's store as the replayed driver sees it: reads pass, writes only when finishing."""

    _WRITES = frozenset({"put", "put_many", "put_if_absent", "put_if_tag", "delete", "delete_many", "create_bucket"})

    def __init__(self, store: Store, engine: ReplayEngine):
        self._store = store
        self._engine = engine

    def __getattr__(self, name: str):
        if name in self._WRITES and not self._engine.finishing:
            raise Complete()
        return getattr(self._store, name)

    def require_bucket(self) -> None:
        if self._engine.start is not None:  # checked when the run starts; a run's bucket is not checked again
            self._store.require_bucket()


class ReplayEngine:
    """What a driver function needs of an engine, answering from the store (see the module)."""

    def __init__(self, store: Store, spec: StoreSpec, run_id: str, *, finishing: bool,
                 start: dict[str, Any] | None):
        self.real_store = store
        self.store = _GatedStore(store, self)
        self.spec = spec
        self.run_id = run_id
        self.transfer = "store"
        self.backend = SimpleNamespace(name="knative")
        self.finishing = finishing
        self.start = start
        self.last_run: ReplayRun | None = None

    def start_run(self, workflow: str, params: dict[str, Any], resume: str | None = None) -> ReplayRun:
        from mlwf.choreography import records

        if self.start is not None:
            now = timestamp(now_utc())
            record = {"run_id": self.run_id, "workflow": workflow, "status": "running", "params": params,
                      "transfer": "store", "resumed": False, "started_at": now, "updated_at": now,
                      "heartbeat_at": now, "lease_s": DEFAULT_LEASE_S, "mode": "choreography", **self.start}
            if not records.create_record(self.real_store, record):
                found = records.read_json(self.real_store, records.record_key(workflow, self.run_id))
                if found is None or found[0].get("invocation") != self.start.get("invocation"):
                    raise UsageError(f"run id {self.run_id} is taken by another run: start a run with a new id")
        found = records.read_json(self.real_store, records.record_key(workflow, self.run_id))
        if found is None:
            raise NotFoundError(f"run {self.run_id} has no record: it was never started, or its folder was deleted")
        record = found[0]
        if record.get("params") != params:
            raise UsageError(f"run {self.run_id}'s record names other parameters than its invocation: "
                             "it was changed by hand; start a new run")
        self.last_run = ReplayRun(self, workflow, params, record)
        return self.last_run


class ReplayRun(Run):
    """A :class:`~mlwf.engine.driver.Run` whose calls are answered by the store's done records."""

    def __init__(self, engine: ReplayEngine, workflow: str, params: dict[str, Any], record: dict[str, Any]):
        self.engine = engine
        self.workflow = workflow
        self.params = params
        self.resumed = False
        self.run_id = engine.run_id
        self.layout = RunLayout(workflow, self.run_id)
        self.ctx = RunContext(self.run_id, workflow, engine.spec.url, engine.spec.bucket, self.layout.folder, "store")
        self.accounts = Accounts()
        self.checkpoints = Checkpoints(engine.real_store, self.layout, enabled=False, resumed=False)
        self.startup_ms: float | None = None
        self.startup_span: tuple[float, float] | None = None
        self.started_at = record.get("started_at")
        self.report_doc: dict[str, Any] | None = None
        self._folder = self.layout.folder

    def _done(self, call: Call) -> str:
        # RunLayout.done, without its join of arbitrary parts: called for every call of a batch per replay.
        return f"{self._folder}/{call.stage}/{call.index}.done.json"

    def _key(self, call: Call) -> tuple[str, str, str]:
        store = self.engine.real_store
        return store.location, store.bucket, self._done(call)

    def _outcome(self, call: Call, cached: tuple[str, Outcome] | None) -> Outcome | None:
        """The done record of ``call`` if it is the record of this very call (cached: see the module)."""
        from mlwf.engine.checkpoints import call_digest

        digest = call_digest(call)
        if cached is not None and cached[0] == digest:
            return cached[1]
        outcome = self.checkpoints.recorded(call)
        if outcome is not None:
            with _DONE_LOCK:
                _DONE[self._key(call)] = (digest, outcome)
                while len(_DONE) > _DONE_MAX:
                    _DONE.popitem(last=False)
        return outcome

    def run_calls(self, **calls: list[dict[str, Any]]) -> dict[str, list[Outcome]]:
        batch = "+".join(calls)
        all_calls = [Call(self.workflow, stage, i, args) for stage, arg_list in calls.items()
                     for i, args in enumerate(arg_list)]
        with _DONE_LOCK:
            cached = [_DONE.get(self._key(c)) for c in all_calls]
        unknown = {c.stage for c, known in zip(all_calls, cached) if known is None}
        if unknown:  # which calls are done: one listing of each stage folder not known to be done
            store = self.engine.real_store
            listed = {k for stage in sorted(unknown) for k in store.list_keys(f"{self.layout.folder}/{stage}/")}
            missing = [c for c, known in zip(all_calls, cached)
                       if known is None and self._done(c) not in listed]
            if missing:
                raise Pending(batch, all_calls, missing)
        outcomes = [self._outcome(c, known) for c, known in zip(all_calls, cached)]
        missing = [c for c, o in zip(all_calls, outcomes) if o is None]
        if missing:
            raise Pending(batch, all_calls, missing)
        results: dict[str, list[Outcome]] = {stage: [] for stage in calls}
        for stage in calls:
            mine = [(c, o) for c, o in zip(all_calls, outcomes) if c.stage == stage]
            stats = self.accounts.stats[stage] = StageStats(calls=len(mine), attempts=len(mine))
            if mine:
                stats.wall_ms = (max(o.end for _, o in mine) - min(o.start for _, o in mine)) * 1e3
            for call, outcome in mine:
                self.accounts.add(call, outcome)
                results[stage].append(outcome)
        return results

    # ---------------------------------------------------------------- the driver's final steps
    def read_bytes(self, ref) -> bytes:
        if not self.engine.finishing:
            raise Complete()
        return super().read_bytes(ref)

    def report(self, **extra: Any) -> dict[str, Any]:
        if not self.engine.finishing:
            raise Complete()
        return super().report(choreography=True, **extra)

    def elapsed_ms(self) -> float:
        try:
            started = _dt.datetime.fromisoformat(self.started_at).timestamp()
        except (TypeError, ValueError):
            return 0.0
        return max(0.0, (time.time() - started) * 1e3)

    def fail(self, error: BaseException) -> None:
        pass  # the server that replays decides what a failure means (see mlwf.choreography.steps)

    def finish(self, report: dict[str, Any]) -> None:
        self.report_doc = report
