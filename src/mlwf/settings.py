"""Settings: the one place mlwf reads the environment (and, for its worker processes, writes it).

A command, an :class:`~mlwf.engine.driver.Engine`, ``mlwf serve`` and every
worker process call :meth:`Settings.resolve` once, at their start: it copies
the variables mlwf reads (``MLWF_*``, ``S3_*``, ``AWS_*``, ``RAY_ADDRESS``,
``PORT``, ``XDG_DATA_HOME``, ``K_SINK``) and takes the command-line flags that override
them. The object is then passed down; no other module looks at
``os.environ``. What each variable means is in docs/configuration.md; how
it is checked lives with its user (the S3 settings in
:mod:`mlwf.storage.s3.config`, the run lease in :mod:`mlwf.engine.driver`),
so a bad S3 variable still fails only a command that uses S3.

Worker processes resolve their own settings, on their own environment:
credentials never travel with a call. The driver hands its forwarded
variables (:meth:`Settings.forwarded`) to the processes it starts (the local
backend's pool initializer, Ray's ``runtime_env``), which adopt them
(:func:`adopt_forwarded`, :func:`keep_forwarded`) before resolving.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

#: Variables with these prefixes reach the worker processes a driver starts.
FORWARDED_PREFIXES = ("MLWF_", "S3_", "AWS_")
_OTHER_VARIABLES = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "HOME", "PORT",
                    "XDG_DATA_HOME", "K_SINK")
#: BLAS and OpenMP thread counts: one per worker, the parallelism is the functions.
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
#: Set only while the local backend's fork server starts (see :mod:`mlwf.backends.local.worker`
#: and :mod:`mlwf.backends.local.preload`).
DRIVER_MAIN_VARIABLE = "MLWF_DRIVER_MAIN"
PRELOAD_WORKFLOW_VARIABLE = "MLWF_PRELOAD_WORKFLOW"
DEFAULT_BUCKET = "tless"


@dataclass(frozen=True)
class S3Environment:
    """The S3 variables as found, raw text or None; :mod:`mlwf.storage.s3.config` checks them."""

    host: str | None = None  # S3_HOST (a host, or a full http(s):// URL)
    port: str | None = None  # S3_PORT
    endpoint_urls: tuple[tuple[str, str], ...] = ()  # (variable, value): AWS_ENDPOINT_URL_S3, _URL, AWS_ENDPOINT
    user: str | None = field(default=None, repr=False)  # S3_USER
    password: str | None = field(default=None, repr=False)  # S3_PASSWORD
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)  # AWS_SESSION_TOKEN, else AWS_TOKEN
    region: str | None = None  # AWS_REGION, else AWS_DEFAULT_REGION
    timeout: str | None = None  # MLWF_S3_TIMEOUT
    concurrency: str | None = None  # MLWF_S3_CONCURRENCY

    def __reduce__(self):  # never pickle secrets
        raise TypeError("S3 settings cannot be pickled; each process reads its own")


@dataclass(frozen=True)
class Settings:
    """What the environment and the command line say, read once.

    Parameters
    ----------
    environ : the variables mlwf reads, as found (see the module docstring).
    store, bucket : ``--store`` and ``--bucket`` (None: not given).
    ray_address : ``--ray-address`` (None: ``RAY_ADDRESS``, else none).
    """

    environ: Mapping[str, str] = field(default_factory=dict, repr=False)
    store_flag: str | None = None
    bucket_flag: str | None = None
    ray_address_flag: str | None = None

    @classmethod
    def resolve(cls, *, store: str | None = None, bucket: str | None = None, ray_address: str | None = None,
                environ: Mapping[str, str] | None = None) -> Settings:
        """Read this process's environment (or ``environ``) once, with the flags that override it."""
        source = os.environ if environ is None else environ
        found = {k: v for k, v in source.items() if k.startswith(FORWARDED_PREFIXES) or k in _OTHER_VARIABLES}
        return cls(found, store, bucket, ray_address)

    def with_store(self, store: str | None, bucket: str | None) -> Settings:
        """These settings with ``store``/``bucket`` given as flags (None keeps what they say)."""
        return replace(self, store_flag=self.store_flag if store is None else store,
                       bucket_flag=self.bucket_flag if bucket is None else bucket)

    def __reduce__(self):  # they hold credentials: each process resolves its own
        raise TypeError("Settings cannot be pickled; each process resolves its own")

    def _get(self, name: str) -> str | None:
        return self.environ.get(name)

    def _text(self, name: str) -> str | None:
        value = (self._get(name) or "").strip()
        return value or None

    # ------------------------------------------------------------------ the store
    # :meth:`mlwf.storage.StoreSpec.from_settings` makes the store's spec of these two.
    @cached_property
    def store_url(self) -> str:
        """The store: ``--store`` > ``MLWF_STORE`` > the default local store.

        Raises :class:`~mlwf.errors.StoreError` for a flag given empty or
        blank: it never means the default.
        """
        _refuse_blank("--store", self.store_flag)
        return self.store_flag or self._get("MLWF_STORE") or self.default_store_url()

    @cached_property
    def bucket(self) -> str:
        """The bucket: ``--bucket`` > ``MLWF_BUCKET`` > ``S3_BUCKET`` (S3 only) > ``tless``.

        Raises :class:`~mlwf.errors.StoreError` for a flag (``--store`` too) given empty or blank.
        """
        url = self.store_url
        _refuse_blank("--bucket", self.bucket_flag)
        bucket = self.bucket_flag
        if bucket is None:
            bucket = self._get("MLWF_BUCKET")
            if bucket is None and url.startswith("s3://"):
                bucket = self._get("S3_BUCKET")
        return bucket or DEFAULT_BUCKET

    def default_store_url(self) -> str:
        """The store used when neither ``--store`` nor ``MLWF_STORE`` is given."""
        data_home = self._get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return str(Path(data_home) / "mlwf" / "store")

    @cached_property
    def s3(self) -> S3Environment:
        """The S3 variables (endpoint, credentials, region, limits), unchecked."""
        get = self._get
        urls = tuple((name, get(name).strip()) for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
                     if (get(name) or "").strip())
        return S3Environment(
            host=self._text("S3_HOST"), port=self._text("S3_PORT"), endpoint_urls=urls,
            user=get("S3_USER") or None, password=get("S3_PASSWORD") or None,
            access_key_id=get("AWS_ACCESS_KEY_ID") or None, secret_access_key=get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=get("AWS_SESSION_TOKEN") or get("AWS_TOKEN") or None,
            region=get("AWS_REGION") or get("AWS_DEFAULT_REGION") or None,
            timeout=self._text("MLWF_S3_TIMEOUT"), concurrency=self._text("MLWF_S3_CONCURRENCY"))

    @property
    def store_faults(self) -> str | None:
        """``MLWF_STORE_FAULTS``: store faults to inject, for tests only (:mod:`mlwf.storage.faulty`)."""
        return self._get("MLWF_STORE_FAULTS") or None

    # ------------------------------------------------------------------ runs and calls
    def variable(self, name: str) -> str | None:
        """The text of variable ``name`` (stripped; None when unset or blank), for messages and parsing."""
        return self._text(name)

    def seconds(self, name: str, default: float) -> float | str:
        """The number in variable ``name``, ``default`` when unset, or its text when it is not a
        number (for the caller to refuse, naming the variable)."""
        text = self._text(name)
        if text is None:
            return default
        try:
            return float(text)
        except ValueError:
            return text

    @property
    def max_memory(self) -> str | None:
        """``MLWF_MAX_MEMORY``: the process's budget for the work inputs cause (:mod:`mlwf.budget`), unchecked."""
        return self._text("MLWF_MAX_MEMORY")

    @property
    def call_faults(self) -> str | None:
        """``MLWF_FAULTS``: stage faults to act out, for tests only (:mod:`mlwf.engine.faults`)."""
        return self._get("MLWF_FAULTS") or None

    @property
    def workflow_modules(self) -> tuple[str, ...]:
        """``MLWF_WORKFLOW_MODULES``: modules (comma-separated) each defining a ``WORKFLOW``."""
        return tuple(m.strip() for m in (self._get("MLWF_WORKFLOW_MODULES") or "").split(",") if m.strip())

    @property
    def function_secret(self) -> str | None:
        """``MLWF_FUNCTION_SECRET``: the key that signs calls to ``mlwf serve`` and their replies."""
        return self._text("MLWF_FUNCTION_SECRET")

    @property
    def ray_address(self) -> str | None:
        """``--ray-address``, else ``RAY_ADDRESS``, else None (a local Ray instance)."""
        return self.ray_address_flag or self._get("RAY_ADDRESS") or None

    @property
    def ray_token_missing(self) -> bool:
        """``RAY_AUTH_MODE=token`` but no token where Ray's client looks for one: ``RAY_AUTH_TOKEN``,
        else the file at ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (Ray's client then
        aborts the process after its connect timeouts)."""
        if (self._get("RAY_AUTH_MODE") or "").strip().lower() != "token" or self._text("RAY_AUTH_TOKEN"):
            return False
        home = self._get("HOME") or os.path.expanduser("~")
        path = self._get("RAY_AUTH_TOKEN_PATH") or os.path.join(home, ".ray", "auth_token")
        try:
            with open(path, "rb") as f:
                return not f.read(4096).strip()
        except OSError:
            return True

    @property
    def port(self) -> str | None:
        """``PORT`` (Knative sets it for ``mlwf serve``)."""
        return self._get("PORT")

    @property
    def k_sink(self) -> str | None:
        """``K_SINK``: where ``mlwf serve`` sends the events it emits (a Knative SinkBinding sets it)."""
        return self._get("K_SINK")

    def forwarded(self) -> dict[str, str]:
        """The variables a driver hands to the worker processes it starts (store, credentials, limits)."""
        return {k: v for k, v in self.environ.items() if k.startswith(FORWARDED_PREFIXES)}


