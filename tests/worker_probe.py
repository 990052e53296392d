"""Called in a local worker by tests/test_local_backend.py: what the worker's process is like."""


def blas_threads() -> list[int]:
    """The threads of every BLAS and OpenMP library loaded once SciPy's linear algebra is."""
    import scipy.linalg  # noqa: F401  (SciPy brings its own OpenBLAS)
    from threadpoolctl import threadpool_info

    return [info["num_threads"] for info in threadpool_info()]
