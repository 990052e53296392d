"""A store wrapper that injects errors and latency, for tests only.

Off unless ``MLWF_STORE_FAULTS`` is set, e.g. ``"get_many:2,latency_ms:20"``:
the first 2 ``get_many`` calls in each process raise
:class:`~mlwf.errors.TransientStoreError` (a store that fails for a while:
the engine retries the call), and every operation waits 20 ms first. Any
operation name of :class:`~mlwf.storage.base.Store` can be given a count.
``slow:TEXT:MS`` makes every operation on a key containing TEXT wait MS
milliseconds (``slow:/versions/:1500``: publishing a model takes seconds,
long enough to be interrupted in the middle).
"""

from __future__ import annotations

import os
import time

from mlwf.errors import TransientStoreError
from mlwf.settings import Settings
from mlwf.storage.base import Store

ENV = "MLWF_STORE_FAULTS"
_OPS = ("list", "get", "get_many", "put", "put_many", "put_if_absent", "get_tagged", "put_if_tag",
        "put_if_absent_tagged", "put_if_tag_tagged", "delete", "delete_many", "exists")


def parse(spec: str) -> tuple[dict[str, int], float]:
    failures, latency = {}, 0.0
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition(":")
        if name == "slow":
            continue  # see slow_keys()
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{ENV}: bad entry {item!r}, expected OP:COUNT or latency_ms:MS") from None
        if name == "latency_ms":
            latency = number / 1000
        elif name in _OPS:
            failures[name] = int(number)
        else:
            raise ValueError(f"{ENV}: unknown operation {name!r}: use one of {', '.join(_OPS)} or latency_ms")
    return failures, latency


def slow_keys(spec: str) -> list[tuple[str, float]]:
    """The ``slow:TEXT:MS`` entries of ``spec``, as (TEXT, seconds)."""
    found = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition(":")
        if name != "slow":
            continue
        text, _, ms = value.rpartition(":")
        try:
            found.append((text, float(ms) / 1000))
        except ValueError:
            raise ValueError(f"{ENV}: bad entry {item!r}, expected slow:TEXT:MS") from None
    return found


class FaultyStore(Store):
    """Wraps a store; fails the first N calls of chosen operations and delays every call, or the calls on
    chosen keys."""

    def __init__(self, inner: Store, failures: dict[str, int], latency_s: float = 0.0,
                 slow: list[tuple[str, float]] | None = None):
        self.inner = inner
        self.location = inner.location
        self.is_local = inner.is_local
        self.bucket = inner.bucket
        self.remaining = dict(failures)
        self.latency_s = latency_s
        self.slow = slow or []

    def _op(self, name: str, *args):
        if self.latency_s:
            time.sleep(self.latency_s)
        for text, seconds in self.slow:
            if args and isinstance(args[0], str) and text in args[0]:
                time.sleep(seconds)
        if self.remaining.get(name, 0) > 0:
            self.remaining[name] -= 1
            raise TransientStoreError(f"injected store fault in {name} (pid {os.getpid()})")
        return getattr(self.inner, name)(*args)

    def list(self, prefix=""):
        return self._op("list", prefix)

    def get(self, key):
        return self._op("get", key)

    def get_many(self, keys):
        return self._op("get_many", keys)

    def put(self, key, data):
        return self._op("put", key, data)

    def put_many(self, items):
        return self._op("put_many", items)

    def put_if_absent(self, key, data):
        return self._op("put_if_absent", key, data)

    def get_tagged(self, key):
        return self._op("get_tagged", key)

    def put_if_tag(self, key, data, tag):
        return self._op("put_if_tag", key, data, tag)

    def put_if_absent_tagged(self, key, data):
        return self._op("put_if_absent_tagged", key, data)

    def put_if_tag_tagged(self, key, data, tag):
        return self._op("put_if_tag_tagged", key, data, tag)

    def delete(self, key):
        return self._op("delete", key)

    def delete_many(self, keys):
        return self._op("delete_many", keys)

    def exists(self, key):
        return self._op("exists", key)

    def bucket_exists(self):
        return self.inner.bucket_exists()

    def create_bucket(self):
        return self.inner.create_bucket()

    def close(self):
        self.inner.close()


def wrap_if_asked(store: Store, settings: Settings) -> Store:
    """``store`` wrapped in a :class:`FaultyStore` when ``MLWF_STORE_FAULTS`` asks for faults, else itself."""
    spec = settings.store_faults
    if not spec:
        return store
    failures, latency = parse(spec)
    return FaultyStore(store, failures, latency, slow_keys(spec))
