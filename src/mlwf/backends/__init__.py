"""The backends, found by name: each is a package here with its driver side, its worker side and its config.

* :mod:`mlwf.backends.local`: a pool of worker processes on this machine;
* :mod:`mlwf.backends.ray`: Ray tasks, on a local Ray instance or a cluster;
* :mod:`mlwf.backends.knative`: signed CloudEvents POSTed to ``mlwf serve``
  (Knative Services, or processes on this machine).

Every backend keeps the contract in :mod:`mlwf.backends.base`. A new backend
is a new package ``mlwf/backends/<name>/`` exposing ``BACKEND`` (its class),
and its name in :data:`NAMES` (with the extra that installs what it needs).
"""

from __future__ import annotations

import importlib
from typing import Any

from mlwf.errors import UsageError

#: Backend names, in the order they are listed.
NAMES = ("local", "ray", "knative")
#: ``--transfer`` modes: ``store`` (every intermediate an object in the store), ``direct`` (handed on by the
#: backend: the local pool's pipe, Ray's object store), ``payload`` (inline in each call and its reply: the
#: local pool's pipe again, a Knative request's body), ``shm`` (written once into shared memory that the
#: next calls map: the local backend). Each backend says which it does (``transfers``) and why not the
#: others it could be asked for (``transfer_notes``).
TRANSFERS = ("store", "direct", "payload", "shm")
#: What a backend with optional libraries says when one is missing: (its libraries, the hint).
_INSTALL_HINTS = {"ray": (("ray",), "the Ray backend needs Ray: pip install 'mlwf[ray]'"),
                  "knative": (("httpx", "cloudevents"),
                              "the Knative backend needs its client libraries: pip install 'mlwf[knative]'")}


def backend_class(name: str) -> Any:
    """The class of the backend called ``name`` (imported, not started).

    Raises :class:`UsageError` for an unknown backend, or one whose optional
    dependencies are not installed (with the command that installs them).
    """
    if name not in NAMES:
        raise UsageError(f"unknown backend {name!r}: choose one of {', '.join(NAMES)}")
    try:
        return importlib.import_module(f"mlwf.backends.{name}").BACKEND
    except ModuleNotFoundError as e:
        libraries, hint = _INSTALL_HINTS.get(name, ((), ""))
        if e.name and e.name.split(".")[0] in libraries:
            raise UsageError(hint) from None
        raise


def cannot_transfer(cls: Any, transfer: str) -> str:
    """The one line saying that backend class ``cls`` cannot do ``--transfer transfer``, and why if it says."""
    why = getattr(cls, "transfer_notes", {}).get(transfer)
    return (f"the {cls.name} backend cannot do --transfer {transfer}" + (f" ({why})" if why else "")
            + f": use {' or '.join(cls.transfers)}")


def make_backend(name_or_config: Any, settings, options: dict[str, Any] | None = None):
    """Create a backend from its name (with ``options``, its config's fields) or from its config object."""
    from mlwf.backends.base import BackendConfig

    if isinstance(name_or_config, BackendConfig):
        config = name_or_config
        cls = backend_class(config.backend)
    else:
        cls = backend_class(name_or_config)
        config = cls.Config.from_options(options)
    return cls(config, settings)


def config_from_flags(name: str, *, workflow: str, workers: int | None = None, ray_address: str | None = None,
                      shared_store: bool = False, stage_resources: dict | None = None,
                      endpoints: list[str] | None = None, ray_pool: bool = True):
    """The config of backend ``name`` from the command line's flags: the one mapping ``mlwf run`` and
    ``mlwf bench`` share. Flags of other backends are ignored; the local pool preloads what the stages of
    ``workflow`` import (scikit-learn only for a workflow whose stages import it)."""
    if name == "local":
        from mlwf.backends.local import LocalConfig

        return LocalConfig(workers=workers, workflow=workflow)
    cls = backend_class(name)
    if name == "ray":
        return cls.Config(address=ray_address, shared_store=shared_store, stage_resources=stage_resources,
                          use_pool=ray_pool)
    if name == "knative":
        return cls.Config(endpoints=endpoints)
    return cls.Config()
