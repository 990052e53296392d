"""The local backend's worker side: what the fork server and each worker process do as they start."""

from __future__ import annotations

import json
import sys

from mlwf.backends import lifeline
from mlwf.settings import adopt_forwarded, take_driver_main


def driver_main() -> str:
    """The driver's main module as multiprocessing tells each new worker to import it (JSON)."""
    from multiprocessing import spawn

    data = spawn.get_preparation_data("mlwf-worker")
    return json.dumps({"path": data.get("init_main_from_path"), "name": data.get("init_main_from_name")})


def _adopt_driver_main() -> None:
    """In the fork server: take on the driver's main module's name and path, not its code.

    Multiprocessing skips re-running the main script in a new worker when the
    process it was forked from already has a ``__main__`` of that path (or
    module name); workers forked from here therefore never run it.
    """
    described = take_driver_main()
    if not described:
        return
    from importlib.machinery import ModuleSpec

    main_module = json.loads(described)
    main = sys.modules["__main__"]
    if main_module.get("path"):
        main.__file__ = main_module["path"]
    if main_module.get("name"):
        main.__spec__ = ModuleSpec(main_module["name"], None)


_adopt_driver_main()


def init_worker(forwarded: dict[str, str], owner) -> None:
    """A new worker: exit with the pool's owner, take the driver's variables now, one BLAS thread."""
    from threadpoolctl import threadpool_limits

    lifeline.exit_with_owner(owner)
    adopt_forwarded(forwarded)
    threadpool_limits(1)
