"""The workflows, found by name: the built-in two and any named in ``MLWF_WORKFLOW_MODULES``.

Each workflow is a :class:`~mlwf.workflows.definition.Workflow` (its stages,
their named inputs and outputs, fan-out and fan-in, resources) that every
part of mlwf reads. A module named in ``MLWF_WORKFLOW_MODULES``
(comma-separated, importable where the stages run: the driver, local
workers, Ray workers and ``mlwf serve`` all read the same setting) defines
one more as ``WORKFLOW``; :func:`use` registers them, which every entry
point does with its settings.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable

from mlwf.errors import UsageError
from mlwf.workflows.definition import Workflow

#: The built-in workflows, in the order they are listed.
BUILTIN = {"ml-training": "mlwf.workflows.training:TRAINING", "ml-inference": "mlwf.workflows.inference:INFERENCE"}
_registered: dict[str, Workflow] = {}
_modules: dict[str, str] = {}  # module -> the name of the workflow it defines


def use(modules: Iterable[str]) -> None:
    """Register the ``WORKFLOW`` of each module in ``modules`` (once each).

    Raises :class:`UsageError` for a module that cannot be imported or defines
    no workflow, or a workflow whose name is already taken.
    """
    for module in modules:
        if module in _modules:
            continue
        try:
            workflow = importlib.import_module(module).WORKFLOW
        except ModuleNotFoundError as e:
            raise UsageError(f"MLWF_WORKFLOW_MODULES names {module!r}, which cannot be imported here ({e}): "
                             "install it, or fix the variable") from None
        except AttributeError:
            raise UsageError(f"MLWF_WORKFLOW_MODULES names {module!r}, which defines no WORKFLOW") from None
        register(workflow)
        _modules[module] = workflow.name


def register(workflow: Workflow) -> None:
    """Make ``workflow`` known by its name in this process."""
    if not isinstance(workflow, Workflow):
        raise UsageError(f"{workflow!r} is not a Workflow")
    if workflow.name in BUILTIN or _registered.get(workflow.name, workflow) is not workflow:
        raise UsageError(f"a workflow named {workflow.name!r} exists already")
    _registered[workflow.name] = workflow


def names(modules: Iterable[str] | None = None) -> tuple[str, ...]:
    """Every known workflow's name, the built-in ones first; with ``modules``, only the built-in ones
    and those the modules define (registered now if need be)."""
    if modules is None:
        return (*BUILTIN, *_registered)
    modules = tuple(modules)
    use(modules)
    return (*BUILTIN, *dict.fromkeys(_modules[m] for m in modules))


def get(name: str) -> Workflow:
    """The workflow called ``name``; :class:`UsageError` if unknown."""
    if name in BUILTIN:
        module, _, attribute = BUILTIN[name].partition(":")
        return getattr(importlib.import_module(module), attribute)
    try:
        return _registered[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown workflow {name!r}: known workflows are {', '.join(names())}") from None


def all_workflows() -> tuple[Workflow, ...]:
    return tuple(get(name) for name in names())


def known_stages() -> dict[str, list[str]]:
    """Every workflow's stage names, in pipeline order."""
    return {w.name: list(w.stage_names) for w in all_workflows()}


def stage_function(workflow: str, stage: str) -> Callable:
    """The function of ``stage`` of ``workflow``; :class:`UsageError` if unknown."""
    return get(workflow).stage(stage).load()


def stage_order() -> list[str]:
    """Every stage name once, in the order the workflows list them (figures colour stages by it)."""
    return list(dict.fromkeys(s for w in all_workflows() for s in w.stage_names))


def modules_to_preload(name: str | None = None) -> list[str]:
    """The modules the stages of workflow ``name`` need, once: each stage function's module, then the
    workflow's :attr:`~Workflow.imports`. With ``name`` None, every known workflow's.

    Raises :class:`UsageError` if ``name`` is not a known workflow.
    """
    found: dict[str, None] = {}
    for w in (all_workflows() if name is None else (get(name),)):
        for stage in w.stages:
            found[stage.function.partition(":")[0]] = None
        found.update(dict.fromkeys(w.imports))
    return list(found)
