"""cold_probe.py: marks the fork server's preload (heavy)."""

from probe_marks import mark

mark("fork server", "preload heavy")
