"""``mlwf bench``: end-to-end latency of a workflow per backend and transfer, with its breakdown.

For each backend × transfer, a workflow runs ``repeats`` times *warm* (one
:class:`~mlwf.engine.driver.Engine`, after one warm-up run that is not
counted) and, with ``cold``, ``repeats`` times as fresh ``python -m mlwf.cli
run … --json`` processes, timed from process start to exit. With
``baseline``, the same work runs in this process as plain scikit-learn
(``benchmarks/baseline.py``), after one warm-up run.

Files written into the output folder:

* ``<backend>-<transfer>-<workflow>-<warm|cold>.csv`` and
  ``baseline-<workflow>.csv``: ``Run,TimeMs``, one row per run (the seed's
  format);
* ``breakdown.csv``: per run, one row per stage (``calls``, ``wall_ms``,
  ``compute_ms``, ``fetch_ms``, ``list_ms``, ``encode_ms``, ``put_ms``,
  ``get_ms``, ``decode_ms``, ``return_ms``, ``bytes`` = bytes the stage
  wrote, ``fetch_bytes``, ``input_bytes``) and one per edge of the graph
  (``from``, ``to``, ``bytes``, ``serialize_ms``, ``transfer_ms``,
  ``deserialize_ms``);
* ``summary.csv``: per configuration, median, min and max of the runs, the
  median end-to-end time the engine reported, accuracy, peak memory and the
  ratio to the same-run baseline;
* ``bench.json``: the command, the machine, the input;
* ``traces/<backend>-<transfer>-<workflow>-warm.trace.json`` and ``.png``:
  the last warm run as a Perfetto trace and a Gantt chart;
* ``latency.png/.svg`` and ``breakdown.png/.svg`` (:mod:`mlwf.plots`).

Running another workflow (or configuration) into the same folder replaces
only its own rows, so one folder can hold both workflows. ``mlwf bench plot
DIR`` redraws every figure from the files.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from mlwf.errors import StageError, UsageError
from mlwf.settings import Settings

WORKFLOWS = ("ml-training", "ml-inference")
MODES = ("warm", "cold")
LATENCY_CSV = re.compile(r"^(?P<backend>[a-z0-9_]+)-(?P<transfer>[a-z0-9_]+)-(?P<workflow>ml-training|ml-inference)"
                         r"-(?P<mode>warm|cold)\.csv$")
BASELINE_CSV = re.compile(r"^baseline-(?P<workflow>ml-training|ml-inference)\.csv$")
BASELINE_LABEL = "baseline · scikit-learn · 1 process"

STAGE_FIELDS = ["calls", "wall_ms", "compute_ms", "fetch_ms", "encode_ms", "put_ms", "get_ms", "decode_ms", "bytes",
                "list_ms", "return_ms", "fetch_bytes", "input_bytes"]
EDGE_FIELDS = ["from", "to", "bytes", "serialize_ms", "transfer_ms", "deserialize_ms"]
BREAKDOWN_COLUMNS = ["backend", "transfer", "workflow", "mode", "run", "e2e_ms", "kind", "stage", *STAGE_FIELDS,
                     *[f for f in EDGE_FIELDS if f != "bytes"]]
SUMMARY_COLUMNS = ["backend", "transfer", "workflow", "mode", "runs", "median_ms", "min_ms", "max_ms",
                   "median_e2e_ms", "median_state_transfer_ms", "accuracy", "driver_peak_mb", "worker_peak_mb",
                   "ratio_to_baseline"]
#: Report fields (per stage) behind each breakdown column that is not named the same.
_STAGE_SOURCE = {"get_ms": "input_get_ms", "decode_ms": "input_decode_ms", "bytes": "output_bytes",
                 "fetch_bytes": "fetch_bytes", "input_bytes": "input_bytes"}


@dataclass
class BenchSpec:
    """What ``mlwf bench`` measures. ``args`` are the workflow's positional arguments.

    ml-training: ``[DATA_PREFIX, NUM_PCA, NUM_TRAIN]``; ml-inference:
    ``[MODEL_PREFIX, DATA_PREFIX, NUM_FUNCS]`` (numbers as ints).
    """

    workflow: str
    args: list[Any]
    out: Path
    backends: list[str] = field(default_factory=lambda: ["local"])
    transfers: list[str] = field(default_factory=lambda: ["store"])
    repeats: int = 5
    cold: bool = False
    baseline: bool = False
    store: str | None = None
    bucket: str | None = None
    workers: int | None = None
    endpoints: list[str] = field(default_factory=list)
    ray_address: str | None = None
    config: Any = None  # TrainingConfig for ml-training
    model_prefix: str = "ml-inference/model"  # where ml-training publishes
    publish: bool = True
    plots: bool = True


def split_list(value: str | list[str], what: str, allowed: tuple[str, ...]) -> list[str]:
    """``"local,ray"`` → ``["local", "ray"]``, each checked against ``allowed``."""
    items = value if isinstance(value, list) else [v.strip() for v in str(value).split(",")]
    items = [v for v in items if v]
    if not items:
        raise UsageError(f"--{what} is empty: give one or more of {', '.join(allowed)}, separated by commas")
    for v in items:
        if v not in allowed:
            raise UsageError(f"unknown {what} {v!r}: choose one or more of {', '.join(allowed)}, "
                             "separated by commas")
    return list(dict.fromkeys(items))


# --------------------------------------------------------------------------- checks before running anything
def check_endpoints(entries: list[str], timeout: float = 3.0) -> None:
    """Refuse, in one line, an ``--endpoint`` whose service does not answer HTTP (``GET /healthz``)."""
    import httpx

    from mlwf.backends.knative import parse_endpoints

    default, routes = parse_endpoints(entries)
    for url in sorted({u for u in [default, *routes.values()] if u}):
        probe = urllib.parse.urljoin(url if url.endswith("/") else url + "/", "healthz")
        try:
            httpx.get(probe, timeout=timeout)
        except httpx.HTTPError as e:
            raise UsageError(f"--endpoint {url} does not answer ({type(e).__name__}: {e or 'no reply'}): start "
                             "'mlwf serve' there or give the right URL") from None


def combinations(spec: BenchSpec, note: Callable[[str], None]) -> list[tuple[str, str]]:
    """The (backend, transfer) pairs to measure; pairs a backend cannot do are skipped with a note."""
    from mlwf.backends import backend_class

    pairs = []
    for backend in spec.backends:
        can = tuple(backend_class(backend).transfers)
        for transfer in spec.transfers:
            if transfer in can:
                pairs.append((backend, transfer))
            else:
                note(f"skipping {backend} · {transfer}: the {backend} backend cannot do --transfer {transfer}")
    if not pairs:
        raise UsageError(f"no backend in {','.join(spec.backends)} can do --transfer {','.join(spec.transfers)}")
    return pairs


def _check_spec(spec: BenchSpec) -> None:
    if spec.workflow not in WORKFLOWS:
        raise UsageError(f"unknown workflow {spec.workflow!r}: choose ml-training or ml-inference")
    if not isinstance(spec.repeats, int) or spec.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {spec.repeats!r}")
    from mlwf.backends import NAMES as BACKENDS, TRANSFERS

    spec.backends = split_list(spec.backends, "backend", BACKENDS)
    spec.transfers = split_list(spec.transfers, "transfer", TRANSFERS)
    if spec.workers is not None and spec.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {spec.workers}")


# --------------------------------------------------------------------------- the same-run baseline
def load_baseline():
    """``benchmarks/baseline.py`` of the mlwf repository (``$MLWF_BASELINE``, this folder, or the checkout)."""
    candidates = [os.environ.get("MLWF_BASELINE"), Path.cwd() / "benchmarks" / "baseline.py",
                  Path(__file__).resolve().parents[2] / "benchmarks" / "baseline.py"]
    for path in candidates:
        if path and Path(path).is_file():
            module_spec = importlib.util.spec_from_file_location("mlwf_bench_baseline", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module  # its dataclasses look themselves up there
            module_spec.loader.exec_module(module)
            return module
    raise UsageError("--baseline needs benchmarks/baseline.py of the mlwf repository: run from the repository "
                     "root or set MLWF_BASELINE to its path")


def _bucket_folder(store, prefix: str) -> str:
    root = getattr(store, "root", None)
    if root is None:
        raise UsageError("--baseline reads the images from a local directory store: use --store DIR")
    folder = Path(root) / store.bucket / prefix.strip("/")
    if not folder.is_dir():
        raise UsageError(f"--baseline: no folder {folder} for prefix {prefix!r} in the store")
    return str(folder)


def _settings(baseline, config):
    return baseline.Settings(image_size=config.image_size, n_components=config.n_components, n_trees=config.n_trees,
                             max_depth=config.max_depth, min_samples_split=config.min_samples_split,
                             holdout=config.holdout, seed=config.seed)


def _trained_on(store, model_prefix: str) -> tuple[dict[str, Any], str]:
    """The training settings of the model published at ``model_prefix`` and the folder of its images."""
    from mlwf import model as mlwf_model

    data, _ = mlwf_model.read_published(store.get, model_prefix)
    cfg = mlwf_model.from_bytes(data, source=model_prefix).config
    if not cfg.get("data_prefix") or "num_pca" not in cfg or "num_train" not in cfg:
        raise UsageError(f"--baseline: the model at {model_prefix} does not say what it was trained on")
    return cfg, _bucket_folder(store, cfg["data_prefix"])


def baseline_runs(spec: BenchSpec, store, tick: Callable[[str], None]) -> tuple[list[float], float]:
    """Times (ms) of ``repeats`` baseline runs after a warm-up, and the baseline's accuracy."""
    baseline = load_baseline()
    if spec.workflow == "ml-training":
        from mlwf.workflows.training import TrainingConfig

        data_prefix, num_pca, num_train = spec.args
        folder = _bucket_folder(store, data_prefix)
        settings = _settings(baseline, spec.config or TrainingConfig())

        def once():
            return baseline.train(folder, num_pca, num_train, settings)

        key = "validation_accuracy"
    else:
        from mlwf.workflows.training import TrainingConfig

        model_prefix, data_prefix, _ = spec.args
        cfg, train_folder = _trained_on(store, model_prefix)
        fields = {k: cfg[k] for k in ("image_size", "n_components", "n_trees", "max_depth", "min_samples_split",
                                      "holdout", "seed") if k in cfg}
        settings = _settings(baseline, TrainingConfig(**fields))
        trained = baseline.train(train_folder, int(cfg["num_pca"]), int(cfg["num_train"]), settings)["model"]
        folder = _bucket_folder(store, data_prefix)

        def once():
            return baseline.infer(trained, folder, settings.image_size)

        key = "accuracy"
    once()
    tick("baseline warm-up")
    times, last = [], {}
    for i in range(spec.repeats):
        last = once()
        times.append(last["ms"])
        tick(f"baseline {i + 1}/{spec.repeats}")
    return times, float(last[key])


