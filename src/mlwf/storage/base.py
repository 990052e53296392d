"""The one object-store interface every stage and command goes through.

Keys and prefixes behave exactly like S3: a key is a ``/``-separated string, a
prefix matches any key that starts with it (``a/b`` matches ``a/b/c`` and
``a/bc``), and listings come back sorted by key. A :class:`Store` is bound to
one bucket.
"""

from __future__ import annotations

import abc
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mlwf.errors import StoreError

MAX_KEY_BYTES = 1024  # S3's limit, enforced everywhere so local runs behave like S3
#: A file name's limit on common file systems, enforced on every store so a key
#: that works on S3 works in a local store too (and fails at once, not on retry).
MAX_SEGMENT_BYTES = 255


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object."""

    key: str
    size: int
    #: The store's content tag where it has one (S3: the ETag, an MD5 for simple PUTs).
    etag: str | None = field(default=None, compare=False)


#: A key of ASCII letters, digits and ``-_.`` whose segments never start with a dot (so none is
#: ``.`` or ``..``), none empty or over 255 bytes, nothing after a last ``/``: safe as it is.
#: Checking every rule costs 5 µs a key; this one match (tested against them on 20,000 random keys) took
#: a predict call's 625 reads from 7.8 to 5.1 ms.
_PLAIN_KEY = re.compile(r"[\w-][\w.-]{0,254}(?:/[\w-][\w.-]{0,254})*", re.ASCII)
#: Backslashes, control characters and lone surrogates (text that is not UTF-8).
_BAD_CHARACTER = re.compile("[\\x00-\\x1f\\x7f\\\\\\ud800-\\udfff]")


def check_key(key: str, *, what: str = "key") -> str:
    """Return ``key`` if it is a safe object key, else raise :class:`StoreError`.

    Refused: empty keys, absolute paths, ``.`` or ``..`` segments, empty
    segments, backslashes and control characters, keys over 1,024 bytes and
    segments (between slashes) over 255 bytes, and text that is not valid UTF-8.
    Such keys could escape a local store's root or mean different objects on
    different stores.
    """
    if not isinstance(key, str) or not key:
        raise StoreError(f"empty {what}: give a non-empty object key")
    if len(key) <= MAX_KEY_BYTES and _PLAIN_KEY.fullmatch(key):
        return key  # the usual key, safe by its form alone (checked ten times faster)
    problem = _key_problem(key)
    if problem:
        shown = repr(key) if len(key) <= 100 else f"{key[:60]!r}…({len(key)} characters)"
        raise StoreError(f"refused {what} {shown}: it {problem}; use a relative key like 'dir/name'")
    return key


def _key_problem(key: str) -> str | None:
    """What makes a non-empty ``key`` unsafe (see :func:`check_key`), or None."""
    problem = None
    bad = _BAD_CHARACTER.search(key)
    if key.startswith("/"):
        problem = "is absolute"
    elif bad:
        c = bad.group()
        problem = ("contains a backslash" if c == "\\" else
                   "is not valid UTF-8 text" if c >= "\ud800" else "contains a control character")
    elif len(key.encode("utf-8")) > MAX_KEY_BYTES:
        problem = f"is longer than {MAX_KEY_BYTES} bytes"
    else:
        parts = key.split("/")
        body = parts[:-1] if key.endswith("/") else parts
        if any(p in (".", "..") for p in body):
            problem = "has a '.' or '..' segment that would escape the store root"
        elif any(p == "" for p in body):
            problem = "has an empty path segment ('//')"
        elif len(key) > MAX_SEGMENT_BYTES // 4 and \
                any(len(p.encode("utf-8")) > MAX_SEGMENT_BYTES for p in parts):
            problem = f"has a segment (between slashes) longer than {MAX_SEGMENT_BYTES} bytes"
    return problem


def check_prefix(prefix: str) -> str:
    """Validate a listing prefix; the empty prefix means the whole bucket."""
    if prefix == "":
        return prefix
    return check_key(prefix, what="prefix")


def join_key(*parts: str) -> str:
    """Join key segments with ``/``, ignoring empty ones and duplicate slashes."""
    return posixpath.join(*[p.strip("/") for p in parts if p and p.strip("/")])


class Store(abc.ABC):
    """An object store bound to one bucket.

    Implementations: :class:`mlwf.storage.local.LocalStore` (a directory) and
    :class:`mlwf.storage.s3.S3Store` (any S3-compatible service).
    """

    #: Where the store is, for messages only (never carries credentials; never parsed: a
    #: :class:`~mlwf.storage.StoreSpec` names a store).
    location: str
    bucket: str
    #: A directory on this machine (where a bucket is just a folder).
    is_local: bool = False

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Return every object whose key starts with ``prefix``, sorted by key.

        Raises :class:`~mlwf.errors.NotFoundError` if the bucket does not exist.
        """

    def list_keys(self, prefix: str = "") -> list[str]:
        """The keys :meth:`list` returns, without their sizes (a store may skip looking them up:
        no partition reads a size, and the local store spares a ``stat`` per file)."""
        return [o.key for o in self.list(prefix)]

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """Return the bytes of ``key``; :class:`~mlwf.errors.NotFoundError` if absent."""

    def get_many(self, keys: Sequence[str]) -> list[bytes]:
        """Return the bytes of every key, in order (concurrently where it pays)."""
        return [self.get(k) for k in keys]

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` atomically: readers see the old or the new object."""

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Write several objects (concurrently where it pays)."""
        for key, data in items:
            self.put(key, data)

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write ``data`` at ``key`` only if no object is there; return whether it was written.

        Atomic against every other writer of the store, in any process or on
        any host that shares it: of several concurrent calls for one key, one
        writes. A key that already holds exactly ``data`` also returns True
        (a retried request whose first attempt landed), so a caller that needs
        to know which writer won must write bytes unique to it.
        """

    @abc.abstractmethod
    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """The bytes of ``key`` and a tag naming this version of it (for :meth:`put_if_tag`).

        Raises :class:`~mlwf.errors.NotFoundError` if absent.
        """

    @abc.abstractmethod
    def put_if_tag(self, key: str, data: bytes, tag: str) -> bool:
        """Replace ``key`` with ``data`` only if it still is the version ``tag`` names.

        Returns False, writing nothing, if another writer replaced or deleted
        it since :meth:`get_tagged` (compare-and-swap: read, change, retry).
        On S3 a request retried after a lost answer may find its own write and
        return False too: a caller reads again and sees whether its change is
        already in.
        """

    def put_if_absent_tagged(self, key: str, data: bytes) -> str | None:
        """:meth:`put_if_absent`, returning the tag of the version written (None: nothing written).

        For a caller that changes the object again by :meth:`put_if_tag_tagged`
        without reading it first: one store operation per change. ``data``
        must be unique to the caller (a nonce), as a key already holding
        exactly ``data`` counts as written. Stores override this with one
        request; this default reads the tag back.
        """
        if not self.put_if_absent(key, data):
            return None
        found, tag = self.get_tagged(key)
        return tag if found == data else None

    def put_if_tag_tagged(self, key: str, data: bytes, tag: str) -> str | None:
        """:meth:`put_if_tag`, returning the tag of the version written (None: nothing written).

        So the next conditional change needs no read first. ``data`` must be
        unique to the caller (a nonce): after a lost answer the store is read
        and a key holding exactly ``data`` counts as written. Stores override
        this with one request; this default reads the tag back.
        """
        self.put_if_tag(key, data, tag)
        return self._own_version(key, data)  # written, or found written after a lost answer

    def _own_version(self, key: str, data: bytes) -> str | None:
        """The tag of ``key`` if it holds exactly ``data`` (our write landed), else None."""
        from mlwf.errors import NotFoundError

        try:
            found, tag = self.get_tagged(key)
        except NotFoundError:
            return None
        return tag if found == data else None

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error (as on S3)."""

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete every key; return how many were asked for."""
        n = 0
        for key in keys:
            self.delete(key)
            n += 1
        return n

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""

    @abc.abstractmethod
    def bucket_exists(self) -> bool:
        """Whether the bucket exists."""

    @abc.abstractmethod
    def create_bucket(self) -> None:
        """Create the bucket if it does not exist."""

    def require_bucket(self) -> None:
        """Raise a clear :class:`~mlwf.errors.NotFoundError` if the bucket is missing."""
        from mlwf.errors import NotFoundError

        if not self.bucket_exists():
            raise NotFoundError(
                f"bucket {self.bucket!r} does not exist in store {self.location}: "
                "check --bucket/--store, or upload data with 'mlwf s3 upload-dir'"
            )

    def same_object(self, info: ObjectInfo | None, key: str, data: bytes) -> bool:
        """Whether ``key`` (listed as ``info``) already holds exactly ``data``.

        Compares size and ETag (MD5) where the store gives one, else the bytes.
        """
        if info is None or info.size != len(data):
            return False
        if info.etag:
            import hashlib

            return info.etag.strip('"') == hashlib.md5(data, usedforsecurity=False).hexdigest()
        try:
            return self.get(key) == data
        except StoreError:
            return False

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the store must not be used afterwards."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r}, bucket={self.bucket!r})"
