"""The Ray backend: every stage call is a Ray task, on a local Ray instance or an existing cluster.

The task (:mod:`mlwf.backends.ray.task`) runs exactly what a local worker runs, :func:`mlwf.engine.runner.execute`,
so stage code never sees Ray. What this module adds is where calls run and how
``--transfer direct`` moves state:

* ``store``: outputs are objects in the store, as on every backend;
* ``direct``: each output goes into Ray's object store as its own object (a
  uint8 array, so a consumer on the same node reads it zero-copy), and the
  driver hands only its ObjectRef on to the consuming task. The task is a
  streaming generator that yields the outputs and then its
  :class:`~mlwf.engine.calls.Outcome`; the caller (the driver) owns what it
  yields, so outputs outlive the worker process that made them and Ray can
  rebuild them from lineage. (Ray returns values of at most 100 KB inline to
  their owner rather than through the shared-memory store; larger ones never
  touch the driver.) On one node this costs more than the store: an object
  put in Ray's store is also registered with its owner, so train → validation
  took 11.4 ms for a Ray put and get against 3.3 ms for a local-disk put and
  get (8.0 ms through the local pool's pipe; 2026-11-26, by a script since
  retired into ``benchmarks/state_transfer.py``).

A worker process that dies mid-call fails the call with
:class:`~mlwf.errors.WorkerLost`; Ray's own task retries are off
(``max_retries=0``), so the driver's budget is the only one: a call runs at
most ``1 + --retries`` times, as on every backend. For the same reason Ray
cannot rebuild an output it lost with a node: this backend keeps its own
lineage instead (:mod:`mlwf.backends.ray.lineage`), and a call that lost an
input fails with a retryable ``WorkerLost`` and is retried once the call that
made the input has made it again. ``--transfer store`` keeps intermediate
state out of Ray altogether. There is no ``--transfer shm`` here (the local
backend's: outputs written once into ``/dev/shm``, mapped read-only by their
consumers): Ray's object store already is shared memory on each node (Plasma,
in ``/dev/shm``), and a NumPy array read from it on the node that holds it is
mapped, not copied, so ``direct`` on Ray is its ``shm``; across nodes it
copies the object once into the reading node's store, which no file in one
machine's ``/dev/shm`` could do. Start-up is quiet and bounded:
no dashboard, worker output stays in Ray's log files, and an address where no
cluster answers fails within ``connect_timeout`` seconds with one line.
Starting a local Ray instance takes about 3.4 s, most of a cold ``--backend
ray`` run; join a running cluster (``--ray-address``) instead.

A local Ray instance started here goes with the driver: at :meth:`close`, and
also when the driver is killed (``kill -9``), a reaper process
(:class:`mlwf.backends.lifeline.Reaper`) kills whatever Ray processes are left,
which Ray's own agents would otherwise outlive by a minute or more.

On a cluster with an mlwf worker pool (:mod:`mlwf.backends.ray.pool`, made by
``mlwf ray pool start``) whose code is this driver's, the calls of stages that
ask for the default 1 CPU and no memory go to the pool's warm workers instead,
one call per worker at a time; the others, and every call once no worker is
left to this driver, run as tasks. A pool of other code is not used: the run's
report says so in one warning, and its calls run as tasks.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, ClassVar

import ray

from mlwf import workflows
from mlwf.backends.base import BackendConfig
from mlwf.backends.ray import cluster, pool
from mlwf.backends.ray.cluster import check_address, first_line, is_local_address, local_ips
from mlwf.backends.ray.lineage import Lineage, chain
from mlwf.backends.ray.task import remote_call
from mlwf.engine.calls import Call, Outcome, Ref, RunContext, refs_in
from mlwf.errors import MlwfError, StageError, UsageError, WorkerLost
from mlwf.settings import Settings
from mlwf.storage import StoreSpec


@dataclass(frozen=True)
class RayConfig(BackendConfig):
    """The Ray backend's settings.

    Parameters
    ----------
    address : the cluster to join (``HOST:PORT`` of the head's GCS, or ``auto``);
        default ``--ray-address``/``RAY_ADDRESS``, else a local Ray instance
        started for this backend and shut down by :meth:`RayBackend.close`. If
        Ray is already initialised in this process, that connection is used
        (and left open).
    stage_resources : per-stage requests, e.g. ``{"train": {"num_cpus": 2,
        "memory": 512 * 2**20}}`` (memory in bytes); other stages take 1 CPU.
    shared_store : the local-directory store is a shared file system mounted at
        the same path on every node; without it a directory store is refused
        on a cluster with nodes on other hosts.
    connect_timeout : seconds to wait for the cluster at ``address`` (default
        ``MLWF_RAY_CONNECT_TIMEOUT``, else 15).
    use_pool : send calls to the cluster's mlwf worker pool when it has one of
        this driver's code (``--no-ray-pool``: False, every call a task).
    """

    backend: ClassVar[str] = "ray"
    address: str | None = None
    stage_resources: Mapping[str, Mapping[str, Any]] | None = None
    shared_store: bool = False
    connect_timeout: float | None = None
    use_pool: bool = True


#: How long the driver waits for a call run again to make a final output Ray lost (:meth:`RayBackend.read`).
READ_REMAKE_TIMEOUT_S = 600.0
#: The request of a stage with no --stage-cpus/--stage-memory: what a pool worker offers.
_DEFAULT_REQUEST = {"num_cpus": 1}


class RayBackend(Lineage):
    """Runs calls as Ray tasks, or on the cluster's worker pool (see :class:`RayConfig`); the run's store is
    checked before connecting."""

    name = "ray"
    #: ``direct`` passes outputs task to task through Ray's object store.
    transfers = ("store", "direct")
    #: Ray inlines a task's arguments in its call only up to 100 KB and moves any larger one through its
    #: object store (docs.ray.io, "Anti-pattern: passing the same large argument by value"), so a
    #: ``payload`` run on Ray would measure ``direct`` under another name; and that object store is
    #: Ray's shared memory, so ``shm`` is what ``direct`` already does on one node.
    transfer_notes: ClassVar[dict[str, str]] = {
        "payload": "Ray moves any task argument over 100 KB through its object store, so state cannot ride "
                   "inline in the call; --transfer direct measures that object store",
        "shm": "Ray's object store is its shared memory: on one node --transfer direct already maps NumPy arrays "
               "from it without copying"}
    Config = RayConfig

    def __init__(self, config: RayConfig | None = None, settings: Settings | None = None):
        config = config or RayConfig()
        self.settings = settings = settings or Settings.resolve()
        self.address = config.address or settings.ray_address
        check_address(self.address)
        self.shared_store = config.shared_store
        self.store = StoreSpec.from_settings(settings)
        self.connect_timeout = cluster.connect_timeout(settings, config.connect_timeout)
        self.resources = self._check_requests(dict(config.stage_resources or {}))
        self.use_pool = config.use_pool
        self._pool: pool.PoolClient | None = None
        self._pool_found = False
        self._warnings: list[str] = []
        self._calls: dict[str, dict[str, int]] = {}  # run id -> calls sent {"pool": n, "tasks": n}
        self._count_lock = threading.Lock()
        self._joined = False
        self._collector: ThreadPoolExecutor | None = None
        self._checked_stores: set[StoreSpec] = set()
        self._options: dict[tuple, Any] = {}
        self._in_flight: dict[int, Any] = {}  # id(future) -> the task's ObjectRefGenerator
        #: Outputs held in Ray's object store (direct transfer): run id -> checksum -> ObjectRef.
        self._held: dict[str, dict[str, Any]] = {}
        super().__init__()  # the lineage of what is held

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _check_requests(requests: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out = {}
        for stage, req in requests.items():
            stages = workflows.stage_order()
            if stage not in stages:
                raise UsageError(f"unknown stage {stage!r} in the per-stage resources: stages are "
                                 f"{', '.join(stages)}")
            unknown = set(req) - {"num_cpus", "memory"}
            if unknown:
                raise UsageError(f"stage {stage}: unknown resource {sorted(unknown)[0]!r}: use num_cpus or memory")
            cpus = req.get("num_cpus", 1)
            memory = req.get("memory")
            if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not cpus > 0:
                raise UsageError(f"stage {stage}: CPUs must be a positive number, got {cpus!r}")
            if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0):
                raise UsageError(f"stage {stage}: memory must be a positive number of bytes, got {memory!r}")
            out[stage] = {"num_cpus": cpus, **({"memory": memory} if memory else {})}
        return out

    def _request(self, stage: str) -> dict[str, Any]:
        return self.resources.get(stage, {"num_cpus": 1})

    def start(self) -> None:
        """Join (or start) Ray, then check the store rule and that every request fits a node."""
        if self._joined:
            return
        self._check_store_before_connecting(self.store)
        cluster.join(self.address, self.connect_timeout, token_missing=self.settings.ray_token_missing)
        self._joined = True
        try:
            self._check_resources()
            self._check_store(self.store)
            if self.use_pool and self.address not in (None, "local"):
                self._attach_pool()
        except BaseException:
            self.close()
            raise
        self._collector = ThreadPoolExecutor(1, thread_name_prefix="mlwf-ray")

    def _attach_pool(self) -> None:
        """Use the cluster's worker pool if it has one of this driver's code (else say why in a warning)."""
        unused = "its calls run as Ray tasks"
        try:
            handle = pool.manager()
        except UsageError as e:
            self._warnings.append(f"{e}; {unused}")
            return
        if handle is None:
            return
        self._pool_found = True
        try:
            described = ray.get(handle.describe.remote(), timeout=self.connect_timeout)
        except Exception as e:  # noqa: BLE001 - any failure: not used, said once
            self._warnings.append(f"the mlwf worker pool on the Ray cluster did not answer ({first_line(e)[:200]}): "
                                  f"{unused}")
            return
        mine = pool.code_fingerprint(self.settings.workflow_modules)
        if described["fingerprint"] != mine:
            from mlwf import __version__

            theirs = pool.describe_code(described["version"], described["fingerprint"], described["workflow_modules"])
            ours = pool.describe_code(__version__, mine, self.settings.workflow_modules)
            self._warnings.append(f"the mlwf worker pool on the Ray cluster runs other code ({theirs}; this run: "
                                  f"{ours}), so {unused}: restart it from this mlwf (mlwf ray pool stop, then "
                                  "mlwf ray pool start)")
            return
        if not described["ready"]:
            self._warnings.append(f"the mlwf worker pool on the Ray cluster is still starting: {unused}")
            return
        self._pool = pool.PoolClient(described, mine)

    def _check_resources(self) -> None:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources()
        biggest = (max((n.get("CPU", 0) for n in nodes), default=0),
                   max((n.get("memory", 0) for n in nodes), default=0))
        for stage in [*self.resources, "*"]:
            req = self._request(stage) if stage != "*" else {"num_cpus": 1}
            cpus, memory = req["num_cpus"], req.get("memory", 0)
            if any(n.get("CPU", 0) >= cpus and n.get("memory", 0) >= memory for n in nodes):
                continue
            what = "every stage" if stage == "*" else f"stage {stage}"
            asks = f"{cpus:g} CPU" + ("s" if cpus != 1 else "") + (f" and {memory / 2**20:.0f} MB" if memory else "")
            raise UsageError(
                f"{what} asks for {asks} per call, but no node of the Ray cluster has that much (largest node: "
                f"{biggest[0]:g} CPUs, {biggest[1] / 2**20:.0f} MB; cluster: {total.get('CPU', 0):g} CPUs on "
                f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}): lower --stage-cpus/--stage-memory or add nodes")

    def _store_rule(self, store: StoreSpec, where: str) -> UsageError:
        return UsageError(
            f"the store {store.url} is a directory on this machine, but {where}: use an S3 store "
            "(--store s3://), or pass --shared-store if that directory is a shared file system mounted at the "
            "same path on every node")

    def _check_store_before_connecting(self, store: StoreSpec) -> None:
        if self.shared_store or not store.is_local or is_local_address(self.address):
            return
        raise self._store_rule(store, f"the Ray cluster at {self.address} is on another host")

    def _check_store(self, store: StoreSpec) -> None:
        """Refuse a directory store when some node of the cluster is on another host."""
        if store in self._checked_stores:
            return
        if store.is_local and not self.shared_store:
            here = local_ips()
            remote = sorted({n.get("NodeManagerAddress", "") for n in ray.nodes()
                             if n.get("Alive") and n.get("NodeManagerAddress") not in here})
            if remote:
                raise self._store_rule(store, f"the Ray cluster has nodes on other hosts ({', '.join(remote[:3])})")
        self._checked_stores.add(store)

    # ------------------------------------------------------------------ calls
    def submit(self, call: Call, ctx: RunContext) -> Future[Outcome]:
        if not self._joined:
            self.start()
        self._check_store(ctx.store)
        env = self.settings.forwarded()
        req = self._request(call.stage)
        lost = self._missing(call, ctx)
        if lost:  # Ray lost them (see _forget_lost): the calls that made them run first
            return self._after_remaking(call, ctx, lost)
        held = self._held.get(ctx.run_id, {})
        inputs = {r.sha256: held[r.sha256] for r in refs_in(call.args.values()) if r.held_by_backend}
        out: Future[Outcome] = Future()
        if self._pool is not None and req == _DEFAULT_REQUEST and self._pool.usable():
            self._submit_to_pool(call, ctx, env, inputs, out)
        else:
            self._submit_task(call, ctx, env, inputs, out)
        return out

    def _submit_task(self, call: Call, ctx: RunContext, env: dict[str, str], inputs: dict[str, Any],
                     out: Future[Outcome]) -> None:
        """Run ``call`` as a Ray task whose Outcome goes to ``out``."""
        req = self._request(call.stage)
        key = (call.workflow, call.stage, tuple(sorted(env.items())))
        task = self._options.get(key)
        if task is None:
            options = dict(num_cpus=req["num_cpus"], max_retries=0, retry_exceptions=False,
                           num_returns="streaming", name=f"mlwf {call.workflow}/{call.stage}")
            if "memory" in req:
                options["memory"] = req["memory"]
            if env:
                options["runtime_env"] = {"env_vars": env}
            if len(self._options) > 64:
                self._options.clear()
            task = self._options[key] = remote_call.options(**options)
        gen = task.remote(call, ctx, sorted(env), req["num_cpus"], inputs)
        self._count(ctx.run_id, "tasks")
        self._in_flight[id(out)] = gen
        collector = self._collector

        def finished(done: Future) -> None:
            try:
                collector.submit(self._collect, done, gen, call, ctx, out)
            except RuntimeError:  # closed meanwhile
                out.cancel()

        gen.completed().future().add_done_callback(finished)
        out.add_done_callback(lambda f: (self._in_flight.pop(id(f), None), f.cancelled() and _cancel(gen)))

    def _submit_to_pool(self, call: Call, ctx: RunContext, env: dict[str, str], inputs: dict[str, Any],
                        out: Future[Outcome]) -> None:
        """Run ``call`` on the next free worker of the pool (as a task once none is left); its Outcome goes to
        ``out``. The driver's variables travel with the call, as a task's ``runtime_env`` would carry them."""
        client = self._pool
        collector = self._collector

        def send(worker: int) -> None:
            gen = client.workers[worker].run.options(num_returns="streaming").remote(
                call, ctx, env, client.fingerprint, inputs)
            self._count(ctx.run_id, "pool")

            def finished(done: Future) -> None:
                try:
                    collector.submit(self._collect_from_pool, done, gen, call, ctx, out, worker)
                except RuntimeError:  # closed meanwhile
                    out.cancel()

            gen.completed().future().add_done_callback(finished)

        client.enqueue(out, send, lambda: self._submit_task(call, ctx, env, inputs, out))
        out.add_done_callback(lambda f: f.cancelled() and client.cancel(f))

    def _collect_from_pool(self, done: Future, gen, call: Call, ctx: RunContext, out: Future, worker: int) -> None:
        from ray import exceptions as rx

        exc = done.exception()
        lost = isinstance(exc, rx.RayActorError) or (isinstance(exc, rx.RayTaskError)
                                                      and isinstance(exc.cause, pool.PoolMismatch))
        if self._pool is not None:
            self._pool.finished(worker, lost)
        self._collect(done, gen, call, ctx, out)

    def _count(self, run_id: str, where: str) -> None:
        with self._count_lock:
            counts = self._calls.setdefault(run_id, {"pool": 0, "tasks": 0})
            counts[where] += 1

    def notes(self, run_id: str) -> dict[str, Any]:
        """What the run's report says of the worker pool: ``ray_pool`` (None: the cluster has none, or it was not
        looked for) and, if a pool was found but not used, one line in ``warnings``."""
        counts = self._calls.get(run_id, {"pool": 0, "tasks": 0})
        found = None
        if self._pool_found:
            found = {"used": self._pool is not None, "workers": self._pool.size if self._pool else 0,
                     "pool_calls": counts["pool"], "task_calls": counts["tasks"]}
        warnings = list(self._warnings)
        remade = sorted((c for c, _ in self._remade.get(run_id, {}).values()), key=lambda c: (c.stage, c.index))
        if remade:
            warnings.append(f"Ray lost outputs held in its object store (a node died?); "
                            f"{', '.join(c.name for c in remade)} ran again to make them")
        return {"ray_pool": found, "warnings": warnings}

    def _collect(self, done: Future, gen, call: Call, ctx: RunContext, out: Future) -> None:
        """Turn a finished task into its Outcome, keeping its output parts and which call made them (off Ray's
        callback thread). A call that lost an input fails with a retryable :class:`WorkerLost`, and the input is
        forgotten, so that the retry first makes it again (:meth:`_make_again`)."""
        if out.cancelled():
            return
        held = self._held.setdefault(ctx.run_id, {})
        try:
            exc = done.exception()
            if exc is not None:
                raise exc
            refs = list(gen)
            outcome: Outcome = ray.get(refs[-1])
            parts = refs[:-1]
            with self._lineage_lock:
                made_by = self._made_by.setdefault(ctx.run_id, {})
                for ref, part in zip([r for r in outcome.refs() if r.held_by_backend], parts):
                    held[ref.sha256] = part
                    made_by[ref.sha256] = (call, ctx)
            result, error = outcome, None
        except BaseException as e:  # noqa: BLE001 - becomes the Future's exception
            lost = _lost_object(e)
            result, error = None, (_error(e, call) if lost is None else self._forget_lost(call, ctx, lost))
            if lost is not None and (error is None or self._lost_again(call, ctx, error)):
                # Made again meanwhile (read the new one), or a later attempt of a call that already lost an
                # input finding another one lost (Ray reports them one at a time): mended within this attempt.
                try:
                    chain(self.submit(call, ctx), out)
                except BaseException as again:  # noqa: BLE001 - off Ray's callback thread: it must reach the driver
                    with contextlib.suppress(InvalidStateError):
                        out.set_exception(again)
                return
        try:
            if error is None:
                out.set_result(result)
            else:
                out.set_exception(error)
        except InvalidStateError:
            pass  # cancelled meanwhile

    def read(self, ref: Ref) -> bytes:
        """The bytes of an output held in Ray's object store (the driver reading a final result). If Ray lost
        it, the call that made it runs again first, as for a call's input (:meth:`_make_again`)."""
        from ray import exceptions as rx

        for run_id, held in list(self._held.items()):
            if ref.sha256 not in held:
                continue
            try:
                return bytes(ray.get(held[ref.sha256]))
            except rx.ObjectLostError:
                pass
            maker = self._made_by.get(run_id, {}).get(ref.sha256)
            if maker is None:
                break
            with self._lineage_lock:
                held.pop(ref.sha256, None)
            try:
                again = self._make_again([ref], maker[1], f"reading the output of {maker[0].name}")
                again.result(timeout=READ_REMAKE_TIMEOUT_S)
            except FutureTimeout:
                raise StageError(f"{maker[0].name} ran again to make its output Ray lost, and did not finish within "
                                 f"{READ_REMAKE_TIMEOUT_S:g} s (no node left that can run it?)") from None
            return bytes(ray.get(held[ref.sha256]))
        raise StageError(f"the output of {ref.producer} (SHA-256 {ref.sha256}) is no longer in Ray's object store")

    def end_run(self, run_id: str) -> None:
        """Let Ray free what the run's calls handed on (direct transfer)."""
        self._held.pop(run_id, None)
        self._calls.pop(run_id, None)
        with self._lineage_lock:
            self._made_by.pop(run_id, None)
            self._remade.pop(run_id, None)
            self._forgotten.pop(run_id, None)
            self._met_loss.pop(run_id, None)

    def cancel_all(self) -> None:
        """Stop every call still running (the driver gave up on them: stuck or timed out).

        Ray replaces dead workers by itself; a stuck call's worker is killed
        (``ray.cancel(force=True)``), as the local backend kills its pool.
        """
        for key, gen in list(self._in_flight.items()):
            _cancel(gen, force=True)
            self._in_flight.pop(key, None)
        if self._pool is not None:
            self._pool.cancel_all()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.cancel_all()  # a pool worker would finish a call of ours even after we are gone
            self._pool = None
        if self._collector is not None:
            self._collector.shutdown(wait=False, cancel_futures=True)
            self._collector = None
        if self._joined:
            self._joined = False
            cluster.leave()