# --------------------------------------------------------------------------- running the workflow
def _cli_args(spec: BenchSpec, backend: str, transfer: str) -> list[str]:
    """The ``mlwf run`` command line of one cold run (without the interpreter)."""
    argv = ["run", spec.workflow, *map(str, spec.args), "--backend", backend, "--transfer", transfer, "--json"]
    if spec.store:
        argv += ["--store", spec.store]
    if spec.bucket:
        argv += ["--bucket", spec.bucket]
    if spec.workers:
        argv += ["--workers", str(spec.workers)]
    for e in spec.endpoints:
        argv += ["--endpoint", e]
    if spec.ray_address:
        argv += ["--ray-address", spec.ray_address]
    if spec.workflow == "ml-training":
        c = spec.config
        if c is not None:
            argv += ["--seed", str(c.seed), "--image-size", str(c.image_size), "--components", str(c.n_components),
                     "--trees", str(c.n_trees), "--max-depth", str(c.max_depth),
                     "--min-samples-split", str(c.min_samples_split), "--holdout", str(c.holdout)]
        argv += ["--model-prefix", spec.model_prefix] + ([] if spec.publish else ["--no-publish"])
    return argv


def command_line(spec: BenchSpec) -> str:
    """The ``mlwf bench`` command line that measures ``spec``."""
    import shlex

    argv = ["mlwf", "bench", spec.workflow, *map(str, spec.args), "--backend", ",".join(spec.backends),
            "--transfer", ",".join(spec.transfers), "--repeats", str(spec.repeats)]
    argv += ["--cold"] * spec.cold + ["--baseline"] * spec.baseline + ["--out", str(spec.out)]
    for flag, value in (("--store", spec.store), ("--bucket", spec.bucket), ("--workers", spec.workers),
                        ("--ray-address", spec.ray_address)):
        if value:
            argv += [flag, str(value)]
    for e in spec.endpoints:
        argv += ["--endpoint", e]
    if spec.workflow == "ml-training":
        from mlwf.workflows.training import TrainingConfig

        default = TrainingConfig()
        for flag, name in (("--seed", "seed"), ("--image-size", "image_size"), ("--components", "n_components"),
                           ("--trees", "n_trees"), ("--max-depth", "max_depth"),
                           ("--min-samples-split", "min_samples_split"), ("--holdout", "holdout")):
            value = getattr(spec.config or default, name)
            if value != getattr(default, name):
                argv += [flag, str(value)]
        if spec.model_prefix != "ml-inference/model":
            argv += ["--model-prefix", spec.model_prefix]
        if not spec.publish:
            argv.append("--no-publish")
    return " ".join(shlex.quote(a) for a in argv)


