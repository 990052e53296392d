"""What each page of the dashboard shows, as JSON: a run, the published models, runs side by side, a bench folder.

Everything here reads; the one write, a rollback, goes through
:func:`mlwf.model.registry.rollback` (see :mod:`mlwf.ui.app`).
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

from mlwf import runs
from mlwf.engine.layout import TRACE, RunLayout
from mlwf.errors import MlwfError, ModelError, NotFoundError, UsageError
from mlwf.ui.index import backend_of

#: Largest trace read (a 1,000-way fan-out's is about 2 MiB).
MAX_TRACE_BYTES = 64 << 20
#: Most done records read to draw the calls of a run that kept no trace.
MAX_DONE_RECORDS = 5000
#: Most runs compared at once.
MAX_COMPARED = 8

#: The bench folder as last read, with the files' identity then: read again only when a file changed.
_bench_cache: dict[Path, tuple[tuple, dict[str, Any]]] = {}
_bench_lock = threading.Lock()


def run_detail(store, run_id: str) -> dict[str, Any] | None:
    """One run as its page shows it, or None if the store has no run of that id.

    :func:`mlwf.runs.show_run`'s fields, and ``backend``, ``failed_stage``,
    ``calls_expected`` (per stage), ``confusion`` (``labels``, ``matrix``:
    rows the true class, columns the predicted one), ``edges`` and ``calls``
    (one per call in the run's trace, for the Gantt; None when the run kept
    no trace, as a run with no driver or one from before traces were kept).

    Raises :class:`~mlwf.errors.UsageError` if the run's record is unreadable.
    """
    record = runs.find_run(store, run_id)
    if record is None:
        return None
    info = runs.show_run(store, run_id)
    report = info.get("report") or {}
    trace = read_trace(store, info["workflow"], run_id)
    calls = gantt_calls(trace) if trace is not None else None
    if calls is None and info["status"] != "running":
        calls = calls_from_done_records(store, info["workflow"], run_id)
    return {**info, "backend": backend_of(record), "failed_stage": record.get("failed_stage"),
            "mode": record.get("mode") or "driver", "confusion": confusion(report),
            "edges": report.get("edges") or [], "calls": calls, "trace": trace is not None}


def read_trace_bytes(store, workflow: str, run_id: str) -> bytes | None:
    """The run's ``trace.json`` as its driver wrote it, or None if it kept none."""
    try:
        raw = store.get(RunLayout(workflow, run_id).result(TRACE))
    except NotFoundError:
        return None
    return raw if len(raw) <= MAX_TRACE_BYTES else None


def read_trace(store, workflow: str, run_id: str) -> dict[str, Any] | None:
    raw = read_trace_bytes(store, workflow, run_id)
    try:
        doc = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list) else None


