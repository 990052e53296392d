"""cold_probe.py: marks the fork server's preload (light)."""

from probe_marks import mark

mark("fork server", "preload light")
