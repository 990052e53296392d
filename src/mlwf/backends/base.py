"""The backend contract: what the driver asks of every backend, and the typed config each one takes.

A backend decides only where a stage call runs and how it gets there; the
call itself is always :func:`mlwf.engine.runner.execute`. Each backend is a
package under :mod:`mlwf.backends` holding its driver side and its worker
side, found by name (:func:`mlwf.backends.backend_class`).

Failures: a backend turns its own into mlwf errors before the driver sees
them. A dead worker is :class:`~mlwf.errors.WorkerLost` (retryable; with
``restart`` the driver calls :meth:`Backend.cancel_all` and resubmits every
call in flight). A backend never retries a call itself: the driver alone
decides, from :attr:`~mlwf.errors.MlwfError.retryable`
(:mod:`mlwf.engine.retry`).

A backend may say why it does not take a transfer mode
(``transfer_notes``: mode → reason), for the error that refuses it. Two
methods are optional (the driver looks for them): ``warm_up() -> bool``
starts the workers before a run's first stage (True if it had to), and
``notes(run_id) -> dict`` gives fields the backend adds to the run's report,
whose ``warnings`` (lines) join the report's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from mlwf.errors import UsageError, WorkerLost

if TYPE_CHECKING:
    from mlwf.engine.calls import Call, Outcome, Ref, RunContext
    from mlwf.settings import Settings

__all__ = ["Backend", "BackendConfig", "HoldsNoOutputs", "WorkerLost"]


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """The base of every backend's config: a frozen dataclass of its own settings.

    ``backend`` (a class attribute) names the backend it configures.
    """

    backend: ClassVar[str] = ""

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> BackendConfig:
        """The config from a mapping of its field names (``Engine(backend_options=...)``).

        Raises :class:`UsageError` naming an option the backend does not have.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options or {}) - names)
        if unknown:
            raise UsageError(f"unknown option {unknown[0]!r} for {cls.__name__}: its options are "
                             f"{', '.join(sorted(names)) or 'none'}")
        return cls(**dict(options or {}))


class Backend(Protocol):
    """What the driver calls on a backend (:class:`~mlwf.engine.driver.Engine` owns one)."""

    name: ClassVar[str]  # "local", "ray", "knative"
    #: The ``--transfer`` modes it can do (:data:`mlwf.backends.TRANSFERS`): ``store`` (outputs are objects in
    #: the store), ``direct`` (the backend hands them on), ``payload`` (inline in each call and reply),
    #: ``shm`` (written once into shared memory on one machine).
    transfers: ClassVar[tuple[str, ...]]
    #: Optional: ``{transfer: why not}`` for modes it does not do, said when one is asked for.
    transfer_notes: ClassVar[dict[str, str]]
    Config: ClassVar[type[BackendConfig]]

    def __init__(self, config: Any, settings: Settings) -> None: ...

    def start(self) -> None:
        """Get ready (pools, connections); errors here are one-line UsageErrors."""

    def submit(self, call: Call, ctx: RunContext) -> Future[Outcome]:
        """Run ``call`` once; the future fails with an :class:`~mlwf.errors.MlwfError` saying whether
        it is retryable."""

    def cancel_all(self) -> None:
        """Stop every call in flight (stuck or lost workers); later submits start afresh."""

    def read(self, ref: Ref) -> bytes:
        """The bytes of an output this backend holds (``direct`` transfer), for the driver."""

    def end_run(self, run_id: str) -> None:
        """Let go of whatever the run's calls left with the backend."""

    def close(self) -> None: ...


class HoldsNoOutputs:
    """For a backend whose outputs always travel inline or through the store."""

    name: ClassVar[str]

    def read(self, ref: Ref) -> bytes:
        raise NotImplementedError(f"the {self.name} backend holds no outputs")

    def end_run(self, run_id: str) -> None:
        """Nothing to let go of."""
