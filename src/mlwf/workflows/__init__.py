"""The workflows: their stage functions and the drivers that chain them.

``STAGES`` maps ``(workflow, stage)`` to the stage function, so every backend
(local processes, Ray, the HTTP function server) finds a stage by name.
"""

from __future__ import annotations

from collections.abc import Callable

from mlwf.errors import UsageError

WORKFLOWS = ("ml-training", "ml-inference")


def _table() -> dict[str, dict[str, Callable]]:
    from mlwf.workflows import inference, training

    return {"ml-training": training.STAGES, "ml-inference": inference.STAGES}


def stage_names(workflow: str) -> tuple[str, ...]:
    """The stages of ``workflow`` in the order they run; :class:`UsageError` if unknown."""
    try:
        return tuple(_table()[workflow])
    except KeyError:
        raise UsageError(f"unknown workflow {workflow!r}: known workflows are {', '.join(WORKFLOWS)}") from None


def stage_function(workflow: str, stage: str) -> Callable:
    """The function for ``stage`` of ``workflow``; :class:`UsageError` if unknown."""
    try:
        return _table()[workflow][stage]
    except KeyError:
        raise UsageError(f"unknown stage {workflow}/{stage}: known workflows are {', '.join(WORKFLOWS)}") from None