def _run_once(spec: BenchSpec, engine) -> dict[str, Any]:
    if spec.workflow == "ml-training":
        data_prefix, num_pca, num_train = spec.args
        return engine.run_training(data_prefix, num_pca, num_train, config=spec.config,
                                   model_prefix=spec.model_prefix, publish=spec.publish)
    model_prefix, data_prefix, num_funcs = spec.args
    return engine.run_inference(model_prefix, data_prefix, num_funcs)


def warm_runs(spec: BenchSpec, backend: str, transfer: str, tick) -> tuple[list[float], list[dict], dict]:
    """Wall times (ms) and reports of ``repeats`` warm runs, and the trace of the last one."""
    from mlwf.backends import config_from_flags
    from mlwf.engine import trace
    from mlwf.engine.driver import Engine

    clock = trace.StageClock()
    config = config_from_flags(backend, workflow=spec.workflow, workers=spec.workers,
                               ray_address=spec.ray_address, endpoints=spec.endpoints)
    with Engine(spec.store, spec.bucket, backend=config, transfer=transfer, progress=clock) as engine:
        _run_once(spec, engine)
        tick(f"{backend} · {transfer} · warm-up")
        times, reports = [], []
        for i in range(spec.repeats):
            t = time.perf_counter()
            reports.append(_run_once(spec, engine))
            times.append((time.perf_counter() - t) * 1e3)
            tick(f"{backend} · {transfer} · warm {i + 1}/{spec.repeats}")
        doc = trace.build(engine.last_run, reports[-1], clock)
    return times, reports, doc


