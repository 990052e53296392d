"""S3 and S3-compatible services (MinIO, Ceph, moto, AWS) through obstore.

Where the store is comes from the ``--store`` URL and the environment:

* ``s3://`` takes the endpoint from ``S3_HOST``/``S3_PORT`` (plain HTTP, as a
  MinIO seed provides; ``S3_HOST`` may also be a full ``http(s)://`` URL), else
  ``AWS_ENDPOINT_URL``, else AWS S3 itself;
* ``s3://HOST:PORT`` names the endpoint (plain HTTP) and overrides the above.

Credentials: ``S3_USER``/``S3_PASSWORD``, else ``AWS_ACCESS_KEY_ID``/
``AWS_SECRET_ACCESS_KEY`` (with ``AWS_SESSION_TOKEN``); region ``AWS_REGION``
(or ``AWS_DEFAULT_REGION``), default ``us-east-1``. With no credentials at all a
custom endpoint is used anonymously and AWS falls back to obstore's own chain
(web identity, container and instance credentials).

Credentials never appear in :attr:`S3Store.url`, a ``repr``, a pickle or an
error message: every obstore failure becomes a :class:`~mlwf.errors.StoreError`
with our own one-line message, scrubbed of the keys in case the server echoed
them.

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
cannot be reached fails within *T*. Every request runs on the process's
background event loop (:mod:`mlwf.aio`).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import hmac
import http.client
import itertools
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from mlwf.aio import BACKGROUND
from mlwf.errors import NotFoundError, StoreError
from mlwf.storage.base import ObjectInfo, Store, check_key, check_prefix

__all__ = ["NoSuchBucketError", "S3Store", "S3Timeouts", "DEFAULT_CONCURRENCY", "DEFAULT_TIMEOUT", "MAX_PUT_BYTES"]

ENV_TIMEOUT = "MLWF_S3_TIMEOUT"
ENV_CONCURRENCY = "MLWF_S3_CONCURRENCY"
DEFAULT_TIMEOUT = 15.0  # seconds, see S3Timeouts
DEFAULT_CONCURRENCY = 64
DEFAULT_REGION = "us-east-1"
MAX_PUT_BYTES = 5 * 1024**3  # S3's limit for one PUT
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1,000 keys
_CREDENTIAL_HINT = "check S3_USER/S3_PASSWORD or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
_ENDPOINT_HINT = "check S3_HOST/S3_PORT, AWS_ENDPOINT_URL or the s3://HOST:PORT store URL, and that the server is up"

# AWS's rules for general purpose buckets (Bucket naming rules, Amazon S3 User Guide); MinIO follows them.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]*[a-z0-9]$")
_IP_LIKE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")

T = TypeVar("T")


def _endpoint_hint(source: str) -> str:
    return f"endpoint from {source}; {_ENDPOINT_HINT}"


# -- settings -----------------------------------------------------------------
#: The slowest transfer that counts as progress: a request may take MLWF_S3_TIMEOUT plus one second per MiB.
MIN_TRANSFER_RATE = 1 << 20  # bytes per second
#: Reads are checked for progress each time this much has arrived (a quarter of a second at the floor rate).
_READ_CHUNK = 256 << 10
_MAX_TIMEOUT = 86_400.0


@dataclass(frozen=True)
class S3Timeouts:
    """Time bounds derived from one total ``T`` (``MLWF_S3_TIMEOUT``), in seconds.

    :meth:`bound` is the hard limit of one operation (see the module
    docstring). Inside it, obstore retries failed attempts for ``retry``
    seconds; the last attempt can start after a backoff of at most
    ``max_backoff`` and wait ``connect`` seconds, so an unreachable endpoint
    fails within ``retry + max_backoff + connect == total`` with obstore's own
    error. ``read`` is the longest silence inside one response before obstore
    retries; ``request`` caps one attempt inside obstore (a backstop, never
    shorter than :meth:`bound` of the largest single PUT).
    """

    total: float
    connect: float
    max_backoff: float
    retry: float
    read: float
    request: float

    @classmethod
    def from_total(cls, total: float) -> S3Timeouts:
        if not (isinstance(total, (int, float)) and 0 < total <= _MAX_TIMEOUT):
            raise StoreError(f"{ENV_TIMEOUT} must be a positive number of seconds (at most {_MAX_TIMEOUT:g}), "
                             f"not {total!r}")
        connect = min(max(total / 5, 0.2), 5.0)
        max_backoff = min(max(total / 5, 0.1), 5.0)
        retry = max(total - connect - max_backoff, 0.1)
        # A healthy server never goes silent this long in the middle of a response.
        read = max(total * 2 / 3, 1.0)
        request = total + MAX_PUT_BYTES / MIN_TRANSFER_RATE
        return cls(total, connect, max_backoff, retry, read, request)

    @classmethod
    def from_env(cls) -> S3Timeouts:
        raw = os.environ.get(ENV_TIMEOUT, "").strip()
        if not raw:
            return cls.from_total(DEFAULT_TIMEOUT)
        try:
            total = float(raw)
        except ValueError:
            raise StoreError(f"{ENV_TIMEOUT}={raw!r} is not a number: give seconds, e.g. 15") from None
        return cls.from_total(total)

    def bound(self, nbytes: int = 0) -> float:
        """Seconds one request moving ``nbytes`` may take, retries included: ``total + nbytes / 1 MiB/s``."""
        return self.total + nbytes / MIN_TRANSFER_RATE


class _Overdue(Exception):
    """A request that did not finish within its bound (turned into a StoreError like every failure)."""

    def __init__(self, bound: float):
        super().__init__(f"no complete answer within {bound:.3g} s")
        self.bound = bound


def _concurrency_from_env() -> int:
    raw = os.environ.get(ENV_CONCURRENCY, "").strip()
    if not raw:
        return DEFAULT_CONCURRENCY
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise StoreError(f"{ENV_CONCURRENCY}={raw!r} is not a positive integer: give e.g. 64")
    return n


class _Credentials:
    """Access key, secret and token; prints as where they came from, never as values."""

    __slots__ = ("access_key", "secret_key", "token", "source")

    def __init__(self, access_key: str, secret_key: str, token: str | None, source: str):
        self.access_key = access_key
        self.secret_key = secret_key
        self.token = token or None
        self.source = source

    def __repr__(self) -> str:
        return f"<credentials from {self.source}>"

    __str__ = __repr__

    def __reduce__(self):  # never pickle secrets
        raise TypeError("S3 credentials cannot be pickled; they are read from the environment")

    def secrets(self) -> list[str]:
        return [s for s in (self.access_key, self.secret_key, self.token) if s]

    def provider(self) -> Callable[[], dict[str, Any]]:
        value = {
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "token": self.token,
            "expires_at": None,
        }

        def credentials() -> dict[str, Any]:
            return value

        return credentials


def _env_credentials() -> _Credentials | None:
    env = os.environ
    if env.get("S3_USER") or env.get("S3_PASSWORD"):
        if not (env.get("S3_USER") and env.get("S3_PASSWORD")):
            raise StoreError(
                "set both S3_USER and S3_PASSWORD (or neither, to use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
            )
        return _Credentials(env["S3_USER"], env["S3_PASSWORD"], None, "S3_USER/S3_PASSWORD")
    if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_SECRET_ACCESS_KEY"):
        if not (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")):
            raise StoreError("set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        token = env.get("AWS_SESSION_TOKEN") or env.get("AWS_TOKEN")
        return _Credentials(
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], token, "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    return None


def _clean_endpoint(endpoint: str, what: str) -> str:
    """``scheme://host[:port]`` with no user info, path, query or trailing slash."""
    parts = urllib.parse.urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StoreError(f"{what} {_strip_userinfo(endpoint)!r} is not an http(s)://HOST[:PORT] URL")
    try:
        port = parts.port
    except ValueError:
        raise StoreError(f"{what} {_strip_userinfo(endpoint)!r} has an invalid port") from None
    host = parts.hostname
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    if parts.path not in ("", "/"):
        raise StoreError(f"{what} {_strip_userinfo(endpoint)!r} has a path: give only http(s)://HOST[:PORT]")
    return f"{parts.scheme}://{netloc}"


