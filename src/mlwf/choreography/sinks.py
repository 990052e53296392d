"""Where a server's emitted events go, and their delivery: a bounded, flow-controlled stream per sink.

``mlwf serve --sink URL`` sends every event to URL; ``--sink STAGE=URL``
sends the events that start STAGE (``train``, ``ml-training/train`` or a
whole workflow) to URL instead; without ``--sink``, ``K_SINK`` (what a
Knative SinkBinding or a ContainerSource sets) is the one sink. What is
behind a sink is Knative's business: a Broker, a Channel, or the next
Service itself.

Delivery works as Knative's own delivery spec does: each event is POSTed
(binary content mode), a 2xx answer means delivered, and a transport error or
a 408/409/429/5xx answer is retried with exponential backoff (``retries``
times, ``backoff`` doubling up to ``max_backoff``); a 429 or 503 with a
``Retry-After`` waits the longer of the backoff and that (at most
``retry_after_max``, Knative's ``retryAfterMax``). Each attempt is signed
afresh (same event id), so a long backoff never outlives the signature. An
event that could not be delivered goes to the dead-letter sink, if there is
one, with Knative's ``knativeerrordest``, ``knativeerrorcode`` and
``knativeerrordata`` attributes and, unlike Knative's, a signature over the
whole of it (:func:`mlwf.backends.knative.events.sign_dead_letter`); its run
ends ``failed``, naming the stage and the last answer.

Why a stream of our own, not one ``post`` per event into the HTTP client.
A fan-out of N events used to be N coroutines posting at once into one
``httpx.AsyncClient`` of 256 connections. httpcore's pool re-assigns its
queued requests on every request started or finished, scanning every queued
request against every connection (O(queued × connections) each time), so
1,000 queued events cost ~10⁸ comparisons per round on the process's one
background loop, which the S3 store shares: the loop thread sat at 100 %
CPU, connections it had opened waited so long for their request to be
written that the receiver's ``--request-timeout`` closed them (the
CLOSE-WAIT sockets), events timed out in the queue and were sent again, and
the 256 connections equalled the receiver's per-client limit, so its guard
evicted them too. Now:

* each sink has a **window** of deliveries in flight (``connections``,
  default 64: a quarter of ``mlwf serve``'s per-client limit, so two servers
  on one host stay below it), each on a keep-alive connection of its own
  (:class:`_Connection`: asyncio streams and h11, the HTTP/1.1 parser
  uvicorn and httpcore use), so no pool is scanned per request: even without
  a queue, httpcore checks every pooled connection's socket on each request
  started or finished, which at 64 connections cost more than the events
  themselves. The rest wait in a plain deque (O(1) per event). The window
  halves on a 429 or 503 (at most once per window's worth of answers, as
  TCP halves once per round trip) and grows back by one per window of
  successes (additive increase, multiplicative decrease);
* an event is **in one place at a time**: queued, in flight, or waiting out
  its backoff; it is posted again only after its attempt ended (answered,
  failed, or timed out and its connection closed), never while it may still
  be running, and the resumer asks :meth:`Dispatcher.pending` before
  sending anything again;
* **new runs first**: events of resumed runs (``resumed=True``) take at most
  a quarter of a sink's window while other events wait, and all of it when
  none do;
* a sink with nothing to send **closes its connections** after
  ``IDLE_CLOSE_S`` (and idle kept-alive ones after ``KEEPALIVE_S``, before
  the receiver's own keep-alive closes them): an idle server holds no
  sockets and runs no timers.

Which runs the stream holds events of (:meth:`Dispatcher.runs`) and which it
handed to a sink that keeps them (a Broker's 202, :meth:`Dispatcher.take_held`)
is what keeps those runs alive between stages (:mod:`mlwf.choreography.steps`).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import random
import ssl
import threading
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import h11

from mlwf.aio import BACKGROUND
from mlwf.backends.knative import events
from mlwf.backends.knative.backend import check_url, parse_endpoints
from mlwf.engine.calls import Call, RunContext
from mlwf.errors import UsageError, one_line

log = logging.getLogger("mlwf.choreography")

DEFAULT_DELIVERY_RETRIES = 10
DEFAULT_DELIVERY_TIMEOUT = 300.0
#: Deliveries in flight to one sink at most (``mlwf serve --sink-connections``).
DEFAULT_SINK_CONNECTIONS = 64
#: The longest ``Retry-After`` honoured, in seconds (Knative's ``retryAfterMax``).
DEFAULT_RETRY_AFTER_MAX = 60.0
#: A sink with nothing queued, in flight or waiting closes its connections after this many seconds.
IDLE_CLOSE_S = 2.0
#: Kept-alive connections idle this long are closed by us (``mlwf serve`` closes them after 30 s).
KEEPALIVE_S = 5.0
#: Of a sink's window, the share events of resumed runs may take while other events wait.
RESUMED_SHARE = 0.25
RETRY_STATUS = frozenset({408, 409, 429})
#: Answers that mean "too much": the window shrinks, and a Retry-After is honoured.
SLOW_DOWN = frozenset({429, 503})
#: What mlwf serve answers once it has handled a stage event (anything else that is 2xx: a sink that keeps it).
_HANDLED = frozenset({"done", "skipped", "failed"})

RunKey = tuple[str, str]  # (workflow, run id)


@dataclass(frozen=True)
class Sinks:
    """Where events go: a default sink, per-stage sinks and the dead-letter sink."""

    default: str | None
    routes: dict[tuple[str, str], str] = field(default_factory=dict)
    dead_letter: str | None = None

    def url_for(self, workflow: str, stage: str) -> str | None:
        return self.routes.get((workflow, stage), self.default)


def parse_sinks(entries: list[str] | None, *, k_sink: str | None = None, dead_letter: str | None = None) -> Sinks | None:
    """The sinks of ``--sink`` entries (else ``K_SINK``) and ``--dead-letter``; None when there is none.

    Raises
    ------
    UsageError
        For a URL that is not http(s), an unknown stage, two URLs for one
        stage, a blank ``K_SINK``, or a dead-letter sink without any sink.
    """
    entries = [e for e in (entries or []) if e is not None]
    if any(not e.strip() for e in entries):
        raise UsageError("--sink is empty: give URL or STAGE=URL")
    if dead_letter is not None:
        check_url(dead_letter.strip(), dead_letter, "--dead-letter")
        dead_letter = dead_letter.strip()
    if entries:
        default, routes = parse_endpoints(entries, flag="--sink")
    elif k_sink is not None:
        if not k_sink.strip():
            raise UsageError("K_SINK is set but blank: give it the sink's URL, or unset it to emit no events")
        default, routes = check_url(k_sink.strip(), k_sink, "K_SINK"), {}
    else:
        if dead_letter is not None:
            raise UsageError("--dead-letter needs a sink to deliver to: give --sink URL (or set K_SINK)")
        return None
    return Sinks(default, routes, dead_letter)


@dataclass(eq=False)
class _Delivery:
    """One event on its way: where it is going, and what its attempts met."""

    url: str
    call: Call
    ctx: RunContext
    resumed: bool
    call_json: dict = field(default_factory=dict)
    ctx_json: dict = field(default_factory=dict)
    event_id: str = field(default_factory=events.new_event_id)
    attempts: int = 0
    last: str = "no attempt"
    code: int | None = None
    timer: asyncio.TimerHandle | None = None  # while it waits for its next attempt

    @property
    def run(self) -> RunKey:
        return self.ctx.workflow, self.ctx.run_id


class _Stream:
    """One sink's deliveries: two queues, the window, spare connections (touched on the loop thread only)."""

    def __init__(self, url: str, limit: int):
        self.url = url
        self.limit = limit
        self.window = float(limit)
        self.fresh: deque[_Delivery] = deque()
        self.resumed: deque[_Delivery] = deque()
        self.in_flight = 0
        self.resumed_in_flight = 0
        self.waiting = 0  # deliveries waiting out a backoff
        self.answered = 0  # attempts answered (counts when the window last shrank: shrunk_at)
        self.shrunk_at = -limit
        self.spare: list[_Connection] = []  # open connections with nothing in flight, the last used last
        self.idle: asyncio.TimerHandle | None = None

    def busy(self) -> bool:
        return bool(self.in_flight or self.waiting or self.fresh or self.resumed)

    def next(self) -> _Delivery | None:
        """The next delivery to start: resumed runs up to their share, then new ones, then any."""
        share = max(1, int(self.window * RESUMED_SHARE))
        if self.resumed and (self.resumed_in_flight < share or not self.fresh):
            return self.resumed.popleft()
        if self.fresh:
            return self.fresh.popleft()
        return None


