"""What the servers of a choreographed run decide through the store.

Every decision is one conditional write, so it holds whichever replica makes
it, after restarts, and when events arrive twice or out of order:

* the run record ``<run folder>/run.json`` is created once (create-if-absent,
  by the start event) and changed only by compare-and-swap
  (:func:`update_record`): a run ends once, ``succeeded`` or ``failed``, and
  nothing written later (a late heartbeat, a second failure) changes that;
* a **claim** (``choreography/claims/<stage>-<index>.json``) lets one server
  at a time run a call: it is taken with a create-if-absent write, renewed
  while the call runs, handed back when it fails, and taken over once its
  lease has expired (its holder died);
* a **batch marker** (``choreography/batches/<stages>.json``) is written
  create-if-absent by the server that finds a stage batch complete: the one
  whose write creates it emits the next batch (the fan-in), the others emit
  nothing.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlwf.errors import MlwfError, NotFoundError, StoreError
from mlwf.engine.layout import RunLayout
from mlwf.runs import now_utc, timestamp
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


def touch(store: Store, workflow: str, run_id: str) -> None:
    """Renew a running run's lease (a call of it finished): it is alive, whoever drives it."""
    update_record(store, workflow, run_id, _while_running(lambda r: {}))


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


@dataclass
class Claim:
    key: str
    doc: dict[str, Any]
    tag: str | None
    taken_over: bool = False


class Claims:
    """Claims on calls: one server at a time runs a call, across replicas and restarts.

    Parameters
    ----------
    store : the store of the runs.
    owner : who claims (a server and process), written into each claim.
    lease_s : how long a claim lasts without renewal; held claims are renewed
        every third of it by a background thread, so only a claim whose holder
        died (or lost the store for that long) expires.
    clock : wall-clock seconds (tests may pass their own).
    """

    def __init__(self, store: Store, owner: str, lease_s: float, *, clock=time.time,
                 renewed: Callable[[list[str]], None] | None = None):
        self.store = store
        self.renewed = renewed  # told the keys of the claims renewed, after each round
        self.owner = owner
        self.lease_s = lease_s
        self.clock = clock
        self._held: dict[str, Claim] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _doc(self, state: str = "held") -> dict[str, Any]:
        return {"owner": self.owner, "state": state, "expires": round(self.clock() + self.lease_s, 3),
                "nonce": secrets.token_hex(8)}

    def acquire(self, key: str) -> Claim | None:
        """Take the claim at ``key``; None while another holder's claim is live.

        A claim taken over from an expired holder has ``taken_over`` set: its
        call may have finished just before (check the done record again).
        """
        for _ in range(3):
            doc = self._doc()
            data = json.dumps(doc).encode()
            if self.store.put_if_absent(key, data):
                return self._hold(Claim(key, doc, None))  # our nonce: ours (its tag is read when needed)
            found = read_json(self.store, key)
            if found is None:
                continue  # deleted meanwhile: try to create it again
            current, tag = found
            expires = current.get("expires")
            live = current.get("state") == "held" and isinstance(expires, (int, float)) and expires > self.clock()
            if live:
                return None
            if self.store.put_if_tag(key, data, tag):
                found = read_json(self.store, key)
                if found is None or found[0].get("nonce") != doc["nonce"]:
                    return None  # taken over again between our write and this read: not ours
                return self._hold(Claim(key, doc, found[1], taken_over=True))
        return None

    def _tag(self, claim: Claim) -> str | None:
        """The tag of our claim as stored now, or None if it is no longer ours."""
        if claim.tag is None:
            found = read_json(self.store, claim.key)
            if found is None or found[0].get("nonce") != claim.doc["nonce"]:
                return None
            claim.tag = found[1]
        return claim.tag

    def _hold(self, claim: Claim) -> Claim:
        with self._lock:
            self._held[claim.key] = claim
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_all, name="mlwf-claims", daemon=True)
                self._renewer.start()
        return claim

    def release(self, claim: Claim) -> None:
        """Hand a claim back (its call failed and may run again at once elsewhere)."""
        with self._lock:
            self._held.pop(claim.key, None)
        try:
            tag = self._tag(claim)
            if tag is not None:
                self.store.put_if_tag(claim.key, json.dumps(self._doc("released")).encode(), tag)
        except MlwfError:
            pass  # it expires by itself

    def done(self, claim: Claim) -> None:
        """Stop renewing a claim whose call is recorded as done (the done record now decides)."""
        with self._lock:
            self._held.pop(claim.key, None)

    def _renew_all(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            with self._lock:
                held = list(self._held.values())
            for claim in held:
                doc = {**claim.doc, "expires": round(self.clock() + self.lease_s, 3)}
                try:
                    tag = self._tag(claim)
                    if tag is not None and self.store.put_if_tag(claim.key, json.dumps(doc).encode(), tag):
                        found = read_json(self.store, claim.key)
                        if found is not None and found[0].get("nonce") == doc["nonce"]:
                            claim.doc, claim.tag = doc, found[1]
                except MlwfError:
                    pass  # renewed at the next turn; the lease allows for it
            if held and self.renewed is not None:
                try:
                    self.renewed([c.key for c in held])
                except Exception:  # noqa: BLE001 - a hook must not stop the renewals
                    pass

    def close(self) -> None:
        self._stop.set()