def _strip_userinfo(url: str) -> str:
    return re.sub(r"(://)[^/@]*@", r"\1", url)


def _env_endpoint() -> tuple[str | None, str]:
    """The endpoint from the environment and the variable it came from."""
    env = os.environ
    host = env.get("S3_HOST", "").strip()
    if host:
        if "://" in host:
            return _clean_endpoint(host, "S3_HOST"), "S3_HOST"
        port = env.get("S3_PORT", "").strip() or "9000"
        if not port.isdigit():
            raise StoreError(f"S3_PORT={port!r} is not a port number")
        return _clean_endpoint(f"http://{host}:{port}", "S3_HOST/S3_PORT"), "S3_HOST/S3_PORT"
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"):
        value = env.get(name, "").strip()
        if value:
            return _clean_endpoint(value, name), name
    return None, "AWS"


def _check_bucket(bucket: str) -> str:
    """Refuse a name S3 would refuse (AWS's general purpose bucket naming rules), before any request."""
    problem = None
    if not isinstance(bucket, str) or not 3 <= len(bucket) <= 63:
        problem = "it must be 3 to 63 characters long"
    elif not _BUCKET_RE.match(bucket):
        problem = ("it may hold only lowercase letters, digits, '.' and '-', and must begin and end with a "
                   "letter or digit")
    elif ".." in bucket:
        problem = "it has two adjacent periods"
    elif _IP_LIKE.match(bucket):
        problem = "it is formatted as an IP address"
    elif bucket.startswith(_RESERVED_BUCKET_PREFIXES):
        problem = f"names starting with {', '.join(_RESERVED_BUCKET_PREFIXES)} are reserved"
    elif bucket.endswith(_RESERVED_BUCKET_SUFFIXES):
        problem = f"names ending with {', '.join(_RESERVED_BUCKET_SUFFIXES)} are reserved"
    if problem:
        raise StoreError(f"refused S3 bucket name {bucket!r}: {problem}; choose another --bucket, e.g. 'tless'")
    return bucket


