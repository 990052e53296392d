"""What a server does for a choreographed run: start it, run a call of it, decide what comes next.

Every decision goes through the store (:mod:`mlwf.choreography.records`), so
it holds whichever replica makes it:

* :meth:`Choreographer.start` (a start event): checks the parameters exactly
  as the driver does, creates the run record (create-if-absent: a start event
  delivered twice starts one run) and emits the first stage batch.
* :meth:`Choreographer.before_call` (a stage event): the call is skipped when
  its run has ended or it is recorded as done (a duplicate), or when another
  server holds its claim (it is running there); else this server claims it.
* :meth:`Choreographer.after_call`: records the call as done (the same
  ``<stage>/<index>.done.json`` the driver writes), then :meth:`advance`.
* :meth:`Choreographer.advance`: replays the driver (:mod:`~mlwf.choreography.replay`).
  If the next batch has calls not done, the server whose create-if-absent
  write makes the batch's marker emits them (the join: after the last of T
  train calls, exactly one server sends the validation event, whichever
  replica each train call ran on and in whatever order they finished). If
  every stage is done, the server that claims the finish publishes and writes
  the report, once.
* :meth:`Choreographer.failed`: a call that fails with bad input (not worth
  retrying) ends the run ``failed`` naming the call and the reason; any other
  failure hands the claim back so a redelivery runs the call again.
* :meth:`Choreographer.resume`: the events of running runs that no live
  server is working on (a server died between recording a call and
  delivering what came next, or while running it): emitted again. A server
  does this when it starts, and every lease for the runs it has seen.

Delivery is at least once, and everything here is idempotent: outputs have
fixed keys and deterministic bytes, a call recorded as done is never run
again, and a second emitted event for a call is skipped by its claim or its
done record.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlwf.choreography import records
from mlwf.choreography.records import Claim, Claims
from mlwf.choreography.replay import Complete, Pending, replay
from mlwf.engine.calls import Call, Outcome, RunContext
from mlwf.engine.checkpoints import Checkpoints
from mlwf.engine.layout import RECORD, RUN_ID, RunLayout, runs_folder
from mlwf.errors import MlwfError, one_line, retryable
from mlwf.storage import Store, StoreSpec

log = logging.getLogger("mlwf.choreography")

#: What :meth:`Choreographer.before_call` may answer besides a claim.
ENDED, DONE, BUSY = "ended", "done", "busy"


@dataclass(frozen=True)
class Verdict:
    """Whether to run a call: ``action`` is ``run`` (``claim`` held), or ended, done or busy (skip it)."""

    action: str
    claim: Claim | None = None
    detail: str = ""
    record: dict[str, Any] | None = None  # the run's record as read before the call


class Choreographer:
    """A server's side of choreographed runs (see the module).

    Parameters
    ----------
    store, spec : the one store the server acts on, and how it is named.
    owner : this server process, as written into claims and markers.
    emit : ``emit(call, ctx)`` sends one stage event (the server's sinks).
    lease_s : how long a claim lasts without renewal.
    """

    def __init__(self, store: Store, spec: StoreSpec, owner: str, emit: Callable[[Call, RunContext], None], *,
                 lease_s: float):
        self.store = store
        self.spec = spec
        self.owner = owner
        self.emit = emit
        self.lease_s = lease_s
        self.claims = Claims(store, owner, lease_s, renewed=self._alive)
        self._seen: set[tuple[str, str]] = set()  # runs this server took part in: resumed every lease
        self._lock = threading.Lock()

    def context(self, workflow: str, run_id: str) -> RunContext:
        return RunContext(run_id, workflow, self.spec.url, self.spec.bucket,
                          RunLayout(workflow, run_id).folder, "store")

    # ---------------------------------------------------------------- start
    def start(self, workflow: str, run_id: str, invocation: Any, started_at: str) -> None:
        """Start run ``run_id`` of ``workflow`` (idempotent: a second start of the same run emits nothing).

        Raises
        ------
        UsageError, DataError, NotFoundError, ModelError
            For parameters or data the driver refuses, before anything is written.
        """
        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
            from mlwf.errors import UsageError

            raise UsageError(f"run id {str(run_id)[:80]!r} is not one mlwf makes (e.g. 20261126T121500.123456Z-3f9a1c)")
        self._note(workflow, run_id)
        try:
            replay(self.store, self.spec, workflow, run_id, invocation,
                   start={"invocation": invocation, "started_at": started_at})
        except Pending as p:
            self._emit_batch(workflow, run_id, p)
        except Complete:
            pass  # a start delivered again after the run did all its work: its finish is under way

    # ---------------------------------------------------------------- one call
    def before_call(self, call: Call, ctx: RunContext) -> Verdict:
        """Decide whether this server runs ``call`` now (see :class:`Verdict`)."""
        self._note(ctx.workflow, ctx.run_id)
        found = records.read_json(self.store, records.record_key(ctx.workflow, ctx.run_id))
        if found is None:
            return Verdict(ENDED, detail="the run has no record (never started, or its folder was deleted)")
        if found[0].get("mode") != "choreography":
            return Verdict(ENDED, detail="the run is driven by a driver, not choreographed")
        if found[0].get("status") != "running":
            return Verdict(ENDED, detail=f"the run has {found[0].get('status')}")
        # A call's claim is written before it runs and never deleted: a claim this server creates is
        # the call's first, so only a claim taken over may belong to a call that finished meanwhile.
        claim = self.claims.acquire(RunLayout(ctx.workflow, ctx.run_id).claim(f"{call.stage}-{call.index}"))
        if claim is None:
            return Verdict(BUSY, detail="running or run on another server")
        if claim.taken_over and self._is_done(call, ctx):  # finished by its last holder just before expiring
            self.claims.done(claim)
            return Verdict(DONE, detail="already done")
        return Verdict("run", claim, record=found[0])

    def after_call(self, call: Call, ctx: RunContext, outcome: Outcome, verdict: Verdict) -> None:
        """Record ``call`` as done, then take the run's next step.

        (The run's lease is renewed while its calls hold claims, not here: one
        write less on the way to the next stage.)
        """
        self._checkpoints(ctx).mark_done(call, outcome)
        self.claims.done(verdict.claim)
        self.advance(ctx.workflow, ctx.run_id, after=call.name, record=verdict.record)

    def failed(self, call: Call, ctx: RunContext, claim: Claim, error: BaseException, *, retryable: bool) -> None:
        """``call`` failed here: end the run (bad input), or hand the claim back (worth another delivery)."""
        if retryable:
            self.claims.release(claim)
            return
        self.claims.done(claim)
        self.fail_run(ctx.workflow, ctx.run_id, call.name, one_line(error))

    def fail_run(self, workflow: str, run_id: str, stage: str | None, error: str) -> None:
        """End the run ``failed`` (once; a run that has ended stays as it ended)."""
        try:
            if records.mark_failed(self.store, workflow, run_id, error, stage):
                log.info("run %s failed at %s: %s", run_id, stage, error)
        except MlwfError as e:
            log.error("could not mark run %s failed (%s): %s", run_id, error, e)

    def fail_start(self, workflow: str, run_id: str, error: str) -> None:
        """A start event that could not start its run: record the run ``failed`` with ``error``."""
        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
            return
        from mlwf.runs import now_utc, timestamp

        now = timestamp(now_utc())
        record = {"run_id": run_id, "workflow": workflow, "status": "failed", "params": {}, "transfer": "store",
                  "resumed": False, "started_at": now, "updated_at": now, "heartbeat_at": now,
                  "mode": "choreography", "error": error, "failed_stage": "start"}
        if records.create_record(self.store, record):
            log.info("run %s failed at start: %s", run_id, error)
        else:
            self.fail_run(workflow, run_id, "start", error)

    # ---------------------------------------------------------------- what comes next
    def advance(self, workflow: str, run_id: str, *, after: str | None = None, resend: bool = False,
                record: dict[str, Any] | None = None) -> None:
        """Emit the run's next batch if this server completes the previous one, or finish the run.

        With ``resend``, emit every call of the pending batch that no live
        server is running (recovery), whoever made the batch's marker.
        ``record``: the run's record if just read (its invocation never changes).
        """
        if record is None:
            found = records.read_json(self.store, records.record_key(workflow, run_id))
            record = None if found is None else found[0]
        if record is None or record.get("status") != "running" or record.get("mode") != "choreography":
            return
        try:
            replay(self.store, self.spec, workflow, run_id, record.get("invocation"))
        except Pending as p:
            if resend:
                self._resend(workflow, run_id, p)
            elif after is None or all(c.name != after for c in p.calls):
                self._emit_batch(workflow, run_id, p)
            # else: the batch of the call just done is still running; whoever emitted it marked it
        except Complete:
            self._finish(workflow, run_id, record)
        except MlwfError as e:
            if retryable(e):
                raise  # the store failing: the delivery of this event is retried
            self.fail_run(workflow, run_id, after, one_line(e))  # the driver's own checks: the run cannot go on
        except Exception as e:  # noqa: BLE001 - a bug: end the run with it rather than stall
            log.exception("run %s: replaying its driver failed", run_id)
            self.fail_run(workflow, run_id, after, f"internal error: {type(e).__name__}: {one_line(e)}")

    def _emit_batch(self, workflow: str, run_id: str, pending: Pending) -> None:
        ctx = self.context(workflow, run_id)
        if records.mark_batch(self.store, RunLayout(workflow, run_id), pending.batch, self.owner):
            for call in pending.missing:
                self.emit(call, ctx)

    def _resend(self, workflow: str, run_id: str, pending: Pending) -> None:
        ctx = self.context(workflow, run_id)
        for call in pending.missing:
            key = RunLayout(workflow, run_id).claim(f"{call.stage}-{call.index}")
            found = records.read_json(self.store, key)
            live = found is not None and found[0].get("state") == "held" \
                and float(found[0].get("expires") or 0) > self.claims.clock()
            if not live:
                self.emit(call, ctx)

    def _finish(self, workflow: str, run_id: str, record: dict[str, Any]) -> None:
        ctx = self.context(workflow, run_id)
        claim = self.claims.acquire(RunLayout(workflow, run_id).claim("finish"))
        if claim is None:
            return  # another server is finishing the run
        try:
            report = replay(self.store, self.spec, workflow, run_id, record.get("invocation"), finishing=True)
            if records.mark_succeeded(self.store, workflow, run_id, report):
                log.info("run %s succeeded", run_id)
        except (Pending, Complete):
            self.claims.release(claim)  # cannot happen once every stage is done; leave it to a later step
            return
        except MlwfError as e:
            if retryable(e):
                self.claims.release(claim)  # the store failing: a later step finishes
                raise
            self.fail_run(workflow, run_id, "finish", one_line(e))
        except BaseException:
            self.claims.release(claim)  # the store failing: a later step finishes
            raise
        self.claims.done(claim)

    # ---------------------------------------------------------------- recovery
    def resume(self, *, everything: bool = False) -> int:
        """Emit again what running runs wait for and no live server runs; returns how many runs were looked at.

        ``everything``: every running choreographed run in the store (at
        start-up), else the runs this server has taken part in.
        """
        if everything:
            runs = self._running_runs()
        else:
            with self._lock:
                runs = sorted(self._seen)
        for workflow, run_id in runs:
            try:
                self.advance(workflow, run_id, resend=True)
            except MlwfError as e:
                log.warning("could not resume run %s: %s", run_id, one_line(e))
            found = records.read_json(self.store, records.record_key(workflow, run_id))
            if found is None or found[0].get("status") != "running":
                with self._lock:
                    self._seen.discard((workflow, run_id))
        return len(runs)

    def _running_runs(self) -> list[tuple[str, str]]:
        from mlwf import workflows

        found = []
        for workflow in workflows.names():
            root = runs_folder(workflow)
            keys = [o.key for o in self.store.list(root)
                    if o.key.endswith("/" + RECORD) and RUN_ID.fullmatch(o.key[len(root):-len(RECORD) - 1])]
            for key in keys:
                try:
                    record = json.loads(self.store.get(key))
                except (MlwfError, ValueError):
                    continue
                # Also runs whose lease ran out while no server was up: a half-finished run goes on.
                if isinstance(record, dict) and record.get("mode") == "choreography" \
                        and record.get("status") == "running":
                    run_id = key[len(root):-len(RECORD) - 1]
                    found.append((workflow, run_id))
                    self._note(workflow, run_id)
        return found

    def _alive(self, claim_keys: list[str]) -> None:
        """Calls of these runs are running here: renew the runs' leases (no driver does)."""
        runs = set()
        for key in claim_keys:
            workflow, _, rest = key.partition("/outputs/")
            runs.add((workflow, rest.split("/", 1)[0]))
        for workflow, run_id in sorted(runs):
            try:
                records.touch(self.store, workflow, run_id)
            except MlwfError as e:
                log.warning("could not renew the lease of run %s: %s", run_id, one_line(e))

    def _note(self, workflow: str, run_id: str) -> None:
        with self._lock:
            self._seen.add((workflow, run_id))

    def _checkpoints(self, ctx: RunContext) -> Checkpoints:
        return Checkpoints(self.store, RunLayout(ctx.workflow, ctx.run_id), enabled=True, resumed=False)

    def _is_done(self, call: Call, ctx: RunContext) -> bool:
        return self._checkpoints(ctx).recorded(call) is not None

    def close(self) -> None:
        self.claims.close()

