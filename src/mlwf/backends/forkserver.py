"""Starting the local backend's fork server, from a module that imports nothing heavy.

A cold ``mlwf run`` spends most of its start-up in the fork server importing
NumPy, Pillow, the stage code and scikit-learn (about 1 s here). The command
line starts it with :func:`start` before it imports the engine, the terminal
display or even the workflow's definition, so the two processes import side
by side on two cores (the driver's 0.25 s of imports beside the fork
server's); :class:`mlwf.backends.local.LocalBackend` then finds it
running. The driver only names the workflow: the fork server reads what its
stages import from the definition (:func:`preload_modules`, run there by
:mod:`mlwf.backends.local.preload`), which it imports anyway, so the
definition stays the one source of truth and the driver no longer imports
the workflow's module (NumPy, about 80 ms) first: the fork server is asked
for at 62 ms instead of 134 (2026-11-28). Only the standard library and
:mod:`mlwf.settings` are imported here. Tried and dropped: starting the fork
server before the command line is parsed (peeking at ``argv``), about 20 ms
sooner at the price of reading the arguments twice.

Ctrl-C is the driver's alone. A terminal sends SIGINT to every process of
its foreground group, fork server and workers included; the fork server
starts with SIGINT blocked, and every worker it forks inherits the block, so
none of them prints a traceback of its own (multiprocessing's fork server
ignores SIGINT only once its preloading is done). The driver, interrupted,
ends its run, kills its workers and, leaving, the fork server (:func:`stop`).
"""

from __future__ import annotations

import json
import os
import signal
import threading

from mlwf.settings import fork_server_environment

#: What multiprocessing's fork server is told to import: one module, which imports the rest.
PRELOAD = ["mlwf.backends.local.preload"]
#: Imported after a workflow's stage code when some of it is scikit-learn: its first-call costs.
SKLEARN_WARMUP = "mlwf.workflows.warmup"
#: Held while the process environment carries the fork server's variables: two engines starting in two
#: threads would otherwise each save the other's variables and restore them for good.
_STARTING = threading.Lock()


def preload_modules(workflow: str | None) -> list[str]:
    """The modules the fork server imports for ``workflow`` (None: every known workflow), in order.

    The worker module first (it adopts the driver's main module), then each
    stage function's module and the workflow's
    :attr:`~mlwf.workflows.definition.Workflow.imports`, then
    :mod:`mlwf.workflows.warmup` if any of them is scikit-learn. Workflows
    named in ``MLWF_WORKFLOW_MODULES`` are found too. A workflow that cannot
    be found adds nothing: the driver reports it when it looks it up.
    """
    from mlwf import workflows
    from mlwf.errors import UsageError
    from mlwf.settings import Settings

    found = ["mlwf.backends.local.worker"]
    try:
        if workflow not in workflows.BUILTIN:
            workflows.use(Settings.resolve().workflow_modules)
        found += workflows.modules_to_preload(workflow)
    except UsageError:
        pass
    return with_warmup(found)


def with_warmup(names: list[str]) -> list[str]:
    """``names`` without repeats, and :mod:`mlwf.workflows.warmup` last if any of them is scikit-learn."""
    if any(name == "sklearn" or name.startswith("sklearn.") for name in names):
        names = [*names, SKLEARN_WARMUP]
    return list(dict.fromkeys(names))


def driver_main() -> str:
    """The driver's main module as multiprocessing tells each new worker to import it (JSON)."""
    from multiprocessing import spawn

    data = spawn.get_preparation_data("mlwf-worker")
    return json.dumps({"path": data.get("init_main_from_path"), "name": data.get("init_main_from_name")})


def start(workflow: str | None = None) -> None:
    """Start multiprocessing's fork server (if it is not running) to preload what ``workflow`` needs.

    Parameters
    ----------
    workflow : the workflow whose stages the workers will run; None for
        every known workflow (an :class:`~mlwf.engine.driver.Engine` may
        run any of them).

    Returns at once: the server imports in the background. Its environment
    pins BLAS to one thread, names the driver's main module and the
    workflow; this process's own environment is left as it was, also when
    several threads start engines at once. A fork server already running is
    kept, with what it preloaded.
    """
    import multiprocessing as mp
    from multiprocessing import forkserver, resource_tracker

    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
    # The resource tracker first: starting it unblocks SIGINT in this thread (whatever was blocked
    # before), which would undo the block below if it happened inside ensure_running().
    resource_tracker.ensure_running()
    with _STARTING, fork_server_environment(driver_main(), workflow), _sigint_blocked():
        forkserver.ensure_running()


class _sigint_blocked:
    """Block SIGINT in this thread while the fork server is spawned: a blocked signal stays blocked
    across fork and exec, so the server and every worker it forks never see a Ctrl-C.

    Blocking (per thread) rather than ignoring (per process) works from any thread and loses no
    Ctrl-C meant for the driver: the kernel hands it to a thread that does not block it.
    """

    def __enter__(self) -> None:
        self._old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def __exit__(self, *exc) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old)


def stop() -> None:
    """Kill this process's fork server now, if it runs: for a command that is ending.

    Left alone, a fork server still importing (a run refused or interrupted
    at start-up) would outlive the command by as long as its imports take;
    it holds nothing worth saving. Workers it forked for a pool still in use
    would see it go as their own death: only call this once every engine of
    the process is closed. A later :func:`start` starts a new one.
    """
    from multiprocessing import forkserver

    server = forkserver._forkserver  # no public way to name or stop it
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass  # gone already
    forget = getattr(server, "_stop", None)
    if forget is not None:
        forget()  # reaps it and forgets it, so a later start() starts a new one
