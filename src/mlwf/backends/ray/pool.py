"""A pool of warm mlwf workers on a Ray cluster, kept across jobs (``mlwf ray pool start|status|stop``).

A fresh driver that sends its calls as Ray tasks waits, in every job, for Ray
to start worker processes for it, which then import NumPy, Pillow,
scikit-learn and the stage code (seconds, against a run of a few). The pool
pays that once: detached actors that outlive the command that made them, each
having imported the stage code and paid the training libraries' first-call
costs (:mod:`mlwf.workflows.warmup`) when it started. The Ray backend
(:mod:`mlwf.backends.ray.backend`) finds the pool by name and sends it the
calls it can run.

With tasks, a fresh driver's first stages (partition, 20 ms of work; pca)
took 1.1 s and 2.5 s; the pool's workers take the calls at once (26 ms,
0.34 s), and what is left is joining the cluster (1.2–1.3 s for a process
that does only that). A fresh driver's run on a two-node cluster took 2.59×
a cold local run with tasks, 1.11× with the pool (2026-11-28, ``e4fb428``,
``benchmarks/ray_cluster.py``). Starting the pool (joining, two workers
importing everything and paying the first-call costs) took 4.2 s, once; it is
part of no run.

The pool is one named, detached actor, :class:`PoolManager` (``worker-pool``
in the Ray namespace ``mlwf``), which owns its :class:`PoolWorker` actors: Ray
destroys an actor with its owner, so killing the manager removes the whole
pool, and there is one pool per cluster.

* Placement: one worker per CPU of the cluster's nodes (``--size`` fewer),
  each pinned to its node while the node lives. Workers hold **no** Ray CPUs
  (``num_cpus=0``): the pool never keeps Ray from scheduling other work, and
  mlwf's own task fallbacks always find CPUs. A driver sends each worker one
  call at a time, so its calls never exceed the CPUs; Ray's accounting does
  not see them, so other jobs' tasks may share those CPUs meanwhile.
* Versioning: :func:`code_fingerprint` hashes mlwf's version, every file of
  the installed mlwf package, and the workflow modules the pool was started
  with (``MLWF_WORKFLOW_MODULES``). A worker computes it over the code it
  imported; a driver sends its own with every call, and a worker refuses a
  call from other code (:class:`PoolMismatch`). A driver whose fingerprint
  differs from the pool's does not use it.
* Credentials and data: a worker keeps no credentials, and no run's data for
  the next run. Each call brings the driver's
  ``MLWF_*``/``S3_*``/``AWS_*`` variables as an argument (as a task's
  ``runtime_env`` would bring them); the worker resolves its settings from
  them for that call alone, never writes them to its environment, and closes
  the stores it opened when the call ends (:func:`mlwf.engine.runner.forget_stores`).
  Names, logs and :meth:`PoolWorker.info` hold no variable. Decoded inputs
  are cached for the calls of one run, as in any worker, and dropped when a
  call of another run arrives (:func:`mlwf.engine.runner.forget_decoded`).
* Failures: a worker that dies (its process killed, its node lost) is
  restarted by Ray (``max_restarts=-1``) and imports everything again; the
  call it was running fails (Ray's actor-task retries are off), and the
  driver's one retry policy decides.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import InvalidStateError
from functools import cache
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mlwf.errors import StageError, UsageError

#: The Ray namespace of the pool's named actors.
NAMESPACE = "mlwf"
#: The name of the pool's manager actor in :data:`NAMESPACE`.
MANAGER = "worker-pool"
#: Seconds to wait for every worker of a new pool to import the stage code (``--timeout``).
START_TIMEOUT = 300.0


class PoolMismatch(StageError):
    """A pool worker was asked to run a call of other mlwf code than it imported."""


@cache
def code_fingerprint(workflow_modules: tuple[str, ...] = ()) -> str:
    """The fingerprint of the mlwf code in this process: what a pool worker and a driver must share.

    Parameters
    ----------
    workflow_modules : the modules of ``MLWF_WORKFLOW_MODULES`` (their order does not matter).

    Returns
    -------
    str
        The SHA-256 (hex) of mlwf's version, of every ``.py`` file of the
        installed mlwf package (its path in the package and its bytes), and of
        each workflow module's name and source file.

    Raises
    ------
    UsageError
        If a workflow module cannot be found.
    """
    import mlwf

    sources = {}
    for name in set(workflow_modules):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin or not os.path.isfile(spec.origin):
            raise UsageError(f"MLWF_WORKFLOW_MODULES names {name!r}, which cannot be found here: install it, "
                             "or fix the variable")
        sources[name] = Path(spec.origin)
    return digest_code(mlwf.__version__, Path(mlwf.__file__).resolve().parent, sources)


def digest_code(version: str, package: Path, modules: dict[str, Path]) -> str:
    """SHA-256 (hex) of ``version``, every ``.py`` file under ``package`` (its relative path and bytes), and
    each of ``modules`` (name and the bytes of its source file)."""
    digest = hashlib.sha256(f"mlwf {version}\0".encode())
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    for name in sorted(modules):
        digest.update(f"module {name}\0".encode() + modules[name].read_bytes() + b"\0")
    return digest.hexdigest()


def describe_code(version: str, fingerprint: str, workflow_modules: Sequence[str]) -> str:
    """``mlwf 0.1.0, code 1a2b3c4d5e6f (workflow modules: …)`` for messages."""
    modules = f", workflow modules {', '.join(workflow_modules)}" if workflow_modules else ""
    return f"mlwf {version}, code {fingerprint[:12]}{modules}"


def _preload(workflow_modules: tuple[str, ...]) -> None:
    """Import what the stages need (scikit-learn too) and pay its first-call costs, as the local fork server does."""
    from mlwf import workflows
    from mlwf.backends.forkserver import with_warmup

    workflows.use(workflow_modules)
    for name in with_warmup(["mlwf.engine.runner", *workflows.modules_to_preload()]):  # every workflow's stages
        importlib.import_module(name)


@ray.remote(concurrency_groups={"control": 2})
class PoolWorker:
    """One warm worker: the stage code imported once; runs one call at a time, any run's."""

    def __init__(self, workflow_modules: tuple[str, ...]):
        from threadpoolctl import threadpool_limits

        from mlwf.settings import single_threaded_blas

        single_threaded_blas()
        _preload(workflow_modules)
        threadpool_limits(1)  # a pool call asks for 1 CPU, as a task of a stage without --stage-cpus does
        self.fingerprint = code_fingerprint(workflow_modules)
        self.started_at = time.time()
        self.calls = 0
        self.busy = False
        self.last_run: str | None = None

    def run(self, call, ctx, forwarded: dict[str, str], fingerprint: str, held: dict[str, Any]):
        """Run one call (a streaming generator: each output held in Ray, then the Outcome), as a task does.

        ``forwarded``: the driver's ``MLWF_*``/``S3_*``/``AWS_*`` variables,
        used for this call only; ``fingerprint``: the driver's
        :func:`code_fingerprint`, which must be this worker's.
        """
        from mlwf.backends.ray.task import run_call
        from mlwf.engine import runner
        from mlwf.settings import FORWARDED_PREFIXES, Settings

        if fingerprint != self.fingerprint:
            raise PoolMismatch(f"{call.workflow} stage {call.name}: the Ray pool worker runs other mlwf code "
                               f"(code {self.fingerprint[:12]}, the driver's {fingerprint[:12]})")
        own = {k: v for k, v in os.environ.items() if not k.startswith(FORWARDED_PREFIXES)}
        settings = Settings.resolve(environ={**own, **forwarded})
        if ctx.run_id != self.last_run:
            runner.forget_decoded()  # inputs decoded for one run (and driver) are not kept for the next
            self.last_run = ctx.run_id
        self.calls += 1
        self.busy = True
        try:
            yield from run_call(call, ctx, settings, held)
        finally:
            self.busy = False
            runner.forget_stores()  # they hold the driver's credentials

    @ray.method(concurrency_group="control")
    def info(self) -> dict[str, Any]:
        """Where it runs, what code, how many calls it has taken (no environment, no credentials)."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "fingerprint": self.fingerprint, "started_at": self.started_at, "calls": self.calls,
                "busy": self.busy}


@ray.remote(max_concurrency=4)
class PoolManager:
    """The pool's named, detached actor: owns the workers, says what code they run."""

    def __init__(self, size: int, workflow_modules: tuple[str, ...], version: str, fingerprint: str):
        self.size = size
        self.workflow_modules = tuple(workflow_modules)
        self.version = version
        self.fingerprint = fingerprint
        self.created_at = time.time()
        self.workers: list = []
        self.ready = False
        self._lock = threading.Lock()

    def start(self, timeout: float) -> dict[str, Any]:
        """Start the workers, one per CPU slot of the alive nodes, and wait until each has imported everything.

        Raises whatever a worker's start raised (e.g. a workflow module missing on a node), or
        ``GetTimeoutError``.
        """
        workers = []
        for node_id in _slots(self.size):
            workers.append(PoolWorker.options(
                num_cpus=0, max_restarts=-1, max_task_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=True),
            ).remote(self.workflow_modules))
        with self._lock:
            self.workers = workers
        infos = ray.get([w.info.remote() for w in workers], timeout=timeout)
        other = {i["fingerprint"] for i in infos} - {self.fingerprint}
        if other:
            raise UsageError(f"the cluster's nodes have other mlwf code than the command that starts the pool "
                             f"(code {sorted(other)[0][:12]}, the command's {self.fingerprint[:12]}): install the "
                             "same mlwf on every node")
        with self._lock:
            self.ready = True
        return self.describe()

    def describe(self) -> dict[str, Any]:
        """The pool: its code, size, whether it is ready, and the workers' handles."""
        with self._lock:
            return {"version": self.version, "fingerprint": self.fingerprint,
                    "workflow_modules": list(self.workflow_modules), "size": self.size, "ready": self.ready,
                    "created_at": self.created_at, "workers": list(self.workers)}


