"""Object stores: a local directory (the embedded default) and S3.

:func:`open_store` turns the ``--store`` value into a :class:`Store`:

* a directory path or ``file://`` URL: :class:`~mlwf.storage.local.LocalStore`;
* ``s3://`` (optionally ``s3://host:port``): :class:`~mlwf.storage.s3.S3Store`,
  endpoint and credentials from the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mlwf.errors import StoreError
from mlwf.storage.base import ObjectInfo, Store, check_key, check_prefix, join_key

__all__ = [
    "DEFAULT_BUCKET",
    "ObjectInfo",
    "Store",
    "StoreSpec",
    "check_key",
    "check_prefix",
    "default_store_url",
    "join_key",
    "open_store",
]

DEFAULT_BUCKET = "tless"


def default_store_url() -> str:
    """The store used when neither ``--store`` nor ``MLWF_STORE`` is given."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(data_home) / "mlwf" / "store")


@dataclass(frozen=True)
class StoreSpec:
    """Where a store is: enough to open it again in another process.

    It holds no credentials: S3 credentials are read from the environment of
    the process that opens the store, so they never travel with a task.
    """

    url: str
    bucket: str

    @classmethod
    def resolve(cls, url: str | None = None, bucket: str | None = None) -> StoreSpec:
        """Fill in defaults from ``MLWF_STORE``/``MLWF_BUCKET`` (and ``S3_BUCKET`` for S3).

        ``None`` means "not given"; an empty or blank value given explicitly is
        refused rather than read as the default, so ``--bucket ""`` can never
        make a command act on the default bucket.
        """
        for flag, value in (("--store", url), ("--bucket", bucket)):
            if value is not None and not value.strip():
                raise StoreError(f"{flag} {value!r} is empty: name the {flag[2:]} or leave the option out "
                                 "for the default")
        url = url or os.environ.get("MLWF_STORE") or default_store_url()
        if bucket is None:
            bucket = os.environ.get("MLWF_BUCKET")
            if bucket is None and url.startswith("s3://"):
                bucket = os.environ.get("S3_BUCKET")
        return cls(url=url, bucket=bucket or DEFAULT_BUCKET)

    @property
    def is_local(self) -> bool:
        return not self.url.startswith("s3://")

    def canonical(self) -> StoreSpec:
        """The same store named one way, so two specs can be compared as strings.

        A directory becomes its absolute path with symbolic links resolved (no
        ``file://``); ``s3://`` and ``s3://HOST:PORT`` lose any trailing slash.
        ``s3://`` means "the endpoint in this process's environment", so two
        processes that both say ``s3://`` name the same store only if their
        environments point at the same S3 service.
        """
        if not self.is_local:
            return StoreSpec("s3://" + self.url[len("s3://"):].rstrip("/"), self.bucket)
        path = self.url[len("file://"):] if self.url.startswith("file://") else self.url
        return StoreSpec(os.path.realpath(os.path.expanduser(path)), self.bucket)

    def open(self) -> Store:
        from mlwf.storage.faulty import wrap_if_asked  # test-only fault injection, off by default

        return wrap_if_asked(open_store(self.url, self.bucket))


def open_store(url: str, bucket: str) -> Store:
    """Open the store at ``url`` bound to ``bucket``.

    Raises :class:`~mlwf.errors.StoreError` for an unknown scheme or a local
    store root that does not exist or is not a folder.
    """
    if url.startswith("s3://"):
        from mlwf.storage.s3 import S3Store

        return S3Store.from_url(url, bucket)
    if "://" in url and not url.startswith("file://"):
        scheme = url.split("://", 1)[0]
        raise StoreError(f"unknown store scheme {scheme!r} in {url!r}: use a directory, file://DIR or s3://")
    from mlwf.storage.local import LocalStore

    path = url[len("file://") :] if url.startswith("file://") else url
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise StoreError(f"store {url!r} is not a directory: give a folder for --store")
    return LocalStore(root, bucket)
