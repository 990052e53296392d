"""What a run tells whoever watches it: the one progress protocol, its silent default, and a clock.

The driver calls a :class:`RunProgress` as stages start, as calls finish and
as stages end; a terminal display (:class:`mlwf.terminal.StageBars`), the
:class:`StageClock` that notes the driver's view of each stage for a trace,
or nothing (:data:`SILENT`).
"""

from __future__ import annotations

import time
from typing import Protocol


class RunProgress(Protocol):
    """What the driver tells a progress display."""

    def stage_started(self, stage: str, total: int) -> None: ...
    def call_done(self, stage: str) -> None: ...
    def stage_done(self, stage: str) -> None: ...


class _Silent:
    def stage_started(self, stage: str, total: int) -> None:
        pass

    def call_done(self, stage: str) -> None:
        pass

    def stage_done(self, stage: str) -> None:
        pass


#: Watches nothing (an engine made without ``progress``).
SILENT: RunProgress = _Silent()


class StageClock:
    """A progress display that also notes when the driver starts and finishes each stage.

    Pass it as an engine's ``progress`` (wrapping the display you would have
    used, if any); :func:`build` then draws the driver's view of every stage.
    """

    def __init__(self, inner=None):
        self.inner = inner
        self.spans: list[tuple[str, float, float]] = []  # (stage, start_s, end_s) on time.time()
        self._open: dict[str, float] = {}

    def stage_started(self, stage: str, total: int) -> None:
        self._open[stage] = time.time()
        if self.inner is not None:
            self.inner.stage_started(stage, total)

    def call_done(self, stage: str) -> None:
        if self.inner is not None:
            self.inner.call_done(stage)

    def stage_done(self, stage: str) -> None:
        start = self._open.pop(stage, None)
        if start is not None:
            self.spans.append((stage, start, time.time()))
        if self.inner is not None:
            self.inner.stage_done(stage)
