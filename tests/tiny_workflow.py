"""A tiny third workflow, defined outside mlwf: all that adding a workflow takes.

``tiny-squares`` splits a list of integers into ``parts`` chunks, squares each
chunk in its own call (fan-out over a ``many`` output), and adds the squares
up in one call (fan-in with ``gather``). Named in ``MLWF_WORKFLOW_MODULES``, it
runs on every backend: tests/test_third_workflow.py runs it on the local pool,
on Ray and on ``mlwf serve`` processes.
"""

from __future__ import annotations

import numpy as np

from mlwf.errors import UsageError
from mlwf.workflows.base import StageOutput
from mlwf.workflows.definition import Input, Output, Profile, Stage, Workflow


def split(*, numbers: list[int], parts: int) -> StageOutput:
    """``parts`` chunks of ``numbers``, dealt round-robin."""
    chunks = [{"values": np.asarray(numbers[i::parts], dtype=np.int64)} for i in range(parts)]
    return StageOutput({"chunks": chunks}, {"count": len(numbers)})


def square(chunk: dict) -> StageOutput:
    """The squares of one chunk."""
    return StageOutput({"squares": {"values": chunk["values"] ** 2}}, {"count": int(len(chunk["values"]))})


def total(squares: list[dict]) -> StageOutput:
    """The sum of every chunk's squares."""
    return StageOutput({"sum": {"value": int(sum(int(s["values"].sum()) for s in squares))}}, {})


def drive(engine, numbers: list[int], parts: int, *, resume: str | None = None) -> dict:
    """Run tiny-squares on ``engine``; the report's ``sum`` is the sum of the squares of ``numbers``."""
    if not isinstance(parts, int) or not 1 <= parts <= len(numbers):
        raise UsageError(f"PARTS must be an integer from 1 to the count of numbers, got {parts!r}")
    run = engine.start_run(WORKFLOW.name, {"numbers": numbers, "parts": parts}, resume=resume)
    try:
        [split_out] = run.run_calls(split=[dict(numbers=numbers, parts=parts)])["split"]
        squared = run.run_calls(square=[dict(chunk=ref) for ref in split_out.outputs["chunks"]])["square"]
        [summed] = run.run_calls(total=[dict(squares=[out.outputs["squares"] for out in squared])])["total"]
        report = run.report(sum=run.read(summed.outputs["sum"])["value"])
    except BaseException as e:
        run.fail(e)
        raise
    run.finish(report)
    return report


_HERE = "tests.tiny_workflow"
WORKFLOW = Workflow(
    name="tiny-squares",
    params=("numbers", "parts"),
    drive=f"{_HERE}:drive",
    stages=(
        Stage("split", f"{_HERE}:split", outputs=(Output("chunks", many=True),), profile=Profile(4, 1, "100m", "128Mi")),
        Stage("square", f"{_HERE}:square", calls="parts", inputs=(Input("chunk", "split.chunks", each=True),),
              outputs=(Output("squares"),), profile=Profile(1, 8, "250m", "256Mi")),
        Stage("total", f"{_HERE}:total", inputs=(Input("squares", "square.squares", gather=True),),
              outputs=(Output("sum"),), profile=Profile(1, 1, "100m", "128Mi")),
    ),
)
