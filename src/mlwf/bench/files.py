"""The files a benchmark folder holds: latency CSVs (the reference's format), the breakdown, the summary."""

from __future__ import annotations

import csv
import io
import os
import platform
import re
import stat
import statistics
from pathlib import Path
from typing import Any

from mlwf.errors import UsageError


#: ``BACKEND-TRANSFER[-heavy]-WORKFLOW-MODE.csv``: a light run's name is the one it had before ``--state``.
LATENCY_CSV = re.compile(r"^(?P<backend>[a-z0-9_]+)-(?P<transfer>[a-z0-9_]+)(?:-(?P<state>heavy))?"
                         r"-(?P<workflow>ml-training|ml-inference)-(?P<mode>warm|cold)\.csv$")


def latency_csv_name(backend: str, transfer: str, workflow: str, mode: str, state: str = "light") -> str:
    """The latency CSV of one configuration (matched by :data:`LATENCY_CSV`)."""
    return f"{backend}-{transfer}{'-heavy' if state == 'heavy' else ''}-{workflow}-{mode}.csv"


def label(backend: str, transfer: str, state: str = "light", mode: str | None = None) -> str:
    """``local · shm · heavy`` (and the mode if given): a configuration as figures and progress name it;
    the default light state goes unsaid, as in a light configuration's file name."""
    return " · ".join([backend, transfer, *([state] if state != "light" else []), *([mode] if mode else [])])


BASELINE_CSV = re.compile(r"^baseline-(?P<workflow>ml-training|ml-inference)\.csv$")


BASELINE_LABEL = "baseline · scikit-learn · 1 process"


STAGE_FIELDS = ["calls", "wall_ms", "compute_ms", "fetch_ms", "encode_ms", "put_ms", "get_ms", "decode_ms", "bytes",
                "list_ms", "return_ms", "fetch_bytes", "input_bytes"]


EDGE_FIELDS = ["from", "to", "bytes", "serialize_ms", "transfer_ms", "deserialize_ms"]


BREAKDOWN_COLUMNS = ["backend", "transfer", "workflow", "mode", "state", "run", "e2e_ms", "peak_pss_mb", "kind",
                     "stage", *STAGE_FIELDS, *[f for f in EDGE_FIELDS if f != "bytes"]]


#: ``peak_pss_mb``: the median over the runs of each run's peak of the PSS summed over its processes
#: on this machine (shared pages once); ``peak_shm_mb``: of mlwf's shared-memory segments' bytes
#: (:mod:`mlwf.bench.memory`). ``driver_peak_mb``, ``worker_peak_mb``: the largest single process's
#: resident peak, as each process reports it.
SUMMARY_COLUMNS = ["backend", "transfer", "workflow", "mode", "state", "runs", "median_ms", "min_ms", "max_ms",
                   "median_e2e_ms", "median_state_transfer_ms", "state_bytes", "accuracy", "peak_pss_mb",
                   "peak_shm_mb", "driver_peak_mb", "worker_peak_mb", "ratio_to_baseline"]


#: Report fields (per stage) behind each breakdown column that is not named the same.
_STAGE_SOURCE = {"get_ms": "input_get_ms", "decode_ms": "input_decode_ms", "bytes": "output_bytes",
                 "fetch_bytes": "fetch_bytes", "input_bytes": "input_bytes"}


#: Largest CSV file of a bench folder read (the state-transfer study's breakdown, 176 runs of every edge,
#: is 210 KB).
MAX_CSV_BYTES = 16 << 20


# --------------------------------------------------------------------------- files
def csv_identity(path: Path) -> tuple | None:
    """``path``'s size, modification time, inode and device (None if there is no such file), checked
    before anything is read: a regular file (a FIFO would make a read wait forever) within
    :data:`MAX_CSV_BYTES`.

    Raises :class:`~mlwf.errors.UsageError` (one line) otherwise.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    _check_csv_file(path, st)
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _check_csv_file(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} is not a regular file: give the folder 'mlwf bench --out' wrote")
    if st.st_size > MAX_CSV_BYTES:
        raise UsageError(f"{path} is {st.st_size / 2**20:.0f} MiB, over the {MAX_CSV_BYTES >> 20} MiB a "
                         "benchmark CSV file may take: split the benchmark into folders")


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of the CSV file ``path`` as dicts (none if there is no such file), checked as
    :func:`csv_identity` checks it once opened and read to at most :data:`MAX_CSV_BYTES`; a file that is
    not UTF-8 CSV is a :class:`~mlwf.errors.UsageError`."""
    try:
        # Not blocking: a FIFO put in the file's place after a look would otherwise make open() wait forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    try:
        _check_csv_file(path, os.fstat(fd))  # the file opened, not the name looked at before
        with open(fd, "rb", closefd=False) as f:
            data = f.read(MAX_CSV_BYTES + 1)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CSV_BYTES:  # it grew after the look
        raise UsageError(f"{path} is over the {MAX_CSV_BYTES >> 20} MiB a benchmark CSV file may take: split "
                         "the benchmark into folders")
    try:
        return list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{path} is not a CSV file 'mlwf bench' wrote ({e})") from None


