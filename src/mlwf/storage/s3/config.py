"""Where an S3 store is, as whom, and within what bounds: checked from :class:`~mlwf.settings.Settings`.

* ``s3://`` takes the endpoint from ``S3_HOST``/``S3_PORT`` (plain HTTP, as a
  MinIO deployment provides; ``S3_HOST`` may also be a full ``http(s)://``
  URL), else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``/``AWS_ENDPOINT``,
  else AWS S3 itself; ``s3://HOST:PORT`` names the endpoint (plain HTTP) and
  overrides the above.
* Credentials: ``S3_USER``/``S3_PASSWORD``, else ``AWS_ACCESS_KEY_ID``/
  ``AWS_SECRET_ACCESS_KEY`` (with ``AWS_SESSION_TOKEN``); region
  ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``), default ``us-east-1``.
* Bounds: ``MLWF_S3_TIMEOUT`` (:class:`S3Timeouts`) and at most
  ``MLWF_S3_CONCURRENCY`` requests in flight.

Every value is checked here and refused with a one-line
:class:`~mlwf.errors.StoreError` naming the variable; credentials never
appear in a message, a ``repr`` or a pickle (:class:`Credentials`).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mlwf.errors import StoreError
from mlwf.settings import Settings

ENV_TIMEOUT = "MLWF_S3_TIMEOUT"
ENV_CONCURRENCY = "MLWF_S3_CONCURRENCY"
DEFAULT_TIMEOUT = 15.0  # seconds, see S3Timeouts
DEFAULT_CONCURRENCY = 64
DEFAULT_REGION = "us-east-1"
MAX_PUT_BYTES = 5 * 1024**3  # S3's limit for one PUT
#: The slowest transfer that counts as progress: a request may take MLWF_S3_TIMEOUT plus one second per MiB.
MIN_TRANSFER_RATE = 1 << 20  # bytes per second
_MAX_TIMEOUT = 86_400.0
CREDENTIAL_HINT = "check S3_USER/S3_PASSWORD or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
_ENDPOINT_HINT = "check S3_HOST/S3_PORT, AWS_ENDPOINT_URL or the s3://HOST:PORT store URL, and that the server is up"

# AWS's rules for general purpose buckets (Bucket naming rules, Amazon S3 User Guide); MinIO follows them.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]*[a-z0-9]$")
_IP_LIKE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def endpoint_hint(source: str) -> str:
    """What to check when the endpoint (named by ``source``) cannot be reached."""
    return f"endpoint from {source}; {_ENDPOINT_HINT}"


@dataclass(frozen=True)
class S3Timeouts:
    """Time bounds derived from one total ``T`` (``MLWF_S3_TIMEOUT``), in seconds.

    :meth:`bound` is the hard limit of one operation (see
    :mod:`mlwf.storage.s3`). Inside it, obstore retries failed attempts for
    ``retry`` seconds; the last attempt can start after a backoff of at most
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
        """The bounds for a total of ``total`` seconds; :class:`StoreError` if it is not a sane number."""
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
    def from_settings(cls, settings: Settings) -> S3Timeouts:
        """The bounds ``MLWF_S3_TIMEOUT`` asks for (default 15 s)."""
        raw = settings.s3.timeout
        if raw is None:
            return cls.from_total(DEFAULT_TIMEOUT)
        try:
            total = float(raw)
        except ValueError:
            raise StoreError(f"{ENV_TIMEOUT}={raw!r} is not a number: give seconds, e.g. 15") from None
        return cls.from_total(total)

    def bound(self, nbytes: int = 0) -> float:
        """Seconds one request moving ``nbytes`` may take, retries included: ``total + nbytes / 1 MiB/s``."""
        return self.total + nbytes / MIN_TRANSFER_RATE


class Credentials:
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
        """obstore's credential provider: always these credentials."""
        value = {"access_key_id": self.access_key, "secret_access_key": self.secret_key, "token": self.token,
                 "expires_at": None}

        def credentials() -> dict[str, Any]:
            return value

        return credentials


