"""Starting the local backend's fork server, from a module that imports nothing heavy.

A cold ``mlwf run`` spends most of its start-up in the fork server importing
NumPy, Pillow, the stage code and scikit-learn (about 1 s here). The command
line starts it with :func:`start` before it imports the engine and the
terminal display itself, so the two processes import side by side on two
cores; :class:`mlwf.engine.local.LocalBackend` then finds it running. Only the
standard library is imported here.
"""

from __future__ import annotations

import json
import os

#: BLAS reads these when it loads: the fork server and every worker forked from it use one thread.
BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")

#: Set only while the fork server starts: the driver's main module, as
#: multiprocessing would describe it to a new worker.
DRIVER_MAIN_ENV = "MLWF_DRIVER_MAIN"

#: Imported once in the fork server, so no worker pays for them (mlwf.engine.local
#: first: it adopts the driver's main module).
LIGHT = ["mlwf.engine.local", "mlwf.engine.runner", "mlwf.workflows.training", "mlwf.workflows.inference",
         "mlwf.model", "mlwf.images"]
#: scikit-learn takes 0.6–0.9 s to import here; only training stages need it. The last
#: module pays the first-call costs of the training stages' libraries once, for every worker.
HEAVY = ["sklearn.decomposition", "sklearn.ensemble", "mlwf.workflows.warmup"]


def preload(sklearn: bool) -> list[str]:
    """The modules the fork server imports, with or without scikit-learn."""
    return LIGHT + (HEAVY if sklearn else [])


def _driver_main() -> str:
    """The driver's main module as multiprocessing tells each new worker to import it (JSON)."""
    from multiprocessing import spawn

    data = spawn.get_preparation_data("mlwf-worker")
    return json.dumps({"path": data.get("init_main_from_path"), "name": data.get("init_main_from_name")})


def start(modules: list[str]) -> None:
    """Start multiprocessing's fork server (if it is not running) with ``modules`` preloaded.

    Returns at once: the server imports them in the background. Its
    environment pins BLAS to one thread and names the driver's main module;
    this process's own environment is left as it was.
    """
    import multiprocessing as mp
    from multiprocessing import forkserver

    mp.get_context("forkserver").set_forkserver_preload(modules)
    saved = {k: os.environ.get(k) for k in (*BLAS_ENV, DRIVER_MAIN_ENV)}
    try:
        for k in BLAS_ENV:
            os.environ[k] = "1"
        os.environ[DRIVER_MAIN_ENV] = _driver_main()
        forkserver.ensure_running()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
