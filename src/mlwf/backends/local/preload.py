"""Imported once, in the local backend's fork server only: what the workers need, before any is forked.

The driver names the workflow when it starts the fork server
(:func:`mlwf.backends.forkserver.start`); :func:`~mlwf.backends.forkserver.preload_modules`
reads what its stages import from its definition, and they are imported here.

The cyclic garbage collector is off meanwhile: scikit-learn and SciPy create
about 190,000 objects as they are imported, and the collector would walk
them over and over: the same modules took 906 ms with it and 837 ms without
(×0.92, 2026-11-28,
``benchmarks/results/cold_start/2026-11-28-fork-server-preload.json``). All
of it is then frozen (:func:`gc.freeze`, made for a process that forks): no
worker's collection walks it again, nor writes to the pages fork shares.
Collecting before freezing was tried: 73–126 ms, more than it could save; not
collecting leaves the imports' garbage frozen, 0.5 MB of resident memory.

What is imported here is most of a cold run, and it is scikit-learn's. Self
time by package under ``-X importtime`` (``benchmarks/cold_start.py
--imports``, 2026-11-28; it inflates every figure, read the shares): SciPy
471 ms, scikit-learn 103, NumPy 83, mlwf 61 (with the warm-up fits), narwhals
29, rich 23; scikit-learn 1.9 imports all but mlwf's. SciPy's statistics,
about half of SciPy's share, come through ``sklearn.utils.fixes``,
``metrics`` and ``_loss``; ``sklearn.linear_model`` (0.13 s) through
``sklearn.decomposition._dict_learning`` and ``sklearn.ensemble._stacking``;
narwhals through ``sklearn.utils.validation``, and rich through
``sklearn.callback`` because it is installed. Tried and dropped:

* importing fewer scikit-learn modules: the stages import
  ``sklearn.decomposition`` and ``sklearn.ensemble``, the public modules of
  their estimators; avoiding the rest means importing private modules or
  stubbing SciPy, which other scikit-learn versions would break. A lazy module
  in their place does not help either: the importers read names from them at
  import time (``from scipy.stats import rankdata``, ``gmean``);
* Python's ``-O``/``-OO`` for the fork server: several times slower here (the
  standard library's optimised bytecode is not cached), and they change what
  the libraries run.
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
