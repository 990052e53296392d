"""A workflow as data: its stages, their named inputs and outputs, fan-out, fan-in and resources.

One :class:`Workflow` per workflow is what every other part reads: the driver
and the runner (which function a stage runs, how its inputs are decoded, how
its outputs are named and numbered), every backend (stage names, resource
requests), ``mlwf deploy`` (one Service per stage, scaled by its
:class:`Profile`), ``mlwf runs`` (how many calls each stage makes), the plots
(stage order and colours) and the function server (which event types exist).
Adding a stage is one edit here; outputs are referred to by name.

The graph is in the inputs: an :class:`Input` names the output it comes from
(``"<stage>.<output>"``), so a stage's predecessors (:attr:`Stage.after`),
successors (:meth:`Workflow.successors`), fan-out (``each``: one call per part
of the source) and fan-in (``gather``: the outputs of every call of the
source, as a list) are all readable from the definition. Functions are named
``"module:function"`` and imported only when a call runs, so reading a
definition never imports scikit-learn.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_WORKFLOW_NAME = re.compile(r"[a-z][a-z0-9-]*[a-z0-9]")
#: How a consumer turns bytes back into a value, besides ``"module:function"``.
DECODERS = ("codec", "raw")


def load_function(path: str) -> Callable:
    """The object named by ``"module:function"`` (imported now)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Output:
    """One named output of a stage.

    ``many``: the stage hands on a list of parts under this name (one per
    consumer call, e.g. pca's slices), each stored as its own object.
    """

    name: str
    many: bool = False


@dataclass(frozen=True)
class Input:
    """One input of a stage: the stage function's parameter ``name``, fed from ``source``.

    Parameters
    ----------
    name : the stage function's parameter.
    source : ``"<stage>.<output>"`` it comes from.
    decode : ``"codec"`` (mlwf's payload format, the default), ``"raw"``
        (the bytes) or ``"module:function"``, called as
        ``function(data, source=<what it is>)`` (e.g. ``"mlwf.model:from_bytes"``).
    cache : keep the decoded value in the worker for later calls (the model).
    each : fan-out: one call of this stage per part of the source (a
        ``many`` output, over every call of the source stage, in call order).
    gather : fan-in: the source's output of every call of the source stage,
        as a list in call order; the stage waits for all of them.
    """

    name: str
    source: str
    decode: str = "codec"
    cache: bool = False
    each: bool = False
    gather: bool = False

    @property
    def stage(self) -> str:
        """The stage this input comes from."""
        return self.source.partition(".")[0]

    @property
    def output(self) -> str:
        """The output of :attr:`stage` it comes from."""
        return self.source.partition(".")[2]


@dataclass(frozen=True)
class Profile:
    """How a Knative Service running one stage scales: calls per pod, pods at most, what one pod gets."""

    concurrency: int
    max_scale: int
    cpu: str
    memory: str
    processes: bool = False  # run the pod's concurrent calls in worker processes (CPU-bound, > 1 per pod)


@dataclass(frozen=True)
class Stage:
    """One stage: a plain function, its named inputs and outputs, and how many calls it makes.

    ``calls`` names the workflow parameter that says how many calls the stage
    makes (``"num_pca"``), or is None for one call: what ``mlwf runs`` counts
    progress against. ``profile`` is how its Knative Service scales.
    """

    name: str
    function: str
    outputs: tuple[Output, ...]
    inputs: tuple[Input, ...] = ()
    calls: str | None = None
    profile: Profile = field(default_factory=lambda: Profile(1, 16, "1", "1Gi"))

    @property
    def after(self) -> tuple[str, ...]:
        """The stages whose outputs this stage takes, in input order (its predecessors)."""
        return tuple(dict.fromkeys(i.stage for i in self.inputs))

    def input(self, name: str) -> Input | None:
        """The input fed to parameter ``name``, or None (a plain argument)."""
        return next((i for i in self.inputs if i.name == name), None)

    def load(self) -> Callable:
        """The stage function (imported now, looked up at every call so tests may replace it)."""
        return load_function(self.function)


