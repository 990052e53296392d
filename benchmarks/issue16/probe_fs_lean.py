"""cold_probe.py variant ``lean``: the worker initializer without threadpool_limits(1).

The fork server was started with OMP/OPENBLAS/MKL/BLIS_NUM_THREADS=1, which
BLAS reads when it loads, so every worker forked from it is pinned already.
"""

import os

from mlwf.engine import lifeline, local


def _init_worker(env, owner):
    lifeline.exit_with_owner(owner)
    for name in [k for k in os.environ if k.startswith(local._FORWARDED_ENV)]:
        del os.environ[name]
    os.environ.update(env)


local._init_worker = _init_worker
