"""What the servers of a choreographed run decide through the store.

Every decision is one conditional write, so it holds whichever replica makes
it, after restarts, and when events arrive twice or out of order:

* the run record ``<run folder>/run.json`` is created once (create-if-absent,
  by the start event) and changed only by compare-and-swap
  (:func:`update_record`): a run ends once, ``succeeded`` or ``failed``, and
  nothing written later (a late heartbeat, a second failure) changes that.
  It also says how far the run got (``batches``: the stage batches emitted,
  in order), so a run whose intermediates were deleted fails instead of
  starting again from nothing, and it keeps the run's liveness
  (:func:`touch`; see :mod:`mlwf.choreography.steps`);
* a **claim** (``choreography/claims/<stage>-<index>.json``) lets one server
  at a time run a call. Every change to it is one conditional write whose
  answer carries the new version's tag, so the next change needs no read:
  taken with a create-if-absent write (or, once expired or handed back, a
  compare-and-swap on the version read, its ``generation`` one higher),
  renewed by a compare-and-swap on the tag of the last renewal, handed back
  the same way. A renewal that finds another version knows at once that its
  claim was taken over;
* the call's **done record** (``<stage>/<index>.done.json``, the one the
  driver writes) is the commit: written create-if-absent and naming the
  claim (owner, generation, nonce) whose run it records. Leases are clocks,
  and a store slow enough (a renewal later than the lease) lets a second
  server take an expired claim while the first still runs; outputs have
  fixed keys and the same bytes whoever makes them, but only the first done
  record counts, and the other run is discarded (``call=... discarded``,
  never ``ran``). So one claim's run is a call's outcome, whatever the
  store's latency, and the done record and the claim say which;
* a **batch marker** (``choreography/batches/<stages>.json``) is written
  create-if-absent by the server that finds a stage batch complete: the one
  whose write creates it emits the next batch (the fan-in), the others emit
  nothing;
* a **failure record** (``choreography/failures/<stage>-<index>.json``)
  says that a delivery of a call's event failed on a server after its own
  retries (which event, the error): what the dead-letter sink checks before
  believing that Knative gave up on that event. A start event refused for
  its parameters leaves :func:`refusal_key` the same way.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlwf.errors import MlwfError, NotFoundError, StoreError
from mlwf.engine.layout import RunLayout
from mlwf.runs import now_utc, parse_time, timestamp
from mlwf.storage import Store

#: Compare-and-swap attempts on a run record before giving up (others keep changing it).
_CAS_ATTEMPTS = 20


def record_key(workflow: str, run_id: str) -> str:
    return RunLayout(workflow, run_id).record


def read_json(store: Store, key: str) -> tuple[dict[str, Any], str] | None:
    """The JSON object at ``key`` and its version tag, or None if absent."""
    try:
        raw, tag = store.get_tagged(key)
    except NotFoundError:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise StoreError(f"{key} is not JSON: it was not written by mlwf") from None
    if not isinstance(doc, dict):
        raise StoreError(f"{key} is not a JSON object: it was not written by mlwf")
    return doc, tag


def create_record(store: Store, record: dict[str, Any]) -> bool:
    """Write a new run's record; False if the run already has one."""
    key = record_key(record["workflow"], record["run_id"])
    return store.put_if_absent(key, json.dumps(record, indent=2).encode())


def update_record(store: Store, workflow: str, run_id: str,
                  change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any] | None:
    """Apply ``change`` to the run's record by compare-and-swap; return what was written.

    ``change`` gets the current record and returns the new one, or None to
    leave it as it is (then None is returned). It is called again when
    another writer changed the record meanwhile.

    Raises
    ------
    NotFoundError
        If the run has no record.
    StoreError
        If the record kept changing for every attempt.
    """
    key = record_key(workflow, run_id)
    for _ in range(_CAS_ATTEMPTS):
        found = read_json(store, key)
        if found is None:
            raise NotFoundError(f"run {run_id} has no record {key}")
        record, tag = found
        new = change(dict(record))
        if new is None:
            return None
        if store.put_if_tag(key, json.dumps(new, indent=2).encode(), tag):
            return new
        time.sleep(0.01 + 0.05 * secrets.randbelow(10) / 10)
    raise StoreError(f"the record of run {run_id} kept changing: gave up after {_CAS_ATTEMPTS} attempts")


