"""The engine: runs workflow stages on a backend.

A backend only decides where a stage call runs and how it gets there. Each is
one module with the same few methods::

    name: str                      # "local", "ray", "knative"
    transfers: tuple[str, ...]     # the --transfer modes it can do
    start() -> None                # get ready (pools, connections)
    submit(call, ctx) -> Future    # a concurrent.futures.Future of an Outcome
    reset() -> None                # drop broken workers; later submits start afresh
    close() -> None
"""

from __future__ import annotations

from typing import Any

from mlwf.errors import UsageError

BACKENDS = ("local", "ray", "knative")
TRANSFERS = ("store", "direct")


def backend_class(name: str):
    """The class of the backend called ``name`` (imported, not started).

    Raises :class:`UsageError` for an unknown backend, or one whose optional
    dependencies are not installed (with the command that installs them).
    """
    if name == "local":
        from mlwf.engine.local import LocalBackend

        return LocalBackend
    if name == "ray":
        try:
            from mlwf.engine.ray import RayBackend
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] == "ray":
                raise UsageError("the Ray backend needs Ray: pip install 'mlwf[ray]'") from None
            raise
        return RayBackend
    if name == "knative":
        try:
            from mlwf.engine.knative import KnativeBackend
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in ("httpx", "cloudevents"):
                raise UsageError("the Knative backend needs its client libraries: pip install 'mlwf[knative]'") from None
            raise
        return KnativeBackend
    raise UsageError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def make_backend(name: str, *, workers: int | None = None, preload_sklearn: bool = True,
                 options: dict[str, Any] | None = None):
    """Create the backend called ``name`` (see :func:`backend_class` for the errors)."""
    cls = backend_class(name)
    if name == "local":
        return cls(workers, preload_sklearn=preload_sklearn)
    return cls(**(options or {}))
