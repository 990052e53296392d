"""``mlwf serve`` with sinks: choreographed events in, successors' events out.

A request whose CloudEvent carries ``mlwfkind`` is choreographed (see
:mod:`mlwf.backends.knative.events`): ``start`` starts a run, ``event`` runs one stage
call of it. Both are checked as a driver's calls are (HMAC signature over the
kind, workflow, stage, run id, data, event id and time; ``--max-age``; the
server's own store and the run's folder only), and answered once the work is
done and what comes next has been handed to the dispatcher:

* ``202 {"run_id", "status": "started"}`` for a start;
* ``200 {"status": "done" | "skipped" | "failed", "detail"}`` for a stage
  event: a call run here, or skipped (its run has ended, it is recorded as
  done, or another server is running it), or one that failed on bad input
  (the run is then ``failed``: redelivering cannot help, so it is
  acknowledged);
* ``400`` for a start whose parameters the driver refuses (nothing written
  but a note of the refusal, see below), and the refusals of
  :mod:`mlwf.backends.knative.server` for anything malformed or forged;
* ``500`` (retryable) when the call failed after the server's own
  ``--retries``: the delivery retries it, and when the deliveries are
  exhausted the run ends ``failed`` with the last error.

A stage event waits for one of the server's workers (new runs' calls before
those of runs taken up again by a resumer) and only then claims its call, so
calls waiting here hold no claim. The driver is replayed to find the next
step only by the last event of a run to leave a server
(:meth:`ChoreographyService._next_step`), so a 1,000-way batch costs a
replay per server and lull, not one per call.

Choreographed events skip the per-event-id replay ledger that driver calls
use: a redelivery of the same event after a crash must run, and running an
event twice cannot do anything twice, since a call recorded as done or
claimed by a live server is skipped (:mod:`mlwf.choreography.records`).

Dead letters are proved, not believed. ``POST /dead-letter`` takes the
events a delivery gave up on, and acts on a run only when the failure is
verified one of two ways:

* **signed whole**: a dead letter mlwf's own dispatcher sends carries
  ``mlwfdeadsignature``, an HMAC over the event *and* its ``knativeerror*``
  attributes (:func:`mlwf.backends.knative.events.sign_dead_letter`): the run
  ends ``failed`` with the error it states;
* **checked in the store**: Knative's own dead letters carry the original
  event, signed, but their error attributes are Knative's and unsigned, so
  anyone holding a captured event could make them up. For those the sink
  believes only what a server wrote: a stage event's failure record (the
  call failed on a server with this very event id after its retries, is not
  done, and nobody holds its claim) or a start's refusal note. The run ends
  ``failed`` with *that* error; the attributes' text is only logged. A
  delivery that failed without reaching a server (an unreachable or
  misrouted service) leaves no such proof: its dead letter is refused with
  409 and the run is left to the resumer, which sends what is missing again
  once the run is stale, and to its deadline.

Either way a dead letter is acted on once: its event id is recorded in a
ledger of its own (``.mlwf/serve/dead-letters``, kept as long as dead letters
are accepted: a day after signing), so a replay is refused with 403. A dead
letter naming a run the store does not have is refused with 404; one whose
failure cannot be verified with 409; nothing unverified reaches a run.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mlwf.backends.knative import events
from mlwf.choreography import records
from mlwf.choreography.sinks import DEFAULT_DELIVERY_RETRIES, DEFAULT_SINK_CONNECTIONS, Dispatcher, Sinks
from mlwf.choreography.steps import DEFAULT_RUN_DEADLINE_S, RESUME_AT_ONCE, Choreographer, Verdict
from mlwf.engine.calls import RunContext
from mlwf.engine.layout import RunLayout
from mlwf.errors import MlwfError, UsageError, one_line, retryable

log = logging.getLogger("mlwf.choreography")

DEFAULT_LEASE_S = 30.0
DEFAULT_STAGE_RETRIES = 2
#: On SIGTERM, how long events still being delivered may take before the server exits.
DRAIN_DELIVERIES_S = 10.0
#: Dead-lettered events may have waited through a whole delivery schedule: accepted this old.
DEAD_LETTER_MAX_AGE = 86_400
#: Replays of one run's driver on one server start at least this many seconds apart (see _replay_loop).
REPLAY_EVERY_S = 0.05
#: Where the dead letters acted on are recorded (a replay ledger of their own).
DEAD_LETTER_LEDGER = ".mlwf/serve/dead-letters"


@dataclass(frozen=True)
class ChoreographyConfig:
    """A server's choreography settings (``mlwf serve --sink ...``)."""

    sinks: Sinks
    delivery_retries: int = DEFAULT_DELIVERY_RETRIES
    lease_s: float = DEFAULT_LEASE_S
    stage_retries: int = DEFAULT_STAGE_RETRIES
    sink_connections: int = DEFAULT_SINK_CONNECTIONS
    run_deadline_s: float = DEFAULT_RUN_DEADLINE_S

    def check(self) -> ChoreographyConfig:
        """This config, or :class:`UsageError` naming the flag that is out of range."""
        if isinstance(self.delivery_retries, bool) or not isinstance(self.delivery_retries, int) \
                or not 0 <= self.delivery_retries <= 100:
            raise UsageError(f"--delivery-retries must be 0 to 100, got {self.delivery_retries!r}")
        if isinstance(self.stage_retries, bool) or not isinstance(self.stage_retries, int) \
                or not 0 <= self.stage_retries <= 100:
            raise UsageError(f"--retries must be 0 to 100, got {self.stage_retries!r}")
        if not isinstance(self.lease_s, (int, float)) or not 1 <= self.lease_s <= 86_400:
            raise UsageError(f"--claim-lease must be 1 to 86400 seconds, got {self.lease_s!r}")
        if isinstance(self.sink_connections, bool) or not isinstance(self.sink_connections, int) \
                or not 1 <= self.sink_connections <= 1024:
            raise UsageError(f"--sink-connections must be 1 to 1024, got {self.sink_connections!r} (keep it below "
                             "the receiver's --max-client-connections, 256 by default)")
        if not isinstance(self.run_deadline_s, (int, float)) or not 60 <= self.run_deadline_s <= 30 * 86_400:
            raise UsageError(f"--run-deadline must be 60 to 2592000 seconds, got {self.run_deadline_s!r}")
        return self


