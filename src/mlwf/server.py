"""``mlwf serve``: every stage of both workflows as an HTTP CloudEvents function.

One ASGI app (Starlette on uvicorn) that follows the Knative Serving runtime
contract: it listens on ``$PORT`` (default 8080), answers ``GET /healthz``
(alive) and ``GET /readyz`` (ready for calls; 503 while starting or
draining), logs one line per invocation to stdout, and on SIGTERM stops
accepting connections, lets the calls in flight finish (up to ``--grace``
seconds) and exits with status 0.

``POST /`` takes a CloudEvent in binary or structured mode (see
:mod:`mlwf.engine.events`), checks it, and runs the call with
:func:`mlwf.engine.runner.execute` in a worker thread. A server acts on one
store only, the one it was started with (``--store``/``--bucket``, else
``MLWF_STORE``/``MLWF_BUCKET``, as every command), opened with *this*
process's credentials (they never travel with a call): a call naming any
other store or bucket is refused, and a call writes only under its own run's
folder ``<workflow>/outputs/<run id>/``. The reply is a signed CloudEvent
``dev.mlwf.<workflow>.<stage>.done`` in the request's mode, with
``Outcome.to_json()`` as its data.

Choreography. Started with ``--sink`` (or ``K_SINK``), a server also takes
choreographed events, those carrying ``mlwfkind`` (a run's start event, or a
stage event whose server emits what comes next), and ``POST /dead-letter``;
:mod:`mlwf.choreography.service` answers them. They are checked as calls
are, except for the replay ledger below: a choreographed event may be
redelivered after a crash and must then run, and the store's claims and done
records keep it from running anything twice.

Replays. Before a call runs, the server records its event id in that store
with a create-if-absent write (:meth:`~mlwf.storage.Store.put_if_absent`:
S3 ``If-None-Match: *``, a hard link on a directory) at
``.mlwf/serve/seen/<slot>/<sha256 of the id>``, where ``<slot>`` is the signing
time (``mlwftime``, covered by the signature) in whole minutes. The call runs
only if this server's write created the object; an event seen before, by this
process (a fast in-memory check) or by any server sharing the store, also
across restarts, is refused with 403. A record of an event signed at ``t``
lives at least until ``t + --max-age + 60`` s (the 60 s are the clock
difference the servers already tolerate): after that no server accepts the
event anyway. Each server deletes such records from the whole store at most
once a minute, as calls arrive (:meth:`ReplayLedger.clean`). So a captured
event runs at most once on all the servers of one store, provided their
clocks agree within 60 s and they share the same ``--max-age``. If the store
cannot be written, the call is refused with a retryable 503 rather than run
unrecorded.

Connections: every request must arrive whole within ``--request-timeout``
seconds, request heads are at most 16 KiB, and connections are limited in
number, per server and per client address, without ever locking out a health
check (see :mod:`mlwf.httpguard`).

Refusals are an HTTP status and ``{"error": "...", "retryable": bool}``; the
server stays up and nothing runs:

====  ==========================================================
400   not a CloudEvent, not JSON, or not ``{call, context}``
400   also: a context that writes outside its run's folder, or a transfer
      other than ``store``
401   no signature, or a signature that does not match
403   signing time too old/too far ahead; an event id seen before (here or
      by a server sharing the store); a store or bucket other than this
      server's (the JSON then also has ``store`` and ``bucket``: this
      server's)
404   unknown workflow or stage, or one this server does not serve
408   the request did not arrive whole within ``--request-timeout``
413   body over ``--max-body`` (counted while reading)
500   the stage raised: ``type`` names the error class; ``retryable`` is
      false for bad input (DataError, ModelError, UsageError,
      NotFoundError), true otherwise
503   too many invocations in the replay window, the replay record could
      not be written, too many connections, or shutting down
====  ==========================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mlwf.engine import events
from mlwf.errors import DataError, ModelError, MlwfError, NotFoundError, UsageError
from mlwf.storage import Store, StoreSpec, join_key

log = logging.getLogger("mlwf.serve")

DEFAULT_PORT = 8080
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB
#: The largest --max-body: every body is held in memory while it is checked.
MAX_BODY_LIMIT = 64 << 20
#: The most --workers (each worker process holds the stage code, about 100 MB).
MAX_WORKERS = 1024
DEFAULT_GRACE = 300.0  # Knative's default revision timeout: a call may take that long
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_REQUEST_TIMEOUT = 10.0
#: Event ids remembered at most (a full cache refuses new calls with 503 rather than forget one).
REPLAY_CACHE_MAX = 100_000
#: After a refusal for size, read (and discard) at most this much more so the client sees the 413.
_DRAIN_MAX = 8 << 20
#: Bad input: retrying cannot help.
NOT_RETRYABLE = (DataError, ModelError, UsageError, NotFoundError)
_SAFE = re.compile(r"[^A-Za-z0-9._:/\[\]=-]")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Where servers record the event ids they ran, in the store they serve (see ReplayLedger).
REPLAY_PREFIX = ".mlwf/serve/seen"
#: Width of one folder of replay records, by signing time, in seconds.
REPLAY_SLOT_S = 60


class Refusal(Exception):
    def __init__(self, status: int, error: str, retryable: bool = False, **extra: Any):
        super().__init__(error)
        self.status = status
        self.error = error
        self.retryable = retryable
        self.extra = extra


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
    choreography: Any = None  # mlwf.choreography.service.ChoreographyConfig: emit successors' events (--sink)


def parse_stages(spec: str | None) -> frozenset[tuple[str, str]] | None:
    """``all`` (or empty) → None; else ``WORKFLOW/STAGE`` or ``WORKFLOW`` entries, comma-separated."""
    if not spec or spec.strip() == "all":
        return None
    known = events.known_stages()
    chosen: set[tuple[str, str]] = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        workflow, _, stage = item.partition("/")
        if workflow not in known or (stage and stage not in known[workflow]):
            names = ", ".join(f"{w}/{s}" for w, ss in known.items() for s in ss)
            raise UsageError(f"--stages: unknown stage {item!r}: use 'all', a workflow, or WORKFLOW/STAGE "
                             f"from {names}")
        chosen |= {(workflow, s) for s in ([stage] if stage else known[workflow])}
    if not chosen:
        raise UsageError("--stages is empty: give 'all' or WORKFLOW/STAGE,...")
    return frozenset(chosen)


def parse_size(text: str) -> int:
    """``1048576``, ``512KiB``, ``1MiB``, ``2MB`` → bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B?|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"--max-body {text!r} is not a size: give bytes or e.g. 1MiB")
    n = int(m.group(1))
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "K": 1024, "KB": 1000, "KIB": 1024, "M": 1 << 20, "MB": 10**6, "MIB": 1 << 20,
             "G": 1 << 30, "GB": 10**9, "GIB": 1 << 30}[unit]
    if n * scale < 1024:
        raise UsageError(f"--max-body {text!r} is too small: at least 1KiB")
    if n * scale > MAX_BODY_LIMIT:
        raise UsageError(f"--max-body {text!r} is too large: at most 64MiB (a call carries store keys, not data)")
    return n * scale


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
            raise Refusal(503, "too many invocations within the signature window; retry later", retryable=True)
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

    def __init__(self, store: Store, max_age: int, *, clock=time.time, source: str = "mlwf serve"):
        self.store = store
        self.max_age = max_age
        self.clock = clock
        self.source = source
        self.cleaned_through: int | None = None  # highest slot known to be deleted
        self._lock = threading.Lock()

    @staticmethod
    def key(event_id: str, stamp: str) -> str:
        slot = int(stamp) // REPLAY_SLOT_S
        return f"{REPLAY_PREFIX}/{slot:012d}/{hashlib.sha256(event_id.encode()).hexdigest()}"

    def claim(self, event_id: str, stamp: str) -> None:
        """Record ``event_id`` (signed at ``stamp``); :class:`Refusal` 403 if any server recorded it before.

        Raises :class:`Refusal` 503 (retryable) when the store cannot be written.
        """
        record = json.dumps({"id": event_id, "signed": int(stamp), "server": self.source,
                             "at": round(self.clock(), 3), "nonce": secrets.token_hex(8)}).encode()
        try:
            created = self.store.put_if_absent(self.key(event_id, stamp), record)
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
                old = [o.key for o in self.store.list(REPLAY_PREFIX + "/") if _slot(o.key) <= horizon]
            else:
                old = [o.key for slot in range(done + 1, horizon + 1)
                       for o in self.store.list(f"{REPLAY_PREFIX}/{slot:012d}/")]
            self.store.delete_many(old)
            self.cleaned_through = horizon
            return len(old)