_LOOP = BACKGROUND  # shared with every other async client of this process

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


class NoSuchBucketError(NotFoundError):
    """The bucket itself does not exist."""


class _Failed(Exception):
    """An obstore failure with what we were doing, turned into a StoreError by the caller."""

    def __init__(self, op: str, key: str | None, exc: BaseException):
        super().__init__(op)
        self.op, self.key, self.exc = op, key, exc


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
        credentials: _Credentials | None = None,
        timeouts: S3Timeouts | None = None,
        concurrency: int | None = None,
        endpoint_source: str = "argument",
    ):
        """Most callers use :meth:`from_url`; this takes everything explicitly.

        ``timeouts`` and ``concurrency`` default to ``MLWF_S3_TIMEOUT`` and
        ``MLWF_S3_CONCURRENCY``. Without credentials a custom endpoint is used
        anonymously.
        """
        if access_key or secret_key:
            if not (access_key and secret_key):
                raise StoreError("give both access_key and secret_key")
            credentials = _Credentials(access_key, secret_key, session_token, "arguments")
        self.bucket = _check_bucket(bucket)
        self.endpoint = _clean_endpoint(endpoint, "S3 endpoint") if endpoint else None
        self.region = region or DEFAULT_REGION
        self._credentials = credentials
        self.timeouts = timeouts or S3Timeouts.from_env()
        self.concurrency = concurrency or _concurrency_from_env()
        if self.concurrency < 1:
            raise StoreError(f"S3 concurrency must be at least 1, not {self.concurrency}")
        self.endpoint_source = endpoint_source
        if self.endpoint:
            scheme, _, hostport = self.endpoint.partition("://")
            self.url = f"s3://{hostport}" if scheme == "http" else f"s3+https://{hostport}"
        else:
            self.url = "s3://aws"
        self._client_lock = threading.Lock()
        self._obs: Any = None
        self._pid = 0

    # -- construction --------------------------------------------------------
    @classmethod
    def from_url(cls, url: str, bucket: str) -> S3Store:
        """Open ``s3://`` (endpoint from the environment) or ``s3://HOST:PORT`` (plain HTTP)."""
        if not url.startswith("s3://"):
            raise StoreError(f"not an S3 store URL: {_strip_userinfo(url)!r}; use s3:// or s3://HOST:PORT")
        rest = url[len("s3://") :].rstrip("/")
        if "@" in rest:
            raise StoreError(f"do not put credentials in the store URL: set {_CREDENTIAL_HINT.removeprefix('check ')}")
        if rest:
            if "/" in rest or not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):\d{1,5}", rest):
                raise StoreError(
                    f"S3 store URL {url!r} is not s3:// or s3://HOST:PORT: the bucket goes in --bucket, "
                    "the endpoint in s3://HOST:PORT or S3_HOST/S3_PORT"
                )
            endpoint, source = f"http://{rest}", "store URL"
        else:
            endpoint, source = _env_endpoint()
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
        return cls(
            bucket,
            endpoint=endpoint,
            region=region,
            credentials=_env_credentials(),
            endpoint_source=source,
        )

    def __reduce__(self):
        return (
            _unpickle,
            (self.bucket, self.endpoint, self.region, self.timeouts, self.concurrency, self.endpoint_source),
        )

    # -- obstore client ------------------------------------------------------
    def _client(self) -> Any:
        global _OBSTORE_PID
        pid = os.getpid()
        obs = self._obs
        if obs is not None and self._pid == pid:
            return obs
        if _OBSTORE_PID and _OBSTORE_PID != pid:
            raise StoreError(
                f"cannot use S3 store {self.url} in a process forked from one that already used S3 "
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
        if self._credentials is not None:
            # A provider (not config keys) so no stray AWS_SESSION_TOKEN from the
            # environment is mixed with S3_USER/S3_PASSWORD.
            kwargs["credential_provider"] = self._credentials.provider()
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
            raise StoreError(f"cannot configure S3 store {self.url}: {self._scrub_detail(e)}") from None

    # -- errors --------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        if self._credentials is not None:
            for secret in self._credentials.secrets():
                text = text.replace(secret, "***")
        text = re.sub(r"(Credential=)[^,\s\"']+", r"\1***", text)
        text = re.sub(r"(?i)(signature=)[0-9a-f]+", r"\1***", text)
        text = re.sub(r"(?i)(x-amz-security-token[=:]\s*)[^\s&\"']+", r"\1***", text)
        return _strip_userinfo(text)

    def _scrub_detail(self, exc: BaseException) -> str:
        """One short, credential-free line about ``exc``."""
        text = str(exc).split("\n\nDebug source:", 1)[0]
        code = re.search(r"<Code>([^<]{1,64})</Code>", text)
        text = re.sub(r"<\?xml.*", "", text, flags=re.S).strip().rstrip(":")
        text = " ".join(text.split())
        if code:
            text += f" ({code.group(1)})"
        text = self._scrub(text)
        return text[:300] + ("..." if len(text) > 300 else "")

    def _bucket_missing(self) -> NoSuchBucketError:
        return NoSuchBucketError(
            f"bucket {self.bucket!r} does not exist at {self.url}: create it with --create-bucket, "
            "or check --bucket (and the endpoint)"
        )

    def _error(self, op: str, key: str | None, exc: BaseException) -> StoreError:
        """Turn an obstore exception into our error; never carries its raw text."""
        from obstore import exceptions as oe

        if isinstance(exc, StoreError):
            return exc
        text = str(exc)
        if op == "list":
            what = f"list prefix {key!r}" if key else "list objects"
        else:
            what = f"{op} {key!r}" if key is not None else op
        where = f"(bucket {self.bucket!r} at {self.url})"
        if isinstance(exc, _Overdue):
            return StoreError(
                f"cannot reach (or get a complete answer from) the S3 endpoint {self.url} to {what}: "
                f"{exc} ({ENV_TIMEOUT}={self.timeouts.total:g} s, plus 1 s per MiB moved): "
                f"{_endpoint_hint(self.endpoint_source)}, or raise {ENV_TIMEOUT}"
            )
        if "NoSuchBucket" in text:
            return self._bucket_missing()
        not_found = isinstance(exc, FileNotFoundError) or isinstance(exc, getattr(oe, "NotFoundError", ())) or (
            "404 Not Found" in text
        )
        if not_found:
            if op in ("list", "check the bucket") or "NoSuchKey" not in text and not self.bucket_exists():
                return self._bucket_missing()
            return NotFoundError(f"no object {key!r} in bucket {self.bucket!r} at {self.url}")
        if (
            isinstance(exc, (oe.PermissionDeniedError, oe.UnauthenticatedError))
            or re.search(r"\b40[13] (Forbidden|Unauthorized)", text)
            or any(c in text for c in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"))
        ):
            who = self._credentials.source if self._credentials else "no credentials (anonymous)"
            return StoreError(
                f"access denied: {what} {where} using {who}: {_CREDENTIAL_HINT}, "
                "and that this user may use the bucket"
            )
        if isinstance(exc, oe.InvalidPathError):
            return StoreError(
                f"cannot {what} {where}: the bucket holds a key obstore cannot represent "
                f"({self._scrub_detail(exc)}); rename or delete it with another S3 client"
            )
        status = re.search(r"non-2xx status code: (5\d\d)", text)
        if status:
            return StoreError(
                f"S3 server at {self.url} kept answering HTTP {status.group(1)} to {what} after retrying for "
                f"{self.timeouts.retry:.1f} s: it is overloaded or failing; try again later "
                f"or raise {ENV_TIMEOUT}"
            )
        lowered = text.lower()
        if any(
            s in lowered
            for s in ("error sending request", "connect", "dns error", "timed out", "timeout", "broken pipe")
        ):
            return StoreError(
                f"cannot reach (or get a complete answer from) the S3 endpoint {self.url} to {what} "
                f"(gave up after retrying for up to {self.timeouts.total:g} s, {ENV_TIMEOUT}): "
                f"{_endpoint_hint(self.endpoint_source)}"
            )
        return StoreError(f"S3 {what} {where} failed: {self._scrub_detail(exc)}")

    def _do(self, op: str, key: str | None, coro: Coroutine[Any, Any, T]) -> T:
        """Run one operation on the background loop; every failure becomes a one-line StoreError."""
        try:
            return _LOOP.run(coro)
        except _Failed as f:
            raise self._error(f.op, f.key, f.exc) from None
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - every obstore failure becomes ours
            raise self._error(op, key, e) from None

    async def _within(self, op: str, key: str | None, request: Callable[[], Awaitable[T]], nbytes: int = 0) -> T:
        """``await request()``, cancelled (and failed) once it takes longer than its bound."""
        bound = self.timeouts.bound(nbytes)
        try:
            async with asyncio.timeout(bound) as deadline:
                return await request()
        except TimeoutError:
            if deadline.expired():
                raise _Failed(op, key, _Overdue(bound)) from None
            raise _Failed(op, key, TimeoutError("timed out")) from None
        except _Failed:
            raise
        except Exception as e:  # noqa: BLE001
            raise _Failed(op, key, e) from None
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
                raise _Failed(op, key, _Overdue(loop.time() - start)) from None
            raise _Failed(op, key, TimeoutError("timed out")) from None
        except Exception as e:  # noqa: BLE001
            raise _Failed(op, key, e) from None
        finally:
            resp = stream = None  # close a stalled response now, not when a traceback is collected
        return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), tag

    async def _aget_bytes(self, key: str) -> bytes:
        return (await self._aget(key))[0]

    async def _aput(self, item: tuple[str, bytes], mode: Any = None, op: str = "put") -> None:
        import obstore

        key, data = item
        kwargs = {"mode": mode} if mode is not None else {}
        await self._within(op, key, lambda: obstore.put_async(self._client(), key, data, use_multipart=False,
                                                              **kwargs), len(data))

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
                except _Failed as f:
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

    async def _aput_if(self, key: str, data: bytes, mode: Any) -> bool:
        """A conditional put: False when the condition failed (the object exists, or its ETag changed)."""
        from obstore import exceptions as oe

        refused: tuple[type[BaseException], ...] = (oe.AlreadyExistsError, oe.PreconditionError)
        if mode != "create":
            refused += (oe.NotFoundError, FileNotFoundError)
        try:
            await self._aput((key, data), mode=mode, op="create" if mode == "create" else "replace")
            return True
        except _Failed as f:
            if isinstance(f.exc, refused):
                return False
            raise

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        self._check_object_key(key)
        data, tag = self._do("get", key, self._aget(key))
        if not tag:
            raise StoreError(f"the S3 server at {self.url} gave no ETag for {key!r}: it cannot do "
                             "conditional writes, which mlwf needs to update shared objects safely")
        return data, tag

    def put_if_tag(self, key: str, data: bytes, tag: str) -> bool:
        self._check_object_key(key)
        data = self._check_data(key, data)
        return self._do("replace", key, self._aput_if(key, data, {"e_tag": tag}))  # If-Match

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
        except _Failed as f:
            raise _Failed("check the bucket", None, f.exc) from None

    def require_bucket(self) -> None:
        if not self.bucket_exists():
            raise self._bucket_missing()

    def create_bucket(self) -> None:
        """Create the bucket (PUT Bucket, signed here: obstore has no bucket API).

        An existing bucket owned by these credentials is fine.
        """
        if self.endpoint:
            base = self.endpoint
            path = "/" + self.bucket
        elif "." not in self.bucket:
            base = f"https://{self.bucket}.s3.{self.region}.amazonaws.com"
            path = "/"
        else:
            base = f"https://s3.{self.region}.amazonaws.com"
            path = "/" + self.bucket
        body = b""
        if self.region != "us-east-1":
            body = (
                '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<LocationConstraint>{self.region}</LocationConstraint></CreateBucketConfiguration>"
            ).encode()
        status, text = self._signed_request("PUT", base, path, body)
        if 200 <= status < 300 or "BucketAlreadyOwnedByYou" in text:
            return
        code = re.search(r"<Code>([^<]{1,64})</Code>", text)
        code_s = code.group(1) if code else f"HTTP {status}"
        if code_s == "BucketAlreadyExists":
            raise StoreError(
                f"cannot create bucket {self.bucket!r} at {self.url}: the name is taken by another account; "
                "choose another --bucket"
            )
        if status in (401, 403) or code_s in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            who = self._credentials.source if self._credentials else "no credentials (anonymous)"
            raise StoreError(
                f"access denied: create bucket {self.bucket!r} at {self.url} using {who} ({code_s}): "
                f"{_CREDENTIAL_HINT}, and that this user may create buckets"
            )
        if status >= 500:
            raise StoreError(
                f"cannot create bucket {self.bucket!r}: S3 server at {self.url} kept answering HTTP {status} "
                f"({self._scrub(code_s)}) after retrying for {self.timeouts.retry:.1f} s: it is overloaded or failing; "
                f"try again later or raise {ENV_TIMEOUT}"
            )
        raise StoreError(
            f"cannot create bucket {self.bucket!r} at {self.url}: "
            f"the server answered HTTP {status} ({self._scrub(code_s)})"
        )

    def _signed_request(self, method: str, base: str, path: str, body: bytes) -> tuple[int, str]:
        """One SigV4-signed request, retried like obstore's (5xx, connection errors), all within ``total`` s.

        The deadline is enforced on the socket itself (shut down when it
        passes), so a server that answers a byte at a time cannot stretch it.
        """
        t = self.timeouts
        parts = urllib.parse.urlsplit(base)
        deadline = time.monotonic() + t.total
        delay = 0.1
        while True:
            headers = {"content-length": str(len(body))}
            if self._credentials is not None:
                headers.update(_sigv4_headers(method, parts.netloc, path, self.region, self._credentials, body))
            conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            left = max(deadline - time.monotonic(), 0.01)
            conn = conn_cls(parts.hostname, parts.port, timeout=min(t.connect, left))
            cutoff = threading.Timer(left, _shut_down, (conn,))
            cutoff.daemon = True
            cutoff.start()
            try:
                conn.connect()
                conn.sock.settimeout(t.read)
                conn.request(method, path, body=body, headers={"Host": parts.netloc, **headers})
                resp = conn.getresponse()
                status, text = resp.status, resp.read(65536).decode("utf-8", "replace")
                if status < 500 or time.monotonic() >= deadline - t.connect:
                    return status, text
            # AttributeError/ValueError: the socket was shut down (and closed) under a read.
            except (OSError, http.client.HTTPException, AttributeError, ValueError) as e:
                if time.monotonic() >= deadline - 0.01:
                    raise StoreError(
                        f"cannot reach (or get a complete answer from) the S3 endpoint {self.url} to create bucket "
                        f"{self.bucket!r} ({type(e).__name__}; gave up after {t.total:g} s, {ENV_TIMEOUT}): "
                        f"{_endpoint_hint(self.endpoint_source)}"
                    ) from None
            finally:
                cutoff.cancel()
                conn.close()
            time.sleep(min(delay, max(deadline - time.monotonic() - t.connect, 0.0)))
            delay = min(delay * 2, t.max_backoff)

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


def _shut_down(conn: http.client.HTTPConnection) -> None:
    """Make every read or write on ``conn`` fail now (its deadline passed)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _unpickle(bucket, endpoint, region, timeouts, concurrency, endpoint_source) -> S3Store:
    return S3Store(
        bucket,
        endpoint=endpoint,
        region=region,
        credentials=_env_credentials(),
        timeouts=timeouts,
        concurrency=concurrency,
        endpoint_source=endpoint_source,
    )


# -- AWS Signature Version 4 (for the one request obstore cannot make) ----------
def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def _sigv4_headers(
    method: str,
    host: str,
    path: str,
    region: str,
    creds: _Credentials,
    body: bytes,
    now: _dt.datetime | None = None,
) -> dict[str, str]:
    """Headers signing a request without query string (SigV4, service s3)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    payload = hashlib.sha256(body).hexdigest()
    headers = {"host": host, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
    if creds.token:
        headers["x-amz-security-token"] = creds.token
    names = sorted(headers)
    signed = ";".join(names)
    canonical = "\n".join(
        [
            method,
            urllib.parse.quote(path, safe="/~"),
            "",  # no query string
            *(f"{n}:{headers[n].strip()}" for n in names),
            "",
            signed,
            payload,
        ]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + creds.secret_key).encode(), day), region), "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out = {k: v for k, v in headers.items() if k != "host"}
    out["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
    )
    return out

