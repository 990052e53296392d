"""cold_probe.py: marks the end of the fork server's preload, and each worker's initializer."""

from mlwf.backends.local import worker
from probe_marks import mark

_init = worker.init_worker


def init_worker(forwarded, owner):
    mark("worker", "initializer began")
    _init(forwarded, owner)
    mark("worker", "initializer ended")


worker.init_worker = init_worker
mark("fork server", "preload end")
