"""What mlwf's two HTTP servers share: binding, logging, bounded request bodies, refusals, a clean SIGTERM.

Used by ``mlwf serve`` (:mod:`mlwf.backends.knative.server`) and ``mlwf model
serve`` (:mod:`mlwf.serving.oip`); the connection limits and time bounds both
run behind are :mod:`mlwf.httpguard`'s. A request's body is taken from the
process's memory budget (:mod:`mlwf.budget`) as it arrives, inflated and
counted piece by piece if it is compressed (:func:`read_body`), and the parse
of its JSON is bounded before it is parsed (:func:`json_cost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import socket
import sys
import threading
import zlib
from typing import Any

from mlwf.budget import BudgetExceeded, Reservation
from mlwf.errors import UsageError

log = logging.getLogger("mlwf.serve")
#: The largest --max-body unless a server says otherwise (``mlwf serve`` allows more, for calls that carry
#: their state: :data:`mlwf.backends.knative.events.MAX_BODY`): every body is held in memory while it is
#: checked, and counted against the process's memory budget.
MAX_BODY_LIMIT = 64 << 20


#: After a refusal for size, read (and discard) at most this much more so the client sees the 413.
_DRAIN_MAX = 8 << 20
#: The Content-Encodings a body may arrive in, and the zlib window bits that read each.
ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
#: Bytes inflated at a time: what a compressed body may make before those bytes are counted.
_INFLATE_STEP = 256 << 10


class Refusal(Exception):
    """A request refused: its HTTP status, the one-line error, whether sending it again may succeed."""

    def __init__(self, status: int, error: str, retryable: bool = False, **extra: Any):
        super().__init__(error)
        self.status = status
        self.error = error
        self.retryable = retryable
        self.extra = extra


def budget_refusal(e: BudgetExceeded) -> Refusal:
    """The answer to work the process's memory budget refused: 413 when the request alone is over the
    limit (sending it again cannot succeed), 503 when other requests hold the budget now (retryable)."""
    return Refusal(503 if e.busy else 413, str(e), retryable=e.busy)


def content_encoding(headers) -> str:
    """The body's Content-Encoding: ``identity``, ``gzip`` or ``deflate``; :class:`Refusal` 415 for any other,
    and for a list of several (a body compressed twice is no smaller, only more work to read)."""
    encoding = headers.get("content-encoding", "identity").strip().lower() or "identity"
    if encoding != "identity" and encoding not in ENCODINGS:
        raise Refusal(415, f"Content-Encoding {encoding[:40]!r} is not supported: send the body as it is "
                           "(identity), or compressed once with gzip or deflate")
    return encoding


async def read_body(request, limit: int, reservation: Reservation) -> bytearray:
    """The request body, decompressed as it arrives if it has a Content-Encoding.

    Every byte held is taken from ``reservation`` (the request's share of
    the process's :data:`mlwf.budget.MEMORY`) as it arrives, before it is
    kept: the body's own bytes, or, for a compressed body, each inflated
    piece of at most 256 KiB (the compressed bytes are inflated and dropped
    as they come, never kept). So a small compressed body that inflates to
    gigabytes is refused at its first piece over a limit, having made no
    more than that piece. The caller gives the reservation back when the
    request ends.

    Parameters
    ----------
    request : the Starlette request.
    limit : the most bytes the body may hold (``--max-body``), counted after decompression too.
    reservation : where the body's bytes are taken from.

    Returns
    -------
    bytearray: the body (not copied into ``bytes``: that would hold it twice).

    Raises
    ------
    Refusal
        400 for a bad Content-Length or corrupt or truncated compressed data,
        413 for a body over ``limit`` (before or after decompression) or over
        the memory budget by itself, 415 for an unsupported Content-Encoding,
        503 (retryable) when other requests hold the memory budget. The rest
        of a refused body is read and dropped (bounded), so that the client
        reads the answer.
    starlette.requests.ClientDisconnect
        If the client went away (or :mod:`mlwf.httpguard` closed it for
        ``--request-timeout``) before the whole body arrived.
    """
    encoding = content_encoding(request.headers)
    length = request.headers.get("content-length")
    too_big = f"request body over the limit of {limit} bytes (--max-body): send a smaller request, or raise --max-body"
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise Refusal(400, "bad Content-Length") from None
        if declared > limit:
            if declared <= limit + _DRAIN_MAX:
                await _drain(request, limit + _DRAIN_MAX)
            raise Refusal(413, too_big)
    inflater = None if encoding == "identity" else _Inflater(encoding)
    body = bytearray()
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise Refusal(413, too_big)
            if inflater is None:
                reservation.grow(len(chunk), "the request body")
                body += chunk
                continue
            for piece in inflater.feed(chunk):
                if len(body) + len(piece) > limit:
                    raise Refusal(413, f"the {encoding} request body inflates to more than {limit} bytes "
                                       "(--max-body): send a smaller request, or raise --max-body")
                reservation.grow(len(piece), f"the {encoding} request body, inflated")
                body += piece
                await asyncio.sleep(0)  # inflating is CPU work: let the other connections be served between pieces
        if inflater is not None:
            inflater.finish()
    except BudgetExceeded as e:
        await _drain(request, limit + _DRAIN_MAX - received)
        raise budget_refusal(e) from None
    except Refusal:
        await _drain(request, limit + _DRAIN_MAX - received)
        raise
    return body


class _Inflater:
    """A gzip or deflate body inflated piece by piece as its bytes arrive (gzip: one member after another)."""

    def __init__(self, encoding: str):
        self.encoding = encoding
        self.stream = zlib.decompressobj(ENCODINGS[encoding])

    def feed(self, data: bytes):
        """Yield what ``data`` inflates to, in pieces of at most :data:`_INFLATE_STEP` bytes."""
        while True:
            if self.stream.eof:
                if not data:
                    return
                if self.encoding != "gzip":
                    raise Refusal(400, "data follows the end of the deflate body: send one deflate stream")
                # RFC 1952: a gzip file may hold several members, one after another.
                self.stream = zlib.decompressobj(ENCODINGS["gzip"])
            try:
                piece = self.stream.decompress(data, _INFLATE_STEP)
            except zlib.error as e:
                raise Refusal(400, f"the body is not valid {self.encoding} data ({e}): compress it with "
                                   f"{self.encoding}, or send it without Content-Encoding") from None
            data = self.stream.unused_data if self.stream.eof else self.stream.unconsumed_tail
            if piece:
                yield piece
            # A full piece may leave output inside zlib with no input left: ask again until it is shorter.
            if not data and len(piece) < _INFLATE_STEP and not self.stream.eof:
                return

    def finish(self) -> None:
        """Refuse (400) a body that ended inside a compressed stream."""
        if not self.stream.eof:
            raise Refusal(400, f"the {self.encoding} request body is truncated: send all of it")


def json_cost(text: bytes | bytearray) -> int:
    """The most memory ``json.loads(text)`` can take, from counts of its structural characters.

    Parsed JSON takes far more memory than its text: a ``{}`` (3 bytes with
    its comma) becomes a 64-byte dict and its 8-byte slot in a list, so 16 MiB
    of ``[{},{},...]`` take 380 MB. The cost is bounded before parsing by
    counting, in C (``bytes.count``), the characters that open a Python
    object: each ``{`` is a dict (80 bytes), each ``[`` a list (96 bytes),
    each ``"`` half a string (40 bytes each, 80 a string), each ``:`` a dict
    entry (60 bytes), each ``,`` one more element (48 bytes: its slot and a
    number object), plus the text itself decoded and the strings' characters
    (2 bytes per byte of ASCII text; 8 when the text has non-ASCII
    characters or ``\\u`` escapes, which may make every character 4 bytes
    wide). The weights are the worst measured (CPython 3.11, 64-bit, RSS) over
    bodies made only of one construct each, rounded up, so the bound holds for
    any mix. Counting costs about 2 ms per MiB (microseconds for an
    ordinary request's JSON header): as much as parsing JSON that is mostly
    base64 strings, a sixth of parsing JSON numbers.

    Why a bound of the parse and not a smaller limit on the JSON part of a
    request: a JSON request of base64 images or pixels is a legitimate use of
    the whole ``--max-body``, and costs 2× to 14× its size; only constructs
    that make many small objects cost more, and they are the ones the counts
    weigh. Binary data (the binary tensor extension) is never parsed and
    costs nothing here.

    Parameters
    ----------
    text : the JSON text, as bytes.

    Returns
    -------
    int: bytes, at least what parsing ``text`` takes at its peak.
    """
    # A backslash is rare: look for one first (memchr), and for "\\u" only if there is one.
    wide = not text.isascii() or (text.find(b"\\") >= 0 and b"\\u" in text)
    per_byte = 8 if wide else 2
    return (per_byte * len(text) + 80 * text.count(b"{") + 96 * text.count(b"[") + 40 * text.count(b'"')
            + 60 * text.count(b":") + 48 * text.count(b","))


async def _drain(request, budget: int) -> None:
    """Read and discard what the client is still sending (bounded), so it gets to read our answer."""
    with contextlib.suppress(Exception):
        async for chunk in request.stream():
            budget -= len(chunk)
            if budget <= 0:
                break


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; :class:`UsageError` (one line) if it cannot be had."""
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


def setup_logging() -> None:
    """One line per record on stdout (a container's log)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per delivered event is the server's own log


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM ends in a clean exit (status 0), not a re-raised signal."""

        def __init__(self, config, app: Any):
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


def make_server(config, app):
    """A uvicorn server for ``app`` (an object with ``draining`` and ``in_flight``) that drains on SIGTERM
    and exits with status 0."""
    return _server_class()(config, app)


def parse_size(text: str, high: int = MAX_BODY_LIMIT) -> int:
    """``1048576``, ``512KiB``, ``1MiB``, ``2MB`` → bytes, from 1 KiB to ``high``."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B?|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"--max-body {text!r} is not a size: give bytes or e.g. 1MiB")
    n = int(m.group(1))
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "K": 1024, "KB": 1000, "KIB": 1024, "M": 1 << 20, "MB": 10**6, "MIB": 1 << 20,
             "G": 1 << 30, "GB": 10**9, "GIB": 1 << 30}[unit]
    if n * scale < 1024:
        raise UsageError(f"--max-body {text!r} is too small: at least 1KiB")
    if n * scale > high:
        shown = f"{high >> 30}GiB" if high % (1 << 30) == 0 else f"{high >> 20}MiB"
        raise UsageError(f"--max-body {text!r} is too large: at most {shown} (every body is held in memory "
                         "while it is checked)")
    return n * scale


def resolve_port(port: int | None, settings, default: int) -> int:
    """``--port``, else ``PORT`` (Knative sets it), else ``default``; :class:`UsageError` if not a port."""
    if port is None:
        raw = settings.port or str(default)
        try:
            port = int(raw)
        except ValueError:
            raise UsageError(f"PORT={raw!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port number")
    return port


def guarded_lifespan(app, background=None):
    """The ASGI lifespan of ``app`` (an object with ``guard`` and ``ready``): while it serves, the guard
    sweeps and ``app.ready`` is true; ``background()``, if given, is a coroutine run alongside."""

    @contextlib.asynccontextmanager
    async def lifespan(_):
        tasks = [asyncio.create_task(app.guard.run())]
        if background is not None:
            tasks.append(asyncio.create_task(background()))
        app.ready = True
        try:
            yield
        finally:
            app.ready = False
            for task in tasks:
                task.cancel()
            app.guard.flush_log()

    return lifespan


def run_guarded(app, sock, grace: float) -> None:
    """Serve ``app.asgi`` on ``sock`` behind ``app.guard`` until SIGTERM or SIGINT and the drain (at most
    ``grace`` seconds); closes ``sock``."""
    import uvicorn

    limits = app.guard.limits
    # Connection limits and time bounds are the guard's (mlwf.httpguard), not uvicorn's
    # limit_concurrency, which would answer 503 to health checks too. No WebSocket upgrades:
    # an upgraded connection would leave the guard.
    config = uvicorn.Config(app.asgi, http=app.guard.protocol_class(), ws="none", log_config=None,
                            access_log=False, lifespan="on", timeout_graceful_shutdown=grace,
                            limit_concurrency=None, timeout_keep_alive=limits.keep_alive,
                            h11_max_incomplete_event_size=limits.max_header_bytes, server_header=False,
                            proxy_headers=False)
    # uvicorn's per-connection warnings (bad requests, upgrades) are the guard's counted log lines instead.
    logging.getLogger("uvicorn.error").setLevel(logging.ERROR)
    server = make_server(config, app)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