class _Slots:
    """The server's workers as slots a stage event waits for: new runs' calls first (a resumed run's only
    when none of those waits), in arrival order within each. On the server's event loop only."""

    def __init__(self, n: int):
        self.free = n
        self._waiting: tuple[deque, deque] = (deque(), deque())  # new runs', resumed runs'

    async def acquire(self, resumed: bool) -> None:
        if self.free > 0 and not any(self._waiting):
            self.free -= 1
            return
        future = asyncio.get_running_loop().create_future()
        self._waiting[resumed].append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # handed a slot just as the request went away: pass it on
            else:
                self._waiting[resumed].remove(future)
            raise

    def release(self) -> None:
        for queue in self._waiting:
            while queue:
                future = queue.popleft()
                if not future.done():
                    future.set_result(None)
                    return
        self.free += 1


class _Replays:
    """One replay of a run's driver at a time on this server; calls finishing meanwhile share the next."""

    def __init__(self):
        self.waiting: list[asyncio.Future] = []
        self.after: set[str] = set()
        self.running = False


class ChoreographyService:
    """The choreography side of one ``mlwf serve`` app (``app``: :class:`mlwf.backends.knative.server.app.App`)."""

    def __init__(self, app, config: ChoreographyConfig):
        from mlwf.backends.knative.server.auth import ReplayLedger

        self.app = app
        self.config = config
        self.owner = owner = f"{app.source}:{os.getpid()}:{secrets.token_hex(4)}"
        self.dispatcher = Dispatcher(config.sinks, app.config.secret, app.source, self._undeliverable,
                                     retries=config.delivery_retries, connections=config.sink_connections)
        self._active: Counter[tuple[str, str]] = Counter()  # runs with stage events being handled here
        self._active_lock = threading.Lock()
        self.steps = Choreographer(app.store, app.config.store, owner, self.dispatcher.send, lease_s=config.lease_s,
                                   event_window_s=app.config.max_age + events.MAX_FUTURE_SKEW,
                                   run_deadline_s=config.run_deadline_s, in_hand=self._in_hand,
                                   held=self.dispatcher.take_held, pending=self.dispatcher.pending)
        self.dead_letters = ReplayLedger(app.store, DEAD_LETTER_MAX_AGE, source=owner, prefix=DEAD_LETTER_LEDGER)
        self._dead_cleaned_at = 0.0
        # Store bookkeeping and replays, off the event loop and never behind long stage calls.
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="mlwf-choreo")
        self.slots = _Slots(app.config.workers or app.threads)
        self._replays: dict[tuple[str, str], _Replays] = {}
        self._due: dict[tuple[str, str], set[str]] = {}  # calls recorded here since the run's last replay
        self._stop = threading.Event()
        self._resumer: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the keeper (claims and run leases) and the resumer (stale runs, in the background)."""
        self.steps.start_keeper()
        self._resumer = threading.Thread(target=self._resume_loop, name="mlwf-resume", daemon=True)
        self._resumer.start()

    def _resume_loop(self) -> None:
        everything = True
        while True:
            try:
                looked, resumed = self.steps.resume(everything=everything)
                if everything and looked:
                    log.info("found %d running choreographed runs: resuming the stale ones, %d at a time, "
                             "after new runs", looked, RESUME_AT_ONCE)
                if everything:
                    records.clean_refusals(self.app.store)
                # More stale runs wait: look again once these had time to go (a third of a claim lease).
                pause = self.config.lease_s / 3 if resumed else self.config.lease_s
            except MlwfError as e:
                log.warning("could not look for runs to resume: %s", one_line(e))
                pause = self.config.lease_s
            except Exception:  # noqa: BLE001 - keep resuming; say what went wrong
                log.exception("resuming runs failed")
                pause = self.config.lease_s
            everything = False
            if self._stop.wait(pause):
                return

    def close(self, wait_s: float = DRAIN_DELIVERIES_S) -> None:
        """Stop; events still being delivered get ``wait_s`` seconds (a restarted server resumes the rest)."""
        self._stop.set()
        self.pool.shutdown(wait=True)
        deadline = time.monotonic() + wait_s
        while self.dispatcher.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.dispatcher.in_flight():
            log.warning("exiting with %d events not yet delivered: the runs' next start-up of a server resumes them",
                        self.dispatcher.in_flight())
        self.steps.close()
        self.dispatcher.close()

    def _in_hand(self) -> set[tuple[str, str]]:
        with self._active_lock:
            active = set(self._active)
        return active | self.dispatcher.runs()

    def _enter(self, run: tuple[str, str]) -> None:
        with self._active_lock:
            self._active[run] += 1

    def _leave(self, run: tuple[str, str]) -> bool:
        """One event of ``run`` is done here; whether it was the last."""
        with self._active_lock:
            self._active[run] -= 1
            if self._active[run] > 0:
                return False
            del self._active[run]
            return True

    # ---------------------------------------------------------------- requests
    async def handle(self, event, kind: str):
        """Answer one choreographed event (``kind`` ``start`` or ``event``)."""
        from mlwf.httpserver import Refusal

        if kind == "start":
            return await self._start(event)
        if kind == "event":
            return await self._event(event)
        raise Refusal(400, f"unknown {events.KIND_ATTR} {str(kind)[:40]!r}: expected 'start' or 'event'")

    async def _blocking(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    def _parse_start(self, event, max_age: int | None = None) -> tuple[str, str, dict, RunContext]:
        """``(workflow, run id, data, context)`` of a signed start event; else Refusal."""
        from mlwf.httpserver import Refusal

        parsed = events.parse_type(event.get_type())
        data = event.get_data()
        if parsed is None or parsed[1] != "start":
            raise Refusal(400, "a start event's type must be dev.mlwf.<workflow>.start")
        workflow = parsed[0]
        if not isinstance(data, dict) or not isinstance(data.get("context"), dict) \
                or not isinstance(data.get("run_id"), str) or not isinstance(data.get("invocation"), dict):
            raise Refusal(400, "a start event's data must be {\"run_id\", \"invocation\", \"context\", \"started_at\"}")
        run_id = data["run_id"]
        self.app._authenticate(event, "start", workflow, "start", run_id, data, max_age=max_age)
        try:
            ctx = RunContext(**data["context"])
        except TypeError as e:
            raise Refusal(400, f"malformed context: {one_line(e)}") from None
        if ctx.workflow != workflow or ctx.run_id != run_id:
            raise Refusal(400, "the start event's context names another run or workflow")
        return workflow, run_id, data, self.app._check_store(ctx)

    async def _start(self, event):
        from starlette.responses import JSONResponse

        from mlwf.httpserver import Refusal

        workflow, run_id, data, ctx = self._parse_start(event)
        served = self.app.config.stages
        if served is not None and not any(w == workflow for w, _ in served):
            raise Refusal(404, f"this server serves no stage of {workflow} (--stages)")
        try:
            await self._blocking(self.steps.start, workflow, run_id, data["invocation"],
                                 _start_time(data.get("started_at"), self.app.config.max_age))
        except MlwfError as e:
            if retryable(e):
                raise  # the store failing: 500, retryable
            raise Refusal(400, one_line(e), type=type(e).__name__) from None
        return JSONResponse({"run_id": run_id, "workflow": workflow, "status": "started"}, status_code=202)

    async def _event(self, event):
        from starlette.responses import JSONResponse

        call, ctx, data = self.app._parse(event)
        self.app._authenticate(event, "event", call.workflow, call.stage, ctx.run_id, data)
        self.app._route(call)
        ctx = self.app._check_store(ctx)
        run = (ctx.workflow, ctx.run_id)
        self._enter(run)  # the keeper renews the run's lease while this event is here
        verdict, result, step = None, None, False
        try:
            checked = await self._blocking(self.steps.check_run, call, ctx)
            if checked.action != "run":
                return self._skipped(call, ctx, checked)
            await self.slots.acquire(checked.resumed)  # the claim is taken only once a worker is free
            try:
                verdict = await self._blocking(self.steps.claim, call, ctx, checked)
                result = await self._run_claimed(event, call, ctx, verdict) if verdict.action == "run" else None
            finally:
                self.slots.release()
            if verdict.action != "run":
                step = verdict.action == "done"  # its last holder may not have taken the next step
                return self._skipped(call, ctx, verdict)
            if isinstance(result, JSONResponse):
                return result
            step = True
        finally:
            try:
                await self._next_step(ctx, call.name, step)
            except BaseException:
                if verdict is not None and verdict.claim is not None and step:
                    # Handed back, the redelivery this failure causes finds the call done, and takes the step.
                    await self._blocking(self.steps.claims.release, verdict.claim)
                raise
        if result is not None:
            log.info("run=%s call=%s/%s discarded: its claim (generation %s) was taken over, and %s recorded it "
                     "first", ctx.run_id, call.workflow, call.name, verdict.claim.doc["generation"],
                     result.get("owner"))
            return JSONResponse({"status": "skipped", "detail": "recorded by another claim"})
        log.info("run=%s call=%s/%s ran", ctx.run_id, call.workflow, call.name)
        return JSONResponse({"status": "done", "detail": call.name})

    async def _run_claimed(self, event, call, ctx, verdict: Verdict):
        """Run a claimed call (with the server's own retries) and commit it: None if its run is the one
        recorded, the other claim if not, or the answer for a failure."""
        from starlette.responses import JSONResponse

        self.app.in_flight += 1
        try:
            attempt = 0
            while True:
                try:
                    outcome = await self.app._run(call, ctx)
                    break
                except Exception as e:  # the stage (or its worker) failed
                    again = retryable(e)
                    if again and attempt < self.config.stage_retries:
                        attempt += 1
                        await asyncio.sleep(min(0.05 * 2 ** attempt, 2.0))
                        continue
                    await self._blocking(self.steps.failed, call, ctx, verdict.claim, e, retryable=again,
                                         event_id=event.get_id())
                    log.info("run=%s call=%s/%s failed: %s", ctx.run_id, call.workflow, call.name, one_line(e))
                    if again:
                        raise  # 500, retryable: the delivery tries again
                    return JSONResponse({"status": "failed", "detail": one_line(e)})
            try:
                return await self._blocking(self.steps.record_done, call, ctx, outcome, verdict.claim)
            except BaseException:
                await self._blocking(self.steps.claims.release, verdict.claim)
                raise
        finally:
            self.app.in_flight -= 1

    def _skipped(self, call, ctx, verdict: Verdict):
        from starlette.responses import JSONResponse

        log.info("run=%s call=%s/%s skipped: %s", ctx.run_id, call.workflow, call.name, verdict.detail)
        return JSONResponse({"status": "skipped", "detail": verdict.detail})

    async def _next_step(self, ctx: RunContext, name: str, recorded: bool) -> None:
        """An event of the run leaves: if it was the last one here, and calls were recorded here since the
        last replay (``recorded``: this one), replay the driver to take the run's next step.

        Why only the last. A batch cannot be complete while another event of
        the run is here: that event's call is not recorded yet (or, if it is
        a duplicate of a done one, it finds it done and asks for the step
        itself), and when it leaves, its own replay, which starts after every
        call recorded here, sees them all. So a server busy with a
        1,000-way batch replays the driver when its work of the run runs out,
        not once per call; each server does so once its part is done, and the
        one whose replay sees the batch complete emits the next (the batch
        marker decides if two do).
        """
        run = (ctx.workflow, ctx.run_id)
        if recorded:
            self._due.setdefault(run, set()).add(name)
        if not self._leave(run):
            return  # the last event of this run here will take the step
        due = self._due.pop(run, None)
        if due:
            await self._advance(run, due)

    async def _advance(self, key: tuple[str, str], after: set[str]) -> None:
        """Take the run's next step once ``after`` are recorded: one replay at a time per run here; calls
        recorded while one runs share the next (which starts after their done records were written)."""
        state = self._replays.get(key)
        if state is None:
            state = self._replays[key] = _Replays()
        future = asyncio.get_running_loop().create_future()
        state.waiting.append(future)
        state.after |= after
        if not state.running:
            state.running = True
            asyncio.get_running_loop().create_task(self._replay_loop(key, state))
        await asyncio.shield(future)

    async def _replay_loop(self, key: tuple[str, str], state: _Replays) -> None:
        loop = asyncio.get_running_loop()
        started = 0.0
        try:
            while state.waiting:
                # Back-to-back replays of one run start REPLAY_EVERY_S apart: while a batch's calls finish
                # one after another, each replay then serves several of them (bounded CPU per run).
                await asyncio.sleep(max(0.0, started + REPLAY_EVERY_S - loop.time()))
                started = loop.time()
                waiting, state.waiting = state.waiting, []
                after, state.after = state.after, set()
                try:
                    await self._blocking(self.steps.advance, *key, after=after)
                except Exception as e:  # noqa: BLE001 - each waiting event answers it (500: retried)
                    for future in waiting:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for future in waiting:
                    if not future.done():
                        future.set_result(None)
        finally:
            state.running = False
            if self._replays.get(key) is state and not state.waiting:
                del self._replays[key]

    # ---------------------------------------------------------------- dead letters
    async def dead_letter(self, event):
        """An event a delivery gave up on: its run ends ``failed`` if the failure is verified (see the module)."""
        from starlette.responses import JSONResponse

        from mlwf.httpserver import Refusal

        kind = event.get_extension(events.KIND_ATTR)
        attributes = dict(event.get_attributes())
        if kind == "start":
            workflow, run_id, data, ctx = self._parse_start(event, max_age=DEAD_LETTER_MAX_AGE)
            stage, name = "start", "start"
        elif kind == "event":
            call, ctx, data = self.app._parse(event)
            self.app._authenticate(event, "event", call.workflow, call.stage, ctx.run_id, data,
                                   max_age=DEAD_LETTER_MAX_AGE)
            ctx = self.app._check_store(ctx)
            workflow, run_id, stage, name = call.workflow, ctx.run_id, call.stage, call.name
        else:
            raise Refusal(400, "only choreographed start and stage events are taken as dead letters")
        signed = attributes.get(events.DEAD_SIGNATURE_ATTR)
        if signed is not None:
            if self.app.config.secret is None or not events.verify_dead_letter(
                    self.app.config.secret, str(signed), kind, workflow, stage, run_id, attributes, data):
                raise Refusal(401, f"bad {events.DEAD_SIGNATURE_ATTR}: the dead letter was altered (its error "
                                   "attributes included), or signed with another MLWF_FUNCTION_SECRET")
        found = await self._blocking(records.read_json, self.app.store, records.record_key(workflow, run_id))
        record = None if found is None else found[0]
        if signed is not None:
            reason = f"{workflow} {'start' if kind == 'start' else 'stage ' + name}: {_knative_error(event)}"
        elif kind == "start":
            refusal = await self._blocking(records.read_refusal, self.app.store, workflow, run_id)
            if refusal is None:
                raise self._unverified(event, workflow, run_id, name, record is None,
                                       "no server refused this start (nothing in the store says its delivery failed)")
            reason = f"{workflow} start: refused: {refusal['error']}"
        else:
            if record is None:
                raise Refusal(404, f"unknown run {run_id} of {workflow} in this server's store: nothing to fail")
            problem, failure = await self._blocking(self._failure_of, call, ctx, event.get_id())
            if problem:
                raise self._unverified(event, workflow, run_id, name, False, problem)
            reason = f"{workflow} stage {name}: not delivered: {failure['error']}"
        if record is None and kind != "start":
            raise Refusal(404, f"unknown run {run_id} of {workflow} in this server's store: nothing to fail")
        await self._claim_dead_letter(event)
        if kind == "start":
            await self._blocking(self.steps.fail_start, workflow, run_id, reason)
            ended = True
        else:
            ended = await self._blocking(self.steps.fail_run, workflow, run_id, name, reason)
        log.info("run=%s dead letter for %s/%s (%s): %s", run_id, workflow, name,
                 "signed" if signed is not None else "checked in the store", "run ended failed" if ended
                 else "the run had ended already")
        return JSONResponse({"status": "failed" if ended else "ended", "run_id": run_id, "detail": reason})

    def _failure_of(self, call, ctx, event_id: str) -> tuple[str | None, dict | None]:
        """Whether the store proves that this event's delivery failed: (problem, failure record)."""
        layout = RunLayout(ctx.workflow, ctx.run_id)
        name = f"{call.stage}-{call.index}"
        failure = records.read_failure(self.app.store, layout, name)
        if failure is None or failure.get("event") != event_id or not isinstance(failure.get("error"), str):
            return "no server noted a failed delivery of this event", None
        if self.steps.is_done(call, ctx):
            return "the call is done", None
        found = records.read_json(self.app.store, layout.claim(name))
        if found is not None and records.live(found[0], self.steps.claims.clock()):
            return "the call is running on a server", None
        return None, failure

    def _unverified(self, event, workflow, run_id, name, unknown: bool, why: str):
        from mlwf.httpserver import Refusal

        # Knative's words are shown to the operator here, never stored in a run.
        log.warning("run=%s dead letter for %s/%s not acted on (%s); it says: %s", run_id, workflow, name, why,
                    _knative_error(event)[:300])
        if unknown:
            return Refusal(404, f"unknown run {run_id} of {workflow} in this server's store, and {why}")
        return Refusal(409, f"cannot verify that the delivery of {workflow}/{name} of run {run_id} failed: {why}; "
                            "the run is left as it is (its stale events are sent again by a resumer)")

    async def _claim_dead_letter(self, event) -> None:
        """Record the dead letter's event id (403 if acted on before); old records are cleaned now and then."""
        loop = asyncio.get_running_loop()
        stamp = str(event.get_extension(events.TIME_ATTR) or events.now_stamp())
        await loop.run_in_executor(self.pool, self.dead_letters.claim, event.get_id(), stamp)
        if time.monotonic() - self._dead_cleaned_at > 600:
            self._dead_cleaned_at = time.monotonic()
            loop.run_in_executor(self.pool, _quietly, self.dead_letters.clean)

    def _undeliverable(self, call, ctx, reason: str) -> None:
        self.steps.fail_run(ctx.workflow, ctx.run_id, call.name, f"{call.workflow} stage {call.name} {reason}")


