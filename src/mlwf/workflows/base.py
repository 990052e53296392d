"""The vocabulary stage functions speak; nothing here knows a backend or a store.

A stage is a plain function. Its parameters are its inputs; a parameter named
``fetch`` receives a function ``fetch(keys) -> list[bytes]`` and one named
``list_keys`` a function ``list_keys(prefix) -> list[key]`` (in key order), supplied
by whichever engine runs the stage. It returns a :class:`StageOutput`: the
parts it hands to later stages, by the names its definition gives its
outputs (:class:`~mlwf.workflows.definition.Output`), and small facts for the
driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Blob:
    """A part that is already bytes, handed on as they are (its consumer's input says how to read them).

    ``stored_at`` names the object these exact bytes were read from, when the
    stage hands on an object that is already in the store (the published
    model): an engine that moves state through the store then hands on that
    key instead of writing a copy.
    """

    data: bytes
    stored_at: str | None = None
    #: The SHA-256 of ``data`` when the stage has just computed it (the engine then does not hash it again).
    sha256: str | None = None


@dataclass
class StageOutput:
    """What a stage returns.

    ``parts`` maps each of the stage's outputs, by name, to what it hands on:
    a JSON-like value with NumPy arrays, or a :class:`Blob`; for an output
    defined with ``many``, a list of them. ``info`` is a small JSON-able dict
    for the driver's summary.
    """

    parts: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def derive_seed(seed: int, stage: str, index: int = 0) -> int:
    """A 32-bit seed for one call, fixed by the run seed, the stage and the call index.

    Retried or resumed calls get the same seed, so they write the same bytes.
    """
    stage_no = int.from_bytes(stage.encode()[:8].ljust(8, b"\0"), "little")
    return int(np.random.SeedSequence([seed, stage_no, index]).generate_state(1)[0])