def write_latency_csv(path: Path, times: list[float]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Run", "TimeMs"])
        for i, t in enumerate(times):
            w.writerow([i, f"{t:.1f}"])


def read_latency_csv(path: Path) -> list[float]:
    rows = read_csv(path)
    try:
        return [float(r["TimeMs"]) for r in rows]
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{path} is not a Run,TimeMs file") from None


def breakdown_rows(key: dict[str, str], run: int, report: dict[str, Any]) -> list[dict[str, Any]]:
    """The breakdown CSV rows of one run report (``key``: backend, transfer, workflow, mode)."""
    rows = []
    base = {**key, "run": run, "e2e_ms": report.get("e2e_ms"),
            "peak_pss_mb": report.get("memory", {}).get("peak_pss_mb")}
    for stage, st in report.get("stages", {}).items():
        row = {**base, "kind": "stage", "stage": stage}
        for f in STAGE_FIELDS:
            v = st.get(_STAGE_SOURCE.get(f, f))
            row[f] = (int(v) if f.endswith("bytes") or f == "calls" else round(v, 3)) if v is not None else 0
        rows.append(row)
    for e in report.get("edges", []):
        rows.append({**base, "kind": "edge", **{f: e.get(f) for f in EDGE_FIELDS}})
    return rows


def merge_csv(path: Path, columns: list[str], rows: list[dict], replaced: set[tuple]) -> None:
    """Write ``rows`` into ``path``, keeping the rows of other configurations already there."""
    kept = [r for r in read_csv(path)
            if (r.get("backend"), r.get("transfer"), r.get("workflow"), r.get("mode"),
                r.get("state") or "light") not in replaced]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in kept + rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    import numpy

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "numpy": numpy.__version__, "scikit-learn": version("scikit-learn"),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}


def describe_input(workflow: str, args: list[Any], num_images: int | None) -> str:
    n = f"{num_images:,} images" if num_images else "images"
    if workflow == "ml-training":
        return f"{args[0]}: {n}, {args[1]} PCA, {args[2]} RF"
    return f"{args[1]}: {n}, {args[2]} functions"


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _median(values: list[Any], digits: int = 1) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return round(statistics.median(values), digits) if values else None


def summary_row(names: dict[str, str], times: list[float], reports: list[dict[str, Any]],
                base_median: float | None) -> dict[str, Any]:
    """The ``summary.csv`` row of one configuration from its wall times and run reports."""
    last = reports[-1]
    s = stats(times)
    accuracy = last.get("validation_accuracy") if names["workflow"] == "ml-training" else last.get("accuracy")
    return {
        **names, "runs": len(times), "median_ms": round(s["median"], 1), "min_ms": round(s["min"], 1),
        "max_ms": round(s["max"], 1),
        "median_e2e_ms": _median([x.get("e2e_ms") for x in reports]),
        "median_state_transfer_ms": _median([x.get("state_transfer_ms", 0.0) for x in reports]),
        # Bytes that crossed between functions in one run (the input images read from the store left
        # out): what the state weighs.
        "state_bytes": int(sum(e.get("bytes") or 0 for e in last.get("edges", []) if e.get("from") != "store")),
        "accuracy": None if accuracy is None else round(accuracy, 4),
        "peak_pss_mb": _median([x.get("memory", {}).get("peak_pss_mb") for x in reports]),
        "peak_shm_mb": _median([x.get("memory", {}).get("peak_shm_mb") for x in reports]),
        "driver_peak_mb": last.get("memory", {}).get("driver_peak_mb"),
        "worker_peak_mb": last.get("memory", {}).get("worker_peak_mb"),
        "ratio_to_baseline": round(s["median"] / base_median, 2) if base_median else None,
    }
