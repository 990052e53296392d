"""What mlwf's two HTTP servers share: binding, logging, bounded request bodies, refusals, a clean SIGTERM.

Used by ``mlwf serve`` (:mod:`mlwf.backends.knative.server`) and ``mlwf model
serve`` (:mod:`mlwf.serving.oip`); the connection limits and time bounds both
run behind are :mod:`mlwf.httpguard`'s.
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
from typing import Any

from mlwf.errors import UsageError

log = logging.getLogger("mlwf.serve")
#: The largest --max-body: every body is held in memory while it is checked.
MAX_BODY_LIMIT = 64 << 20


#: After a refusal for size, read (and discard) at most this much more so the client sees the 413.
_DRAIN_MAX = 8 << 20


class Refusal(Exception):
    """A request refused: its HTTP status, the one-line error, whether sending it again may succeed."""

    def __init__(self, status: int, error: str, retryable: bool = False, **extra: Any):
        super().__init__(error)
        self.status = status
        self.error = error
        self.retryable = retryable
        self.extra = extra


async def read_body(request, limit: int) -> bytes:
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
