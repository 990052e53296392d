"""cold_probe.py: marks the fork server's preload: its begin, and when it starts importing
scikit-learn (``preload light``: the stage code is in) and the warm-up (``preload heavy``)."""

import sys

from probe_marks import mark


class WatchImports:
    """A finder that finds nothing: it only marks the first import of the modules it watches."""

    events = {"sklearn": "preload light", "mlwf.workflows.warmup": "preload heavy"}

    def find_spec(self, name, path=None, target=None):
        event = self.events.pop(name, None)
        if event:
            mark("fork server", event)
        return None


sys.meta_path.insert(0, WatchImports())
mark("fork server", "preload begin")
