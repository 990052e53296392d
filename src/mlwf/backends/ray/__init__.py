"""The Ray backend: :mod:`~mlwf.backends.ray.backend` (driver side; :mod:`~mlwf.backends.ray.lineage`: lost
outputs made again), :mod:`~mlwf.backends.ray.task` (the task in a worker), :mod:`~mlwf.backends.ray.cluster`
(joining Ray), :mod:`~mlwf.backends.ray.pool` (the worker pool kept on a cluster)."""

from mlwf.backends.ray.backend import BACKEND, RayBackend, RayConfig

__all__ = ["BACKEND", "RayBackend", "RayConfig"]