def cold_runs(spec: BenchSpec, backend: str, transfer: str, tick) -> tuple[list[float], list[dict]]:
    """Wall times (ms, process start to exit) and reports of ``repeats`` fresh ``mlwf run`` processes."""
    argv = [sys.executable, "-m", "mlwf.cli", *_cli_args(spec, backend, transfer)]
    times, reports = [], []
    for i in range(spec.repeats):
        t = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        times.append((time.perf_counter() - t) * 1e3)
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
            raise StageError(f"cold run {i + 1} on {backend} · {transfer} failed: "
                             f"{lines[-1] if lines else f'exit status {done.returncode}'}")
        reports.append(json.loads(done.stdout))
        tick(f"{backend} · {transfer} · cold {i + 1}/{spec.repeats}")
    return times, reports


# --------------------------------------------------------------------------- files
def write_latency_csv(path: Path, times: list[float]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Run", "TimeMs"])
        for i, t in enumerate(times):
            w.writerow([i, f"{t:.1f}"])


def read_latency_csv(path: Path) -> list[float]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return [float(r["TimeMs"]) for r in rows]
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{path} is not a Run,TimeMs file") from None


def breakdown_rows(key: dict[str, str], run: int, report: dict[str, Any]) -> list[dict[str, Any]]:
    """The breakdown CSV rows of one run report (``key``: backend, transfer, workflow, mode)."""
    rows = []
    base = {**key, "run": run, "e2e_ms": report.get("e2e_ms")}
    for stage, st in report.get("stages", {}).items():
        row = {**base, "kind": "stage", "stage": stage}
        for f in STAGE_FIELDS:
            v = st.get(_STAGE_SOURCE.get(f, f))
            row[f] = (int(v) if f.endswith("bytes") or f == "calls" else round(v, 3)) if v is not None else 0
        rows.append(row)
    for e in report.get("edges", []):
        rows.append({**base, "kind": "edge", **{f: e.get(f) for f in EDGE_FIELDS}})
    return rows


def _merge_csv(path: Path, columns: list[str], rows: list[dict], replaced: set[tuple]) -> None:
    """Write ``rows`` into ``path``, keeping the rows of other configurations already there."""
    kept = []
    if path.exists():
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f)
                    if (r.get("backend"), r.get("transfer"), r.get("workflow"), r.get("mode")) not in replaced]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in kept + rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# --------------------------------------------------------------------------- progress
