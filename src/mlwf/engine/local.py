"""The embedded default backend: a pool of worker processes on this machine.

Workers are forked from a clean server process that has already imported the
stage code (multiprocessing's forkserver with preloading), so starting them is
cheap and no thread of the driver (progress bars, S3 client runtimes) is ever
forked. The pool is reused across stages and across runs of one
:class:`~mlwf.engine.driver.Engine`. Each worker pins its BLAS to one thread:
the parallelism is the functions, as on a serverless platform.

Workers never run the driver's main script. Multiprocessing's forkserver and
spawn start methods normally re-import ``__main__`` in every new worker, so a
script that creates an engine without an ``if __name__ == "__main__":`` guard
would start engines inside its own workers. Workers only ever run mlwf's
stage code, so the fork server is told which main module the driver has
(:func:`_adopt_driver_main`), and multiprocessing then sees it as already
imported in every worker it forks.

Workers exit as soon as the process that owns the pool is gone, even one
killed with ``kill -9`` in the middle of a stuck call (they watch a pipe only
the owner holds: :mod:`mlwf.engine.lifeline`); the fork server and
multiprocessing's resource tracker then exit by themselves.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from mlwf.engine import lifeline, runner
from mlwf.engine.calls import Call, Outcome, RunContext
from mlwf.errors import StageError

_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


#: Environment a worker needs from the driver *now*, not from when the fork
#: server started: store endpoints, credentials and limits.
_FORWARDED_ENV = ("S3_", "AWS_", "MLWF_")


#: Set only while the fork server starts: the driver's main module, as
#: multiprocessing would describe it to a new worker.
_DRIVER_MAIN_ENV = "MLWF_DRIVER_MAIN"


def _driver_main() -> str:
    """The driver's main module as multiprocessing tells each new worker to import it (JSON)."""
    from multiprocessing import spawn

    data = spawn.get_preparation_data("mlwf-worker")
    return json.dumps({"path": data.get("init_main_from_path"), "name": data.get("init_main_from_name")})


def _adopt_driver_main() -> None:
    """In the fork server: take on the driver's main module's name and path, not its code.

    Multiprocessing skips re-running the main script in a new worker when the
    process it was forked from already has a ``__main__`` of that path (or
    module name); workers forked from here therefore never run it.
    """
    described = os.environ.pop(_DRIVER_MAIN_ENV, None)
    if not described:
        return
    from importlib.machinery import ModuleSpec

    driver_main = json.loads(described)
    main = sys.modules["__main__"]
    if driver_main.get("path"):
        main.__file__ = driver_main["path"]
    if driver_main.get("name"):
        main.__spec__ = ModuleSpec(driver_main["name"], None)


_adopt_driver_main()


def _init_worker(env: dict[str, str], owner) -> None:
    from threadpoolctl import threadpool_limits

    lifeline.exit_with_owner(owner)
    for name in [k for k in os.environ if k.startswith(_FORWARDED_ENV)]:
        del os.environ[name]
    os.environ.update(env)
    threadpool_limits(1)


class LocalBackend:
    """Runs calls in ``workers`` processes (default: one per core)."""

    name = "local"
    #: ``direct`` hands each output's bytes back through the pool's pipe to the
    #: driver and on to the next call; ``store`` puts them in the object store.
    transfers = ("store", "direct")

    #: Imported once in the fork server, so no worker pays for them (this
    #: module first: it adopts the driver's main module, see above).
    LIGHT = ["mlwf.engine.local", "mlwf.engine.runner", "mlwf.workflows.training", "mlwf.workflows.inference",
             "mlwf.model", "mlwf.images"]
    #: scikit-learn takes 0.6 s to import here; only training stages need it.
    HEAVY = ["sklearn.decomposition", "sklearn.ensemble"]

    def __init__(self, workers: int | None = None, preload_sklearn: bool = True):
        self.workers = workers or os.cpu_count() or 1
        self.preload = self.LIGHT + (self.HEAVY if preload_sklearn else [])
        self._pool: ProcessPoolExecutor | None = None
        self._workers_started = False

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(self.preload)
            saved = {k: os.environ.get(k) for k in (*_BLAS_ENV, _DRIVER_MAIN_ENV)}
            try:
                for k in _BLAS_ENV:
                    os.environ[k] = "1"
                os.environ[_DRIVER_MAIN_ENV] = _driver_main()
                from multiprocessing import forkserver

                forkserver.ensure_running()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV)}
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                             initargs=(env, lifeline.reader()))
        return self._pool

    def start(self) -> None:
        """Start the fork server now (it imports in the background while the driver works)."""
        self._start()

    def warm_up(self) -> bool:
        """Start the workers now, rather than at the first call, and wait until they take calls.

        Returns whether any had to start (False when the pool was already
        running). The driver times this as the run's worker start-up, so a
        cold run does not charge it to its first stage.
        """
        if self._pool is not None and self._workers_started:
            return False
        pool = self._start()
        # One per core at most: more than that (--workers 500) start as calls need them.
        try:
            for f in [pool.submit(os.getpid) for _ in range(min(self.workers, os.cpu_count() or 1))]:
                f.result()
        except BrokenProcessPool:
            self.reset()
            raise StageError("the local backend's worker processes died as they started (their errors are "
                             "above); in a script, create the engine under 'if __name__ == \"__main__\":'") from None
        self._workers_started = True
        return True

    def submit(self, call: Call, ctx: RunContext) -> Future[Outcome]:
        try:
            return self._start().submit(runner.execute, call, ctx)
        except BrokenProcessPool:
            self.reset()
            return self._start().submit(runner.execute, call, ctx)

    def reset(self) -> None:
        """Kill the workers (a dead, stuck or broken pool); the next call starts new ones."""
        if self._pool is not None:
            # The executor has no public way to stop a stuck worker.
            processes = list(getattr(self._pool, "_processes", {}).values())
            for proc in processes:
                if proc.is_alive():
                    proc.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
            for proc in processes:
                proc.join(timeout=5)
            self._pool = None
            self._workers_started = False

    def read(self, ref):
        """Never needed: this backend hands every output on inline or through the store."""
        raise NotImplementedError(f"the {self.name} backend holds no outputs")

    def end_run(self, run_id: str) -> None:
        """Nothing to let go of: this backend holds no outputs between calls."""

    def close(self) -> None:
        """Stop the workers; one still busy (a run that failed around it) is killed."""
        if self._pool is not None:
            processes = list(getattr(self._pool, "_processes", {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for proc in processes:
                proc.join(timeout=2)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=5)
            self._pool = None
            self._workers_started = False
