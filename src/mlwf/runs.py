"""Runs kept in the store: their status, listing them, showing one, collecting old intermediates.

Every run writes ``<workflow>/outputs/<run-id>/run.json`` (parameters, status,
report) and one ``<stage>/<index>.done.json`` per finished call; that is all
``mlwf runs ls`` and ``mlwf runs show`` read. A run is identified by the folder
it lives in, never by what its ``run.json`` says, and only a folder named like
a run id mlwf makes is a run.

While a run is going, its driver renews a lease: it rewrites ``run.json``
with a fresh ``heartbeat_at`` every ``heartbeat_s`` seconds (default 15) from
a background thread, and the record says how long the lease lasts
(``lease_s``, default 120). A run still marked ``running`` whose lease has
expired was killed or lost its driver: :func:`effective_status` calls it
``abandoned``, ``mlwf runs gc`` may collect it and ``--resume`` may finish it.
The lease is eight heartbeats long so that a heartbeat delayed by a slow
store (one S3 operation with its retries is bounded by about three times
``MLWF_S3_TIMEOUT``, 45 s by default) never makes a live run look abandoned.

A choreographed run has no driver: the servers holding anything of it renew
its lease, and events of it that a sink (a Broker) keeps to deliver later
keep it alive until ``held_until``, the last moment any of them could still
be accepted (see :mod:`mlwf.choreography.steps`).

``mlwf runs gc`` deletes only the intermediate objects of a run (the
``<stage>/<index>-<part>.bin`` and ``<stage>/<index>.done.json`` files of the
workflow's stages, and a choreographed run's claims and batch markers under
``choreography/``); it never touches a run's ``run.json`` or results, nor
anything else below or beside it, such as a model.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import shlex
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from mlwf import workflows
from mlwf.engine.layout import (RECORD, RUN_ID, RunLayout, is_choreography_bookkeeping, parse_intermediate,
                                runs_folder)
from mlwf.errors import MlwfError, NotFoundError, StoreError, UsageError
from mlwf.storage import Store

#: Seconds between two renewals of a running run's lease.
DEFAULT_HEARTBEAT_S = 15.0
#: Seconds a lease lasts without renewal before the run counts as abandoned.
DEFAULT_LEASE_S = 120.0
#: The statuses a driver writes; :func:`effective_status` adds ``abandoned`` and ``unknown``.
#: ``interrupted``: stopped by Ctrl-C, on purpose, where ``failed`` is stopped by an error.
WRITTEN_STATUSES = ("running", "succeeded", "failed", "interrupted")
#: The runs ``--resume latest`` looks for: stopped before they finished, by Ctrl-C or by losing their driver.
RESUMABLE_STATUSES = ("interrupted", "abandoned")
#: The furthest ahead a choreographed run's ``held_until`` counts (a day: the longest --max-age, and more).
MAX_HELD_S = 2 * 86_400.0
#: Largest run.json read; a driver writes a few kilobytes.
_MAX_RECORD_BYTES = 4 << 20
#: A URL's user name or password (``s3://key:secret@host``): a command holding one is not recorded.
_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*@")


#: Most words, and most characters in all, of the command line a run records for ``mlwf runs show``.
MAX_COMMAND_WORDS = 256
MAX_COMMAND_CHARS = 16_384


def recordable_command(words: Sequence[str] | None) -> list[str] | None:
    """``mlwf run``'s own words (after ``mlwf``) as a run records them, to show how to resume it.

    None (nothing recorded) if there are none, if they are not ``run <workflow> …``, if they are too many
    or too long, or if a word holds what a command line should not carry into a record: a character that
    is not printable, or a URL with a user name or password in it.
    """
    if not words or not all(isinstance(w, str) for w in words):
        return None
    words = list(words)
    if (words[0] != "run" or len(words) > MAX_COMMAND_WORDS or sum(map(len, words)) > MAX_COMMAND_CHARS
            or not all(w.isprintable() for w in words) or any(_CREDENTIALS.search(w) for w in words)):
        return None
    return words


def resume_command(words: Sequence[str], run_id: str) -> str:
    """The command line that resumes ``run_id``: ``mlwf`` and ``words`` (a ``mlwf run`` command line
    without ``mlwf``) with any ``--resume`` replaced by ``--resume run_id``, quoted for a POSIX shell."""
    kept: list[str] = []
    skip_value = False
    for word in words:
        if skip_value:
            skip_value = False
            continue
        name, equals, _ = word.partition("=")
        if len(name) >= 5 and "--resume".startswith(name):  # --resume, or the abbreviation argparse took for it
            skip_value = not equals
            continue
        kept.append(word)
    return shlex.join(["mlwf", *kept, "--resume", run_id])


def _resume_hint(record: dict[str, Any], status: str, run_id: str) -> str | None:
    """How to resume a run that can be (``mlwf runs show``), or None: its recorded command line with
    ``--resume``, else the words that say so. Only a store-transfer run keeps outputs to reuse."""
    if status not in RESUMABLE_STATUSES or record.get("transfer", "store") != "store":
        return None
    words = recordable_command(record.get("command"))
    if words is None:
        return f"its own command line and '--resume {run_id}'"
    return resume_command(words, run_id)


def now_utc() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def timestamp(moment: _dt.datetime) -> str:
    """How run records write a time (UTC, milliseconds)."""
    return moment.isoformat(timespec="milliseconds")


def parse_time(value: Any) -> _dt.datetime | None:
    """A record's time (ISO 8601 with a zone, as :func:`timestamp` writes it), or None for anything else."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        moment = _dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def effective_status(record: dict[str, Any], now: _dt.datetime | float | None = None) -> str:
    """The status a run really has: what its driver wrote, unless its lease expired.

    Parameters
    ----------
    record : a run's ``run.json`` as a dict.
    now : the time to judge the lease at: an aware datetime or seconds since
        the epoch (default: now).

    Returns
    -------
    str
        ``succeeded``, ``failed`` or ``interrupted`` as written; ``running`` while the lease
        (``heartbeat_at``, else ``updated_at``, plus ``lease_s``, default
        :data:`DEFAULT_LEASE_S`) holds, or while events of a choreographed run
        may still arrive (``held_until``, at most :data:`MAX_HELD_S` ahead);
        ``abandoned`` once both have expired, or for a running record that
        names no valid time or one further in the future than a lease (no
        driver is renewing it); ``unknown`` for any other record.
    """
    status = record.get("status") if isinstance(record, dict) else None
    if status not in WRITTEN_STATUSES:
        return "unknown"
    if status != "running":
        return status
    beat = parse_time(record.get("heartbeat_at")) or parse_time(record.get("updated_at"))
    lease = record.get("lease_s")
    if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not math.isfinite(lease) or lease <= 0:
        lease = DEFAULT_LEASE_S
    if beat is None:
        return "abandoned"
    if isinstance(now, (int, float)) and not isinstance(now, bool):
        now = _dt.datetime.fromtimestamp(now, _dt.UTC)
    now = now or now_utc()
    held = parse_time(record.get("held_until"))
    if held is not None and 0 <= (held - now).total_seconds() <= MAX_HELD_S:
        return "running"
    age = (now - beat).total_seconds()
    return "running" if -lease <= age <= lease else "abandoned"


