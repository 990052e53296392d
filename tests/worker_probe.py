"""Called in a local worker by tests/test_local_backend.py: what the worker's process is like."""

import os

import numpy as np


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def allocate_and_free(n_bytes: int) -> dict:
    """Resident bytes before, while holding ``n_bytes`` of written memory, and after freeing it."""
    before = resident_bytes()
    held = np.ones(n_bytes // 8)
    holding = resident_bytes()
    del held
    return {"before": before, "holding": holding, "after": resident_bytes()}


def blas_threads() -> list[int]:
    """The threads of every BLAS and OpenMP library loaded once SciPy's linear algebra is."""
    import scipy.linalg  # noqa: F401  (SciPy brings its own OpenBLAS)
    from threadpoolctl import threadpool_info

    return [info["num_threads"] for info in threadpool_info()]