def _while_running(extra: Callable[[dict[str, Any]], dict[str, Any]]):
    def change(record):
        if record.get("status") != "running":
            return None  # a run ends once
        now = timestamp(now_utc())
        return {**record, **extra(record), "updated_at": now, "heartbeat_at": now}
    return change


def touch(store: Store, workflow: str, run_id: str, *, held_until: float | None = None) -> bool:
    """Renew a running run's lease: a server has work of it in hand (see :mod:`mlwf.choreography.steps`).

    ``held_until`` (wall-clock seconds): events of the run were handed to a
    sink that keeps them (a Broker) and may arrive until then; the record's
    ``held_until`` is moved forward to it. Returns False if the run has ended.
    """
    def extra(record):
        if held_until is None:
            return {}
        current = seconds_of(record.get("held_until"))
        return {"held_until": timestamp(utc_time(max(held_until, current or 0.0)))}

    return update_record(store, workflow, run_id, _while_running(extra)) is not None


def note_batch(store: Store, workflow: str, run_id: str, batch: str) -> dict[str, Any] | None:
    """Record that stage batch ``batch`` is emitted (and renew the lease); the record written, or None
    if the run has ended (emit nothing then)."""
    def extra(record):
        done = [b for b in record.get("batches", []) if isinstance(b, str)]
        return {"batches": done if batch in done else [*done, batch]}

    return update_record(store, workflow, run_id, _while_running(extra))


def utc_time(seconds: float):
    """An aware UTC datetime of wall-clock ``seconds``."""
    import datetime as _dt

    return _dt.datetime.fromtimestamp(seconds, _dt.UTC)


def seconds_of(value: Any) -> float | None:
    """Wall-clock seconds of a record's time (ISO 8601 with a zone), or None."""
    moment = parse_time(value)
    return None if moment is None else moment.timestamp()


def mark_failed(store: Store, workflow: str, run_id: str, error: str, stage: str | None) -> bool:
    """End a running run as ``failed`` with ``error`` (one line) and the ``stage`` it failed in.

    Returns whether this call ended it (False: it had ended already).
    """
    return update_record(store, workflow, run_id,
                         _while_running(lambda r: {"status": "failed", "error": error,
                                                   "failed_stage": stage})) is not None


def mark_succeeded(store: Store, workflow: str, run_id: str, report: dict[str, Any]) -> bool:
    """End a running run as ``succeeded`` with its report; False if it had ended already."""
    return update_record(store, workflow, run_id,
                         _while_running(lambda r: {"status": "succeeded", "report": report})) is not None


def mark_batch(store: Store, layout: RunLayout, batch: str, owner: str) -> bool:
    """Write the marker of stage batch ``batch``; True if this write created it (emit the batch)."""
    doc = {"batch": batch, "by": owner, "at": timestamp(now_utc()), "nonce": secrets.token_hex(8)}
    return store.put_if_absent(layout.batch_marker(batch), json.dumps(doc).encode())




# --------------------------------------------------------------------------- failures and refusals
def note_failure(store: Store, layout: RunLayout, call_name: str, event_id: str, error: str, owner: str) -> None:
    """Record that a delivery of event ``event_id`` (call ``stage-index``) failed here after the server's own
    retries, with ``error``: the proof a dead letter of that event is checked against."""
    doc = {"event": event_id, "error": error, "by": owner, "at": timestamp(now_utc())}
    store.put(layout.failure(call_name), json.dumps(doc).encode())


