"""Finished calls on record, so a resumed run reuses them: ``<stage>/<index>.done.json`` (store transfer only).

A record holds the call's digest (its stage, index and arguments, with the
checksums of its inputs) and its outcome; a resumed run reuses it only if the
same call asks again and every output it names is still in the store with
the same SHA-256.
"""

from __future__ import annotations

import json

from mlwf.codec import digest
from mlwf.engine.calls import Call, Outcome
from mlwf.engine.layout import RunLayout
from mlwf.errors import MlwfError


def call_digest(call: Call) -> str:
    """What identifies a call's work: its stage, index and arguments (with input checksums)."""
    return digest(json.dumps(call.to_json(), sort_keys=True).encode())


class Checkpoints:
    """The done records of one run. ``enabled``: write them; ``resumed``: read them back."""

    def __init__(self, store, layout: RunLayout, *, enabled: bool, resumed: bool):
        self.store = store
        self.layout = layout
        self.enabled = enabled
        self.resumed = resumed

    def mark_done(self, call: Call, outcome: Outcome) -> None:
        """Record a finished call so a resumed run can reuse it."""
        if self.enabled:
            doc = {"call": call_digest(call), "outcome": outcome.to_json()}
            self.store.put(self.layout.done(call.stage, call.index), json.dumps(doc).encode())

    def recorded(self, call: Call) -> Outcome | None:
        """The outcome on record for ``call`` (the same call: same digest), its outputs not checked; else None.

        A choreographed run's servers read these to take the next step: each
        consumer checks an input's SHA-256 when it reads it anyway.
        """
        try:
            doc = json.loads(self.store.get(self.layout.done(call.stage, call.index)))
            if doc["call"] != call_digest(call):
                return None
            outcome = Outcome.from_json(doc["outcome"])
        except (MlwfError, ValueError, KeyError, TypeError):
            return None
        return outcome if _fits_definition(call, outcome) else None

    def reuse(self, call: Call) -> Outcome | None:
        """On a resumed run, the recorded outcome of ``call`` if its outputs verify; else None."""
        if not self.resumed:
            return None
        outcome = self.recorded(call)
        if outcome is None:
            return None
        try:
            for ref in outcome.refs():
                if ref.key is None or digest(self.store.get(ref.key)) != ref.sha256:
                    return None
        except (MlwfError, ValueError, KeyError, TypeError):
            return None
        outcome.durations_ms, outcome.bytes = {}, {}
        outcome.input_edges = []
        return outcome


def _fits_definition(call: Call, outcome: Outcome) -> bool:
    """Whether a recorded outcome has the outputs its stage defines now (an mlwf that recorded it
    may have defined them otherwise: e.g. one hold-out set where there are now shares of it)."""
    from mlwf import workflows

    try:
        outputs = workflows.get(call.workflow).stage(call.stage).outputs
    except MlwfError:
        return False
    return set(outcome.outputs) == {o.name for o in outputs} and \
        all(isinstance(outcome.outputs[o.name], list) == o.many for o in outputs)