class S3Target(Protocol):
    """An S3 store as the bucket request and the error messages read it (an
    :class:`~mlwf.storage.s3.S3Store`): where, as whom, within what bounds."""

    bucket: str
    location: str
    endpoint: str | None
    endpoint_source: str
    region: str
    credentials: Credentials | None
    timeouts: S3Timeouts

    def bucket_exists(self) -> bool: ...


def credentials_from(settings: Settings) -> Credentials | None:
    """The credentials the settings name (see the module docstring), or None for none at all."""
    env = settings.s3
    if env.user or env.password:
        if not (env.user and env.password):
            raise StoreError(
                "set both S3_USER and S3_PASSWORD (or neither, to use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
        return Credentials(env.user, env.password, None, "S3_USER/S3_PASSWORD")
    if env.access_key_id or env.secret_access_key:
        if not (env.access_key_id and env.secret_access_key):
            raise StoreError("set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        return Credentials(env.access_key_id, env.secret_access_key, env.session_token,
                           "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    return None


def strip_userinfo(url: str) -> str:
    """``url`` without any ``user:password@`` part."""
    return re.sub(r"(://)[^/@]*@", r"\1", url)


def clean_endpoint(endpoint: str, what: str) -> str:
    """``scheme://host[:port]`` with no user info, path, query or trailing slash."""
    parts = urllib.parse.urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StoreError(f"{what} {strip_userinfo(endpoint)!r} is not an http(s)://HOST[:PORT] URL")
    try:
        port = parts.port
    except ValueError:
        raise StoreError(f"{what} {strip_userinfo(endpoint)!r} has an invalid port") from None
    host = parts.hostname
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    if parts.path not in ("", "/"):
        raise StoreError(f"{what} {strip_userinfo(endpoint)!r} has a path: give only http(s)://HOST[:PORT]")
    return f"{parts.scheme}://{netloc}"


def endpoint_from(settings: Settings) -> tuple[str | None, str]:
    """The endpoint the settings name and the variable it came from (None, "AWS": AWS S3 itself)."""
    env = settings.s3
    if env.host:
        if "://" in env.host:
            return clean_endpoint(env.host, "S3_HOST"), "S3_HOST"
        port = env.port or "9000"
        if not port.isdigit():
            raise StoreError(f"S3_PORT={port!r} is not a port number")
        return clean_endpoint(f"http://{env.host}:{port}", "S3_HOST/S3_PORT"), "S3_HOST/S3_PORT"
    for name, value in env.endpoint_urls:
        return clean_endpoint(value, name), name
    return None, "AWS"


def concurrency_from(settings: Settings) -> int:
    """``MLWF_S3_CONCURRENCY``, default 64."""
    raw = settings.s3.concurrency
    if raw is None:
        return DEFAULT_CONCURRENCY
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise StoreError(f"{ENV_CONCURRENCY}={raw!r} is not a positive integer: give e.g. 64")
    return n


def check_bucket(bucket: str) -> str:
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


def parse_store_url(url: str) -> tuple[str | None, str | None]:
    """``s3://`` → ``(None, None)`` (the endpoint comes from the settings); ``s3://HOST:PORT`` →
    ``("http://HOST:PORT", "store URL")``. :class:`StoreError` for anything else."""
    if not url.startswith("s3://"):
        raise StoreError(f"not an S3 store URL: {strip_userinfo(url)!r}; use s3:// or s3://HOST:PORT")
    rest = url[len("s3://"):].rstrip("/")
    if "@" in rest:
        raise StoreError(f"do not put credentials in the store URL: set {CREDENTIAL_HINT.removeprefix('check ')}")
    if not rest:
        return None, None
    if "/" in rest or not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):\d{1,5}", rest):
        raise StoreError(f"S3 store URL {url!r} is not s3:// or s3://HOST:PORT: the bucket goes in --bucket, "
                         "the endpoint in s3://HOST:PORT or S3_HOST/S3_PORT")
    return f"http://{rest}", "store URL"