def read_failure(store: Store, layout: RunLayout, call_name: str) -> dict[str, Any] | None:
    """The failure record of call ``stage-index``, or None."""
    found = read_json(store, layout.failure(call_name))
    return None if found is None else found[0]


#: Where servers note the start events they refused for their parameters (see :func:`refusal_key`).
REFUSALS_PREFIX = ".mlwf/choreography/refused"
#: How long a refusal is kept: as long as a dead letter of its start event is accepted.
REFUSAL_KEEP_S = 86_400


def refusal_key(run_id: str) -> str:
    """Where a refused start of run ``run_id`` is noted (run ids sort by time, so old ones list first)."""
    return f"{REFUSALS_PREFIX}/{run_id}.json"


def note_refusal(store: Store, workflow: str, run_id: str, error: str) -> None:
    """Note that the signed start of ``run_id`` was refused with ``error`` (nothing else is written: the run
    has no record). A dead letter of that start is believed only if this is there."""
    doc = {"workflow": workflow, "run_id": run_id, "error": error, "at": timestamp(now_utc())}
    store.put(refusal_key(run_id), json.dumps(doc).encode())


def read_refusal(store: Store, workflow: str, run_id: str) -> dict[str, Any] | None:
    found = read_json(store, refusal_key(run_id))
    if found is None or found[0].get("workflow") != workflow or not isinstance(found[0].get("error"), str):
        return None
    return found[0]


def clean_refusals(store: Store, now: float | None = None) -> int:
    """Delete refusals older than :data:`REFUSAL_KEEP_S` (their dead letters are refused anyway)."""
    import datetime as _dt

    horizon = _dt.datetime.fromtimestamp((now or time.time()) - REFUSAL_KEEP_S, _dt.UTC)
    old = []
    for key in store.list_keys(REFUSALS_PREFIX + "/"):
        name = key.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            started = _dt.datetime.strptime(name[:22], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=_dt.UTC)
        except ValueError:
            continue
        if started < horizon:
            old.append(key)
    return store.delete_many(old)


# --------------------------------------------------------------------------- claims
@dataclass
class Claim:
    """A claim this server holds: its key, the document it wrote, and that version's tag."""

    key: str
    doc: dict[str, Any]
    tag: str
    taken_over: bool = False
    lost: bool = False  # a renewal found another version: another server took it (its run is not recorded)
    renewing: bool = False  # a renewal is under way

    @property
    def identity(self) -> dict[str, Any]:
        """What the done record names: whose claim, which take-over of it, which nonce."""
        return {"owner": self.doc["owner"], "generation": self.doc["generation"], "nonce": self.doc["nonce"]}


def live(doc: dict[str, Any], now: float) -> bool:
    """Whether a claim document is held and not expired at ``now``."""
    expires = doc.get("expires")
    return doc.get("state") == "held" and isinstance(expires, (int, float)) and expires > now


