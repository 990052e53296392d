"""cold_probe.py: marks the fork server's preload (begin)."""

from probe_marks import mark

mark("fork server", "preload begin")
