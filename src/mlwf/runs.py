"""Runs kept in the store: list them with their progress, show one, collect old intermediates.

Every run writes ``<workflow>/outputs/<run-id>/run.json`` (parameters, status,
report) and one ``<stage>/<index>.done.json`` per finished call; that is all
``mlwf runs ls`` and ``mlwf runs show`` read. ``mlwf runs gc`` deletes the stage outputs of old runs
(the folders below the run) and keeps their ``run.json`` and results, and
never touches a model prefix.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from mlwf.errors import MlwfError, UsageError
from mlwf.storage import Store, join_key
from mlwf.workflows import WORKFLOWS


def _expected_calls(record: dict[str, Any]) -> dict[str, int]:
    report = record.get("report") or {}
    if report.get("stages"):
        return {s: v["calls"] for s, v in report["stages"].items()}
    p = record.get("params", {})
    if record.get("workflow") == "ml-training":
        return {"partition": 1, "pca": p.get("num_pca", 0), "train": p.get("num_train", 0), "validation": 1}
    return {"partition": 1, "load": 1, "predict": p.get("num_funcs", 0)}


def list_runs(store: Store) -> list[dict[str, Any]]:
    """Every run in the store, newest first, with status and per-stage progress."""
    runs = []
    for workflow in WORKFLOWS:
        root = join_key(workflow, "outputs") + "/"
        done: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        records = []
        for obj in store.list(root):
            rest = obj.key[len(root):].split("/")
            if len(rest) == 2 and rest[1] == "run.json":
                records.append(obj.key)
            elif len(rest) == 3 and rest[2].endswith(".done.json"):
                done[rest[0]][rest[1]] += 1
        for key in records:
            try:
                record = json.loads(store.get(key))
            except (MlwfError, ValueError):
                continue
            expected = _expected_calls(record)
            runs.append({
                "run_id": record.get("run_id"),
                "workflow": workflow,
                "status": record.get("status"),
                "updated_at": record.get("updated_at"),
                "progress": {s: f"{done[record.get('run_id')].get(s, 0)}/{n}" for s, n in expected.items()},
                "e2e_ms": (record.get("report") or {}).get("e2e_ms"),
                "error": record.get("error"),
            })
    runs.sort(key=lambda r: r["run_id"] or "", reverse=True)
    return runs


def gc_runs(store: Store, keep: int) -> dict[str, Any]:
    """Delete the intermediate outputs of all but the ``keep`` newest runs of each workflow.

    Runs still marked running are left alone. Returns the collected run ids
    and how many objects were deleted.
    """
    if not isinstance(keep, int) or keep < 0:
        raise UsageError(f"--keep must be 0 or more, got {keep!r}")
    collected, deleted = [], 0
    by_workflow: dict[str, list[dict]] = defaultdict(list)
    for run in list_runs(store):
        by_workflow[run["workflow"]].append(run)
    for workflow, runs in by_workflow.items():
        for run in runs[keep:]:
            if run["status"] == "running":
                continue
            prefix = join_key(workflow, "outputs", run["run_id"]) + "/"
            keys = [o.key for o in store.list(prefix) if "/" in o.key[len(prefix):]]
            if keys:
                deleted += store.delete_many(keys)
                collected.append(run["run_id"])
    return {"runs": sorted(collected), "deleted": deleted}


def effective_status(record: dict[str, Any], now: float | None = None) -> str:
    """The status of a run as a reader should take it: the one its record states.

    Parameters
    ----------
    record : the run's ``run.json`` document.
    now : the time to judge it at (seconds since the epoch; default: now).

    Returns
    -------
    str : ``"running"``, ``"succeeded"`` or ``"failed"``.
    """
    return record.get("status")


def show_run(store: Store, run_id: str) -> dict[str, Any]:
    """Everything kept about one run: parameters, status, progress, report and where its outputs are.

    Returns
    -------
    dict with ``run_id``, ``workflow``, ``status``, ``updated_at``, ``params``,
    ``transfer``, ``resumed``, ``error``, ``progress`` (finished/expected calls
    per stage), ``report`` (the run's report once it succeeded, else None:
    per-stage figures, accuracy, confusion matrix) and ``outputs`` (name → key).

    Raises
    ------
    UsageError
        If no run of that id is in the store.
    """
    from mlwf.engine.driver import find_run

    record = find_run(store, run_id)
    if record is None:
        raise UsageError(f"unknown run id {run_id!r} in bucket {store.bucket!r} of {store.url}: "
                         "see 'mlwf runs ls' for the runs kept there")
    if not isinstance(record, dict) or record.get("workflow") not in WORKFLOWS:
        raise UsageError(f"the record of run {run_id!r} in bucket {store.bucket!r} is not a run record: "
                         "it was not written by mlwf; delete its folder with 'mlwf s3 clear-dir'")
    workflow = record["workflow"]
    folder = join_key(workflow, "outputs", run_id) + "/"
    done: dict[str, int] = defaultdict(int)
    for obj in store.list(folder):
        rest = obj.key[len(folder):].split("/")
        if len(rest) == 2 and rest[1].endswith(".done.json"):
            done[rest[0]] += 1
    report = record.get("report") if record.get("status") == "succeeded" else None
    outputs = {"run folder": folder, "run record": folder + "run.json"}
    if report and workflow == "ml-inference":
        outputs["predictions"] = report.get("results_key")
        outputs["summary"] = report.get("summary_key")
    if report and report.get("model_prefix"):
        outputs["model" if workflow == "ml-inference" else "published model"] = report["model_prefix"]
    return {
        "run_id": record.get("run_id"),
        "workflow": workflow,
        "status": effective_status(record),
        "updated_at": record.get("updated_at"),
        "params": record.get("params", {}),
        "transfer": record.get("transfer"),
        "resumed": record.get("resumed"),
        "error": record.get("error"),
        "progress": {s: f"{done.get(s, 0)}/{n}" for s, n in _expected_calls(record).items()},
        "report": report,
        "outputs": {k: v for k, v in outputs.items() if v},
    }
