"""cold_probe.py: marks the end of the fork server's preload, and each worker's initializer."""

import sys

from mlwf.backends.local import worker
from probe_fs_begin import WatchImports
from probe_marks import mark

sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, WatchImports)]

_init = worker.init_worker


def init_worker(*args):
    mark("worker", "initializer began")
    _init(*args)
    mark("worker", "initializer ended")


worker.init_worker = init_worker
mark("fork server", "preload end")
