"""Imported once, in the local backend's fork server only: what the workers need, before any is forked.

The driver names the workflow when it starts the fork server
(:func:`mlwf.backends.forkserver.start`); :func:`~mlwf.backends.forkserver.preload_modules`
reads what its stages import from its definition, and they are imported here.

The cyclic garbage collector is off meanwhile: scikit-learn and SciPy create
about 190,000 objects as they are imported, and the collector would walk
them over and over (about 0.1 s of a cold run here). All of it is then
frozen (:func:`gc.freeze`, made for a process that forks): no worker's
collection walks it again, nor writes to the pages fork shares.
"""

from __future__ import annotations

import gc
import importlib

from mlwf.backends.forkserver import preload_modules
from mlwf.settings import take_preload_workflow


def _preload() -> None:
    # Nothing raised here may end the fork server: a module that fails to import fails again,
    # reported, where the driver or a call imports it.
    gc.disable()
    try:
        try:
            names = preload_modules(take_preload_workflow())
        except Exception:  # noqa: BLE001  (a workflow module named in MLWF_WORKFLOW_MODULES that raises)
            names = ["mlwf.backends.local.worker"]
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001
                continue
    finally:
        gc.freeze()
        gc.enable()


_preload()