def _quietly(fn) -> None:
    try:
        fn()
    except MlwfError as e:
        log.warning("could not delete old dead-letter records (will retry): %s", one_line(e))


def _start_time(value, max_age: int) -> str:
    """When the run started: the start event's ``started_at`` if it is a time within ``max_age`` of now."""
    import datetime as _dt

    from mlwf.runs import now_utc, timestamp

    now = now_utc()
    try:
        given = _dt.datetime.fromisoformat(value) if isinstance(value, str) and len(value) < 64 else None
    except ValueError:
        given = None
    if given is None or given.tzinfo is None or abs((now - given).total_seconds()) > max_age:
        return timestamp(now)
    return timestamp(given)


def _knative_error(event) -> str:
    """What a dead letter's error attributes say: where it gave up, the last status, the answer's error."""
    import json

    code = event.get_extension("knativeerrorcode")
    data = event.get_extension("knativeerrordata")
    try:
        detail = base64.b64decode(str(data), validate=True).decode("utf-8", "replace") if data else ""
    except ValueError:
        detail = str(data)
    try:  # an mlwf server's answer: {"error": ..., "type": ...}
        body = json.loads(detail)
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            detail = body["error"]
    except ValueError:
        pass
    where = str(event.get_extension("knativeerrordest") or "its sink")[:200]
    return (f"not delivered to {where}" + (f" (last answer {str(code)[:10]})" if code else "")
            + (f": {one_line(detail)}" if detail else ""))
