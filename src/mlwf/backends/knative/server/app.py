"""The ASGI app of ``mlwf serve``: probes, and ``POST /`` checking, running and answering one call.

The rules it applies (and the refusals) are described in :mod:`mlwf.backends.knative.server`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mlwf import budget
from mlwf.backends.knative import events, frames
from mlwf.backends.knative.server.auth import REPLAY_SLOT_S, ReplayGuard, ReplayLedger, check_signature
from mlwf.engine.layout import RunLayout
from mlwf.errors import MlwfError, UsageError, WorkerLost, one_line, retryable
from mlwf.httpserver import Refusal, budget_refusal, guarded_lifespan, json_cost, read_body
from mlwf.settings import Settings
from mlwf.storage import StoreSpec

log = logging.getLogger("mlwf.serve")

DEFAULT_PORT = 8080
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB
#: The most --workers (each worker process holds the stage code, about 100 MB).
MAX_WORKERS = 1024
DEFAULT_GRACE = 300.0  # Knative's default revision timeout: a call may take that long
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_REQUEST_TIMEOUT = 10.0
#: The largest call index a request may name (a stage's calls are numbered from 0).
MAX_CALL_INDEX = (1 << 31) - 1
_SAFE = re.compile(r"[^A-Za-z0-9._:/\[\]=-]")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class ServeConfig:
    store: StoreSpec  # the one store this server acts on (canonical)
    stages: frozenset[tuple[str, str]] | None = None  # None: every stage
    secret: str | None = None  # None only with insecure=True
    insecure: bool = False
    max_body: int = DEFAULT_MAX_BODY
    max_age: int = events.DEFAULT_MAX_AGE
    threads: int | None = None
    workers: int = 0  # > 0: run calls in that many worker processes instead of threads
    limits: Any = None  # mlwf.httpguard.Limits (None: its defaults)
    settings: Settings | None = None  # this process's (None: resolved from its environment)
    choreography: Any = None  # mlwf.choreography.service.ChoreographyConfig: emit successors' events (--sink)


def _clean(value: Any, n: int = 80) -> str:
    return _SAFE.sub("?", str(value))[:n] if value not in (None, "") else "-"


class App:
    """The ASGI application and its state (readiness, replay cache, worker threads)."""

    def __init__(self, config: ServeConfig):
        from starlette.applications import Starlette
        from starlette.routing import Route

        from mlwf.httpguard import ConnectionGuard, Limits

        self.config = config
        self.ready = False
        self.draining = False
        self.in_flight = 0  # requests waiting for their call
        self.running = 0  # calls running in a thread or process (may outlive a cancelled request)
        self._lock = threading.Lock()
        self.guard = ConnectionGuard(config.limits or Limits())
        self.settings = config.settings or Settings.resolve()
        self.store = config.store.open(self.settings)
        self.source = f"/mlwf/serve/{socket.gethostname()}"
        self.replays = ReplayGuard(config.max_age + events.MAX_FUTURE_SKEW)
        self.ledger = ReplayLedger(self.store, config.max_age, source=f"{self.source}:{os.getpid()}")
        self._cleaned_at = 0.0
        # Store bookkeeping (replay records) never waits behind long stage calls.
        self.bookkeeping = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mlwf-ledger")
        self.threads = threads = config.threads or min(32, (os.cpu_count() or 1) + 4)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mlwf-stage")
        self.processes = None
        if config.workers:
            # CPU-bound calls in pure Python hold the GIL; worker processes (the
            # local backend's forkserver pool) run them truly in parallel.
            from mlwf.backends.local import LocalBackend, LocalConfig

            self.processes = LocalBackend(LocalConfig(config.workers), self.settings)
            self.processes.warm_up()
        self.choreography = None
        if config.choreography is not None:
            from mlwf.choreography.service import ChoreographyService

            self.choreography = ChoreographyService(self, config.choreography)

        lifespan = guarded_lifespan(self, self._start_choreography if self.choreography is not None else None)

        self.asgi = Starlette(routes=[Route("/healthz", self.healthz, methods=["GET"]),
                                      Route("/readyz", self.readyz, methods=["GET"]),
                                      Route("/", self.invoke, methods=["POST"]),
                                      Route("/dead-letter", self.invoke, methods=["POST"])],
                              lifespan=lifespan)

    async def _start_choreography(self) -> None:
        self.choreography.start()  # its threads run on; the lifespan only starts them

    # ------------------------------------------------------------------ probes
    async def healthz(self, request):
        from starlette.responses import JSONResponse

        # The body limit, so that a driver refuses a --transfer payload call over it before sending it.
        return JSONResponse({"status": "ok", "max_body": self.config.max_body})

    async def readyz(self, request):
        from starlette.responses import JSONResponse

        if self.ready and not self.draining:
            return JSONResponse({"status": "ready", "in_flight": self.in_flight})
        return JSONResponse({"status": "draining" if self.draining else "starting"}, status_code=503)

    # ------------------------------------------------------------------ calls
    async def invoke(self, request):
        from starlette.requests import ClientDisconnect
        from starlette.responses import JSONResponse, Response

        t0 = time.perf_counter()
        event_id, etype, status = "-", "-", 500
        # What this request makes the process hold (its body, the parsed event) is taken from the one
        # budget before it is made, and given back when the request ends.
        reservation = budget.MEMORY.reserve(0, "this request")
        try:
            if self.draining:
                raise Refusal(503, "shutting down: retry on another instance", retryable=True)
            body = await read_body(request, self.config.max_body, reservation)
            structured = events.is_structured(request.headers)
            # A --transfer payload call in binary mode: its JSON, then its inputs' bytes (frames).
            framed = not structured and frames.is_frames(request.headers.get("content-type"))
            rest = None
            try:
                head, rest = frames.split_body(body) if framed else (body, None)
                # The SDK decodes and parses the JSON; the signature check writes the data again as
                # canonical JSON, where \uXXXX escapes make up to 3 bytes a byte (6 with its encoding).
                # A framed call's inputs are copied once out of the body, each checked against its digest.
                reservation.grow(json_cost(head) + 6 * len(head) + (len(rest) if framed else 0),
                                 "the JSON of this event" + (" and its inline inputs" if framed else ""))
            except budget.BudgetExceeded as e:
                raise budget_refusal(e) from None
            except frames.FrameError as e:
                raise Refusal(400, f"not a framed call ({frames.FRAMES_TYPE}): {one_line(e)}") from None
            try:
                event = (frames.event_from_http if framed else events.from_http)(request.headers, head)
            except Exception as e:  # the SDK raises several kinds for malformed input
                raise Refusal(400, f"not a CloudEvents 1.0 request: {one_line(e)}") from None
            event_id, etype = event.get_id(), event.get_type()
            kind = event.get_extension(events.KIND_ATTR)
            if framed and (kind is not None or request.url.path == "/dead-letter"):
                raise Refusal(400, f"a choreographed event carries no inline state: send it as JSON, not "
                                   f"{frames.FRAMES_TYPE}")
            if kind is not None or request.url.path == "/dead-letter":
                # Choreographed: a start or stage event whose server emits what comes next.
                if self.choreography is None:
                    raise Refusal(404, "this server takes no choreographed events: start it with --sink URL "
                                       "(or K_SINK)")
                if request.url.path == "/dead-letter":
                    response = await self.choreography.dead_letter(event)
                else:
                    response = await self.choreography.handle(event, str(kind))
                status = response.status_code
                return response
            call, ctx, data = self._parse(event)
            self._authenticate(event, "call", call.workflow, call.stage, ctx.run_id, data)
            self._route(call)
            ctx = self._check_store(ctx)
            if framed:
                try:
                    call = frames.join_call(call, rest)
                except frames.FrameError as e:
                    raise Refusal(400, f"the call's inline inputs do not match it: {one_line(e)}") from None
                del head, rest, body  # the inputs were copied out: the body is not needed any more
            await self._claim(event)
            self.in_flight += 1
            try:
                outcome = await self._run(call, ctx)
            finally:
                self.in_flight -= 1
            try:
                # The reply holds the outputs a payload call hands back: framed, once more (the joined
                # body); as JSON, in base64 several times over (the text, its parse, the canonical copy).
                inline = frames.inline_bytes(outcome.outputs.values())
                if inline:
                    reservation.grow((2 if framed else 8) * inline, "the outputs in this call's reply")
            except budget.BudgetExceeded as e:
                raise budget_refusal(e) from None
            headers, payload = self._reply(event, call, ctx, outcome, structured, framed)
            status = 200
            return Response(payload, status_code=200, headers=headers)
        except Refusal as r:
            status = r.status
            return JSONResponse({"error": r.error, "retryable": r.retryable, "id": event_id, **r.extra},
                                status_code=r.status)
        except ClientDisconnect:  # gone before its request arrived whole (or closed for --request-timeout)
            status = 499
            return Response(status_code=400)
        except Exception as e:  # the stage (or the runner) raised: report, stay up
            status = 500
            log.warning("event=%s failed: %s: %s", _clean(event_id), type(e).__name__, one_line(e)[:500])
            return JSONResponse({"error": one_line(e), "type": type(e).__name__, "retryable": retryable(e),
                                 "id": event_id}, status_code=500)
        finally:
            reservation.release()
            log.info("event=%s type=%s status=%d ms=%.1f", _clean(event_id), _clean(etype), status,
                     (time.perf_counter() - t0) * 1e3)

    async def _run(self, call, ctx):
        """``runner.execute(call, ctx)`` off the event loop: in a worker thread, or a worker process."""
        future = self.pool.submit(_execute, call, ctx, self.settings) if self.processes is None else self.processes.submit(call, ctx)
        with self._lock:
            self.running += 1

        def done(_):
            with self._lock:
                self.running -= 1

        future.add_done_callback(done)
        try:
            return await asyncio.wrap_future(future)
        except WorkerLost:
            self.processes.cancel_all()
            raise

    async def _claim(self, event) -> None:
        """Refuse a replayed event: this process's memory first, then the record in the store."""
        if self.config.insecure:
            return
        event_id, stamp = event.get_id(), str(event.get_extension(events.TIME_ATTR))
        self.replays.check_and_add(event_id)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.bookkeeping, self.ledger.claim, event_id, stamp)
        if time.monotonic() - self._cleaned_at > REPLAY_SLOT_S:
            self._cleaned_at = time.monotonic()
            loop.run_in_executor(self.bookkeeping, self._clean_ledger)

    def _clean_ledger(self) -> None:
        try:
            n = self.ledger.clean()
        except MlwfError as e:
            log.warning("could not delete old replay records (will retry): %s", one_line(e))
            return
        if n:
            log.info("deleted %d expired replay records", n)

    def _check_store(self, ctx):
        """``ctx`` if it names this server's store and bucket and writes only under its run; else Refusal."""
        own = self.config.store
        if ctx.transfer not in ("store", "payload"):
            raise Refusal(400, f"context.transfer {_clean(ctx.transfer)!r} is neither 'store' nor 'payload': "
                               "mlwf serve hands outputs on through its store or inline in its reply")
        if not _RUN_ID.fullmatch(ctx.run_id) or ctx.outputs_prefix != RunLayout(ctx.workflow, ctx.run_id).folder:
            raise Refusal(400, "context.run_id must be a run id (letters, digits, '.', '_', '-') and "
                               "context.outputs_prefix exactly <workflow>/outputs/<run_id>: a call writes only "
                               "under its own run")
        try:
            named = StoreSpec(ctx.store_url, ctx.bucket).canonical()
        except (OSError, ValueError):
            named = None
        if named != own:
            raise Refusal(403, f"this server acts only on store {own.url} bucket {own.bucket!r} (mlwf serve "
                               f"--store/--bucket), not on {_clean(ctx.store_url, 200)} bucket "
                               f"{_clean(ctx.bucket)!r}", store=own.url, bucket=own.bucket)
        return dataclasses.replace(ctx, store_url=own.url, bucket=own.bucket)

    def close(self) -> None:
        if self.choreography is not None:
            self.choreography.close()
        self.pool.shutdown(wait=True)
        self.bookkeeping.shutdown(wait=True)
        if self.processes is not None:
            self.processes.close()
        self.store.close()

    def _parse(self, event):
        from mlwf.engine.calls import Call, RunContext

        if len(str(event.get_id())) > 200:
            raise Refusal(400, "event id longer than 200 characters")
        data = event.get_data()
        if not isinstance(data, dict) or not isinstance(data.get("call"), dict) \
                or not isinstance(data.get("context"), dict):
            raise Refusal(400, "data must be a JSON object {\"call\": ..., \"context\": ...}")
        index = data["call"].get("index")
        # A number from the request, checked before anything converts it (int(1e400) raises OverflowError).
        if type(index) is not int or not 0 <= index <= MAX_CALL_INDEX:
            shown = "a huge integer" if type(index) is int and abs(index) >= 10**12 else _clean(index)
            raise Refusal(400, f"call.index must be a whole number 0..{MAX_CALL_INDEX}, got {shown}")
        if not isinstance(data["call"].get("args"), dict):
            raise Refusal(400, "call.args must be a JSON object")
        try:
            call = Call.from_json(data["call"])
            ctx = RunContext(**data["context"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise Refusal(400, f"malformed call or context: {one_line(e)}") from None
        for name in ("run_id", "workflow", "store_url", "bucket", "outputs_prefix", "transfer"):
            if not isinstance(getattr(ctx, name), str):
                raise Refusal(400, f"context.{name} must be a string")
        if not isinstance(call.workflow, str) or not isinstance(call.stage, str):
            raise Refusal(400, "call.workflow and call.stage must be strings")
        parsed = events.parse_type(event.get_type())
        if parsed is None:
            raise Refusal(404, f"unknown event type {_clean(event.get_type())!r}: expected "
                               "dev.mlwf.<workflow>.<stage>")
        if parsed != (call.workflow, call.stage) or ctx.workflow != call.workflow:
            raise Refusal(400, f"event type {_clean(event.get_type())} does not match the call "
                               f"{_clean(call.workflow)}/{_clean(call.stage)} of a {_clean(ctx.workflow)} run")
        return call, ctx, data

    def _authenticate(self, event, kind: str, workflow: str, stage: str, run_id: str, data,
                      max_age: int | None = None) -> None:
        """Check a ``kind`` request's signature (``call``, ``event``, ``start``) and its age; else Refusal."""
        if not self.config.insecure:
            check_signature(event, kind, workflow, stage, run_id, data, secret=self.config.secret,
                            max_age=self.config.max_age if max_age is None else max_age)

    def _route(self, call) -> None:
        from mlwf.workflows import stage_function

        try:
            stage_function(call.workflow, call.stage)
        except UsageError as e:
            raise Refusal(404, str(e)) from None
        if self.config.stages is not None and (call.workflow, call.stage) not in self.config.stages:
            raise Refusal(404, f"this server does not serve {call.workflow}/{call.stage} (--stages): "
                               "check the caller's --endpoint")

    def _reply(self, request_event, call, ctx, outcome, structured: bool, framed: bool = False):
        blobs = None
        if framed:  # as the call came: the outputs' bytes after the JSON
            outcome, blobs = frames.split_outcome(outcome)
        data = events.plain_json(outcome.to_json())
        reply_id = f"{request_event.get_id()}.done"
        stamp = events.now_stamp()
        attrs: dict[str, Any] = {"type": events.event_type(call.workflow, call.stage, done=True),
                                 "source": self.source, "id": reply_id, "datacontenttype": events.JSON_TYPE,
                                 "subject": call.name, events.TIME_ATTR: stamp}
        if self.config.secret is not None:
            attrs[events.SIGNATURE_ATTR] = events.sign(self.config.secret, "done", call.workflow, call.stage,
                                                       ctx.run_id, data, reply_id, stamp)
        event = events.make_event(attrs, data)
        return frames.to_http(event, blobs) if framed else events.to_http(event, structured=structured)


def _execute(call, ctx, settings):
    from mlwf.engine import runner

    return runner.execute(call, ctx, settings)