class Dispatcher:
    """Delivers a server's emitted events to its sinks, on the process's background loop (see the module).

    Parameters
    ----------
    sinks : where events go.
    secret : the shared secret the events are signed with (None: unsigned).
    source : the events' ``source``.
    give_up : ``give_up(call, ctx, reason)``, called (in a worker thread) for
        an event that could not be delivered: it ends the run ``failed``.
    retries, backoff, max_backoff : redeliveries and their pauses (seconds).
    timeout : seconds one delivery may take, the whole exchange (a sink that
        is the next service itself answers when its call is done).
    connections : deliveries in flight to one sink at most (its connections).
    retry_after_max : the longest ``Retry-After`` honoured (seconds; 0: ignored).
    """

    def __init__(self, sinks: Sinks, secret: str | None, source: str,
                 give_up: Callable[[Call, RunContext, str], None], *, retries: int = DEFAULT_DELIVERY_RETRIES,
                 backoff: float = 0.2, max_backoff: float = 10.0, timeout: float = DEFAULT_DELIVERY_TIMEOUT,
                 connections: int = DEFAULT_SINK_CONNECTIONS, retry_after_max: float = DEFAULT_RETRY_AFTER_MAX):
        self.sinks = sinks
        self.secret = secret
        self.source = source
        self.give_up = give_up
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.connections = connections
        self.retry_after_max = retry_after_max
        self._streams: dict[str, _Stream] = {}  # loop thread only
        self._tasks: set[asyncio.Task] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._lock = threading.Lock()  # guards what other threads read: the pending events and held runs
        self._pending: dict[RunKey, Counter[str]] = {}
        self._count = 0
        self._held: dict[RunKey, float] = {}

    # ---------------------------------------------------------------- any thread
    def send(self, calls: list[Call], ctx: RunContext, *, resumed: bool = False) -> None:
        """Deliver the events that start ``calls`` of the run ``ctx`` (in the background).

        ``resumed``: events of a run taken up again by the resumer; they go
        after and beside other events (see the module).
        """
        deliveries = []
        for call in calls:
            url = self.sinks.url_for(call.workflow, call.stage)
            if url is None:
                self.give_up(call, ctx, f"no sink for {call.workflow}/{call.stage}: start mlwf serve with --sink "
                                        f"URL or --sink {call.stage}=URL")
                continue
            deliveries.append(_Delivery(url, call, ctx, resumed, call.to_json(), ctx.to_json()))
        if not deliveries:
            return
        with self._lock:
            for d in deliveries:
                self._pending.setdefault(d.run, Counter())[d.call.name] += 1
            self._count += len(deliveries)
        BACKGROUND.loop().call_soon_threadsafe(self._enqueue, deliveries)

    def in_flight(self) -> int:
        """Events not yet delivered or given up: queued, in flight or waiting to be tried again."""
        return self._count

    def pending(self, workflow: str, run_id: str) -> set[str]:
        """The calls (``stage[index]``) of a run whose events are here, not yet delivered or given up."""
        with self._lock:
            return set(self._pending.get((workflow, run_id), ()))

    def runs(self) -> set[RunKey]:
        """The runs with events here not yet delivered or given up (they are alive: see the module)."""
        with self._lock:
            return set(self._pending)

    def take_held(self) -> dict[RunKey, float]:
        """The runs with events that a sink took to deliver later (a Broker's 202), and when the last
        was taken (wall-clock seconds), since the last call."""
        with self._lock:
            held, self._held = self._held, {}
        return held

    def close(self) -> None:
        """Stop: forget what is not delivered (a restarted server's resumer sends it again), close connections."""
        async def close():
            for timer in list(self._timers):
                timer.cancel()
            for task in list(self._tasks):
                task.cancel()
            for stream in self._streams.values():
                if stream.idle is not None:
                    stream.idle.cancel()
                spare, stream.spare = stream.spare, []
                for connection in spare:
                    connection.close()

        try:
            BACKGROUND.run(close())
        except RuntimeError:
            pass

    # ---------------------------------------------------------------- loop thread
    def _stream(self, url: str) -> _Stream:
        stream = self._streams.get(url)
        if stream is None:
            stream = self._streams[url] = _Stream(url, self.connections)
        return stream

    def _enqueue(self, deliveries: list[_Delivery]) -> None:
        streams = {}
        for d in deliveries:
            stream = streams[d.url] = self._stream(d.url)
            (stream.resumed if d.resumed else stream.fresh).append(d)
        for stream in streams.values():
            self._pump(stream)

    def _pump(self, stream: _Stream) -> None:
        """Start deliveries while the window allows; close the connections of a stream with nothing to do."""
        if stream.idle is not None:
            stream.idle.cancel()
            stream.idle = None
        loop = asyncio.get_running_loop()
        while stream.in_flight < max(1, int(stream.window)):
            d = stream.next()
            if d is None:
                break
            stream.in_flight += 1
            stream.resumed_in_flight += d.resumed
            task = loop.create_task(self._attempt(stream, d))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not stream.busy():
            stream.idle = loop.call_later(IDLE_CLOSE_S, self._close_idle, stream)

    def _close_idle(self, stream: _Stream) -> None:
        stream.idle = None
        if stream.busy():
            return
        spare, stream.spare = stream.spare, []
        for connection in spare:
            connection.close()

    def _connection(self, stream: _Stream) -> _Connection:
        """A spare connection used within ``KEEPALIVE_S`` (older ones are closed), else a new one."""
        now = time.monotonic()
        while stream.spare:
            connection = stream.spare.pop()
            if now - connection.used < KEEPALIVE_S and connection.reusable():
                return connection
            connection.close()
        return _Connection(stream.url, self.timeout)

    async def _attempt(self, stream: _Stream, d: _Delivery) -> None:
        """One attempt of ``d``; then it is delivered, waits for its next attempt, or is given up."""
        try:
            try:
                verdict, pause = await self._post(stream, d)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a surprise in one delivery must not lose the event
                d.last, d.code = f"{type(e).__name__}: {one_line(e)}", None
                verdict, pause = "retry", self._backoff(d)
        finally:
            stream.in_flight -= 1
            stream.resumed_in_flight -= d.resumed
        if verdict == "retry" and d.attempts <= self.retries:
            stream.waiting += 1
            timer = asyncio.get_running_loop().call_later(pause, self._again, stream, d)
            self._timers.add(timer)
            d.timer = timer
        elif verdict == "delivered":
            self._forget(d)
        else:
            await self._undeliverable(d)
            self._forget(d)
        self._pump(stream)

    def _again(self, stream: _Stream, d: _Delivery) -> None:
        self._timers.discard(d.timer)
        d.timer = None
        stream.waiting -= 1
        (stream.resumed if d.resumed else stream.fresh).appendleft(d)  # its turn came: before those never tried
        self._pump(stream)

    def _forget(self, d: _Delivery) -> None:
        with self._lock:
            counts = self._pending.get(d.run)
            if counts is not None:
                counts[d.call.name] -= 1
                if counts[d.call.name] <= 0:
                    del counts[d.call.name]
                if not counts:
                    del self._pending[d.run]
            self._count -= 1

    def _backoff(self, d: _Delivery) -> float:
        pause = min(self.backoff * 2 ** max(0, d.attempts - 1), self.max_backoff)
        return pause * (0.5 + random.random() / 2)

    async def _post(self, stream: _Stream, d: _Delivery) -> tuple[str, float]:
        """Post ``d`` once: ``("delivered", 0)``, ``("retry", pause)`` or ``("failed", 0)``."""
        d.attempts += 1
        event = events.call_event(d.call_json, d.ctx_json, self.secret, source=self.source, event_id=d.event_id,
                                  kind="event")
        headers, body = events.to_http(event)
        connection = self._connection(stream)
        try:
            async with asyncio.timeout(self.timeout):
                resp = await connection.post(headers, body)
        except TimeoutError:
            connection.close()  # in an unknown state: never reused
            d.last, d.code = f"no answer from {stream.url} within {self.timeout:g} s", None
            return "retry", self._backoff(d)
        except (OSError, EOFError, ValueError, h11.ProtocolError) as e:
            connection.close()
            d.last, d.code = f"cannot reach {stream.url} ({type(e).__name__}: {one_line(e) or 'closed'})", None
            return "retry", self._backoff(d)
        except BaseException:
            connection.close()  # cancelled (the server stopping), or a surprise: nothing is left open
            raise
        if connection.reusable():
            stream.spare.append(connection)
        else:
            connection.close()
        status = resp.status
        stream.answered += 1
        if 200 <= status < 300:
            stream.window = min(float(stream.limit), stream.window + 1 / stream.window)
            if not _handled(resp):
                with self._lock:
                    self._held[d.run] = time.time()
            return "delivered", 0.0
        d.code, d.last = status, f"{stream.url} answered {status}: {_error_text(resp)}"
        if status in SLOW_DOWN:
            if stream.answered - stream.shrunk_at >= stream.window:  # once per window's worth of answers,
                stream.window = max(1.0, stream.window / 2)         # as TCP halves once per round trip
                stream.shrunk_at = stream.answered
            asked = _retry_after(resp.headers.get("retry-after"))
            return "retry", max(self._backoff(d), min(asked or 0.0, self.retry_after_max))
        if status in RETRY_STATUS or status >= 500:
            return "retry", self._backoff(d)
        return "failed", 0.0

    async def _undeliverable(self, d: _Delivery) -> None:
        attempts = d.attempts
        reason = f"failed: gave up after {attempts} deliver{'ies' if attempts > 1 else 'y'}: {d.last}"
        log.error("%s/%s of run %s %s", d.call.workflow, d.call.name, d.ctx.run_id, reason)
        # The run ends with this reason first: a dead-letter sink that ends it too finds it ended.
        await asyncio.get_running_loop().run_in_executor(None, self.give_up, d.call, d.ctx, reason)
        if self.sinks.dead_letter:
            await self._dead_letter(d)

    async def _dead_letter(self, d: _Delivery) -> None:
        """Send ``d`` to the dead-letter sink, signed as a whole (error attributes included)."""
        event = events.call_event(d.call_json, d.ctx_json, self.secret, source=self.source, event_id=d.event_id,
                                  kind="event")
        attrs = dict(event.get_attributes())
        attrs.update({"knativeerrordest": d.url,
                      "knativeerrordata": base64.b64encode(d.last.encode()[:1024]).decode()})
        if d.code is not None:
            attrs["knativeerrorcode"] = str(d.code)
        if self.secret is not None:
            attrs[events.DEAD_SIGNATURE_ATTR] = events.sign_dead_letter(
                self.secret, "event", d.call.workflow, d.call.stage, d.ctx.run_id, attrs, event.get_data())
        headers, body = events.to_http(events.make_event(attrs, event.get_data()))
        connection = _Connection(self.sinks.dead_letter, 30.0)
        try:
            async with asyncio.timeout(30.0):
                resp = await connection.post(headers, body)
            if not 200 <= resp.status < 300:
                log.error("the dead-letter sink %s answered %d: %s", self.sinks.dead_letter, resp.status,
                          _error_text(resp))
        except Exception as e:  # noqa: BLE001 - the run is marked failed anyway
            log.error("could not reach the dead-letter sink %s: %s", self.sinks.dead_letter,
                      one_line(e) or type(e).__name__)
        finally:
            connection.close()