def _slot(key: str) -> int:
    """The slot of a replay record's key; keys that are not records count as current (kept)."""
    parts = key[len(REPLAY_PREFIX) + 1:].split("/")
    return int(parts[0]) if len(parts) == 2 and parts[0].isdigit() else sys.maxsize


def _clean(value: Any, n: int = 80) -> str:
    return _SAFE.sub("?", str(value))[:n] if value not in (None, "") else "-"


async def _read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    length = request.headers.get("content-length")
    too_big = f"body over the limit of {limit} bytes (--max-body): send smaller calls"
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise Refusal(400, "bad Content-Length") from None
        if declared > limit:
            if declared <= limit + _DRAIN_MAX:
                await _drain(request, limit + _DRAIN_MAX)
            raise Refusal(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await _drain(request, limit + _DRAIN_MAX - size)
            raise Refusal(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request, budget: int) -> None:
    """Read and discard what the client is still sending (bounded), so it gets to read our answer."""
    with contextlib.suppress(Exception):
        async for chunk in request.stream():
            budget -= len(chunk)
            if budget <= 0:
                break


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
        self.store = config.store.open()
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
            from mlwf.engine.local import LocalBackend

            self.processes = LocalBackend(config.workers, preload_sklearn=True)
            self.processes.warm_up()
        self.choreography = None
        if config.choreography is not None:
            from mlwf.choreography.service import ChoreographyService

            self.choreography = ChoreographyService(self, config.choreography)

        @contextlib.asynccontextmanager
        async def lifespan(app):
            sweeper = asyncio.create_task(self.guard.run())
            if self.choreography is not None:
                self.choreography.start()
            self.ready = True
            try:
                yield
            finally:
                self.ready = False
                sweeper.cancel()
                self.guard.flush_log()

        self.asgi = Starlette(routes=[Route("/healthz", self.healthz, methods=["GET"]),
                                      Route("/readyz", self.readyz, methods=["GET"]),
                                      Route("/", self.invoke, methods=["POST"]),
                                      Route("/dead-letter", self.invoke, methods=["POST"])],
                              lifespan=lifespan)

    # ------------------------------------------------------------------ probes
    async def healthz(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok"})

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
        try:
            if self.draining:
                raise Refusal(503, "shutting down: retry on another instance", retryable=True)
            body = await _read_body(request, self.config.max_body)
            try:
                event = events.from_http(request.headers, body)
            except Exception as e:  # the SDK raises several kinds for malformed input
                raise Refusal(400, f"not a CloudEvents 1.0 request: {_one_line(e)}") from None
            event_id, etype = event.get_id(), event.get_type()
            kind = event.get_extension(events.KIND_ATTR)
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
            await self._claim(event)
            self.in_flight += 1
            try:
                outcome = await self._run(call, ctx)
            finally:
                self.in_flight -= 1
            headers, payload = self._reply(event, call, ctx, outcome, events.is_structured(request.headers))
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
            log.warning("event=%s failed: %s: %s", _clean(event_id), type(e).__name__, _one_line(e)[:500])
            retryable = not isinstance(e, NOT_RETRYABLE)
            return JSONResponse({"error": _one_line(e), "type": type(e).__name__, "retryable": retryable,
                                 "id": event_id}, status_code=500)
        finally:
            log.info("event=%s type=%s status=%d ms=%.1f", _clean(event_id), _clean(etype), status,
                     (time.perf_counter() - t0) * 1e3)

    async def _run(self, call, ctx):
        """``runner.execute(call, ctx)`` off the event loop: in a worker thread, or a worker process."""
        from concurrent.futures.process import BrokenProcessPool

        future = self.pool.submit(_execute, call, ctx) if self.processes is None else self.processes.submit(call, ctx)
        with self._lock:
            self.running += 1

        def done(_):
            with self._lock:
                self.running -= 1

        future.add_done_callback(done)
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool:
            self.processes.reset()
            raise RuntimeError(f"the worker process running {call.workflow} stage {call.name} died") from None

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
            log.warning("could not delete old replay records (will retry): %s", _one_line(e))
            return
        if n:
            log.info("deleted %d expired replay records", n)

    def _check_store(self, ctx):
        """``ctx`` if it names this server's store and bucket and writes only under its run; else Refusal."""
        own = self.config.store
        if ctx.transfer != "store":
            raise Refusal(400, f"context.transfer {_clean(ctx.transfer)!r} is not 'store': mlwf serve hands "
                               "outputs on through its store only")
        if not _RUN_ID.fullmatch(ctx.run_id) or ctx.outputs_prefix != join_key(ctx.workflow, "outputs", ctx.run_id):
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
        try:
            call = Call.from_json(data["call"])
            ctx = RunContext(**data["context"])
        except (KeyError, TypeError, ValueError) as e:
            raise Refusal(400, f"malformed call or context: {_one_line(e)}") from None
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
        """Check the signature of a ``kind`` request (``call``, ``event``, ``start``) and its age; else Refusal."""
        if self.config.insecure:
            return
        signature = event.get_extension(events.SIGNATURE_ATTR)
        stamp = event.get_extension(events.TIME_ATTR)
        if signature in (None, "") or stamp in (None, ""):
            raise Refusal(401, f"unsigned invocation: {events.SIGNATURE_ATTR} and {events.TIME_ATTR} are required")
        stamp = str(stamp)
        if not stamp.isdigit() or len(stamp) > 12:
            raise Refusal(401, f"{events.TIME_ATTR} must be whole Unix seconds")
        if not events.verify(self.config.secret, str(signature), kind, workflow, stage, run_id,
                             data, event.get_id(), stamp):
            raise Refusal(401, "bad signature: the caller's MLWF_FUNCTION_SECRET differs, or the event was altered")
        limit = self.config.max_age if max_age is None else max_age
        age = time.time() - int(stamp)
        if age > limit:
            raise Refusal(403, f"expired invocation: signed {age:.0f} s ago, over the {limit} s "
                               "window (check the clocks)")
        if age < -events.MAX_FUTURE_SKEW:
            raise Refusal(403, f"invocation signed {-age:.0f} s in the future (check the clocks)")

    def _route(self, call) -> None:
        from mlwf.workflows import stage_function

        try:
            stage_function(call.workflow, call.stage)
        except UsageError as e:
            raise Refusal(404, str(e)) from None
        if self.config.stages is not None and (call.workflow, call.stage) not in self.config.stages:
            raise Refusal(404, f"this server does not serve {call.workflow}/{call.stage} (--stages): "
                               "check the caller's --endpoint")

    def _reply(self, request_event, call, ctx, outcome, structured: bool):
        data = events.plain_json(outcome.to_json())
        reply_id = f"{request_event.get_id()}.done"
        stamp = events.now_stamp()
        attrs: dict[str, Any] = {"type": events.event_type(call.workflow, call.stage, done=True),
                                 "source": self.source, "id": reply_id, "datacontenttype": events.JSON_TYPE,
                                 "subject": call.name, events.TIME_ATTR: stamp}
        if self.config.secret is not None:
            attrs[events.SIGNATURE_ATTR] = events.sign(self.config.secret, "done", call.workflow, call.stage,
                                                       ctx.run_id, data, reply_id, stamp)
        return events.to_http(events.make_event(attrs, data), structured=structured)


def _execute(call, ctx):
    from mlwf.engine import runner

    return runner.execute(call, ctx)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:2000]


# --------------------------------------------------------------------------- running it
def preload() -> None:
    """Import every stage's code now (not at the first call) and pin BLAS to one thread per call."""
    import importlib

    for name in ("mlwf.engine.runner", "mlwf.workflows.training", "mlwf.workflows.inference", "mlwf.model",
                 "mlwf.images", "sklearn.decomposition", "sklearn.ensemble"):
        importlib.import_module(name)
    from threadpoolctl import threadpool_limits

    # Parallelism is the concurrent calls, as in the local backend's workers; one
    # BLAS thread also keeps the model bytes identical to the other backends'.
    threadpool_limits(1)


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per delivered event is the server's own log


def serve(*, host: str = "0.0.0.0", port: int | None = None, stages: str | None = None,
          store: str | None = None, bucket: str | None = None,
          max_body: int = DEFAULT_MAX_BODY, threads: int | None = None, grace: float = DEFAULT_GRACE,
          insecure_no_auth: bool = False, max_age: int = events.DEFAULT_MAX_AGE,
          max_connections: int = DEFAULT_MAX_CONNECTIONS, max_client_connections: int | None = None,
          request_timeout: float = DEFAULT_REQUEST_TIMEOUT, workers: int = 0, sinks: list[str] | None = None,
          dead_letter: str | None = None, delivery_retries: int | None = None, claim_lease: float | None = None,
          retries: int | None = None) -> int:
    """Run the function server until SIGTERM/SIGINT; returns the exit status (0 after a clean drain).

    ``store``/``bucket`` (default ``MLWF_STORE``/``MLWF_BUCKET``, as every
    command) name the one store the server acts on. ``request_timeout``,
    ``max_connections`` and ``max_client_connections`` (default half of
    ``max_connections``) bound connections as :mod:`mlwf.httpguard` describes.
    ``sinks`` (``URL`` or ``STAGE=URL`` entries, default ``$K_SINK``) turn on
    choreography (:mod:`mlwf.choreography`), with ``dead_letter``,
    ``delivery_retries``, ``claim_lease`` and the stage's own ``retries``.

    Raises
    ------
    UsageError
        For a bad setting (port, counts, times, stages, store URL, secret).
    """
    from mlwf.errors import StoreError
    from mlwf.httpguard import Limits

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    try:
        import uvicorn
    except ModuleNotFoundError:
        raise UsageError("mlwf serve needs its server libraries: pip install 'mlwf[knative]'") from None
    if port is None:
        raw = os.environ.get("PORT", str(DEFAULT_PORT))
        try:
            port = int(raw)
        except ValueError:
            raise UsageError(f"PORT={raw!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port number")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    if not 0 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be 0 (threads) to {MAX_WORKERS} processes, got {workers}")
    if threads is not None and threads > MAX_WORKERS:
        raise UsageError(f"--threads must be at most {MAX_WORKERS}, got {threads}")
    if not 0 <= grace < 86_400:
        raise UsageError(f"--grace must be 0 or more seconds (under a day), got {grace}")
    if not 1 <= max_age <= 86_400:
        raise UsageError(f"--max-age must be between 1 and 86400 seconds, got {max_age}")
    limits = Limits(request_timeout=request_timeout, max_connections=max_connections,
                    max_client_connections=(max(1, max_connections // 2) if max_client_connections is None
                                            else max_client_connections))
    choreography = _choreography_config(sinks, dead_letter, delivery_retries, claim_lease, retries)
    spec = StoreSpec.resolve(store, bucket)
    try:
        spec.open().close()  # a bad URL or bucket name fails here, not at the first call
    except StoreError as e:
        raise UsageError(f"mlwf serve --store/--bucket: {e}") from None
    if insecure_no_auth:
        secret = os.environ.get(events.SECRET_ENV, "").strip() or None
    else:
        secret = events.read_secret(who="mlwf serve (or pass --insecure-no-auth, for local experiments only)")
    # With --insecure-no-auth, a secret that is there anyway still signs the replies.
    config = ServeConfig(store=spec.canonical(), stages=parse_stages(stages), secret=secret,
                         insecure=insecure_no_auth, max_body=max_body, max_age=max_age, threads=threads,
                         workers=workers, limits=limits, choreography=choreography)
    _setup_logging()
    if insecure_no_auth:
        warning = ("AUTHENTICATION DISABLED (--insecure-no-auth): anyone who can reach "
                   f"{host}:{port} can run stages with this server's store credentials")
        print(f"mlwf: WARNING: {warning}", file=sys.stderr, flush=True)
        log.warning(warning)
    sock = _bind(host, port)
    preload()
    app = App(config)
    served = "all stages" if config.stages is None else ", ".join(sorted(f"{w}/{s}" for w, s in config.stages))
    log.info("mlwf serve on %s:%d: %s; store %s bucket %s; max body %d bytes; request timeout %g s; "
             "max connections %d (%d per client); %s; auth %s", host, sock.getsockname()[1], served,
             config.store.url, config.store.bucket, max_body, limits.request_timeout, limits.max_connections,
             limits.max_client_connections,
             f"{workers} worker processes" if workers else f"{app.threads} worker threads",
             "off" if insecure_no_auth else "HMAC-SHA256")
    if choreography is not None:
        sink = choreography.sinks
        log.info("choreography: events to %s%s; dead letters to %s; %d delivery retries; claims last %g s",
                 sink.default or "per-stage sinks", "".join(f", {w}/{st}={u}" for (w, st), u in sorted(sink.routes.items())),
                 sink.dead_letter or "nowhere", choreography.delivery_retries, choreography.lease_s)
    # Connection limits and time bounds are the guard's (mlwf.httpguard), not uvicorn's
    # limit_concurrency, which would answer 503 to health checks too. No WebSocket upgrades:
    # an upgraded connection would leave the guard.
    uconfig = uvicorn.Config(app.asgi, http=app.guard.protocol_class(), ws="none", log_config=None,
                             access_log=False, lifespan="on", timeout_graceful_shutdown=grace,
                             limit_concurrency=None, timeout_keep_alive=limits.keep_alive,
                             h11_max_incomplete_event_size=limits.max_header_bytes, server_header=False,
                             proxy_headers=False)
    # uvicorn's per-connection warnings (bad requests, upgrades) are the guard's counted log lines instead.
    logging.getLogger("uvicorn.error").setLevel(logging.ERROR)
    server = _Server(uconfig, app)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if app.running:
        log.error("exiting with %d calls still running after the %s s grace period", app.running, grace)
        app.pool.shutdown(wait=False, cancel_futures=True)
        if app.processes is not None:
            app.processes.reset()
        logging.shutdown()
        os._exit(1)
    app.close()
    log.info("mlwf serve stopped cleanly")
    return 0


def _choreography_config(sinks, dead_letter, delivery_retries, claim_lease, retries):
    """The choreography settings of ``mlwf serve`` (None: no sink, a driver's function server only)."""
    from mlwf.choreography.service import ChoreographyConfig
    from mlwf.choreography.sinks import parse_sinks

    parsed = parse_sinks(sinks, k_sink=os.environ.get("K_SINK"), dead_letter=dead_letter)
    if parsed is None:
        for flag, value in (("--delivery-retries", delivery_retries), ("--claim-lease", claim_lease),
                            ("--retries", retries)):
            if value is not None:
                raise UsageError(f"{flag} is for choreography: give --sink URL (or set K_SINK) too")
        return None
    given = {k: v for k, v in (("delivery_retries", delivery_retries), ("lease_s", claim_lease),
                               ("stage_retries", retries)) if v is not None}
    return ChoreographyConfig(sinks=parsed, **given).check()


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM ends in a clean exit (status 0), not a re-raised signal."""

        def __init__(self, config, app: App):
            super().__init__(config)
            self.mlwf_app = app

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self._on_signal) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def _on_signal(self, sig, frame) -> None:
            if not self.mlwf_app.draining:
                log.info("received %s: draining %d calls in flight, then exiting",
                         signal.Signals(sig).name, self.mlwf_app.in_flight)
            self.mlwf_app.draining = True
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    return Server


def _Server(config, app):  # noqa: N802 - a factory standing in for the class
    return _server_class()(config, app)
