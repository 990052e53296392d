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

from mlwf.engine import forkserver, lifeline, runner
from mlwf.engine.calls import Call, Outcome, RunContext
from mlwf.errors import StageError


#: Environment a worker needs from the driver *now*, not from when the fork
#: server started: store endpoints, credentials and limits.
_FORWARDED_ENV = ("S3_", "AWS_", "MLWF_")


def _adopt_driver_main() -> None:
    """In the fork server: take on the driver's main module's name and path, not its code.

    Multiprocessing skips re-running the main script in a new worker when the
    process it was forked from already has a ``__main__`` of that path (or
    module name); workers forked from here therefore never run it.
    """
    described = os.environ.pop(forkserver.DRIVER_MAIN_ENV, None)
    if not described:
        return
    import atexit
    from importlib.machinery import ModuleSpec

    # The fork server ends when the driver has gone. It holds the driver's stdout and
    # stderr too, so whoever reads them (a pipe, `mlwf bench --cold`) waits for it:
    # leave at once rather than unload scikit-learn and SciPy (0.17 s here). It owns
    # nothing to flush or remove; its workers have their own lifeline.
    atexit.register(os._exit, 0)

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

    def __init__(self, workers: int | None = None, preload_sklearn: bool = True):
        self.workers = workers or os.cpu_count() or 1
        self.preload = forkserver.preload(preload_sklearn)
        self._pool: ProcessPoolExecutor | None = None
        self._workers_started = False

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            forkserver.start(self.preload)
            ctx = mp.get_context("forkserver")
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