def _lost_object(e: BaseException) -> str | None:
    """If ``e`` says Ray lost an object a call needed: that object's hex id ('' when Ray did not say), else None."""
    from ray import exceptions as rx

    # A task's error is a RayTaskError that is also an instance of its cause's class (without the cause's
    # attributes): the cause itself names the object.
    found = [err for err in (getattr(e, "cause", None), e) if isinstance(err, rx.ObjectLostError)]
    if not found:
        return None
    return next((h for h in (getattr(err, "object_ref_hex", None) for err in found) if h), "")


def _cancel(gen, force: bool = False) -> None:
    try:
        ray.cancel(gen, force=force)
    except Exception:  # noqa: BLE001 - already finished or gone
        pass


def _error(e: BaseException, call: Call) -> BaseException:
    """A Ray failure as the one-line error the driver acts on."""
    from ray import exceptions as rx

    if isinstance(e, rx.RayTaskError):
        cause = e.cause
        if isinstance(cause, MlwfError):
            return cause
        return StageError(f"{call.workflow} stage {call.name} failed on Ray: {first_line(cause or e)}")
    if isinstance(e, (rx.WorkerCrashedError, rx.NodeDiedError, rx.LocalRayletDiedError)):
        return WorkerLost(f"{call.workflow} stage {call.name} failed: its Ray worker died (see the worker logs "
                          "under /tmp/ray/session_latest/logs)", restart=False)
    if isinstance(e, rx.RayActorError):
        return WorkerLost(f"{call.workflow} stage {call.name} failed: its worker of the mlwf pool died (see the "
                          "worker logs under /tmp/ray/session_latest/logs)", restart=False)
    if isinstance(e, rx.RuntimeEnvSetupError):
        return StageError(f"{call.workflow} stage {call.name} failed: Ray could not set up its environment: "
                          f"{first_line(e)}")
    if isinstance(e, MlwfError):
        return e
    return StageError(f"{call.workflow} stage {call.name} failed on Ray: {first_line(e)}")


BACKEND = RayBackend
