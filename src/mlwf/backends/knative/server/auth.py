"""Who may call ``mlwf serve``, and only once: signature checks live in :mod:`mlwf.backends.knative.events`;
here, the replay protection (an in-memory cache per process, a ledger shared through the store).

See :mod:`mlwf.backends.knative.server` for the rules a server applies.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
import threading
import time
from collections import OrderedDict

from mlwf.backends.knative import events
from mlwf.errors import MlwfError
from mlwf.httpserver import Refusal
from mlwf.storage import Store


#: Event ids remembered at most (a full cache refuses new calls with 503 rather than forget one).
REPLAY_CACHE_MAX = 100_000


#: Where servers record the event ids they ran, in the store they serve (see ReplayLedger).
REPLAY_PREFIX = ".mlwf/serve/seen"


#: Width of one folder of replay records, by signing time, in seconds.
REPLAY_SLOT_S = 60


class ReplayGuard:
    """Event ids seen recently; bounded, forgets an id only once its signature has expired anyway."""

    def __init__(self, keep_s: float, max_entries: int = REPLAY_CACHE_MAX):
        self.keep_s = keep_s
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def check_and_add(self, event_id: str) -> None:
        now = time.time()
        while self._seen:
            oldest, expiry = next(iter(self._seen.items()))
            if expiry > now:
                break
            del self._seen[oldest]
        if event_id in self._seen:
            # retryable: the caller may send the call again as a new event (the driver always does).
            raise Refusal(403, f"event id {event_id!r} was already used: replayed invocations are refused",
                          retryable=True)
        if len(self._seen) >= self.max_entries:
            raise Refusal(503, f"too many invocations within the signature window (at most {self.max_entries} "
                                "in --max-age seconds): retry later, or lower --max-age", retryable=True)
        self._seen[event_id] = now + self.keep_s


class ReplayLedger:
    """Event ids already run, shared by every server of one store, kept only as long as they can be replayed.

    One object per event id, ``REPLAY_PREFIX/<slot>/<sha256 of the id>``,
    written with :meth:`Store.put_if_absent`; ``<slot>`` is the signing time in
    units of ``REPLAY_SLOT_S`` (zero-padded, so folders sort by time). The
    bytes name this server and a fresh nonce, so a write never "succeeds" by
    finding an identical record left by someone else.

    Parameters
    ----------
    store : the store the server serves.
    max_age : the server's ``--max-age``: how long a signature is accepted.
    clock : wall-clock seconds (tests may pass their own).
    """

    def __init__(self, store: Store, max_age: int, *, clock=time.time, source: str = "mlwf serve",
                 prefix: str = REPLAY_PREFIX):
        self.store = store
        self.max_age = max_age
        self.clock = clock
        self.source = source
        self.prefix = prefix  # another prefix: another ledger (the dead letters acted on)
        self.cleaned_through: int | None = None  # highest slot known to be deleted
        self._lock = threading.Lock()

    @staticmethod
    def key(event_id: str, stamp: str, prefix: str = REPLAY_PREFIX) -> str:
        slot = int(stamp) // REPLAY_SLOT_S
        return f"{prefix}/{slot:012d}/{hashlib.sha256(event_id.encode()).hexdigest()}"

    def claim(self, event_id: str, stamp: str) -> None:
        """Record ``event_id`` (signed at ``stamp``); :class:`Refusal` 403 if any server recorded it before.

        Raises :class:`Refusal` 503 (retryable) when the store cannot be written.
        """
        record = json.dumps({"id": event_id, "signed": int(stamp), "server": self.source,
                             "at": round(self.clock(), 3), "nonce": secrets.token_hex(8)}).encode()
        try:
            created = self.store.put_if_absent(self.key(event_id, stamp, self.prefix), record)
        except MlwfError as e:
            raise Refusal(503, f"cannot record the call in the store for replay protection: {e}",
                          retryable=True) from None
        if not created:
            raise Refusal(403, f"event id {event_id!r} was already used (recorded by a server of this store): "
                               "replayed invocations are refused", retryable=True)

    def expired_through(self, now: float) -> int:
        """The highest slot whose every event is refused by every server now (signature too old)."""
        return int((now - self.max_age - events.MAX_FUTURE_SKEW) // REPLAY_SLOT_S) - 1

    def clean(self) -> int:
        """Delete the records no server needs any more; returns how many were deleted."""
        with self._lock:
            horizon = self.expired_through(self.clock())
            done = self.cleaned_through
            if done is not None and horizon <= done:
                return 0
            if done is None or horizon - done > 60:
                # First pass (or after a long pause): one listing finds every old folder.
                old = [o.key for o in self.store.list(self.prefix + "/") if _slot(o.key, self.prefix) <= horizon]
            else:
                old = [o.key for slot in range(done + 1, horizon + 1)
                       for o in self.store.list(f"{self.prefix}/{slot:012d}/")]
            self.store.delete_many(old)
            self.cleaned_through = horizon
            return len(old)


def _slot(key: str, prefix: str = REPLAY_PREFIX) -> int:
    """The slot of a replay record's key; keys that are not records count as current (kept)."""
    parts = key[len(prefix) + 1:].split("/")
    return int(parts[0]) if len(parts) == 2 and parts[0].isdigit() else sys.maxsize


def check_signature(event, kind: str, workflow: str, stage: str, run_id: str, data, *, secret: str,
                    max_age: int) -> None:
    """Refuse (:class:`Refusal` 401/403) a request that is unsigned, signed with another secret, altered, or
    signed outside ``[now - max_age, now + MAX_FUTURE_SKEW]``. ``kind``: ``call`` (a driver's call),
    ``event`` or ``start`` (choreographed); it is part of the signed message."""
    signature = event.get_extension(events.SIGNATURE_ATTR)
    stamp = event.get_extension(events.TIME_ATTR)
    if signature in (None, "") or stamp in (None, ""):
        raise Refusal(401, f"unsigned invocation: {events.SIGNATURE_ATTR} and {events.TIME_ATTR} are required")
    stamp = str(stamp)
    if not stamp.isdigit() or len(stamp) > 12:
        raise Refusal(401, f"{events.TIME_ATTR} must be whole Unix seconds")
    if not events.verify(secret, str(signature), kind, workflow, stage, run_id, data, event.get_id(), stamp):
        raise Refusal(401, "bad signature: the caller's MLWF_FUNCTION_SECRET differs, or the event was altered")
    age = time.time() - int(stamp)
    if age > max_age:
        raise Refusal(403, f"expired invocation: signed {age:.0f} s ago, over the {max_age} s "
                           "window (check the clocks)")
    if age < -events.MAX_FUTURE_SKEW:
        raise Refusal(403, f"invocation signed {-age:.0f} s in the future (check the clocks)")
