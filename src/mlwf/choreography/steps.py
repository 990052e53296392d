"""What a server does for a choreographed run: start it, run a call of it, keep it alive, decide what comes next.

Every decision goes through the store (:mod:`mlwf.choreography.records`), so
it holds whichever replica makes it:

* :meth:`Choreographer.start` (a start event): checks the parameters exactly
  as the driver does, creates the run record (create-if-absent: a start event
  delivered twice starts one run) and emits the first stage batch.
* :meth:`Choreographer.check_run` (a stage event, before it waits for a
  worker): the call is skipped when its run has ended.
* :meth:`Choreographer.claim` (once the call has a worker): one conditional
  write takes the call's claim; the call is skipped while another server
  holds it, or when it is already done. A call waiting for a worker holds no
  claim, so a thousand queued calls cost no renewals.
* :meth:`Choreographer.record_done`: the done record, written
  create-if-absent and naming the claim, is the commit (the first counts).
* :meth:`Choreographer.advance`: replays the driver (:mod:`~mlwf.choreography.replay`).
  If the next batch has calls not done, the server whose create-if-absent
  write makes the batch's marker emits them (the join: after the last of T
  train calls, exactly one server sends the validation event, whichever
  replica each train call ran on and in whatever order they finished). If
  every stage is done, the server that claims the finish publishes and writes
  the report, once. A replay that finds a batch the run had already passed
  missing its done records ends the run ``failed``: its intermediates are
  gone, and it is not silently recomputed from nothing.
* :meth:`Choreographer.failed`: a call that fails with bad input (not worth
  retrying) ends the run ``failed`` naming the call and the reason; any other
  failure notes the failed delivery (what a dead letter is checked against)
  and hands the claim back so a redelivery runs the call again.

**Liveness.** No driver renews a choreographed run's lease, so every server
does, for what it has in hand: every third of ``--claim-lease``, its keeper
renews the claims of the calls it runs (one conditional write each,
concurrently) and then the lease of every run it holds anything of (one
compare-and-swap per run): calls running, events waiting for a worker,
events in its dispatcher (queued, in flight or waiting for a retry). Events a
sink took to deliver later (a Broker's 202) may still arrive as long as
their signature is accepted, ``--max-age`` (+60 s of clock skew) after they
were signed, and no server holds them: the keeper moves the record's
``held_until`` to then. A run is alive (:func:`mlwf.runs.effective_status`)
while its lease (``lease_s``, four claim leases) or ``held_until`` lasts;
``mlwf runs gc`` collects only what is not, and ends such a run ``failed``
first (:func:`mlwf.runs.gc_runs`).

**Recovery** (:meth:`Choreographer.resume`). A run none of that keeps alive
is stale: a server died between recording a call and delivering what came
next, or with events in its memory, or a Broker dropped them. The resumer
takes up to ``RESUME_AT_ONCE`` stale runs at a time (the rest at its next
turn), claims each by one compare-and-swap on its record (so one server
resumes it), and emits what its pending batch still misses and nobody holds;
a resumed run's events go after and beside new runs' (in the dispatcher and
for the workers), so a restarted server with old runs serves new ones first.
A stale run past its deadline (``deadline_at``, ``--run-deadline`` after its
start) is ended ``failed`` saying so instead.

Delivery is at least once, and everything here is idempotent: outputs have
fixed keys and deterministic bytes, a call recorded as done is never
recorded again, and a second emitted event for a call is skipped by its
claim or its done record.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from mlwf.choreography import records
from mlwf.choreography.records import Claim, Claims
from mlwf.choreography.replay import Complete, Pending, remember_done, replay
from mlwf.engine.calls import Call, Outcome, RunContext
from mlwf.engine.checkpoints import Checkpoints, call_digest
from mlwf.engine.layout import RECORD, RUN_ID, RunLayout, runs_folder
from mlwf.errors import MlwfError, StageError, one_line, retryable
from mlwf.storage import Store, StoreSpec

log = logging.getLogger("mlwf.choreography")

#: What :meth:`Choreographer.check_run` and :meth:`Choreographer.claim` may answer besides ``run``.
ENDED, DONE, BUSY = "ended", "done", "busy"
#: A run's lease, in claim leases: renewed every third of a claim lease, it outlasts eleven late renewals.
RUN_LEASES_PER_CLAIM_LEASE = 4
#: Stale runs the resumer takes up at once (their events drained, it takes the next ones).
RESUME_AT_ONCE = 2
#: Default ``--run-deadline``: a stale run older than this is given up, not resumed.
DEFAULT_RUN_DEADLINE_S = 86_400.0

RunKey = tuple[str, str]


@dataclass(frozen=True)
class Verdict:
    """Whether to run a call: ``action`` is ``run``, or ended, done or busy (skip it).

    ``claim``: the claim held (``run`` from :meth:`Choreographer.claim`);
    ``record``: the run's record as read before the call.
    """

    action: str
    claim: Claim | None = None
    detail: str = ""
    record: dict[str, Any] | None = None

    @property
    def resumed(self) -> bool:
        """Whether the run was taken up again by a resumer (its calls go after new runs')."""
        return bool(self.record and self.record.get("resumed_at"))


def _nothing() -> set:
    return set()


class Choreographer:
    """A server's side of choreographed runs (see the module).

    Parameters
    ----------
    store, spec : the one store the server acts on, and how it is named.
    owner : this server process, as written into claims and markers.
    emit : ``emit(calls, ctx, resumed=...)`` sends stage events (the dispatcher's ``send``).
    lease_s : how long a claim lasts without renewal (``--claim-lease``).
    event_window_s : how long after its signing an event may still be accepted
        (``--max-age`` + the clock skew tolerated).
    run_deadline_s : how long after its start a stale run is still resumed.
    in_hand : the runs this server holds events or calls of (besides its claims).
    held : ``take_held()`` of the dispatcher: runs whose events a sink keeps, and when.
    pending : ``pending(workflow, run_id)`` of the dispatcher: calls whose events it holds.
    """

    def __init__(self, store: Store, spec: StoreSpec, owner: str, emit: Callable[..., None], *, lease_s: float,
                 event_window_s: float = 360.0, run_deadline_s: float = DEFAULT_RUN_DEADLINE_S,
                 in_hand: Callable[[], Collection[RunKey]] = _nothing,
                 held: Callable[[], dict[RunKey, float]] = dict,
                 pending: Callable[[str, str], Collection[str]] = lambda w, r: ()):
        self.store = store
        self.spec = spec
        self.owner = owner
        self.emit = emit
        self.lease_s = lease_s
        self.run_lease_s = RUN_LEASES_PER_CLAIM_LEASE * lease_s
        self.event_window_s = event_window_s
        self.run_deadline_s = run_deadline_s
        self.in_hand = in_hand
        self.held = held
        self.pending = pending
        self.claims = Claims(store, owner, lease_s)
        self._seen: set[RunKey] = set()  # runs this server took part in: looked at by the resumer
        self._touching: set[RunKey] = set()  # runs whose lease renewal is under way
        self._resuming: set[RunKey] = set()  # runs taken up here (they count against RESUME_AT_ONCE)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def context(self, workflow: str, run_id: str) -> RunContext:
        return RunContext(run_id, workflow, self.spec.url, self.spec.bucket,
                          RunLayout(workflow, run_id).folder, "store")

    # ---------------------------------------------------------------- start
    def start(self, workflow: str, run_id: str, invocation: Any, started_at: str) -> None:
        """Start run ``run_id`` of ``workflow`` (idempotent: a second start of the same run emits nothing).

        Raises
        ------
        UsageError, DataError, NotFoundError, ModelError
            For parameters or data the driver refuses, before anything is
            written (but a note that the start was refused, see
            :func:`mlwf.choreography.records.note_refusal`).
        """
        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
            from mlwf.errors import UsageError

            raise UsageError(f"run id {str(run_id)[:80]!r} is not one mlwf makes (e.g. 20261126T121500.123456Z-3f9a1c)")
        self._note(workflow, run_id)
        deadline = records.utc_time(_time_of(started_at) + self.run_deadline_s)
        fields = {"invocation": invocation, "started_at": started_at, "lease_s": self.run_lease_s,
                  "deadline_at": records.timestamp(deadline)}
        try:
            replay(self.store, self.spec, workflow, run_id, invocation, start=fields)
        except Pending as p:
            self._emit_batch(workflow, run_id, p, resumed=False)
        except Complete:
            pass  # a start delivered again after the run did all its work: its finish is under way
        except MlwfError as e:
            if not retryable(e) and records.read_json(self.store, records.record_key(workflow, run_id)) is None:
                records.note_refusal(self.store, workflow, run_id, one_line(e))
            raise

    # ---------------------------------------------------------------- one call
    def check_run(self, call: Call, ctx: RunContext) -> Verdict:
        """Whether ``call``'s run is going (``run``, with its record) or has ended (skip the call)."""
        self._note(ctx.workflow, ctx.run_id)
        found = records.read_json(self.store, records.record_key(ctx.workflow, ctx.run_id))
        if found is None:
            return Verdict(ENDED, detail="the run has no record (never started, or its folder was deleted)")
        if found[0].get("mode") != "choreography":
            return Verdict(ENDED, detail="the run is driven by a driver, not choreographed")
        if found[0].get("status") != "running":
            return Verdict(ENDED, detail=f"the run has {found[0].get('status')}")
        return Verdict("run", record=found[0])

    def claim(self, call: Call, ctx: RunContext, checked: Verdict) -> Verdict:
        """Take ``call``'s claim now that it has a worker: ``run`` with the claim, or busy or done."""
        claim = self.claims.acquire(RunLayout(ctx.workflow, ctx.run_id).claim(f"{call.stage}-{call.index}"))
        if claim is None:
            return Verdict(BUSY, detail="running or run on another server", record=checked.record)
        if claim.taken_over and self._is_done(call, ctx):  # finished by its last holder just before expiring
            self.claims.done(claim)
            return Verdict(DONE, detail="already done", record=checked.record)
        return Verdict("run", claim, record=checked.record)

    def record_done(self, call: Call, ctx: RunContext, outcome: Outcome, claim: Claim) -> dict[str, Any] | None:
        """Commit ``call``'s outcome as this claim's run; None if it counts, else the claim whose run
        was recorded first (this one is discarded)."""
        self.claims.done(claim)
        layout = RunLayout(ctx.workflow, ctx.run_id)
        call_json, outcome_json = call.to_json(), outcome.to_json()
        first = records.commit(self.store, layout, claim, call_json, outcome_json, call_digest(call))
        if first is None:  # kept as if read back, for the replays that follow (see mlwf.choreography.replay)
            remember_done(self.store, layout, Call.from_json(call_json), json.loads(json.dumps(outcome_json)))
        return first

    def failed(self, call: Call, ctx: RunContext, claim: Claim, error: BaseException, *, retryable: bool,
               event_id: str) -> None:
        """``call`` failed here: end the run (bad input), or note the failed delivery and hand the claim
        back (worth another delivery)."""
        if retryable:
            said = one_line(error) if isinstance(error, StageError) else f"{type(error).__name__}: {one_line(error)}"
            try:
                records.note_failure(self.store, RunLayout(ctx.workflow, ctx.run_id),
                                     f"{call.stage}-{call.index}", event_id, said, self.owner)
            except MlwfError as e:
                log.warning("could not note the failed call %s of run %s: %s", call.name, ctx.run_id, one_line(e))
            self.claims.release(claim)
            return
        self.claims.done(claim)
        self.fail_run(ctx.workflow, ctx.run_id, call.name, one_line(error))

    def fail_run(self, workflow: str, run_id: str, stage: str | None, error: str) -> bool:
        """End the run ``failed`` (once; a run that has ended stays as it ended); whether this ended it."""
        try:
            if records.mark_failed(self.store, workflow, run_id, error, stage):
                log.info("run %s failed at %s: %s", run_id, stage, error)
                return True
        except MlwfError as e:
            log.error("could not mark run %s failed (%s): %s", run_id, error, e)
        return False

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
    def advance(self, workflow: str, run_id: str, *, after: Collection[str] = (), resend: bool = False,
                record: dict[str, Any] | None = None) -> None:
        """Emit the run's next batch if this server completes the previous one, or finish the run.

        ``after``: the calls just recorded here (whose batch, if still
        pending, someone else emitted). With ``resend``, emit every call of
        the pending batch that no live server runs or holds (recovery), whoever
        made the batch's marker. ``record``: the run's record if just read.
        """
        if record is None:
            found = records.read_json(self.store, records.record_key(workflow, run_id))
            record = None if found is None else found[0]
        if record is None or record.get("status") != "running" or record.get("mode") != "choreography":
            return
        resumed = bool(record.get("resumed_at"))
        try:
            replay(self.store, self.spec, workflow, run_id, record.get("invocation"))
        except Pending as p:
            gone = _passed(record, p.batch)
            if gone:
                self.fail_run(workflow, run_id, p.batch,
                              f"the intermediates of its {p.batch} stage are gone (its {p.missing[0].name} and "
                              f"{len(p.missing) - 1} more have no done record) though it went on to {gone}: they "
                              "were deleted (mlwf runs gc, or by hand); start a new run")
            elif resend:
                self._resend(workflow, run_id, p, resumed=resumed)
            elif not after or not any(c.name in after for c in p.calls):
                self._emit_batch(workflow, run_id, p, resumed=resumed)
            # else: the batch of the calls just done is still running; whoever emitted it marked it
        except Complete:
            self._finish(workflow, run_id, record)
        except MlwfError as e:
            if retryable(e):
                raise  # the store failing: the delivery of this event is retried
            self.fail_run(workflow, run_id, ",".join(sorted(after)) or None, one_line(e))
        except Exception as e:  # noqa: BLE001 - a bug: end the run with it rather than stall
            log.exception("run %s: replaying its driver failed", run_id)
            self.fail_run(workflow, run_id, ",".join(sorted(after)) or None,
                          f"internal error: {type(e).__name__}: {one_line(e)}")

    def _emit_batch(self, workflow: str, run_id: str, pending: Pending, *, resumed: bool) -> None:
        ctx = self.context(workflow, run_id)
        if records.mark_batch(self.store, RunLayout(workflow, run_id), pending.batch, self.owner):
            if records.note_batch(self.store, workflow, run_id, pending.batch) is not None:
                self.emit(pending.missing, ctx, resumed=resumed)

    def _resend(self, workflow: str, run_id: str, pending: Pending, *, resumed: bool) -> None:
        ctx = self.context(workflow, run_id)
        layout = RunLayout(workflow, run_id)
        queued = set(self.pending(workflow, run_id))
        now = self.claims.clock()
        calls = []
        for call in pending.missing:
            if call.name in queued:
                continue  # its event is still on its way from here
            found = records.read_json(self.store, layout.claim(f"{call.stage}-{call.index}"))
            if found is None or not records.live(found[0], now):
                calls.append(call)
        records.mark_batch(self.store, layout, pending.batch, self.owner)
        if calls and records.note_batch(self.store, workflow, run_id, pending.batch) is not None:
            self.emit(calls, ctx, resumed=resumed)

    def _finish(self, workflow: str, run_id: str, record: dict[str, Any]) -> None:
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

    # ---------------------------------------------------------------- liveness
    def start_keeper(self) -> None:
        """Renew, every third of a claim lease, the claims held here and the leases of the runs in hand."""
        self._keeper = threading.Thread(target=self._keep, name="mlwf-keeper", daemon=True)
        self._keeper.start()

    def _keep(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.keep_alive()
            except Exception:  # noqa: BLE001 - keep renewing; say what went wrong
                log.exception("renewing claims and run leases failed")

    def keep_alive(self, *, wait: bool = False) -> None:
        """One round of the keeper (see the module): every claim held here and the lease of every run in hand
        renewed, each by one conditional write, all at once in the background (``wait``: until done).

        A renewal still under way from the last round is not started again:
        so a slow store delays no renewal behind another, and the rounds keep
        their pace (a third of a claim lease) whatever the store's latency.
        """
        jobs = [self.claims.renew_soon(c) for c in self.claims.held()]
        runs = {_run_of(c.key) for c in self.claims.held()} | set(self.in_hand())
        held = self.held()
        for run in sorted(runs | set(held)):
            until = held.get(run)
            jobs.append(self._touch_soon(run, None if until is None else until + self.event_window_s))
        if wait:
            for job in jobs:
                if job is not None:
                    job.result()

    def _touch_soon(self, run: RunKey, held_until: float | None):
        with self._lock:
            if run in self._touching and held_until is None:
                return None
            self._touching.add(run)
        return self.claims.background(self._touch, run, held_until)

    def _touch(self, run: RunKey, held_until: float | None) -> None:
        try:
            records.touch(self.store, *run, held_until=held_until)
        except MlwfError as e:
            log.warning("could not renew the lease of run %s: %s", run[1], one_line(e))
        finally:
            with self._lock:
                self._touching.discard(run)

    # ---------------------------------------------------------------- recovery
    def resume(self, *, everything: bool = False, limit: int = RESUME_AT_ONCE) -> tuple[int, int]:
        """Take up stale runs (see the module); returns (runs looked at, runs taken up here and not drained).

        ``everything``: every running choreographed run in the store (at
        start-up), else the runs this server has taken part in. At most
        ``limit`` runs taken up here have events on their way at once; the
        others wait for a later call.
        """
        from mlwf.runs import effective_status

        if everything:
            runs = self._running_runs()
        else:
            with self._lock:
                runs = sorted(self._seen)
        with self._lock:  # runs taken up here whose events are still on their way count against the limit
            self._resuming = {run for run in self._resuming if self.pending(*run)}
            resumed = len(self._resuming)
        for workflow, run_id in runs:
            try:
                found = records.read_json(self.store, records.record_key(workflow, run_id))
                if found is None or found[0].get("status") != "running":
                    with self._lock:
                        self._seen.discard((workflow, run_id))
                    continue
                if resumed >= limit or self.pending(workflow, run_id) or effective_status(found[0]) != "abandoned":
                    continue  # the rest at a later turn; its events are on their way; someone keeps it alive
                if deadline_of(found[0], self.run_deadline_s) < time.time():
                    self.fail_run(workflow, run_id, None,
                                  f"given up: no server or event advanced it since {found[0].get('heartbeat_at')} "
                                  f"and its deadline ({found[0].get('deadline_at')}, --run-deadline after its "
                                  "start) has passed; start a new run")
                    continue
                record = records.update_record(self.store, workflow, run_id, _take_up(self.owner))
                if record is None:
                    continue  # another server took it up first, or it ended
                resumed += 1
                log.info("run %s: resuming it (nothing kept it alive since %s)", run_id, found[0].get("heartbeat_at"))
                self.advance(workflow, run_id, resend=True, record=record)
                with self._lock:
                    self._resuming.add((workflow, run_id))
            except MlwfError as e:
                log.warning("could not resume run %s: %s", run_id, one_line(e))
        return len(runs), resumed

    def _running_runs(self) -> list[RunKey]:
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
                if isinstance(record, dict) and record.get("mode") == "choreography" \
                        and record.get("status") == "running":
                    run_id = key[len(root):-len(RECORD) - 1]
                    found.append((workflow, run_id))
                    self._note(workflow, run_id)
        return found

    def _note(self, workflow: str, run_id: str) -> None:
        with self._lock:
            self._seen.add((workflow, run_id))

    def _checkpoints(self, ctx: RunContext) -> Checkpoints:
        return Checkpoints(self.store, RunLayout(ctx.workflow, ctx.run_id), enabled=True, resumed=False)

    def _is_done(self, call: Call, ctx: RunContext) -> bool:
        return self._checkpoints(ctx).recorded(call) is not None

    def is_done(self, call: Call, ctx: RunContext) -> bool:
        """Whether ``call`` has a done record."""
        return self._is_done(call, ctx)

    def close(self) -> None:
        self._stop.set()
        self.claims.close()


def _run_of(claim_key: str) -> RunKey:
    workflow, _, rest = claim_key.partition("/outputs/")
    return workflow, rest.split("/", 1)[0]


def _passed(record: dict[str, Any], batch: str) -> str | None:
    """The later batch a run went on to, if ``batch`` (pending now) was passed before; else None."""
    batches = [b for b in record.get("batches") or [] if isinstance(b, str)]
    if batch in batches and batches[-1] != batch:
        return batches[-1]
    return None


def _take_up(owner: str):
    """The record change by which one resumer takes up a stale run: only if it is still stale."""
    from mlwf.runs import effective_status, now_utc, timestamp

    def change(record):
        if record.get("status") != "running" or effective_status(record) != "abandoned":
            return None
        now = timestamp(now_utc())
        return {**record, "heartbeat_at": now, "updated_at": now, "resumed_at": now, "resumed_by": owner,
                "resumes": int(record.get("resumes") or 0) + 1}

    return change


def _time_of(value: Any, default: float | None = None) -> float:
    """Seconds since the epoch of a record's time, or ``default`` (now if None)."""
    seconds = records.seconds_of(value)
    if seconds is None:
        return time.time() if default is None else default
    return seconds


def deadline_of(record: dict[str, Any], run_deadline_s: float = DEFAULT_RUN_DEADLINE_S) -> float:
    """When a choreographed run is given up if stale: its ``deadline_at``, else ``run_deadline_s`` after its
    start (a record written before deadlines were), in wall-clock seconds."""
    deadline = records.seconds_of(record.get("deadline_at"))
    if deadline is not None:
        return deadline
    return _time_of(record.get("started_at")) + run_deadline_s