@dataclass(frozen=True)
class Workflow:
    """A workflow: its stages in the order they run, its parameters, and the function that drives it.

    Parameters
    ----------
    name : ``ml-training``; also the first part of its event types and run folders.
    stages : in the order the driver runs them.
    params : the driver's positional arguments (``DATA_PREFIX NUM_PCA NUM_TRAIN``), by their names
        in the run record.
    drive : ``"module:function"`` called as ``function(engine, *args, **options)``; returns the report.
    imports : modules the stage functions import, loaded once in a worker before its first call.
    example : the reference's arguments for this workflow (the in-cluster driver Jobs run them).
    """

    name: str
    stages: tuple[Stage, ...]
    params: tuple[str, ...]
    drive: str
    imports: tuple[str, ...] = ()
    example: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check(self)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def stage(self, name: str) -> Stage:
        """The stage called ``name``; :class:`~mlwf.errors.UsageError` if there is none."""
        for s in self.stages:
            if s.name == name:
                return s
        from mlwf.errors import UsageError

        raise UsageError(f"unknown stage {self.name}/{name}: {self.name} has stages {', '.join(self.stage_names)}")

    def successors(self, stage: str) -> tuple[str, ...]:
        """The stages that take an output of ``stage``."""
        return tuple(s.name for s in self.stages if stage in s.after)

    def fan_in(self, stage: str) -> tuple[Input, ...]:
        """The inputs of ``stage`` that gather every call of their source (it waits for all of them)."""
        return tuple(i for i in self.stage(stage).inputs if i.gather)

    def expected_calls(self, params: Mapping[str, Any]) -> dict[str, int]:
        """How many calls each stage makes for a run with ``params`` (0 where a parameter is missing)."""
        return {s.name: (1 if s.calls is None else int(params.get(s.calls, 0))) for s in self.stages}

    def run(self, engine, *args, **options) -> dict[str, Any]:
        """Drive a run on ``engine``; returns its report."""
        return load_function(self.drive)(engine, *args, **options)


def check(workflow: Workflow) -> None:
    """Refuse a definition whose graph does not hold together (:class:`ValueError`, naming the fault)."""
    where = f"workflow {workflow.name!r}"
    if not _WORKFLOW_NAME.fullmatch(workflow.name or ""):
        raise ValueError(f"{where}: a name is lowercase letters, digits and '-'")
    seen: dict[str, Stage] = {}
    for stage in workflow.stages:
        if not _NAME.fullmatch(stage.name) or stage.name in seen:
            raise ValueError(f"{where}: stage name {stage.name!r} is not a lowercase identifier, or not unique")
        if ":" not in stage.function:
            raise ValueError(f"{where}: stage {stage.name} function {stage.function!r} is not 'module:function'")
        names = [o.name for o in stage.outputs]
        if not stage.outputs or len(set(names)) != len(names):
            raise ValueError(f"{where}: stage {stage.name} needs outputs with distinct names")
        for i in stage.inputs:
            source = seen.get(i.stage)
            if source is None or i.output not in {o.name for o in source.outputs}:
                raise ValueError(f"{where}: input {stage.name}.{i.name} comes from {i.source!r}, which is not an "
                                 "output of an earlier stage")
            if i.each and i.gather:
                raise ValueError(f"{where}: input {stage.name}.{i.name} cannot both fan out and gather")
            if i.decode not in DECODERS and ":" not in i.decode:
                raise ValueError(f"{where}: input {stage.name}.{i.name} decode {i.decode!r} is not one of "
                                 f"{', '.join(DECODERS)} or 'module:function'")
        if sum(i.each for i in stage.inputs) > 1:
            raise ValueError(f"{where}: stage {stage.name} fans out over more than one input")
        seen[stage.name] = stage
