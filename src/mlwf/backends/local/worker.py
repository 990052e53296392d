"""The local backend's worker side: what the fork server and each worker process do as they start."""

from __future__ import annotations

import json
import sys

from mlwf.backends import lifeline, memory
from mlwf.settings import adopt_forwarded, single_threaded_blas, take_driver_main


def _adopt_driver_main() -> None:
    """In the fork server: take on the driver's main module's name and path, not its code.

    Multiprocessing skips re-running the main script in a new worker when the
    process it was forked from already has a ``__main__`` of that path (or
    module name); workers forked from here therefore never run it.
    """
    described = take_driver_main()
    if not described:
        return
    import atexit
    import os
    from importlib.machinery import ModuleSpec

    # The fork server ends when the driver has gone. It holds the driver's stdout and
    # stderr too, so whoever reads them (a pipe, `mlwf bench --cold`) waits for it:
    # leave at once rather than unload scikit-learn and SciPy (the end of a run to the
    # process gone: 271 → 64 ms). It owns nothing to flush or remove; its workers have
    # their own lifeline.
    atexit.register(os._exit, 0)

    main_module = json.loads(described)
    main = sys.modules["__main__"]
    if main_module.get("path"):
        main.__file__ = main_module["path"]
    if main_module.get("name"):
        main.__spec__ = ModuleSpec(main_module["name"], None)


_adopt_driver_main()


def init_worker(forwarded: dict[str, str], owner, keep_freed_bytes: int = memory.KEEP_BYTES) -> None:
    """A new worker: exit with the pool's owner, take the driver's variables now, one BLAS thread,
    keep freed memory for the next call."""
    from threadpoolctl import threadpool_limits

    lifeline.exit_with_owner(owner)
    adopt_forwarded(forwarded)
    # One BLAS thread for the libraries loaded later too (SciPy's own OpenBLAS, when the fork
    # server was started by someone else and preloaded nothing): threadpool_limits reaches only
    # those loaded now. A second thread would change a PCA's float sums, and the model's bytes.
    # (Found through the test order; it costs nothing measurable. Skipping threadpool_limits
    # would save 4 ms per worker, in parallel: kept, for a fork server whose environment did
    # not pin BLAS.)
    single_threaded_blas(force=True)
    threadpool_limits(1)
    memory.keep_freed_memory(keep_freed_bytes)
