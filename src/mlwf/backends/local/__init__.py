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
(:mod:`mlwf.backends.local.worker`), and multiprocessing then sees it as already
imported in every worker it forks.

Workers exit as soon as the process that owns the pool is gone, even one
killed with ``kill -9`` in the middle of a stuck call (they watch a pipe only
the owner holds: :mod:`mlwf.backends.lifeline`); the fork server and
multiprocessing's resource tracker then exit by themselves.

``--transfer shm`` is this backend's alone (:mod:`mlwf.engine.shm`): every
worker is on this machine, so an output written once into shared memory can
be mapped by any later call. The run's segments are removed when the run ends
(:meth:`LocalBackend.end_run`); a run that failed with calls still running
has those workers killed first, or a call finishing after the clean-up would
leave a segment behind for as long as the driver lives.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import ClassVar

from mlwf.backends import forkserver, lifeline, memory
from mlwf.backends.base import BackendConfig, HoldsNoOutputs
from mlwf.engine import runner, shm
from mlwf.engine.calls import Call, Outcome, RunContext
from mlwf.errors import StageError, UsageError, WorkerLost
from mlwf.settings import Settings

#: The most worker processes (each holds the stage code, about 100 MB).
MAX_WORKERS = 1024


@dataclass(frozen=True)
class LocalConfig(BackendConfig):
    """``workers``: processes (default: one per core); ``workflow``: the workflow whose stage code the
    fork server imports once for every worker (default: every known workflow's; a process that only
    runs inference starts faster without scikit-learn, which only training needs); ``keep_freed_bytes``:
    memory each worker keeps after a call for the next one instead of giving it back (0: give it all
    back; see :mod:`mlwf.backends.memory`)."""

    backend: ClassVar[str] = "local"
    workers: int | None = None
    workflow: str | None = None
    keep_freed_bytes: int = memory.KEEP_BYTES

    def __post_init__(self):
        w = self.workers
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_WORKERS):
            raise UsageError(f"--workers must be an integer from 1 to {MAX_WORKERS:,}, got {w!r}")
        f = self.workflow
        if f is not None and not (isinstance(f, str) and f.strip() and f.isprintable()):
            raise UsageError(f"workflow= names the workflow the workers will run (None: any), got {f!r}")
        k = self.keep_freed_bytes
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= memory.MAX_KEEP_BYTES:
            raise UsageError(f"keep_freed_bytes= must be an integer from 0 to {memory.MAX_KEEP_BYTES:,} "
                             f"(bytes a worker keeps between calls), got {k!r}")


def _run(call: Call, ctx: RunContext) -> Outcome:
    """A call in a worker process, as it arrives through the pool."""
    return runner.execute(call, ctx)


class LocalBackend(HoldsNoOutputs):
    """Runs calls in ``config.workers`` processes (default: one per core)."""

    name = "local"
    #: ``direct`` hands each output's bytes back through the pool's pipe to the
    #: driver and on to the next call; ``store`` puts them in the object store;
    #: ``shm`` writes them once into shared memory that later calls map.
    #: ``payload`` (state inline in the call) is, on one machine's pool, the same
    #: mechanism as ``direct``: the bytes ride the pipe inside the call and its
    #: result. The two differ on Ray (``direct`` is its object store, ``payload``
    #: it does not offer) and on Knative (``payload`` is the request's body,
    #: ``direct`` it does not offer).
    transfers = ("store", "direct", "payload", "shm")
    Config = LocalConfig

    def __init__(self, config: LocalConfig | None = None, settings: Settings | None = None):
        config = config or LocalConfig()
        self.settings = settings or Settings.resolve()
        self.workers = config.workers or os.cpu_count() or 1
        self.preload_workflow = config.workflow
        self.keep_freed_bytes = config.keep_freed_bytes
        self._pool: ProcessPoolExecutor | None = None
        self._workers_started = False
        #: The calls in flight of each --transfer shm run (for end_run), and their lock.
        self._shm_calls: dict[str, set[Future]] = {}
        self._shm_lock = threading.Lock()

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            from mlwf.backends.local.worker import init_worker

            forkserver.start(self.preload_workflow)
            ctx = mp.get_context("forkserver")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=init_worker,
                                             initargs=(self.settings.forwarded(), lifeline.reader(),
                                                       self.keep_freed_bytes))
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
            self.cancel_all()
            raise StageError("the local backend's worker processes died as they started (their errors are "
                             "above); in a script, create the engine under 'if __name__ == \"__main__\":'") from None
        self._workers_started = True
        return True

    def submit(self, call: Call, ctx: RunContext) -> Future[Outcome]:
        """Run ``call`` in a worker; a worker that dies fails every call of the pool with
        :class:`WorkerLost` (the pool is broken: :meth:`cancel_all` before submitting again)."""
        try:
            pooled = self._start().submit(_run, call, ctx)
        except BrokenProcessPool:
            self.cancel_all()
            pooled = self._start().submit(_run, call, ctx)
        out: Future[Outcome] = Future()

        def finished(done: Future) -> None:
            if done.cancelled():
                out.cancel()
                return
            error = done.exception()
            if isinstance(error, BrokenProcessPool):
                error = WorkerLost(f"{call.workflow} stage {call.name} failed: its worker process died")
            if not out.set_running_or_notify_cancel():
                return
            if error is None:
                out.set_result(done.result())
            else:
                out.set_exception(error)

        if ctx.transfer == "shm":
            with self._shm_lock:
                self._shm_calls.setdefault(ctx.run_id, set()).add(pooled)
            pooled.add_done_callback(lambda f: self._shm_call_ended(ctx.run_id, f))
        pooled.add_done_callback(finished)
        out.add_done_callback(lambda f: pooled.cancel() if f.cancelled() else None)  # the driver dropped it
        return out

    def _shm_call_ended(self, run_id: str, pooled: Future) -> None:
        with self._shm_lock:
            self._shm_calls.get(run_id, set()).discard(pooled)

    def end_run(self, run_id: str) -> None:
        """Remove the run's shared-memory segments (``--transfer shm``), its calls still running (a failed
        run's) stopped first so that none makes one afterwards."""
        with self._shm_lock:
            calls = self._shm_calls.pop(run_id, None)
        if calls is None:
            return
        if any(not f.done() for f in calls):
            self.cancel_all()
        shm.remove_run(shm.owner(), run_id)

    def cancel_all(self) -> None:
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


BACKEND = LocalBackend
