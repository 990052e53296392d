"""Object stores: a local directory (the embedded default) and S3.

:func:`open_store` turns the ``--store`` value into a :class:`Store`:

* a directory path or ``file://`` URL: :class:`~mlwf.storage.local.LocalStore`;
* ``s3://`` (optionally ``s3://host:port``): :class:`~mlwf.storage.s3.S3Store`,
  endpoint and credentials from the settings (:mod:`mlwf.settings`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mlwf.errors import StoreError
from mlwf.settings import DEFAULT_BUCKET, Settings
from mlwf.storage.base import ObjectInfo, Store, check_key, check_prefix, join_key

__all__ = [
    "DEFAULT_BUCKET",
    "ObjectInfo",
    "Store",
    "StoreSpec",
    "check_key",
    "check_prefix",
    "join_key",
    "open_store",
]


@dataclass(frozen=True)
class StoreSpec:
    """Where a store is: enough to open it again in another process.

    It holds no credentials: S3 credentials are read from the settings of
    the process that opens the store, so they never travel with a task. The
    settings resolve a spec's URL and bucket from ``--store``/``--bucket`` and
    the environment (:meth:`from_settings`).
    """

    url: str
    bucket: str

    @classmethod
    def from_settings(cls, settings: Settings) -> StoreSpec:
        """The store ``settings`` name (:attr:`~mlwf.settings.Settings.store_url`,
        :attr:`~mlwf.settings.Settings.bucket`).

        Raises :class:`~mlwf.errors.StoreError` for ``--store`` or ``--bucket`` given empty.
        """
        return cls(url=settings.store_url, bucket=settings.bucket)

    @property
    def is_local(self) -> bool:
        """A directory on this machine (or a file system mounted at the same path elsewhere)."""
        return not self.is_s3

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")

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

    def open(self, settings: Settings | None = None) -> Store:
        """Open the store, with the S3 endpoint, credentials and limits ``settings`` name (by default
        this process's); wrapped to inject faults when the settings ask (tests only)."""
        from mlwf.storage.faulty import wrap_if_asked

        settings = settings or Settings.resolve()
        return wrap_if_asked(open_store(self.url, self.bucket, settings), settings)


def open_store(url: str, bucket: str, settings: Settings | None = None) -> Store:
    """Open the store at ``url`` bound to ``bucket`` (S3: as ``settings`` say, by default this process's).

    Raises :class:`~mlwf.errors.StoreError` for an unknown scheme or a local
    store root that does not exist or is not a folder.
    """
    if url.startswith("s3://"):
        from mlwf.storage.s3 import S3Store

        return S3Store.from_url(url, bucket, settings)
    if "://" in url and not url.startswith("file://"):
        scheme = url.split("://", 1)[0]
        raise StoreError(f"unknown store scheme {scheme!r} in {url!r}: use a directory, file://DIR or s3://")
    from mlwf.storage.local import LocalStore

    path = url[len("file://") :] if url.startswith("file://") else url
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise StoreError(f"store {url!r} is not a directory: give a folder for --store")
    return LocalStore(root, bucket)
