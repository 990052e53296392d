"""S3 and S3-compatible services (MinIO, Ceph, moto, AWS) through obstore.

* :mod:`.config`: where the store is, as whom, within what bounds (from
  :class:`~mlwf.settings.Settings`, every value checked);
* :mod:`.store`: :class:`S3Store`, every operation of
  :class:`~mlwf.storage.base.Store` as obstore requests on the process's
  background event loop (:mod:`mlwf.aio`);
* :mod:`.errors`: obstore's failures as one-line errors without credentials;
* :mod:`.bucket`: bucket creation, the one request obstore has no API for.

With no credentials at all, a custom endpoint is used anonymously and AWS
falls back to obstore's own chain (web identity, container and instance
credentials). Credentials never appear in :attr:`S3Store.location`, a ``repr``, a
pickle or an error message.

Bounds (``MLWF_S3_TIMEOUT``, default 15 s, written *T*; see
:class:`S3Timeouts`). Every request mlwf makes, retries included, ends within
*T* plus one second per MiB it moves (``T + n / MIN_TRANSFER_RATE``), however
the server behaves: refusing, never answering, answering 503, or sending its
headers and then one byte a second. Reads are checked as the bytes arrive (a
read falling *T* seconds behind 1 MiB/s fails at once, whatever size the
server declared); writes know their size up front. Per operation:

* ``get``, ``get_tagged``, ``put``, ``put_if_tag`` of *n* bytes: ``T + n/MiB``;
* ``put_if_absent``: twice that (a refused create reads the object back);
* ``exists``, ``bucket_exists``: *T*; ``list``: *T* per page of 1,000 keys;
  ``delete``/``delete_many``: *T* per 1,000 keys;
* ``get_many``/``put_many``: each object as ``get``/``put``, at most
  ``MLWF_S3_CONCURRENCY`` (default 64) at once; the first failure cancels the
  rest, so a stalled object fails the whole call within its own bound;
* ``create_bucket``: *T*.

Within the bound, throttling (503 SlowDown), other 5xx answers and dropped
connections are retried with exponential backoff and jitter; an endpoint that
cannot be reached fails within *T*.
"""

from mlwf.storage.s3.config import (DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT, MAX_PUT_BYTES, MIN_TRANSFER_RATE,
                                    S3Timeouts)
from mlwf.storage.s3.errors import NoSuchBucketError
from mlwf.storage.s3.store import S3Store

__all__ = ["DEFAULT_CONCURRENCY", "DEFAULT_TIMEOUT", "MAX_PUT_BYTES", "MIN_TRANSFER_RATE", "NoSuchBucketError",
           "S3Store", "S3Timeouts"]
