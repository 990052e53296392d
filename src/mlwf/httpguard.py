"""Time bounds and connection limits for ``mlwf serve``, in front of uvicorn's HTTP/1.1 protocol.

Why this exists. uvicorn bounds the idle time *between* two requests on a
connection (``timeout_keep_alive``) but not the time a client takes to *send*
one: the keep-alive timer is cancelled at the first byte received and armed
again only after a response, and nothing is armed for a connection that has
just opened. A client that sends half a request line, then nothing (or one
byte a second), holds its connection for ever; a few hundred of them reach
``limit_concurrency`` and uvicorn then answers 503 to every request,
``/healthz`` included. What the well-kept servers offer, and why it is not
enough here:

* uvicorn: ``timeout_keep_alive`` (idle between requests only),
  ``limit_concurrency`` (503 for *everyone* past N connections, so the
  attacker wins), ``h11_max_incomplete_event_size`` (bounds the size of a
  request head; used below). No header or body timeout (it has been asked for
  and is not there; projects that need one add a deadline to uvicorn's
  protocol class, as here).
* hypercorn: ``keep_alive_timeout``, ``read_timeout`` and
  ``h11_max_incomplete_size``. ``read_timeout`` bounds each read, so a client
  sending one byte per interval still holds its connection; there is no
  whole-request deadline and no per-client limit, and switching would replace
  the server whose SIGTERM drain the Knative contract relies on.
* a reverse proxy (nginx ``client_header_timeout``/``client_body_timeout``)
  protects only a deployment that has one; ``mlwf serve`` also runs bare.

So ``mlwf serve`` keeps uvicorn and plugs into its documented extension point,
``uvicorn.Config(http=<protocol class>)``, a subclass of uvicorn's h11
protocol (:class:`GuardedProtocol`) that reports each connection's phase to
a :class:`ConnectionGuard`. The subclass reads h11's public state
(``their_state``, ``trailing_data``) and uvicorn's ``conn``, ``transport``,
``client`` and ``cycle`` attributes and its ``on_response_complete`` hook,
which uvicorn has kept since long before the version pinned in
``pyproject.toml``; the tests drive every path below against a real server.

What it guarantees (every number is a :class:`Limits` field, set by
``mlwf serve`` flags):

* **A whole request within ``request_timeout`` seconds** (default 10): from
  the moment a connection opens, or from the first byte after the previous
  response, the client must have sent the request line, every header and
  the whole body. Otherwise the connection is closed, with a 408 JSON
  answer if the client had sent part of a request. Checked every
  ``request_timeout / 4`` seconds (at most 0.5 s), so the connection is gone
  within ``request_timeout + 0.5`` s.
* **Request heads of at most 16 KiB** (``max_header_bytes``): a larger one is
  answered 400 and closed as soon as it passes the limit (whether it arrives
  slowly or in one piece).
* **Replies that the client reads.** A reply whose bytes stay unread for
  ``request_timeout`` seconds (a client that pipelines requests and never
  reads) has its connection aborted.
* **Idle keep-alive connections** are closed after ``keep_alive`` seconds.
* **At most ``max_connections`` connections, ``max_client_connections`` from
  one address.** A new connection over either limit closes the *oldest
  connection that is not running a call* (idle, or still sending its
  request), from that address for the per-client limit, so a health check or
  a caller always gets in while slow clients are pushed out. Only when every
  connection is running a call is the new one answered 503 (retryable).

A connection running a call is never cut by these rules: how long a call may
run is the caller's timeout (and Knative's ``timeoutSeconds``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("mlwf.serve")

#: A connection's phases: sending a request (or just opened), between requests, running one.
RECEIVING, IDLE, SERVING = "receiving", "idle", "serving"
_REQUEST_DONE = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR, h11.MIGHT_SWITCH_PROTOCOL,
                 h11.SWITCHED_PROTOCOL)
#: How often the guard looks at every connection, at most.
_MAX_SWEEP_S = 0.5
#: Seconds between two log lines about connections the guard closed (counts are summed).
_LOG_EVERY_S = 5.0


@dataclass(frozen=True)
class Limits:
    """The bounds a :class:`ConnectionGuard` enforces (see the module docstring)."""

    request_timeout: float = 10.0
    keep_alive: float = 30.0
    max_connections: int = 512
    max_client_connections: int = 256
    max_header_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        from mlwf.errors import UsageError

        for name in ("request_timeout", "keep_alive"):
            value = getattr(self, name)
            if not 0 < value < 86_400:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive number of seconds (under a day), "
                                 f"got {value!r}")
        if not 1 <= self.max_connections <= 1_000_000:
            raise UsageError(f"--max-connections must be between 1 and 1000000, got {self.max_connections!r}")
        if not 1 <= self.max_client_connections <= self.max_connections:
            raise UsageError(f"--max-client-connections must be between 1 and --max-connections "
                             f"({self.max_connections}), got {self.max_client_connections!r}")


class ConnectionGuard:
    """Every open connection of one server, with its phase; enforces :class:`Limits`.

    Parameters
    ----------
    limits : the bounds to enforce.
    clock : a monotonic clock in seconds (tests may pass their own).
    """

    def __init__(self, limits: Limits, clock=time.monotonic):
        self.limits = limits
        self.clock = clock
        self.connections: dict[GuardedProtocol, None] = {}  # insertion-ordered set
        self.per_client: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()  # why the guard closed connections, since the last log line
        self._logged_at = clock()

    def protocol_class(self) -> type[GuardedProtocol]:
        """The protocol class to give uvicorn (``uvicorn.Config(http=...)``), bound to this guard."""
        return type("MlwfGuardedH11Protocol", (GuardedProtocol,), {"guard": self})

    # ------------------------------------------------------------------ admission
    def admit(self, conn: GuardedProtocol) -> None:
        """Register a new connection, making room (or refusing it) when a limit is reached."""
        if self.per_client[conn.host] >= self.limits.max_client_connections:
            if not self._evict(self._oldest_waiting(conn.host), "client-limit"):
                conn.close_with(503, f"too many connections from {conn.host} (--max-client-connections "
                                     f"{self.limits.max_client_connections}), all running calls: retry later, or raise "
                                     "--max-client-connections",
                                retryable=True)
                self.closed["refused"] += 1
                return
        if len(self.connections) >= self.limits.max_connections:
            if not self._evict(self._oldest_waiting(None), "server-limit"):
                conn.close_with(503, f"too many connections (--max-connections {self.limits.max_connections}), "
                                     "all running calls: retry later, or raise --max-connections", retryable=True)
                self.closed["refused"] += 1
                return
        self.connections[conn] = None
        self.per_client[conn.host] += 1

    def forget(self, conn: GuardedProtocol) -> None:
        if self.connections.pop(conn, False) is None:
            self.per_client[conn.host] -= 1
            if self.per_client[conn.host] <= 0:
                del self.per_client[conn.host]

    def _oldest_waiting(self, host: str | None) -> GuardedProtocol | None:
        """The connection (of ``host``, or any) that has waited longest without running a call."""
        best = None
        for conn in self.connections:
            if conn.phase != SERVING and (host is None or conn.host == host) \
                    and (best is None or conn.since < best.since):
                best = conn
        return best

    def _evict(self, conn: GuardedProtocol | None, why: str) -> bool:
        if conn is None:
            return False
        self.forget(conn)
        conn.close_with(503, "connection closed to make room for another (too many open connections): retry",
                        retryable=True)
        self.closed[why] += 1
        return True

    # ------------------------------------------------------------------ time bounds
    @property
    def interval(self) -> float:
        return min(_MAX_SWEEP_S, self.limits.request_timeout / 4)

    async def run(self) -> None:
        """Sweep every :attr:`interval` seconds until cancelled (runs on the server's event loop)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the guard must outlive a surprise in one connection
                log.exception("connection guard sweep failed")

    def sweep(self) -> None:
        """Close every connection past its deadline; log what was closed (summed, every few seconds)."""
        now = self.clock()
        limits = self.limits
        for conn in list(self.connections):
            if conn.transport is None:
                continue
            if conn.phase == RECEIVING and now - conn.since > limits.request_timeout:
                self.forget(conn)
                conn.close_with(408, f"request not received within {limits.request_timeout:g} s "
                                     "(--request-timeout): send whole requests promptly, or raise --request-timeout",
                                retryable=True)
                self.closed["request-timeout"] += 1
            elif conn.phase == IDLE and now - conn.since > limits.keep_alive:
                self.forget(conn)
                conn.close_with(None, "")
                self.closed["idle"] += 1
            elif conn.write_stalled(now, limits.request_timeout):
                self.forget(conn)
                conn.transport.abort()
                self.closed["unread-reply"] += 1
        if self.closed and now - self._logged_at >= _LOG_EVERY_S:
            self.flush_log(now)

    def flush_log(self, now: float | None = None) -> None:
        if self.closed:
            what = ", ".join(f"{n} {why}" for why, n in sorted(self.closed.items()))
            log.warning("closed connections (%s); open: %d", what, len(self.connections))
            self.closed.clear()
        self._logged_at = self.clock() if now is None else now


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol, reporting its phase to :attr:`guard` (set by :meth:`ConnectionGuard.protocol_class`)."""

    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase = RECEIVING
        self.since = self.guard.clock()
        self.host = "-"
        self.responses = 0
        self._buffered = (0, self.since)  # write-buffer size last seen, and when it last shrank or was empty

    # ------------------------------------------------------------------ asyncio protocol
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.host = self.client[0] if self.client else "-"
        self.since = self.guard.clock()
        self.guard.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.phase == IDLE:
            self._enter(RECEIVING)
        if self.conn.their_state is h11.IDLE and self._head_too_long(data):
            self.send_400_response("request head too long")
            return
        super().data_received(data)
        self._refresh()

    def _head_too_long(self, data: bytes) -> bool:
        # h11 refuses only a head still *incomplete* past its limit; one that arrives whole in a
        # single read (up to 256 KiB) would pass. Measure the head itself.
        limit = self.guard.limits.max_header_bytes
        pending = self.conn.trailing_data[0] + data
        return pending.find(b"\r\n\r\n", 0, limit + 4) < 0 and len(pending) > limit

    def on_response_complete(self) -> None:
        self.responses += 1
        super().on_response_complete()
        self._refresh()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own answer is plain text; ours is the JSON every refusal of mlwf serve has.
        self.guard.closed["bad-request"] += 1
        self.close_with(400, f"malformed HTTP request, or a request head over "
                             f"{self.guard.limits.max_header_bytes} bytes: {msg}", retryable=False, force=True)

    # ------------------------------------------------------------------ phases
    def _enter(self, phase: str) -> None:
        if phase != self.phase:
            self.phase = phase
            self.since = self.guard.clock()

    def _refresh(self) -> None:
        theirs = self.conn.their_state
        if theirs in _REQUEST_DONE:
            self._enter(SERVING)
        elif theirs is h11.SEND_BODY or self.conn.trailing_data[0] or not self.responses:
            self._enter(RECEIVING)
        else:
            self._enter(IDLE)

    def write_stalled(self, now: float, limit: float) -> bool:
        """Whether bytes of a reply have waited ``limit`` seconds with none of them read."""
        size = self.transport.get_write_buffer_size()
        last_size, progress = self._buffered
        if size == 0 or size < last_size:
            progress = now
        self._buffered = (size, progress)
        return size > 0 and now - progress > limit

    def close_with(self, status: int | None, error: str, *, retryable: bool = False, force: bool = False) -> None:
        """Close the connection, first answering ``status`` with a JSON error if the client awaits an answer.

        A client that has not started a request (fresh or idle connection) is
        closed without an answer unless ``force``; neither is one whose
        answer has already begun.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        # h11's view of our side: IDLE or SEND_RESPONSE means no answer to this request has begun.
        can_answer = self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE)
        sending = self.conn.their_state is h11.SEND_BODY or bool(self.conn.trailing_data[0]) or force \
            or (self.phase == RECEIVING and not self.responses)
        if status is not None and sending and can_answer:
            body = json.dumps({"error": error, "retryable": retryable}).encode()
            head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
            transport.write(head + body)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        transport.close()
        if transport.get_write_buffer_size():
            # close() waits for the buffer to drain, which a client that reads nothing never lets happen.
            self.loop.call_later(self.guard.limits.request_timeout, transport.abort)
