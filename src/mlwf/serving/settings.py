"""The settings of ``mlwf model serve``: its defaults and request limits (light to import: the CLI reads them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlwf.errors import UsageError

DEFAULT_NAME = "mlwf"
DEFAULT_PORT = 8080
DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_BODY = 16 << 20  # 16 MiB
#: Decoded pixels per request (sum over its images): bounds the CPU one request can take.
DEFAULT_MAX_PIXELS = 1 << 26
#: Seconds a client has to send a whole request, head and body (mlwf.httpguard enforces it).
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 512
#: Requests being computed at once, each counted once its body has arrived; more are refused with 503. It
#: bounds the queue of work, not memory: what requests hold, from their first byte, is the memory budget's
#: (--max-memory, mlwf.budget).
DEFAULT_MAX_IN_FLIGHT = 64


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_body: int = DEFAULT_MAX_BODY
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_client_connections: int | None = None  # None: half of max_connections

    def connection_limits(self):
        """The connection bounds for :class:`mlwf.httpguard.ConnectionGuard`, the same guard as ``mlwf serve``'s."""
        from mlwf.httpguard import Limits as ConnectionLimits

        per_client = self.max_client_connections
        return ConnectionLimits(request_timeout=self.request_timeout, max_connections=self.max_connections,
                                max_client_connections=max(1, self.max_connections // 2) if per_client is None
                                else per_client)

    def check(self) -> Limits:
        """Refuse limits the server cannot work with.

        Raises
        ------
        UsageError
            Naming the flag.
        """
        if not 1 <= self.max_batch <= 1_000_000:
            raise UsageError(f"--max-batch must be between 1 and 1000000, got {self.max_batch}")
        if self.max_body < 1024:
            raise UsageError(f"--max-body must be at least 1KiB, got {self.max_body} bytes")
        if self.max_pixels < 1:
            raise UsageError(f"--max-pixels must be at least 1, got {self.max_pixels}")
        if not 1 <= self.max_in_flight <= 100_000:
            raise UsageError(f"--max-in-flight must be between 1 and 100000, got {self.max_in_flight}")
        if not math.isfinite(self.request_timeout):
            raise UsageError(f"--request-timeout must be a finite number of seconds, got {self.request_timeout}")
        self.connection_limits()  # its own checks, with mlwf serve's messages
        return self