def read_record(store: Store, workflow: str, run_id: str) -> dict[str, Any]:
    """The ``run.json`` of the run living in ``<workflow>/outputs/<run_id>/``, checked.

    Raises
    ------
    NotFoundError
        If there is no ``run.json`` there.
    ValueError
        If the folder is not named like a run id, or the record is
        unreadable: too large, not JSON, not an object, or naming another run
        id or workflow than where it lives.
    """
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise ValueError("folder is not named like a run id mlwf makes")
    raw = store.get(RunLayout(workflow, run_id).record)
    if len(raw) > _MAX_RECORD_BYTES:
        raise ValueError(f"{RECORD} is larger than {_MAX_RECORD_BYTES >> 20} MiB")
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError(f"{RECORD} is not valid JSON") from None
    if not isinstance(record, dict):
        raise ValueError(f"{RECORD} is not a JSON object")
    if record.get("run_id") != run_id:
        raise ValueError(f"{RECORD} names another run ({str(record.get('run_id'))[:80]!r})")
    if record.get("workflow") != workflow:
        raise ValueError(f"{RECORD} names another workflow ({str(record.get('workflow'))[:80]!r})")
    if not isinstance(record.get("params"), dict):
        raise ValueError(f"{RECORD} has no parameters")
    return record


