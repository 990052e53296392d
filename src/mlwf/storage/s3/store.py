"""The S3 store: a bucket on S3 or an S3-compatible service, through obstore (see :mod:`mlwf.storage.s3`)."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from mlwf.aio import BACKGROUND
from mlwf.errors import NotFoundError, StoreError
from mlwf.settings import Settings
from mlwf.storage.base import ObjectInfo, Store, check_key, check_prefix
from mlwf.storage.s3 import bucket as _bucket
from mlwf.storage.s3.config import (DEFAULT_REGION, MAX_PUT_BYTES, Credentials, S3Timeouts, check_bucket,
                                    clean_endpoint, concurrency_from, credentials_from, endpoint_from,
                                    parse_store_url)
from mlwf.storage.s3.errors import Failed, NoSuchBucketError, Overdue, bucket_missing, scrub_detail, store_error

T = TypeVar("T")
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1,000 keys
#: Reads are checked for progress each time this much has arrived (a quarter of a second at the floor rate).
_READ_CHUNK = 256 << 10

# obstore runs its requests on a tokio runtime that does not survive fork():
# in a child forked after the parent made S3 requests every obstore call hangs
# (https://github.com/developmentseed/obstore/pull/441, tokio-rs/tokio#4301).
# A fresh client does not help, so such a child gets a clear error instead.
_OBSTORE_PID = 0  # the process that started obstore's runtime (inherited by fork)


async def _bounded(fn: Callable[[Any], Awaitable[T]], items: Sequence[Any], limit: int) -> list[T]:
    """``[await fn(x) for x in items]`` with at most ``limit`` in flight; order kept.

    The first failure cancels the rest and is raised.
    """
    results: list[Any] = [None] * len(items)
    todo = iter(enumerate(items))

    async def worker() -> None:
        for i, item in todo:
            results[i] = await fn(item)

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(limit, len(items)))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return results


# -- the store -----------------------------------------------------------------
class S3Store(Store):
    """A bucket on S3 or an S3-compatible service, through obstore.

    The obstore client is created on first use and again whenever the process
    id changes, so an instance made (but not yet used) in a parent process
    works in workers it forks, and a pickled instance works in forkserver or
    spawn workers. A child forked *after* the parent made S3 requests gets a
    :class:`~mlwf.errors.StoreError` rather than a hang: obstore's runtime does
    not survive fork. Pickling carries no credentials: the unpickled store
    reads them from the environment of the process that unpickles it.
    """


    def __init__(
        self,
        bucket: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        credentials: Credentials | None = None,
        timeouts: S3Timeouts | None = None,
        concurrency: int | None = None,
        endpoint_source: str = "argument",
        settings: Settings | None = None,
    ):
        """Most callers use :meth:`from_url`; this takes everything explicitly.

        ``timeouts`` and ``concurrency`` default to what ``settings`` (by
        default this process's) say: ``MLWF_S3_TIMEOUT`` and
        ``MLWF_S3_CONCURRENCY``. Without credentials a custom endpoint is
        used anonymously.
        """
        if access_key or secret_key:
            if not (access_key and secret_key):
                raise StoreError("give both access_key and secret_key")
            credentials = Credentials(access_key, secret_key, session_token, "arguments")
        self.bucket = check_bucket(bucket)
        self.endpoint = clean_endpoint(endpoint, "S3 endpoint") if endpoint else None
        self.region = region or DEFAULT_REGION
        self.credentials = credentials
        if timeouts is None or concurrency is None:
            settings = settings or Settings.resolve()
        self.timeouts = timeouts or S3Timeouts.from_settings(settings)
        self.concurrency = concurrency or concurrency_from(settings)
        if self.concurrency < 1:
            raise StoreError(f"S3 concurrency must be at least 1, not {self.concurrency}")
        self.endpoint_source = endpoint_source
        if self.endpoint:
            scheme, _, hostport = self.endpoint.partition("://")
            self.location = f"s3://{hostport}" if scheme == "http" else f"s3+https://{hostport}"
        else:
            self.location = "s3://aws"
        self._client_lock = threading.Lock()
        self._obs: Any = None
        self._pid = 0

    # -- construction --------------------------------------------------------
    @classmethod
    def from_url(cls, url: str, bucket: str, settings: Settings | None = None) -> S3Store:
        """Open ``s3://`` (endpoint from the settings) or ``s3://HOST:PORT`` (plain HTTP).

        ``settings`` default to this process's (:meth:`mlwf.settings.Settings.resolve`).
        """
        settings = settings or Settings.resolve()
        endpoint, source = parse_store_url(url)
        if endpoint is None:
            endpoint, source = endpoint_from(settings)
        return cls(bucket, endpoint=endpoint, region=settings.s3.region, credentials=credentials_from(settings),
                   endpoint_source=source, settings=settings)

    def __reduce__(self):
        return (
            _unpickle,
            (self.bucket, self.endpoint, self.region, self.timeouts, self.concurrency, self.endpoint_source),
        )

    # -- obstore client ------------------------------------------------------
    def _client(self) -> Any:
        """The obstore client of this process (made on first use, and again after a fork or a pickle)."""
        global _OBSTORE_PID
        pid = os.getpid()
        obs = self._obs
        if obs is not None and self._pid == pid:
            return obs
        if _OBSTORE_PID and _OBSTORE_PID != pid:
            raise StoreError(
                f"cannot use S3 store {self.location} in a process forked from one that already used S3 "
                "(obstore's runtime does not survive fork): start workers with the 'forkserver' or "
                "'spawn' multiprocessing method, or fork before the first S3 request"
            )
        _OBSTORE_PID = pid
        if self._pid != pid:
            self._client_lock = threading.Lock()  # a lock copied by fork may be held
        with self._client_lock:
            if self._obs is None or self._pid != pid:
                self._obs = self._make_client()
                self._pid = pid
            return self._obs

    def _make_client(self) -> Any:
        from datetime import timedelta

        from obstore.store import S3Store as ObS3Store

        t = self.timeouts
        config: dict[str, Any] = {"region": self.region}
        if self.endpoint:
            config["endpoint"] = self.endpoint
            config["virtual_hosted_style_request"] = False  # path style, as MinIO needs
        else:
            config["virtual_hosted_style_request"] = "." not in self.bucket
        kwargs: dict[str, Any] = {}
        if self.credentials is not None:
            # A provider (not config keys) so no stray AWS_SESSION_TOKEN from the
            # environment is mixed with S3_USER/S3_PASSWORD.
            kwargs["credential_provider"] = self.credentials.provider()
        elif self.endpoint:
            config["skip_signature"] = True  # anonymous access to a custom endpoint
        client_options = {
            "allow_http": True,
            "connect_timeout": timedelta(seconds=t.connect),
            "read_timeout": timedelta(seconds=t.read),
            "timeout": timedelta(seconds=t.request),
            "user_agent": "mlwf",
        }
        retry_config = {
            "max_retries": 30,  # retry_timeout is the bound
            "retry_timeout": timedelta(seconds=t.retry),
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=t.max_backoff),
                "base": 2,
            },
        }
        try:
            return ObS3Store(
                self.bucket, config=config, client_options=client_options, retry_config=retry_config, **kwargs
            )
        except Exception as e:  # noqa: BLE001 - configuration errors
            raise StoreError(f"cannot configure S3 store {self.location}: {scrub_detail(e, self.credentials)}") from None

    def _do(self, op: str, key: str | None, coro: Coroutine[Any, Any, T]) -> T:
        """Run one operation on the background loop; every failure becomes a one-line StoreError."""
        try:
            return BACKGROUND.run(coro)
        except Failed as f:
            raise store_error(self, f.op, f.key, f.exc) from None
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - every obstore failure becomes ours
            raise store_error(self, op, key, e) from None

    async def _within(self, op: str, key: str | None, request: Callable[[], Awaitable[T]], nbytes: int = 0) -> T:
        """``await request()``, cancelled (and failed) once it takes longer than its bound."""
        bound = self.timeouts.bound(nbytes)
        try:
            async with asyncio.timeout(bound) as deadline:
                return await request()
        except TimeoutError:
            if deadline.expired():
                raise Failed(op, key, Overdue(bound)) from None
            raise Failed(op, key, TimeoutError("timed out")) from None
        except Failed:
            raise
        except Exception as e:  # noqa: BLE001
            raise Failed(op, key, e) from None
        finally:
            # A traceback keeps this frame: let go of the request (and the connection it holds) now.
            request = None  # noqa: F841

    # -- async operations (run on the loop thread) ------------------------------
    async def _aget(self, key: str, op: str = "get") -> tuple[bytes, str | None]:
        """The object's bytes and ETag; fails once the read is ``total`` seconds behind 1 MiB/s."""
        import obstore

        loop = asyncio.get_running_loop()
        start = loop.time()
        got, resp, stream = 0, None, None
        try:
            async with asyncio.timeout_at(start + self.timeouts.total) as deadline:
                resp = await obstore.get_async(self._client(), key)
                tag = resp.meta.get("e_tag")
                chunks = []
                stream = resp.stream(min_chunk_size=_READ_CHUNK)
                async for chunk in stream:
                    chunks.append(chunk)
                    got += len(chunk)
                    deadline.reschedule(start + self.timeouts.bound(got))
        except TimeoutError:
            if deadline.expired():
                raise Failed(op, key, Overdue(loop.time() - start)) from None
            raise Failed(op, key, TimeoutError("timed out")) from None
        except Exception as e:  # noqa: BLE001
            raise Failed(op, key, e) from None
        finally:
            resp = stream = None  # close a stalled response now, not when a traceback is collected
        return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), tag

    async def _aget_bytes(self, key: str) -> bytes:
        return (await self._aget(key))[0]

    async def _aput(self, item: tuple[str, bytes], mode: Any = None, op: str = "put") -> str | None:
        """Write one object; the ETag of the version written (None if the server gave none)."""
        import obstore

        key, data = item
        kwargs = {"mode": mode} if mode is not None else {}
        result = await self._within(op, key, lambda: obstore.put_async(self._client(), key, data,
                                                                       use_multipart=False, **kwargs), len(data))
        return result.get("e_tag") if isinstance(result, dict) else None

    async def _alist(self, prefix: str, segment: str | None, offset: str | None, limit: int | None) -> list[dict]:
        import obstore

        kwargs: dict[str, Any] = {"chunk_size": limit or 1000}
        if offset is not None:
            kwargs["offset"] = offset
        stream = obstore.list(self._client(), segment, **kwargs)
        found: list[dict] = []
        try:
            while True:  # one page (one request) at a time, each within the bound
                try:
                    page = await self._within("list", prefix, stream.__anext__)
                except Failed as f:
                    if isinstance(f.exc, StopAsyncIteration):
                        return found
                    raise
                found.extend(page)
                if limit is not None:
                    return found
        finally:
            # Drop the stream now, not when a traceback that holds this frame is collected:
            # dropping it closes a connection still waiting for a page.
            del stream

    # -- Store ---------------------------------------------------------------
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)
        # obstore prefixes are whole path segments ('a/b' lists 'a/b/...'), S3
        # prefixes are strings: list the deepest folder the prefix names and
        # filter. Keys starting with the prefix sort after prefix[:-1], so the
        # server skips the siblings before it (start-after).
        head, sep, _ = prefix.rpartition("/")
        segment = head if sep else None
        offset = prefix[:-1] if len(prefix) > 1 and not prefix[:-1].endswith("/") else None
        metas = self._do("list", prefix, self._alist(prefix, segment, offset, None))
        found = [ObjectInfo(m["path"], int(m["size"]), m.get("e_tag")) for m in metas if m["path"].startswith(prefix)]
        found.sort(key=lambda o: o.key)
        return found

    def get(self, key: str) -> bytes:
        self._check_object_key(key)
        return self._do("get", key, self._aget_bytes(key))

    def get_many(self, keys: Sequence[str]) -> list[bytes]:
        keys = list(keys)
        for key in keys:
            self._check_object_key(key)
        if not keys:
            return []
        return self._do("get", keys[0], _bounded(self._aget_bytes, keys, self.concurrency))

    def put(self, key: str, data: bytes) -> None:
        self._check_object_key(key)
        data = self._check_data(key, data)
        self._do("put", key, self._aput((key, data)))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self._check_object_key(key)
        data = self._check_data(key, data)
        if self._do("create", key, self._aput_if(key, data, "create")):  # If-None-Match: *
            return True
        return self._holds(key, data)

    async def _aput_if(self, key: str, data: bytes, mode: Any) -> str | bool:
        """A conditional put: False when the condition failed (the object exists, or its ETag changed),
        else the new version's ETag (True if the server gave none)."""
        from obstore import exceptions as oe

        refused: tuple[type[BaseException], ...] = (oe.AlreadyExistsError, oe.PreconditionError)
        if mode != "create":
            refused += (oe.NotFoundError, FileNotFoundError)
        try:
            tag = await self._aput((key, data), mode=mode, op="create" if mode == "create" else "replace")
            return tag or True
        except Failed as f:
            if isinstance(f.exc, refused):
                return False
            raise

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        self._check_object_key(key)
        data, tag = self._do("get", key, self._aget(key))
        if not tag:
            raise StoreError(f"the S3 server at {self.location} gave no ETag for {key!r}: it cannot do "
                             "conditional writes, which mlwf needs to update shared objects safely")
        return data, tag

    def put_if_tag(self, key: str, data: bytes, tag: str) -> bool:
        self._check_object_key(key)
        data = self._check_data(key, data)
        return bool(self._do("replace", key, self._aput_if(key, data, {"e_tag": tag})))  # If-Match

    def put_if_absent_tagged(self, key: str, data: bytes) -> str | None:
        self._check_object_key(key)
        data = self._check_data(key, data)
        written = self._do("create", key, self._aput_if(key, data, "create"))
        if isinstance(written, str):
            return written  # one request: the ETag comes with the answer
        return self._own_version(key, data)  # refused, or a retry that found its own write

    def put_if_tag_tagged(self, key: str, data: bytes, tag: str) -> str | None:
        self._check_object_key(key)
        data = self._check_data(key, data)
        written = self._do("replace", key, self._aput_if(key, data, {"e_tag": tag}))
        if isinstance(written, str):
            return written
        return self._own_version(key, data)

    def _holds(self, key: str, data: bytes) -> bool:
        try:
            return self.get(key) == data
        except NotFoundError:
            return False

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        # Consume the iterable in chunks so a generator of large objects is
        # never held in memory all at once.
        it = iter(items)
        chunk_len = max(8 * self.concurrency, 256)
        while True:
            chunk = [(self._check_object_key(k), self._check_data(k, d)) for k, d in itertools.islice(it, chunk_len)]
            if not chunk:
                return
            self._do("put", chunk[0][0], _bounded(self._aput, chunk, self.concurrency))

    def delete(self, key: str) -> None:
        self._check_object_key(key)
        self._delete_keys([key])

    def delete_many(self, keys: Iterable[str]) -> int:
        it = iter(keys)
        n = 0
        while True:
            batch = [self._check_object_key(k) for k in itertools.islice(it, _DELETE_BATCH)]
            if not batch:
                return n
            self._delete_keys(batch)
            n += len(batch)

    def _delete_keys(self, keys: list[str]) -> None:
        import obstore

        what = keys[0] if len(keys) == 1 else f"{keys[0]} (and {len(keys) - 1} more)"
        try:
            # One DeleteObjects request for up to 1,000 keys; missing keys are not errors on S3.
            self._do("delete", what, self._within(
                "delete", what, lambda: obstore.delete_async(self._client(), keys if len(keys) > 1 else keys[0])))
        except NoSuchBucketError:
            raise
        except NotFoundError:
            return  # a missing key in an existing bucket: deleting it is fine

    def exists(self, key: str) -> bool:
        self._check_object_key(key)
        import obstore

        try:
            self._do("check for", key, self._within("check for", key, lambda: obstore.head_async(self._client(), key)))
            return True
        except NotFoundError:  # no such object (or no such bucket)
            return False

    def bucket_exists(self) -> bool:
        try:
            self._do("check the bucket", None, self._alist_probe())
            return True
        except NoSuchBucketError:
            return False

    async def _alist_probe(self) -> None:
        try:
            await self._alist("", None, None, 1)
        except Failed as f:
            raise Failed("check the bucket", None, f.exc) from None

    def require_bucket(self) -> None:
        if not self.bucket_exists():
            raise bucket_missing(self)

    def create_bucket(self) -> None:
        """Create the bucket (see :mod:`mlwf.storage.s3.bucket`); one owned by these credentials is fine."""
        _bucket.create_bucket(self)

    def close(self) -> None:
        """Drop the client and its connections; a later call would open new ones."""
        self._obs = None

    # -- helpers -------------------------------------------------------------
    def _check_object_key(self, key: str) -> str:
        check_key(key)
        if key.endswith("/"):
            raise StoreError(f"refused key {key!r}: an object key cannot end with '/'")
        return key

    @staticmethod
    def _check_data(key: str, data: Any) -> Any:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StoreError(f"cannot put {key!r}: data must be bytes, not {type(data).__name__}")
        if len(data) > MAX_PUT_BYTES:
            raise StoreError(f"cannot put {key!r}: {len(data)} bytes is over S3's 5 GiB single-PUT limit")
        return data



def _unpickle(bucket, endpoint, region, timeouts, concurrency, endpoint_source) -> S3Store:
    # Credentials never travel: the process that unpickles reads its own.
    return S3Store(bucket, endpoint=endpoint, region=region, credentials=credentials_from(Settings.resolve()),
                   timeouts=timeouts, concurrency=concurrency, endpoint_source=endpoint_source)