def _slots(size: int) -> list[str]:
    """Node ids for ``size`` workers: one per CPU of the alive nodes, taken across the nodes in turn."""
    cpus = {n["NodeID"]: int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")}
    slots = [node for turn in range(max(cpus.values(), default=0)) for node, n in sorted(cpus.items()) if n > turn]
    return slots[:size]


# --------------------------------------------------------------------------- driver side
def manager():
    """The pool's manager actor on the cluster this process joined, or None if there is no pool.

    Raises :class:`UsageError` if the actor of that name is not an mlwf pool's
    manager (another program chose the same name): mlwf never acts on it.
    """
    try:
        handle = ray.get_actor(MANAGER, namespace=NAMESPACE)
    except ValueError:
        return None
    # Ray keeps no public record of an actor's class; its handle's creation descriptor names it.
    descriptor = getattr(handle, "_ray_actor_creation_function_descriptor", None)
    made_by = (getattr(descriptor, "module_name", __name__), getattr(descriptor, "class_name", "PoolManager"))
    if made_by != (__name__, "PoolManager"):
        raise UsageError(f"the actor {MANAGER!r} in the Ray namespace {NAMESPACE!r} is not an mlwf worker pool (it is "
                         f"a {'.'.join(made_by)}): mlwf leaves it alone; remove it with Ray's own tools to start a "
                         "pool")
    return handle


def cluster_cpus() -> int:
    """The CPUs of the alive nodes: the most workers a pool may have."""
    return sum(int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive"))


def start(size: int | None, workflow_modules: Sequence[str], timeout: float = START_TIMEOUT) -> dict[str, Any]:
    """Start the pool on the cluster this process joined; returns :meth:`PoolManager.describe`.

    Raises :class:`UsageError` if a pool is running already, ``size`` does not
    fit the cluster's CPUs, or the workers could not start (the half-made pool
    is removed).
    """
    from mlwf import __version__

    modules = tuple(dict.fromkeys(workflow_modules))
    fingerprint = code_fingerprint(modules)
    cpus = cluster_cpus()
    if cpus == 0:
        raise UsageError("the Ray cluster's alive nodes offer no CPUs, and the pool runs one worker per CPU: add "
                         "nodes with CPUs")
    if size is None:
        size = cpus
    if not 1 <= size <= cpus:
        raise UsageError(f"--size {size}: the pool runs one worker per CPU, and the cluster has {cpus} CPU"
                         f"{'s' if cpus != 1 else ''}: give a size from 1 to {cpus}")
    if manager() is not None:
        raise UsageError("a worker pool is already running on this Ray cluster (see 'mlwf ray pool status'): "
                         "stop it first with 'mlwf ray pool stop'")
    try:
        handle = PoolManager.options(name=MANAGER, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
                                     max_restarts=0).remote(size, modules, __version__, fingerprint)
    except ValueError:  # the name was taken meanwhile
        raise UsageError("a worker pool was started on this Ray cluster meanwhile (see 'mlwf ray pool status')") \
            from None
    try:
        return ray.get(handle.start.remote(timeout), timeout=timeout + 30)
    except BaseException as e:
        _kill(handle)
        if isinstance(e, UsageError):
            raise
        cause = getattr(e, "cause", None)
        if isinstance(cause, UsageError):
            raise cause from None
        if isinstance(e, ray.exceptions.GetTimeoutError) or isinstance(cause, ray.exceptions.GetTimeoutError):
            raise UsageError(f"the pool's workers did not start within {timeout:g} s: see the workers' logs on the "
                             "nodes (/tmp/ray/session_latest/logs); the pool was removed") from None
        from mlwf.backends.ray.cluster import first_line

        raise UsageError(f"the pool's workers could not start ({first_line(cause or e)[:300]}): see the workers' "
                         "logs on the nodes (/tmp/ray/session_latest/logs); the pool was removed") from None


def status(timeout: float = 10.0) -> dict[str, Any] | None:
    """The pool and each worker's :meth:`PoolWorker.info` (None for a worker that does not answer), or None."""
    handle = manager()
    if handle is None:
        return None
    described = ray.get(handle.describe.remote(), timeout=timeout)
    workers = described.pop("workers")
    refs = [w.info.remote() for w in workers]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    infos = []
    for ref in refs:
        try:
            infos.append(ray.get(ref, timeout=0) if ref in ready else None)
        except ray.exceptions.RayError:
            infos.append(None)
    described["workers"] = infos
    return described


def stop(timeout: float = 30.0) -> dict[str, Any] | None:
    """Remove the pool (its manager and every worker); returns what it was, or None if there was none."""
    handle = manager()
    if handle is None:
        return None
    try:
        described = ray.get(handle.describe.remote(), timeout=timeout)
    except ray.exceptions.RayError:
        described = {"workers": []}
    for worker in described.get("workers", []):
        _kill(worker)
    _kill(handle)
    deadline = time.monotonic() + timeout
    while manager() is not None:
        if time.monotonic() > deadline:
            raise UsageError(f"the pool's manager actor was killed but is still listed after {timeout:g} s: run "
                             "'mlwf ray pool status' again later")
        time.sleep(0.1)
    described.pop("workers", None)
    return described


def _kill(handle) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


class PoolClient:
    """The driver's view of a pool it uses: which workers are free, which it lost.

    A worker gets one call at a time from this driver (the rest wait here), so a
    call that has been sent is running: cancelling it means killing its worker
    (Ray interrupts no running actor call), which Ray then restarts. A worker
    that died, or that was killed, under one of this driver's calls is not sent
    more of them; once none is left, the waiting calls go as tasks.
    """

    def __init__(self, described: dict[str, Any], fingerprint: str):
        self.workers = list(described["workers"])
        self.fingerprint = fingerprint
        self.size = len(self.workers)
        self._free = list(range(self.size))
        self._lost: set[int] = set()
        self._waiting: list[tuple[Any, Any, Any]] = []  # (out, send, as_task), in submit order
        self._running: dict[int, Any] = {}  # worker -> the Future of its call
        self._lock = threading.RLock()

    def usable(self) -> bool:
        """Whether any worker is left for this driver."""
        return len(self._lost) < self.size

    def enqueue(self, out, send, as_task) -> None:
        """Run ``send(worker)`` for ``out`` on the next free worker, or ``as_task()`` once no worker is left.

        ``send`` starts the call on the worker (and arranges for :meth:`finished`);
        it raises if Ray refuses.
        """
        with self._lock:
            self._waiting.append((out, send, as_task))
        self._dispatch()

    def _dispatch(self) -> None:
        to_tasks, failed = [], []
        with self._lock:
            while self._waiting and (self._free or not self.usable()):
                out, send, as_task = self._waiting.pop(0)
                if out.done():  # cancelled while it waited
                    continue
                if not self.usable():
                    to_tasks.append((out, as_task))
                    continue
                worker = self._free.pop(0)
                self._running[worker] = out
                try:
                    send(worker)
                except Exception as e:  # noqa: BLE001 - Ray refused to send it: this call fails, the worker stays
                    self._running.pop(worker, None)
                    self._free.append(worker)
                    failed.append((out, e))
        for out, e in failed:
            with contextlib.suppress(InvalidStateError):
                out.set_exception(e)
        for out, as_task in to_tasks:
            try:
                as_task()
            except Exception as e:  # noqa: BLE001 - Ray refused the task: this call fails
                with contextlib.suppress(InvalidStateError):
                    out.set_exception(e)

    def finished(self, worker: int, lost: bool) -> None:
        """The call on ``worker`` ended; ``lost``: the worker died under it (or refused it)."""
        with self._lock:
            self._running.pop(worker, None)
            if lost:
                self._lost.add(worker)
            elif worker not in self._lost:
                self._free.append(worker)
        self._dispatch()

    def cancel(self, out) -> None:
        """``out`` was cancelled: if its call is running, kill its worker (Ray restarts it)."""
        with self._lock:
            running = [w for w, o in self._running.items() if o is out]
            self._lost.update(running)
        self._kill(running)

    def cancel_all(self) -> None:
        """Kill every worker running one of this driver's calls; cancel the calls still waiting."""
        with self._lock:
            running = list(self._running)
            self._lost.update(running)
            waiting, self._waiting = self._waiting, []
        for out, _, _ in waiting:
            out.cancel()
        self._kill(running)

    def _kill(self, workers: list[int]) -> None:
        for worker in workers:
            try:
                ray.kill(self.workers[worker], no_restart=False)
            except Exception:  # noqa: BLE001 - gone already
                pass