def find_run(store, run_id: str) -> dict[str, Any] | None:
    """The ``run.json`` record of the run living in ``<workflow>/outputs/<run_id>/``, or None.

    Raises :class:`UsageError` if that record is unreadable (see :func:`read_record`).
    """
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        return None  # not an id mlwf makes (and never a path to follow)
    for workflow in workflows.names():
        try:
            return read_record(store, workflow, run_id)
        except NotFoundError:
            continue
        except StoreError:
            return None  # not a key at all (control characters, too long)
        except ValueError as e:
            raise UsageError(f"the record of run {run_id} is not a run record mlwf can read (its {e}): start a "
                             f"new run instead, and delete its folder with 'mlwf s3 clear-dir --prefix "
                             f"{workflow}/outputs/{run_id}'") from None
    return None


def _progress(record: dict[str, Any], done: dict[str, int]) -> dict[str, str]:
    """Finished/expected calls per stage: from the done records in the run's folder (``store``
    transfer, the choreography) or from the count the driver keeps in ``run.json`` (every transfer),
    whichever says more (a crafted count is capped at the expected number)."""
    recorded = record.get("calls_done") if isinstance(record.get("calls_done"), dict) else {}
    out = {}
    for s, n in _expected_calls(record).items():
        kept = recorded.get(s)
        kept = kept if isinstance(kept, int) and not isinstance(kept, bool) and kept >= 0 else 0
        out[s] = f"{max(done.get(s, 0), min(kept, n))}/{n}"
    return out


def _expected_calls(record: dict[str, Any]) -> dict[str, int]:
    try:
        report = record.get("report") or {}
        if report.get("stages"):
            return {str(s): int(v["calls"]) for s, v in report["stages"].items()}
        return workflows.get(record["workflow"]).expected_calls(record["params"])
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError, UsageError):
        return {}


def _folders(store: Store, workflow: str) -> dict[str, list[tuple[str, int]]]:
    """Every run folder of ``workflow`` and the keys below it (relative to the folder), with their sizes."""
    root = runs_folder(workflow)
    found: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for obj in store.list(root):
        folder, sep, rest = obj.key[len(root):].partition("/")
        if sep:
            found[folder].append((rest, obj.size))
    return found


def _accuracy(workflow: str, report: dict[str, Any]) -> float | None:
    """What a run measured: training's validation accuracy, inference's accuracy on labelled images."""
    value = report.get("validation_accuracy" if workflow == "ml-training" else "accuracy")
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _duration_ms(status: str, record: dict[str, Any], report: dict[str, Any], now: _dt.datetime) -> float | None:
    """How long the run took (its report's end to end), or has been going, or went before it stopped."""
    if status == "succeeded" and isinstance(report.get("e2e_ms"), (int, float)):
        return float(report["e2e_ms"])
    start = parse_time(record.get("started_at"))
    end = now if status == "running" else parse_time(record.get("updated_at"))
    if start is None or end is None or end < start:
        return None
    return round((end - start).total_seconds() * 1e3, 3)


def summarize(workflow: str, run_id: str, keys: list[tuple[str, int]], record: dict[str, Any] | None,
              error: str | None, now: _dt.datetime) -> dict[str, Any]:
    """One entry of :func:`list_runs`: the run living in ``<workflow>/outputs/<run_id>/``.

    ``keys`` are the keys below its folder (relative to it) with their sizes;
    ``record`` its ``run.json`` as :func:`read_record` returned it, or None
    with ``error`` saying why it could not be read. (``mlwf ui`` keeps records
    it has read and calls this with them.)
    """
    done: dict[str, int] = defaultdict(int)
    intermediate_bytes = 0
    for rest, size in keys:
        intermediate = parse_intermediate(rest)
        if intermediate is not None and intermediate[1]:
            done[intermediate[0]] += 1
        if _is_intermediate(workflow, rest):
            intermediate_bytes += size
    entry: dict[str, Any] = {"run_id": run_id, "workflow": workflow}
    sizes = {"bytes": sum(size for _, size in keys), "intermediate_bytes": intermediate_bytes}
    if record is None:
        why = f"no {RECORD}" if RECORD not in {rest for rest, _ in keys} else str(error)
        return {**entry, "status": "unreadable", "started_at": None, "updated_at": None,
                "heartbeat_at": None, "duration_ms": None, "e2e_ms": None, "accuracy": None,
                "progress": {}, "error": why, **sizes}
    report = record.get("report") if isinstance(record.get("report"), dict) else {}
    status = effective_status(record, now)
    return {
        **entry,
        "status": status,
        "started_at": record.get("started_at"),
        "updated_at": record.get("updated_at"),
        "heartbeat_at": record.get("heartbeat_at"),
        "duration_ms": _duration_ms(status, record, report, now),
        "e2e_ms": report.get("e2e_ms"),
        "accuracy": _accuracy(workflow, report),
        "progress": _progress(record, done),
        "error": record.get("error"),
        **sizes,
    }


