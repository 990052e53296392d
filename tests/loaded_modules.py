"""Called in a local worker by tests/test_local_backend.py: what its process holds from the fork server
it was forked from (this module imports nothing else)."""

import gc
import sys


def loaded() -> dict:
    """The names in ``sys.modules``, and how many objects the garbage collector keeps frozen."""
    return {"modules": sorted(sys.modules), "frozen": gc.get_freeze_count()}