@dataclass(frozen=True)
class _Response:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self):
        return json.loads(self.body)


class _Connection:
    """One HTTP/1.1 keep-alive connection to a sink: asyncio streams and h11, one request at a time.

    Opened at the first request; ``reusable()`` once a request and its answer
    are complete and neither side asked to close; ``close()`` is idempotent.
    ``connect_timeout`` bounds the connection's opening only (the caller bounds
    the exchange).
    """

    def __init__(self, url: str, connect_timeout: float = 5.0):
        parts = urllib.parse.urlsplit(url)
        self.secure = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.secure else 80)
        self.authority = parts.netloc.rpartition("@")[2]
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.connect_timeout = min(connect_timeout, 5.0)
        self.used = time.monotonic()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._h11: h11.Connection | None = None

    def reusable(self) -> bool:
        return self._writer is not None and not self._writer.is_closing() and self._h11 is not None \
            and self._h11.our_state is h11.IDLE and self._h11.their_state is h11.IDLE

    async def post(self, headers: dict[str, str], body: bytes) -> _Response:
        if not self.reusable():
            self.close()
            async with asyncio.timeout(self.connect_timeout):
                self._reader, self._writer = await asyncio.open_connection(
                    self.host, self.port, ssl=ssl.create_default_context() if self.secure else None)
            self._h11 = h11.Connection(h11.CLIENT)
        conn, writer = self._h11, self._writer
        request = h11.Request(method="POST", target=self.target,
                              headers=[("host", self.authority), ("content-length", str(len(body))),
                                       *headers.items()])
        writer.write(conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        await writer.drain()
        response, chunks = None, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self._reader.read(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("the sink closed the connection before answering")
        self.used = time.monotonic()
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            self.close()
        return _Response(response.status_code, response.reason.decode("latin-1", "replace"),
                         {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers},
                         b"".join(chunks))

    def close(self) -> None:
        writer, self._writer, self._reader, self._h11 = self._writer, None, None, None
        if writer is not None:
            writer.close()


def _handled(resp: _Response) -> bool:
    """Whether a 2xx answer is mlwf serve's, for an event it has handled (else a sink keeps it to deliver)."""
    if resp.status != 200 or not resp.headers.get("content-type", "").startswith("application/json"):
        return False
    try:
        body = resp.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") in _HANDLED


def _retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` asks for (a number of seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_text(resp: _Response) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            kind = body.get("type")
            text = one_line(body["error"], 1000)
            return text if kind in (None, "StageError") else f"{str(kind)[:40]}: {text}"
    except ValueError:
        pass
    return one_line(resp.body.decode("utf-8", "replace"), 300) or resp.reason