# --------------------------------------------------------------------------- worker processes
def _refuse_blank(flag: str, value: str | None) -> None:
    if value is not None and not value.strip():
        from mlwf.errors import StoreError

        raise StoreError(f"{flag} {value!r} is empty: name the {flag[2:]} or leave the option out for the default")


def adopt_forwarded(forwarded: Mapping[str, str]) -> None:
    """In a worker process: make this process's ``MLWF_*``/``S3_*``/``AWS_*`` exactly ``forwarded``."""
    keep_forwarded(forwarded)
    os.environ.update(forwarded)


def keep_forwarded(names) -> None:
    """In a worker process: drop the ``MLWF_*``/``S3_*``/``AWS_*`` variables not in ``names``.

    A Ray worker inherits its node's environment plus the driver's variables
    (``runtime_env``); what the driver did not set must not apply either.
    """
    keep = set(names)
    for name in [k for k in os.environ if k.startswith(FORWARDED_PREFIXES) and k not in keep]:
        del os.environ[name]


def single_threaded_blas(*, force: bool = False) -> None:
    """One BLAS thread per process unless told otherwise (``mlwf serve``: the parallelism is the calls);
    with ``force``, whatever the environment said (local workers: one per core). Reaches the BLAS
    libraries loaded from now on; ``threadpool_limits`` those already loaded."""
    for name in BLAS_THREAD_VARIABLES:
        if force:
            os.environ[name] = "1"
        else:
            os.environ.setdefault(name, "1")


@contextlib.contextmanager
def fork_server_environment(driver_main: str, workflow: str | None) -> Iterator[None]:
    """While the local backend's fork server starts: one BLAS thread, the driver's main module named,
    and the workflow whose stage code it preloads (None: every known workflow)."""
    saved = {k: os.environ.get(k) for k in (*BLAS_THREAD_VARIABLES, DRIVER_MAIN_VARIABLE, PRELOAD_WORKFLOW_VARIABLE)}
    try:
        single_threaded_blas(force=True)
        os.environ[DRIVER_MAIN_VARIABLE] = driver_main
        os.environ[PRELOAD_WORKFLOW_VARIABLE] = workflow or ""
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def take_driver_main() -> str | None:
    """In the fork server: the driver's main module as :func:`fork_server_environment` named it (once)."""
    return os.environ.pop(DRIVER_MAIN_VARIABLE, None)


def take_preload_workflow() -> str | None:
    """In the fork server: the workflow :func:`fork_server_environment` named (once); None for every one."""
    return os.environ.pop(PRELOAD_WORKFLOW_VARIABLE, None) or None
