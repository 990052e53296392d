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
DEFAULT_READ_TIMEOUT = 30.0
#: Requests being received or computed at once; more are refused with 503 (bounds memory: this × --max-body).
DEFAULT_MAX_IN_FLIGHT = 64


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_body: int = DEFAULT_MAX_BODY
    max_pixels: int = DEFAULT_MAX_PIXELS
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT

    def check(self) -> Limits:
        if not 1 <= self.max_batch <= 1_000_000:
            raise UsageError(f"--max-batch must be between 1 and 1000000, got {self.max_batch}")
        if self.max_body < 1024:
            raise UsageError(f"--max-body must be at least 1KiB, got {self.max_body} bytes")
        if self.max_pixels < 1:
            raise UsageError(f"--max-pixels must be at least 1, got {self.max_pixels}")
        if not (math.isfinite(self.read_timeout) and self.read_timeout > 0):
            raise UsageError(f"--read-timeout must be a positive number of seconds, got {self.read_timeout}")
        if not 1 <= self.max_in_flight <= 100_000:
            raise UsageError(f"--max-in-flight must be between 1 and 100000, got {self.max_in_flight}")
        return self
