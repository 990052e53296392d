"""Every key a run writes, in one place.

A run lives in ``<workflow>/outputs/<run-id>/``::

    run.json                      the record: parameters, status, lease, report
    <stage>/<index>-<part>.bin    an output of call <index> of <stage> (store transfer); parts are
                                  numbered in the order the stage's outputs are defined, every part
                                  of a ``many`` output counted
    <stage>/<index>.done.json     a finished call: its outputs and their SHA-256 (for --resume)
    predictions.csv, ...          results a workflow's driver writes
    trace.json                    the run's calls as a Chrome/Perfetto trace (mlwf.engine.trace), written
                                  by its driver as it ends (drawn by mlwf ui)
    choreography/claims/<stage>-<index>.json, choreography/batches/<stages>.json,
    choreography/failures/<stage>-<index>.json
                                  a choreographed run's claims, batch markers and failed deliveries
                                  (mlwf.choreography.records)

A run id (``20261126T121500.123456Z-3f9a1c``) sorts by start time and is
unique, so concurrent runs never touch each other's state. ``mlwf runs``
reads runs back through :func:`parse_intermediate` and :data:`RUN_ID`.
"""

from __future__ import annotations

import datetime as _dt
import re
import secrets
from dataclasses import dataclass

from mlwf.storage import join_key

RECORD = "run.json"
#: A run's trace, beside its record (a result: never collected by mlwf runs gc).
TRACE = "trace.json"
#: The shape of every run id :func:`new_run_id` makes.
RUN_ID = re.compile(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}")
#: Where a choreographed run keeps its claims and batch markers (mlwf.choreography.records).
CHOREOGRAPHY = "choreography"
_CHOREOGRAPHY = re.compile(r"choreography/(?:claims/(?:[a-z][a-z0-9_]*-\d+|finish)|failures/[a-z][a-z0-9_]*-\d+|"
                           r"batches/[a-z][a-z0-9_]*(?:\+[a-z][a-z0-9_]*)*)\.json")
_INTERMEDIATE = re.compile(r"(?P<stage>[a-z][a-z0-9_]*)/(?P<index>\d+)(?:-(?P<part>\d+)\.bin|\.done\.json)")


def new_run_id() -> str:
    """A unique run id that sorts by start time, such as ``20261126T121500.123456Z-3f9a1c``."""
    now = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{now}-{secrets.token_hex(3)}"


def runs_folder(workflow: str) -> str:
    """``<workflow>/outputs/``: where the runs of ``workflow`` live."""
    return join_key(workflow, "outputs") + "/"


@dataclass(frozen=True)
class RunLayout:
    """The keys of one run."""

    workflow: str
    run_id: str

    @property
    def folder(self) -> str:
        """``<workflow>/outputs/<run-id>`` (no trailing slash)."""
        return join_key(self.workflow, "outputs", self.run_id)

    @property
    def record(self) -> str:
        return join_key(self.folder, RECORD)

    def output(self, stage: str, index: int, part: int) -> str:
        """Where part ``part`` of call ``index`` of ``stage`` is stored."""
        return join_key(self.folder, stage, f"{index}-{part}.bin")

    def done(self, stage: str, index: int) -> str:
        """The record of a finished call of ``stage``."""
        return join_key(self.folder, stage, f"{index}.done.json")

    def result(self, name: str) -> str:
        """A result the driver writes, such as ``predictions.csv``."""
        return join_key(self.folder, name)

    def claim(self, name: str) -> str:
        """A choreographed run's claim on a call (``<stage>-<index>``) or on its finish (``finish``)."""
        return join_key(self.folder, CHOREOGRAPHY, "claims", f"{name}.json")

    def failure(self, name: str) -> str:
        """Where a failed delivery of a call (``<stage>-<index>``) of a choreographed run is noted."""
        return join_key(self.folder, CHOREOGRAPHY, "failures", f"{name}.json")

    def batch_marker(self, batch: str) -> str:
        """The marker of a choreographed run's stage batch (``pca``, ``partition+load``): who emitted it."""
        return join_key(self.folder, CHOREOGRAPHY, "batches", f"{batch}.json")


def is_choreography_bookkeeping(rest: str) -> bool:
    """Whether a key below a run's folder is a choreographed run's claim, batch marker or failure record."""
    return _CHOREOGRAPHY.fullmatch(rest) is not None


def parse_intermediate(rest: str) -> tuple[str, bool] | None:
    """``(stage, finished)`` for a key below a run's folder that is an intermediate (``finished``: a
    ``.done.json`` record, else an output part), or None for anything else (the record, results)."""
    match = _INTERMEDIATE.fullmatch(rest)
    if match is None:
        return None
    return match["stage"], match["part"] is None
