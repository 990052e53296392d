"""Starting the local backend's fork server, from a module that imports nothing heavy.

A cold ``mlwf run`` spends most of its start-up in the fork server importing
NumPy, Pillow, the stage code and scikit-learn (about 1 s here). The command
line starts it with :func:`start` before it imports the engine and the
terminal display itself, so the two processes import side by side on two
cores; :class:`mlwf.backends.local.LocalBackend` then finds it running. Only
the standard library and :mod:`mlwf.settings` are imported here.
"""

from __future__ import annotations

import json

from mlwf.settings import fork_server_environment

#: Imported once in the fork server, so no worker pays for them (the worker module first: it
#: adopts the driver's main module).
LIGHT = ["mlwf.backends.local.worker", "mlwf.engine.runner", "mlwf.workflows.training",
         "mlwf.workflows.inference", "mlwf.model", "mlwf.images"]
#: scikit-learn takes 0.6–0.9 s to import here; only training stages need it. The last
#: module pays the first-call costs of the training stages' libraries once, for every worker.
HEAVY = ["sklearn.decomposition", "sklearn.ensemble", "mlwf.workflows.warmup"]


def preload(sklearn: bool) -> list[str]:
    """The modules the fork server imports, with or without scikit-learn."""
    return LIGHT + (HEAVY if sklearn else [])


def needs_sklearn(workflow: str) -> bool:
    """Whether the stages of ``workflow`` import scikit-learn (then the fork server preloads it)."""
    from mlwf import workflows

    return any(m.startswith("sklearn") for m in workflows.get(workflow).imports)


def driver_main() -> str:
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
    with fork_server_environment(driver_main()):
        forkserver.ensure_running()
