"""Time marks of the fork server and the workers for cold_probe.py (imported by the fork server's preload)."""

from __future__ import annotations

import json
import os
import time


def mark(who: str, event: str, **extra) -> None:
    path = os.environ.get("MLWF_PROBE_MARKS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"t": time.time(), "pid": os.getpid(), "who": who, "event": event, **extra}) + "\n")