def list_runs(store: Store, now: _dt.datetime | None = None) -> list[dict[str, Any]]:
    """Every run in the store, newest first.

    Returns
    -------
    list of dict
        One per run folder: ``run_id``, ``workflow``, ``status`` (effective:
        see :func:`effective_status`), ``started_at`` (this attempt's, for a
        resumed run), ``updated_at``, ``heartbeat_at``, ``duration_ms`` (the
        report's end to end once it succeeded; else from its start to its last
        record, or to now while running), ``e2e_ms``, ``accuracy`` (training:
        on the held-out images; inference: on labelled images; else None),
        ``progress`` (finished/expected calls per stage), ``error``,
        ``bytes`` (everything in its folder) and ``intermediate_bytes`` (what
        :func:`gc_runs` would delete). A folder whose ``run.json`` is missing
        or unreadable is listed with status ``unreadable`` and the reason in
        ``error``.
    """
    now = now or now_utc()
    runs = []
    for workflow in workflows.names():
        for run_id, keys in _folders(store, workflow).items():
            try:
                record, error = read_record(store, workflow, run_id), None
            except (MlwfError, ValueError) as e:
                record, error = None, str(e)
            runs.append(summarize(workflow, run_id, keys, record, error, now))
    runs.sort(key=lambda r: r["run_id"], reverse=True)
    return runs


def latest_resumable(store: Store, workflow: str, params: dict[str, Any]) -> tuple[str | None, dict | None]:
    """What ``--resume latest`` resumes: the newest ``workflow`` run with status in
    :data:`RESUMABLE_STATUSES` and these ``params``.

    Returns
    -------
    (run id or None, the newest such run's record whatever its parameters, or None)
    """
    newest = None
    for run_id in sorted(_folders(store, workflow), reverse=True):
        try:
            record = read_record(store, workflow, run_id)
        except (MlwfError, ValueError):
            continue
        if effective_status(record) not in RESUMABLE_STATUSES:
            continue
        if record["params"] == params:
            return run_id, record
        newest = newest or record
    return None, newest