class Claims:
    """Claims on calls: one server at a time runs a call, across replicas and restarts (see the module).

    Parameters
    ----------
    store : the store of the runs.
    owner : who claims (a server and process), written into each claim.
    lease_s : how long a claim lasts without renewal; the server's keeper
        renews the claims held here every third of it (:meth:`renew_soon`).
    clock : wall-clock seconds (tests may pass their own).
    """

    def __init__(self, store: Store, owner: str, lease_s: float, *, clock=time.time):
        self.store = store
        self.owner = owner
        self.lease_s = lease_s
        self.clock = clock
        self._held: dict[str, Claim] = {}
        self._lock = threading.Lock()
        self._renewers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="mlwf-renew")

    def _doc(self, generation: int, nonce: str, state: str = "held", renewal: int = 0) -> dict[str, Any]:
        return {"owner": self.owner, "state": state, "expires": round(self.clock() + self.lease_s, 3),
                "generation": generation, "nonce": nonce, "renewal": renewal}

    def acquire(self, key: str) -> Claim | None:
        """Take the claim at ``key``: one create-if-absent write when it is new, else a read and one
        compare-and-swap when it has expired or was handed back; None while another holder's claim is live.

        A claim taken over has ``taken_over`` set: its call may have finished
        just before (check the done record).
        """
        nonce = secrets.token_hex(8)
        doc = self._doc(0, nonce)
        tag = self.store.put_if_absent_tagged(key, json.dumps(doc).encode())
        if tag is not None:
            return self._hold(Claim(key, doc, tag))
        for _ in range(3):
            found = read_json(self.store, key)
            if found is None:
                tag = self.store.put_if_absent_tagged(key, json.dumps(doc).encode())
                if tag is not None:
                    return self._hold(Claim(key, doc, tag))
                continue
            current, seen = found
            if live(current, self.clock()):
                return None
            generation = current.get("generation")
            doc = self._doc((generation if isinstance(generation, int) else 0) + 1, nonce)
            tag = self.store.put_if_tag_tagged(key, json.dumps(doc).encode(), seen)
            if tag is not None:
                return self._hold(Claim(key, doc, tag, taken_over=True))
        return None

    def _hold(self, claim: Claim) -> Claim:
        with self._lock:
            self._held[claim.key] = claim
        return claim

    def held(self) -> list[Claim]:
        with self._lock:
            return list(self._held.values())

    def renew(self, claim: Claim) -> bool:
        """Renew ``claim``: one compare-and-swap on the tag of its last version; False if it was lost."""
        if claim.lost:
            return False
        doc = {**claim.doc, "expires": round(self.clock() + self.lease_s, 3), "renewal": claim.doc["renewal"] + 1}
        try:
            tag = self.store.put_if_tag_tagged(claim.key, json.dumps(doc).encode(), claim.tag)
        except MlwfError:
            return True  # not known to be lost: renewed at the next turn; the lease allows for it
        if tag is None:
            claim.lost = True
            self.done(claim)
            return False
        claim.doc, claim.tag = doc, tag
        return True

    def renew_soon(self, claim: Claim):
        """Renew ``claim`` in the background unless its last renewal is still under way (two at once would
        race on one tag); the future, or None."""
        with self._lock:
            if claim.renewing:
                return None
            claim.renewing = True

        def renew():
            try:
                return self.renew(claim)
            finally:
                claim.renewing = False

        return self.background(renew)

    def background(self, fn, *args):
        """Run ``fn(*args)`` on the renewing threads (None once closed)."""
        try:
            return self._renewers.submit(fn, *args)
        except RuntimeError:
            return None

    def release(self, claim: Claim) -> None:
        """Hand a claim back (its call failed and may run again at once elsewhere)."""
        self.done(claim)
        if claim.lost:
            return
        doc = {**claim.doc, "state": "released", "renewal": claim.doc["renewal"] + 1}
        try:
            self.store.put_if_tag_tagged(claim.key, json.dumps(doc).encode(), claim.tag)
        except MlwfError:
            pass  # it expires by itself

    def done(self, claim: Claim) -> None:
        """Stop renewing a claim (its call is recorded, or it was lost)."""
        with self._lock:
            if self._held.get(claim.key) is claim:
                del self._held[claim.key]

    def close(self) -> None:
        self._renewers.shutdown(wait=False, cancel_futures=True)


def commit(store: Store, layout: RunLayout, claim: Claim, call_json: dict[str, Any], outcome_json: dict[str, Any],
           call_digest: str) -> dict[str, Any] | None:
    """Record a call as done by ``claim``, create-if-absent: None if this claim's run is the one recorded,
    else the claim named by the done record already there (this run is discarded)."""
    doc = {"call": call_digest, "outcome": outcome_json, "claim": claim.identity}
    key = layout.done(call_json["stage"], call_json["index"])
    if store.put_if_absent(key, json.dumps(doc).encode()):
        return None
    found = read_json(store, key)
    return {"owner": "unknown"} if found is None else (found[0].get("claim") or {"owner": "a driver"})
