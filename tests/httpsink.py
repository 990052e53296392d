"""What the tests' own small HTTP servers (sinks, brokers, proxies) share."""

from __future__ import annotations

import http.server


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A test server's request handler: HTTP/1.1 keep-alive, no log lines, the request body read whole."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def body(self) -> bytes:
        """The request's body (as its Content-Length says)."""
        return self.rfile.read(int(self.headers.get("content-length", 0)))