class _Progress:
    """One bar over every run of the benchmark, on stderr when it is a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self._p = None
        self.total = total

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

            from mlwf.ui import show_progress

            self._p = show_progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn())
            self._task = self._p.add_task("bench", total=self.total)
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            from mlwf.ui import hide_progress

            hide_progress(self._p)

    def tick(self, what: str) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=1, description=what)

    def note(self, text: str) -> None:
        if self._p is not None:
            self._p.console.print(text)
        else:
            print(f"mlwf bench: {text}", file=sys.stderr)


# --------------------------------------------------------------------------- the benchmark
def run(spec: BenchSpec, *, progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Run the benchmark described by ``spec``; write its files and figures; return its summary.

    Raises
    ------
    UsageError
        For an unknown backend, transfer or workflow, an ``--endpoint`` that
        does not answer, or a baseline that cannot run here (before any run).
    MlwfError
        Whatever a run raised (bad input, a failed stage).
    """

    _check_spec(spec)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    out = Path(spec.out)
    notes: list[str] = []
    pairs = combinations(spec, notes.append)
    if "knative" in {b for b, _ in pairs}:
        check_endpoints(spec.endpoints)
    settings = Settings.resolve(store=spec.store, bucket=spec.bucket)
    store = settings.store.open(settings)
    if spec.baseline:
        load_baseline()
        _bucket_folder(store, spec.args[0] if spec.workflow == "ml-training" else spec.args[1])
        if spec.workflow == "ml-inference":
            _trained_on(store, spec.args[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "traces").mkdir(exist_ok=True)

    total = len(pairs) * (spec.repeats + 1 + (spec.repeats if spec.cold else 0)) + \
        (spec.repeats + 1 if spec.baseline else 0)
    results: list[dict[str, Any]] = []  # one per configuration: key, times, reports
    written: list[Path] = []
    with _Progress(total, progress) as bar:
        for text in notes:
            bar.note(text)
        for backend, transfer in pairs:
            times, reports, doc = warm_runs(spec, backend, transfer, bar.tick)
            results.append({"key": (backend, transfer, spec.workflow, "warm"), "times": times, "reports": reports})
            from mlwf.engine import trace

            stem = f"{backend}-{transfer}-{spec.workflow}-warm"
            written.append(trace.write(doc, out / "traces" / f"{stem}.trace.json"))
            if spec.plots:
                from mlwf import plots

                written.append(plots.gantt(doc, out / "traces" / f"{stem}.png"))
            bar.note(f"{backend} · {transfer} · warm: median {statistics.median(times):.0f} ms "
                     f"({min(times):.0f}–{max(times):.0f})")
            if spec.cold:
                times, reports = cold_runs(spec, backend, transfer, bar.tick)
                results.append({"key": (backend, transfer, spec.workflow, "cold"), "times": times,
                                "reports": reports})
                bar.note(f"{backend} · {transfer} · cold: median {statistics.median(times):.0f} ms "
                         f"({min(times):.0f}–{max(times):.0f})")
        base = None
        if spec.baseline:
            times, accuracy = baseline_runs(spec, store, bar.tick)
            base = {"times": times, "accuracy": accuracy}
            bar.note(f"baseline: median {statistics.median(times):.0f} ms ({min(times):.0f}–{max(times):.0f})")
    store.close()

    # --- files
    summary_rows, breakdown, replaced = [], [], set()
    base_median = statistics.median(base["times"]) if base else None
    for r in results:
        backend, transfer, workflow, mode = key = r["key"]
        replaced.add(key)
        path = out / f"{backend}-{transfer}-{workflow}-{mode}.csv"
        write_latency_csv(path, r["times"])
        written.append(path)
        names = dict(zip(("backend", "transfer", "workflow", "mode"), key))
        for i, rep in enumerate(r["reports"]):
            breakdown += breakdown_rows(names, i, rep)
        last = r["reports"][-1]
        s = _stats(r["times"])
        accuracy = last.get("validation_accuracy") if workflow == "ml-training" else last.get("accuracy")
        summary_rows.append({
            **names, "runs": len(r["times"]), "median_ms": round(s["median"], 1), "min_ms": round(s["min"], 1),
            "max_ms": round(s["max"], 1),
            "median_e2e_ms": round(statistics.median(x["e2e_ms"] for x in r["reports"]), 1),
            "median_state_transfer_ms": round(statistics.median(x.get("state_transfer_ms", 0.0)
                                                                for x in r["reports"]), 1),
            "accuracy": None if accuracy is None else round(accuracy, 4),
            "driver_peak_mb": last.get("memory", {}).get("driver_peak_mb"),
            "worker_peak_mb": last.get("memory", {}).get("worker_peak_mb"),
            "ratio_to_baseline": round(s["median"] / base_median, 2) if base_median else None,
        })
    if base:
        path = out / f"baseline-{spec.workflow}.csv"
        write_latency_csv(path, base["times"])
        written.append(path)
        key = ("baseline", "", spec.workflow, "warm")
        replaced.add(key)
        s = _stats(base["times"])
        summary_rows.append({"backend": "baseline", "transfer": "", "workflow": spec.workflow, "mode": "warm",
                             "runs": len(base["times"]), "median_ms": round(s["median"], 1),
                             "min_ms": round(s["min"], 1), "max_ms": round(s["max"], 1),
                             "accuracy": round(base["accuracy"], 4), "ratio_to_baseline": 1.0})
    _merge_csv(out / "breakdown.csv", BREAKDOWN_COLUMNS, breakdown, replaced)
    _merge_csv(out / "summary.csv", SUMMARY_COLUMNS, summary_rows, replaced)
    written += [out / "breakdown.csv", out / "summary.csv"]

    num_images = results[0]["reports"][-1].get("num_images")
    meta_path = out / "bench.json"
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    except ValueError:
        meta = {}
    meta[spec.workflow] = {
        "command": command or command_line(spec), "args": spec.args,
        "input": describe_input(spec.workflow, spec.args, num_images),
        "num_images": num_images, "repeats": spec.repeats, "backends": spec.backends, "transfers": spec.transfers,
        "cold": spec.cold, "baseline": spec.baseline,
        "config": asdict(spec.config) if spec.config is not None else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
        "load_average_at_start": load_at_start,
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    written.append(meta_path)
    if spec.plots:
        written += plot_dir(out, traces=False)
    return {"out": str(out), "summary": summary_rows, "files": [str(p) for p in written], "notes": notes}


# --------------------------------------------------------------------------- plots from the files
def plot_dir(out: str | Path, *, traces: bool = True) -> list[Path]:
    """Redraw every figure of a benchmark folder from its files; return the paths written.

    Raises :class:`UsageError` when the folder holds no benchmark CSV.
    """
    from mlwf import plots

    out = Path(out)
    if not out.is_dir():
        raise UsageError(f"no benchmark folder {str(out)!r}: run 'mlwf bench … --out {out}' first")
    series: dict[str, dict[str, list[float]]] = {}
    found = sorted(p for p in out.iterdir() if LATENCY_CSV.match(p.name) or BASELINE_CSV.match(p.name))
    if not found:
        raise UsageError(f"no benchmark CSVs (BACKEND-TRANSFER-WORKFLOW-MODE.csv) in {out}: run "
                         f"'mlwf bench … --out {out}' first")
    def order(p: Path) -> tuple:
        m = LATENCY_CSV.match(p.name)
        return (1,) if m is None else (0, plots.config_order(m["backend"], m["transfer"], m["mode"]))

    for p in sorted(found, key=order):  # measured configurations in a fixed order, the baseline last
        if m := LATENCY_CSV.match(p.name):
            label = f"{m['backend']} · {m['transfer']} · {m['mode']}"
            wf = m["workflow"]
        else:
            m = BASELINE_CSV.match(p.name)
            label, wf = BASELINE_LABEL, m["workflow"]
        times = read_latency_csv(p)
        if times:
            series.setdefault(wf, {})[label] = times
    if not series:
        raise UsageError(f"the benchmark CSVs in {out} hold no runs")
    try:
        meta = json.loads((out / "bench.json").read_text())
    except (OSError, ValueError):
        meta = {}
    inputs = {wf: m.get("input") for wf, m in meta.items() if isinstance(m, dict)}
    written = plots.latency(series, out / "latency", inputs)
    stage_rows = [r for r in _read_csv(out / "breakdown.csv") if r.get("kind") == "stage"]
    if stage_rows:
        written += plots.breakdown(stage_rows, out / "breakdown")
    if traces and (out / "traces").is_dir():
        from mlwf.engine import trace

        for p in sorted((out / "traces").glob("*.trace.json")):
            written.append(plots.gantt(trace.load(p), p.with_name(p.name[:-len(".trace.json")] + ".png")))
    return written
