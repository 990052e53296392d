"""cold_probe.py: marks the end of the fork server's preload, and each worker's initializer."""

from mlwf.engine import local
from probe_marks import mark

_init = local._init_worker


def _init_worker(env, owner):
    mark("worker", "initializer began")
    _init(env, owner)
    mark("worker", "initializer ended")


local._init_worker = _init_worker
mark("fork server", "preload end")
