"""Fault injection, for tests only (off unless ``MLWF_FAULTS`` is set).

``MLWF_FAULTS`` is a ``;``-separated list of ``STAGE:INDEX:KIND:TIMES``: the
call INDEX of STAGE raises (``raise``), kills its worker process
(``exit``) or hangs (``hang``), the first TIMES times it runs in a run.
Attempts are counted with files under ``$TMPDIR/mlwf-faults/<run-id>/``, so
the count holds across worker processes (on one machine). Example::

    MLWF_FAULTS="train:3:exit:1;pca:0:raise:2" mlwf run ml-training …
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

ENV = "MLWF_FAULTS"
KINDS = ("raise", "exit", "hang")


class InjectedFault(RuntimeError):
    """The exception an injected ``raise`` fault throws."""


def maybe_inject(spec: str | None, stage: str, index: int, run_id: str) -> None:
    """Act out the fault ``spec`` (the settings' ``MLWF_FAULTS``) plans for this call, if any is left."""
    if not spec:
        return
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        try:
            f_stage, f_index, kind, times = item.split(":")
            f_index, times = int(f_index), int(times)
        except ValueError:
            raise ValueError(f"{ENV}: bad entry {item!r}, expected STAGE:INDEX:KIND:TIMES") from None
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault kind {kind!r} in {item!r}: use {', '.join(KINDS)}")
        if f_stage != stage or f_index != index or not _claim(run_id, item, times):
            continue
        if kind == "raise":
            raise InjectedFault(f"injected fault in {stage}[{index}]")
        if kind == "exit":
            os._exit(17)
        time.sleep(3600)


def _claim(run_id: str, item: str, times: int) -> bool:
    """Take one of the ``times`` shots of ``item`` in this run; False when all are used."""
    folder = Path(tempfile.gettempdir()) / "mlwf-faults" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    name = item.replace(":", "-")
    for shot in range(times):
        try:
            fd = os.open(folder / f"{name}-{shot}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.close(fd)
        return True
    return False