def gc_runs(store: Store, keep: int, now: _dt.datetime | None = None) -> dict[str, Any]:
    """Delete the intermediate outputs of all but the ``keep`` newest runs of each workflow.

    The newest runs are the readable ones with the greatest run ids (run ids
    sort by start time). Of the others, runs that succeeded, failed, were
    interrupted or abandoned are collected; a run still running is left alone, and so is a
    folder whose ``run.json`` is missing or unreadable. Only intermediates
    are deleted (see the module's description); an abandoned choreographed
    run is first ended ``failed`` (no server would take it up again to find
    its inputs gone), by compare-and-swap, so one that came alive meanwhile
    is kept.

    Returns
    -------
    dict
        ``runs``: the collected run ids; ``deleted``: how many objects;
        ``kept``: the run ids kept as the newest; ``skipped``: ``{"run_id",
        "workflow", "reason"}`` for every run left alone for another reason.

    Raises
    ------
    UsageError
        If ``keep`` is not an integer of 0 or more.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise UsageError(f"--keep must be 0 or more, got {keep!r}")
    now = now or now_utc()
    collected, kept, skipped, deleted = [], [], [], 0
    by_workflow: dict[str, list[dict]] = defaultdict(list)
    for run in list_runs(store, now):
        if run["status"] == "unreadable":
            skipped.append({"run_id": run["run_id"], "workflow": run["workflow"],
                            "reason": f"unreadable: {run['error']}"})
        else:
            by_workflow[run["workflow"]].append(run)
    for workflow, runs in by_workflow.items():
        kept += [r["run_id"] for r in runs[:keep]]
        for run in runs[keep:]:
            run_id = run["run_id"]
            try:
                # Judge again just before deleting: the run may have been resumed meanwhile.
                status = effective_status(read_record(store, workflow, run_id), now_utc())
            except (MlwfError, ValueError) as e:
                skipped.append({"run_id": run_id, "workflow": workflow, "reason": f"unreadable: {e}"})
                continue
            if status not in ("succeeded", "failed", "interrupted", "abandoned"):
                skipped.append({"run_id": run_id, "workflow": workflow, "reason": status})
                continue
            if status == "abandoned" and not _end_abandoned_choreography(store, workflow, run_id):
                skipped.append({"run_id": run_id, "workflow": workflow, "reason": "running"})
                continue
            prefix = RunLayout(workflow, run_id).folder + "/"
            keys = [o.key for o in store.list(prefix) if _is_intermediate(workflow, o.key[len(prefix):])]
            if keys:
                deleted += store.delete_many(keys)
                collected.append(run_id)
    return {"runs": sorted(collected), "deleted": deleted, "kept": sorted(kept), "skipped": skipped}


def _end_abandoned_choreography(store: Store, workflow: str, run_id: str) -> bool:
    """Before a choreographed run's intermediates are collected, end it ``failed`` saying why, by
    compare-and-swap: False if it came alive meanwhile (keep it). A driver's run is left as it is
    (``--resume`` checks what is left)."""
    key = RunLayout(workflow, run_id).record
    for _ in range(5):
        try:
            raw, tag = store.get_tagged(key)
            record = json.loads(raw)
        except (MlwfError, ValueError):
            return False
        if not isinstance(record, dict) or record.get("mode") != "choreography" or record.get("status") != "running":
            return True
        if effective_status(record) != "abandoned":
            return False
        now = timestamp(now_utc())
        ended = {**record, "status": "failed", "failed_stage": None, "updated_at": now,
                 "error": f"abandoned: nothing kept it alive since {record.get('heartbeat_at')} (no server held a "
                          "call or event of it, and none of its events could still arrive); its intermediates were "
                          "collected by mlwf runs gc: start a new run"}
        if store.put_if_tag(key, json.dumps(ended, indent=2).encode(), tag):
            return True
    return False


def _is_intermediate(workflow: str, rest: str) -> bool:
    intermediate = parse_intermediate(rest)
    return (intermediate is not None and intermediate[0] in workflows.get(workflow).stage_names) \
        or is_choreography_bookkeeping(rest)


def show_run(store: Store, run_id: str) -> dict[str, Any]:
    """Everything kept about one run: parameters, status, progress, report and where its outputs are.

    Returns
    -------
    dict with ``run_id``, ``workflow``, ``status``, ``started_at``, ``updated_at``,
    ``duration_ms`` (as :func:`list_runs` says), ``params``,
    ``transfer``, ``resumed``, ``error``, ``resume`` (for an interrupted or abandoned
    run that can be resumed, the command that does it, else None), ``progress`` (finished/expected calls
    per stage), ``report`` (the run's report once it succeeded, else None:
    per-stage figures, accuracy, confusion matrix) and ``outputs`` (name → key).

    Raises
    ------
    UsageError
        If no run of that id is in the store.
    """
    record = find_run(store, run_id)
    if record is None:
        raise UsageError(f"unknown run id {run_id!r} in bucket {store.bucket!r} of {store.location}: "
                         "see 'mlwf runs ls' for the runs kept there")
    if not isinstance(record, dict) or record.get("workflow") not in workflows.names():
        raise UsageError(f"the record of run {run_id!r} in bucket {store.bucket!r} is not a run record: "
                         "it was not written by mlwf; delete its folder with 'mlwf s3 clear-dir'")
    workflow = record["workflow"]
    folder = RunLayout(workflow, run_id).folder + "/"
    done: dict[str, int] = defaultdict(int)
    for obj in store.list(folder):
        rest = obj.key[len(folder):].split("/")
        if len(rest) == 2 and rest[1].endswith(".done.json"):
            done[rest[0]] += 1
    report = record.get("report") if record.get("status") == "succeeded" else None
    outputs = {"run folder": folder, "run record": folder + RECORD}
    if report and workflow == "ml-inference":
        outputs["predictions"] = report.get("results_key")
        outputs["summary"] = report.get("summary_key")
    if report and report.get("model_prefix"):
        outputs["model" if workflow == "ml-inference" else "published model"] = report["model_prefix"]
    status = effective_status(record)
    return {
        "run_id": record.get("run_id"),
        "workflow": workflow,
        "status": status,
        "started_at": record.get("started_at"),
        "updated_at": record.get("updated_at"),
        "duration_ms": _duration_ms(status, record, report or {}, now_utc()),
        "params": record.get("params", {}),
        "transfer": record.get("transfer"),
        "resumed": record.get("resumed"),
        "error": record.get("error"),
        "resume": _resume_hint(record, status, run_id),
        "progress": _progress(record, done),
        "report": report,
        "outputs": {k: v for k, v in outputs.items() if v},
    }
