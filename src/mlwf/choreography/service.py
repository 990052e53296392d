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
* ``400`` for a start whose parameters the driver refuses (nothing written),
  and the refusals of :mod:`mlwf.backends.knative.server` for anything malformed or forged;
* ``500`` (retryable) when the call failed after the server's own
  ``--retries``: the delivery retries it, and when the deliveries are
  exhausted the run ends ``failed`` with the last error.

Choreographed events skip the per-event-id replay ledger that driver calls
use: a redelivery of the same event after a crash must run, and running an
event twice cannot do anything twice, since a call recorded as done or
claimed by a live server is skipped (:mod:`mlwf.choreography.records`).

``POST /dead-letter`` takes the events a Knative delivery gave up on (its
``deadLetterSink``): the run of each ends ``failed`` with Knative's error
code and data.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mlwf.choreography.sinks import DEFAULT_DELIVERY_RETRIES, Dispatcher, Sinks
from mlwf.choreography.steps import Choreographer
from mlwf.backends.knative import events
from mlwf.engine.calls import RunContext
from mlwf.errors import MlwfError, UsageError, one_line, retryable

log = logging.getLogger("mlwf.choreography")

DEFAULT_LEASE_S = 30.0
DEFAULT_STAGE_RETRIES = 2
#: On SIGTERM, how long events still being delivered may take before the server exits.
DRAIN_DELIVERIES_S = 10.0
#: Dead-lettered events may have waited through a whole delivery schedule: accepted this old.
DEAD_LETTER_MAX_AGE = 86_400


@dataclass(frozen=True)
class ChoreographyConfig:
    """A server's choreography settings (``mlwf serve --sink ...``)."""

    sinks: Sinks
    delivery_retries: int = DEFAULT_DELIVERY_RETRIES
    lease_s: float = DEFAULT_LEASE_S
    stage_retries: int = DEFAULT_STAGE_RETRIES

    def check(self) -> ChoreographyConfig:
        if isinstance(self.delivery_retries, bool) or not isinstance(self.delivery_retries, int) \
                or not 0 <= self.delivery_retries <= 100:
            raise UsageError(f"--delivery-retries must be 0 to 100, got {self.delivery_retries!r}")
        if isinstance(self.stage_retries, bool) or not isinstance(self.stage_retries, int) \
                or not 0 <= self.stage_retries <= 100:
            raise UsageError(f"--retries must be 0 to 100, got {self.stage_retries!r}")
        if not isinstance(self.lease_s, (int, float)) or not 1 <= self.lease_s <= 86_400:
            raise UsageError(f"--claim-lease must be 1 to 86400 seconds, got {self.lease_s!r}")
        return self


class ChoreographyService:
    """The choreography side of one ``mlwf serve`` app (``app``: :class:`mlwf.backends.knative.server.app.App`)."""

    def __init__(self, app, config: ChoreographyConfig):
        self.app = app
        self.config = config
        owner = f"{app.source}:{os.getpid()}:{secrets.token_hex(4)}"
        self.dispatcher = Dispatcher(config.sinks, app.config.secret, app.source, self._undeliverable,
                                     retries=config.delivery_retries)
        self.steps = Choreographer(app.store, app.config.store, owner, self.dispatcher.send, lease_s=config.lease_s)
        # Store bookkeeping and replays, off the event loop and never behind long stage calls.
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mlwf-choreo")
        self._stop = threading.Event()
        self._resumer: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Resume the store's running runs now, and the runs seen here every lease, in the background."""
        self._resumer = threading.Thread(target=self._resume_loop, name="mlwf-resume", daemon=True)
        self._resumer.start()

    def _resume_loop(self) -> None:
        everything = True
        while True:
            try:
                n = self.steps.resume(everything=everything)
                if everything and n:
                    log.info("resumed %d running choreographed runs", n)
            except MlwfError as e:
                log.warning("could not look for runs to resume: %s", one_line(e))
            except Exception:  # noqa: BLE001 - keep resuming; say what went wrong
                log.exception("resuming runs failed")
            everything = False
            if self._stop.wait(self.config.lease_s):
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
        verdict = await self._blocking(self.steps.before_call, call, ctx)
        if verdict.action != "run":
            log.info("run=%s call=%s/%s skipped: %s", ctx.run_id, call.workflow, call.name, verdict.detail)
            return JSONResponse({"status": "skipped", "detail": verdict.detail})
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
                    await self._blocking(self.steps.failed, call, ctx, verdict.claim, e, retryable=again)
                    log.info("run=%s call=%s/%s failed: %s", ctx.run_id, call.workflow, call.name, one_line(e))
                    if again:
                        raise  # 500, retryable: the delivery tries again
                    return JSONResponse({"status": "failed", "detail": one_line(e)})
            try:
                await self._blocking(self.steps.after_call, call, ctx, outcome, verdict)
            except BaseException:
                self.steps.claims.release(verdict.claim)
                raise
        finally:
            self.app.in_flight -= 1
        log.info("run=%s call=%s/%s ran", ctx.run_id, call.workflow, call.name)
        return JSONResponse({"status": "done", "detail": call.name})

    async def dead_letter(self, event):
        """An event a Knative delivery gave up on: its run ends ``failed`` (a start that never
        started: its run is recorded ``failed``, so ``mlwf invoke --wait`` says why)."""
        from starlette.responses import JSONResponse

        from mlwf.httpserver import Refusal

        kind = event.get_extension(events.KIND_ATTR)
        if kind == "start":
            workflow, run_id, _, ctx = self._parse_start(event, max_age=DEAD_LETTER_MAX_AGE)
            reason = f"{workflow} start: {_knative_error(event)}"
            await self._blocking(self.steps.fail_start, workflow, run_id, reason)
            return JSONResponse({"status": "failed", "run_id": run_id, "detail": reason})
        if kind != "event":
            raise Refusal(400, "only choreographed start and stage events are taken as dead letters")
        call, ctx, data = self.app._parse(event)
        self.app._authenticate(event, "event", call.workflow, call.stage, ctx.run_id, data,
                               max_age=DEAD_LETTER_MAX_AGE)
        ctx = self.app._check_store(ctx)
        reason = f"{call.workflow} stage {call.name}: {_knative_error(event)}"
        await self._blocking(self.steps.fail_run, ctx.workflow, ctx.run_id, call.name, reason)
        return JSONResponse({"status": "failed", "run_id": ctx.run_id, "detail": reason})

    def _undeliverable(self, call, ctx, reason: str) -> None:
        self.steps.fail_run(ctx.workflow, ctx.run_id, call.name, f"{call.workflow} stage {call.name} {reason}")


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
    """What Knative's dead-letter attributes say: where it gave up, the last status, the answer's error."""
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