def gantt_calls(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """Every call of a trace (its ``call`` events), by start: ``name``, ``stage``, ``index``, ``worker``,
    ``lane`` (a row per worker and lane), ``start_ms``, ``duration_ms``, ``attempts``."""
    workers = {ev.get("pid"): str(ev.get("args", {}).get("name", "")).removeprefix("worker ")
               for ev in trace["traceEvents"] if isinstance(ev, dict) and ev.get("name") == "process_name"}
    calls = []
    for ev in trace["traceEvents"]:
        if not isinstance(ev, dict) or ev.get("ph") != "X" or ev.get("cat") != "call":
            continue
        args = ev.get("args") if isinstance(ev.get("args"), dict) else {}
        try:
            start, duration = float(ev["ts"]) / 1e3, float(ev["dur"]) / 1e3
        except (KeyError, TypeError, ValueError):
            continue
        worker = str(args.get("worker") or workers.get(ev.get("pid")) or ev.get("pid"))
        attempts = args.get("attempts")
        calls.append({"name": str(ev.get("name")), "stage": str(args.get("stage", "")), "index": args.get("index"),
                      "worker": worker, "lane": f"{worker} · {ev.get('tid', 1)}", "start_ms": round(start, 3),
                      "duration_ms": round(duration, 3),
                      "attempts": attempts if isinstance(attempts, int) and not isinstance(attempts, bool) else 1})
    calls.sort(key=lambda c: (c["start_ms"], c["lane"]))
    return calls


def calls_from_done_records(store, workflow: str, run_id: str) -> list[dict[str, Any]] | None:
    """The calls of a run that kept no trace, as :func:`gantt_calls` gives them, from the done records
    in its folder (each holds its call's outcome: worker, start, end); None if it has none, or more
    than :data:`MAX_DONE_RECORDS`.

    A choreographed run has no driver to write a trace; its servers write a done record per call.
    So does a driver's run with ``--transfer store`` (the default) that ended before traces were kept.
    """
    from mlwf.engine.layout import parse_intermediate
    from mlwf.engine.trace import assign_lanes

    folder = RunLayout(workflow, run_id).folder + "/"
    keys = [o.key for o in store.list(folder) if (parse_intermediate(o.key[len(folder):]) or ("", False))[1]]
    if not keys or len(keys) > MAX_DONE_RECORDS:
        return None
    found = []
    for key, raw in zip(keys, store.get_many(keys)):
        stage, name = key[len(folder):].split("/")
        try:
            outcome = json.loads(raw)["outcome"]
            start, end, worker = float(outcome["start"]), float(outcome["end"]), str(outcome["worker"])
        except (ValueError, KeyError, TypeError, RecursionError):
            continue
        found.append((stage, int(name.split(".")[0]), worker, start, max(start, end)))
    if not found:
        return None
    t0 = min(f[3] for f in found)
    calls = []
    for worker in sorted({f[2] for f in found}):
        mine = [f for f in found if f[2] == worker]
        for (stage, index, _, start, end), lane in zip(mine, assign_lanes([(f[3], f[4]) for f in mine])):
            calls.append({"name": f"{stage}[{index}]", "stage": stage, "index": index, "worker": worker,
                          "lane": f"{worker} · {lane + 1}", "start_ms": round((start - t0) * 1e3, 3),
                          "duration_ms": round((end - start) * 1e3, 3), "attempts": 1})
    calls.sort(key=lambda c: (c["start_ms"], c["lane"]))
    return calls


def confusion(report: dict[str, Any]) -> dict[str, Any] | None:
    """A report's confusion matrix as ``{"labels", "matrix"}`` (training writes the matrix and ``classes``
    apart; inference writes them together)."""
    found = report.get("confusion")
    if isinstance(found, dict):
        labels, matrix = found.get("labels"), found.get("matrix")
    else:
        labels, matrix = report.get("classes"), found
    if not isinstance(labels, list) or not isinstance(matrix, list) or len(matrix) != len(labels):
        return None
    return {"labels": [str(x) for x in labels], "matrix": matrix}


def models(store, prefixes: list[str]) -> list[dict[str, Any]]:
    """The model published at each prefix that has one: current version and history, newest first."""
    from mlwf.model.registry import read_manifest

    where = f"bucket {store.bucket!r} of {store.location}"
    out = []
    for prefix in prefixes:
        try:
            manifest = read_manifest(store.get, prefix, where=where)
        except ModelError as e:
            if "no model at" in str(e):
                continue
            out.append({"prefix": prefix, "error": str(e)})
            continue
        except (MlwfError, ValueError) as e:
            out.append({"prefix": prefix, "error": str(e)})
            continue
        summary = manifest.get("summary") if isinstance(manifest.get("summary"), dict) else {}
        current = {**_version(manifest), "current": True, "accuracy": summary.get("validation_accuracy"),
                   "rolled_back_at": manifest.get("rolled_back_at")}
        out.append({"prefix": prefix, "current": current,
                    "history": [_version(h) for h in manifest.get("history", [])]})
    return out


def _version(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry.get(k) for k in ("sha256", "size", "run_id", "published_at")}


def add_accuracies(found: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Each version's accuracy, from the run that made it (the manifest keeps the current one's only)."""
    by_run = {r["run_id"]: r["accuracy"] for r in rows}
    for model in found:
        for version in [model.get("current"), *model.get("history", [])]:
            if version and version.get("accuracy") is None:
                version["accuracy"] = by_run.get(version.get("run_id"))


def compare(store, run_ids: list[str]) -> dict[str, Any]:
    """Runs side by side: end to end, per stage and per edge. Unknown ids are listed in ``missing``."""
    compared, missing = [], []
    for run_id in dict.fromkeys(run_ids):
        try:
            info = runs.show_run(store, run_id) if runs.find_run(store, run_id) else None
        except UsageError:
            info = None
        if info is None:
            missing.append(run_id)
            continue
        report = info.get("report") or {}
        compared.append({"run_id": run_id, "workflow": info["workflow"], "status": info["status"],
                         "transfer": info.get("transfer"), "backend": report.get("backend"),
                         "e2e_ms": report.get("e2e_ms"), "duration_ms": info.get("duration_ms"),
                         "stage_ms": report.get("stage_ms") or {}, "edges": report.get("edges") or [],
                         "accuracy": report.get("validation_accuracy", report.get("accuracy"))})
    return {"runs": compared, "missing": missing}


def bench(folder: Path | None) -> dict[str, Any] | None:
    """A ``mlwf bench`` folder: its ``summary.csv`` rows, and the median of each edge's figures per
    configuration from ``breakdown.csv``; None when no folder was given.

    The files are read again only when one has changed (its size, time or inode), so a page loaded again
    costs a ``stat`` of each. A file that cannot be read (not a regular file, over
    :data:`mlwf.bench.files.MAX_CSV_BYTES`, not CSV) gives no rows and an ``error`` that says which and why.
    """
    if folder is None:
        return None
    from mlwf.bench.files import csv_identity, read_csv

    files = [folder / "summary.csv", folder / "breakdown.csv"]
    try:
        identity = tuple(csv_identity(path) for path in files)
    except MlwfError as e:
        return {"folder": str(folder), "summary": [], "edges": [], "error": str(e)}
    with _bench_lock:
        cached = _bench_cache.get(folder)
        if cached is not None and cached[0] == identity:
            return cached[1]
    try:
        summary, breakdown = (read_csv(path) for path in files)
        found = {"folder": str(folder), "summary": summary, "edges": _edge_medians(breakdown)}
    except MlwfError as e:
        found = {"folder": str(folder), "summary": [], "edges": [], "error": str(e)}
    with _bench_lock:
        _bench_cache[folder] = (identity, found)
    return found


def _edge_medians(breakdown: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The median of each edge's figures per configuration (the ``edge`` rows of ``breakdown.csv``)."""
    from statistics import median

    edges: dict[tuple, dict[str, list[float]]] = {}
    for row in breakdown:
        if row.get("kind") != "edge":
            continue
        key = (row.get("backend"), row.get("transfer"), row.get("workflow"), row.get("mode"),
               row.get("state") or "light", row.get("stage") or f"{row.get('from')}→{row.get('to')}")
        figures = edges.setdefault(key, {})
        for name in ("serialize_ms", "transfer_ms", "deserialize_ms", "bytes"):
            try:
                value = float(row.get(name) or 0)
            except ValueError:
                continue
            if math.isfinite(value):  # 'nan' or 'inf' in a hand-edited file: no JSON number, left out
                figures.setdefault(name, []).append(value)
    return [{"backend": k[0], "transfer": k[1], "workflow": k[2], "mode": k[3], "state": k[4], "edge": k[5],
             **{name: round(median(values), 3) for name, values in figures.items() if values}}
            for k, figures in sorted(edges.items(), key=lambda kv: tuple(str(x) for x in kv[0]))]
