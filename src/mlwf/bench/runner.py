"""Running a benchmark: its checks, the warm and cold runs, the same-run baseline, the progress line."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from mlwf.bench.files import (BREAKDOWN_COLUMNS, SUMMARY_COLUMNS, breakdown_rows, describe_input, label,
                              latency_csv_name, machine, merge_csv, read_csv, stats, summary_row, write_latency_csv)
from mlwf.bench.memory import PeakMemory, listening_pids, release_freed, return_large_buffers
from mlwf.bench.plots import plot_dir
from mlwf.errors import Interrupted, StageError, UsageError
from mlwf.presets import DEFAULTS
from mlwf.cli.options import training_flags
from mlwf.settings import Settings

WORKFLOWS = ("ml-training", "ml-inference")
MODES = ("warm", "cold")


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
    states: list[str] = field(default_factory=lambda: ["light"])
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


def local_servers(spec: BenchSpec) -> list[int]:
    """The processes serving ``spec``'s ``--endpoint`` URLs on this machine's loopback interface: their memory
    is the run's too (:func:`mlwf.bench.memory.listening_pids`)."""
    if not spec.endpoints:
        return []
    from mlwf.backends.knative import parse_endpoints

    default, routes = parse_endpoints(spec.endpoints)
    return listening_pids(sorted({u for u in [default, *routes.values()] if u}))


def combinations(spec: BenchSpec, note: Callable[[str], None]) -> list[tuple[str, str]]:
    """The (backend, transfer) pairs to measure (each with every ``--state``); pairs a backend
    cannot do are skipped with a note."""
    from mlwf.backends import backend_class, cannot_transfer

    pairs = []
    for backend in spec.backends:
        cls = backend_class(backend)
        for transfer in spec.transfers:
            if transfer in cls.transfers:
                pairs.append((backend, transfer))
            else:
                note(f"skipping {backend} · {transfer}: {cannot_transfer(cls, transfer)}")
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
    from mlwf.workflows.state import STATES

    spec.states = split_list(spec.states, "state", STATES)
    if spec.workers is not None and spec.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {spec.workers}")
    if spec.baseline and spec.workflow == "ml-training" and spec.config is not None:
        _baseline_can_train(asdict(spec.config))


# --------------------------------------------------------------------------- the same-run baseline
def load_baseline():
    """:mod:`mlwf.bench.baseline` (imported now: it imports scikit-learn)."""
    from mlwf.bench import baseline

    return baseline


def _bucket_folder(store, prefix: str) -> str:
    root = getattr(store, "root", None)
    if root is None:
        raise UsageError("--baseline reads the images from a local directory store: use --store DIR")
    folder = Path(root) / store.bucket / prefix.strip("/")
    if not folder.is_dir():
        raise UsageError(f"--baseline: no folder {folder} for prefix {prefix!r} in the store")
    return str(folder)


def _settings(baseline, config: dict[str, Any]):
    """The baseline's settings: those of a training config (as a dict) that it follows."""
    return baseline.Settings(**{name: config[name] for name in DEFAULTS if name in config})


def _trained_on(store, model_prefix: str) -> tuple[dict[str, Any], str]:
    """The training settings of the model published at ``model_prefix`` and the folder of its images."""
    from mlwf import model as mlwf_model

    data, _ = mlwf_model.read_published(store.get, model_prefix)
    cfg = mlwf_model.from_bytes(data, source=model_prefix).config
    if not cfg.get("data_prefix") or "num_pca" not in cfg or "num_train" not in cfg:
        raise UsageError(f"--baseline: the model at {model_prefix} does not say what it was trained on")
    return cfg, _bucket_folder(store, cfg["data_prefix"])


def _baseline_can_train(config: dict[str, Any]) -> None:
    """The baseline trains the reference's forests on slices: refuse settings it cannot follow."""
    if config.get("forest", "random") != "random" or config.get("train_rows", "slice") != "slice":
        raise UsageError("--baseline trains random forests on slices, as the reference does: it cannot follow "
                         "--forest extra or --train-rows partition (or --preset accurate); leave --baseline out")


def baseline_runs(spec: BenchSpec, store, tick: Callable[[str], None]) -> tuple[list[float], float]:
    """Times (ms) of ``repeats`` baseline runs after a warm-up, and the baseline's accuracy."""
    baseline = load_baseline()
    if spec.workflow == "ml-training":
        from mlwf.workflows.training import TrainingConfig

        data_prefix, num_pca, num_train = spec.args
        folder = _bucket_folder(store, data_prefix)
        config = asdict(spec.config or TrainingConfig())
        _baseline_can_train(config)
        settings = _settings(baseline, config)

        def once():
            return baseline.train(folder, num_pca, num_train, settings)

        key = "validation_accuracy"
    else:
        model_prefix, data_prefix, _ = spec.args
        cfg, train_folder = _trained_on(store, model_prefix)
        _baseline_can_train(cfg)
        settings = _settings(baseline, cfg)
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
def _cli_args(spec: BenchSpec, backend: str, transfer: str, state: str = "light") -> list[str]:
    """The ``mlwf run`` command line of one cold run (without the interpreter)."""
    argv = ["run", spec.workflow, *map(str, spec.args), "--backend", backend, "--transfer", transfer, "--json"]
    argv += ["--state", state] * (state != "light")
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
        if spec.config is not None:
            argv += training_flags(spec.config)
        argv += ["--model-prefix", spec.model_prefix] + ([] if spec.publish else ["--no-publish"])
    return argv


def _where_flags(spec: BenchSpec) -> list[str]:
    """The flags that say where ``spec`` runs (store, bucket, workers, Ray address, endpoints), as given."""
    argv: list[str] = []
    for flag, value in (("--store", spec.store), ("--bucket", spec.bucket), ("--workers", spec.workers),
                        ("--ray-address", spec.ray_address)):
        if value:
            argv += [flag, str(value)]
    for e in spec.endpoints:
        argv += ["--endpoint", e]
    return argv


def resume_command(spec: BenchSpec, backend: str, transfer: str, run_id: str, state: str = "light") -> str:
    """The ``mlwf run`` command line that finishes run ``run_id`` of this benchmark."""
    import shlex

    from mlwf.workflows.training import TrainingConfig

    argv = ["run", spec.workflow, *map(str, spec.args)]
    argv += ["--backend", backend] * (backend != "local") + ["--transfer", transfer] * (transfer != "store")
    argv += ["--state", state] * (state != "light")
    argv += _where_flags(spec)
    if spec.workflow == "ml-training":  # only what differs from the defaults: the run records the rest
        argv += training_flags(spec.config or TrainingConfig(), changed_only=True)
        argv += ["--model-prefix", spec.model_prefix] * (spec.model_prefix != "ml-inference/model")
        argv += ["--no-publish"] * (not spec.publish)
    return shlex.join(["mlwf", *argv, "--resume", run_id])


def command_line(spec: BenchSpec) -> str:
    """The ``mlwf bench`` command line that measures ``spec``."""
    import shlex

    argv = ["mlwf", "bench", spec.workflow, *map(str, spec.args), "--backend", ",".join(spec.backends),
            "--transfer", ",".join(spec.transfers), "--repeats", str(spec.repeats)]
    argv += ["--state", ",".join(spec.states)] * (spec.states != ["light"])
    argv += ["--cold"] * spec.cold + ["--baseline"] * spec.baseline + ["--out", str(spec.out)]
    argv += _where_flags(spec)
    if spec.workflow == "ml-training":
        from mlwf.workflows.training import TrainingConfig

        argv += training_flags(spec.config or TrainingConfig(), changed_only=True)
        if spec.model_prefix != "ml-inference/model":
            argv += ["--model-prefix", spec.model_prefix]
        if not spec.publish:
            argv.append("--no-publish")
    return " ".join(shlex.quote(a) for a in argv)


def _run_once(spec: BenchSpec, engine, state: str) -> dict[str, Any]:
    if spec.workflow == "ml-training":
        data_prefix, num_pca, num_train = spec.args
        return engine.run_training(data_prefix, num_pca, num_train, config=spec.config,
                                   model_prefix=spec.model_prefix, publish=spec.publish, state=state)
    model_prefix, data_prefix, num_funcs = spec.args
    return engine.run_inference(model_prefix, data_prefix, num_funcs, state=state)


def _with_memory(report: dict[str, Any], peak: PeakMemory) -> dict[str, Any]:
    """``report`` with the run's peak memory on this machine (:mod:`mlwf.bench.memory`)."""
    report["memory"] = {**report.get("memory", {}), "peak_pss_mb": peak.pss_mb, "peak_shm_mb": peak.shm_mb}
    return report


def warm_runs(spec: BenchSpec, backend: str, transfer: str, tick,
              state: str = "light") -> tuple[list[float], list[dict], dict]:
    """Wall times (ms) and reports of ``repeats`` warm runs, and the trace of the last one."""
    from mlwf.backends import config_from_flags
    from mlwf.engine import trace
    from mlwf.engine.driver import Engine

    release_freed()  # the previous configuration's leftovers are not this one's memory
    clock = trace.StageClock()
    config = config_from_flags(backend, workflow=spec.workflow, workers=spec.workers,
                               ray_address=spec.ray_address, endpoints=spec.endpoints)
    with Engine(spec.store, spec.bucket, backend=config, transfer=transfer, progress=clock) as engine:
        what = label(backend, transfer, state)
        try:
            _run_once(spec, engine, state)
            tick(f"{what} · warm-up")
            times, reports = [], []
            servers = local_servers(spec)
            for i in range(spec.repeats):
                with PeakMemory(also=servers) as peak:
                    t = time.perf_counter()
                    report = _run_once(spec, engine, state)
                    times.append((time.perf_counter() - t) * 1e3)
                reports.append(_with_memory(report, peak))
                tick(f"{what} · warm {i + 1}/{spec.repeats}")
        except Interrupted as e:
            if e.run_id:
                e.resume = resume_command(spec, backend, transfer, e.run_id, state)
            raise
        doc = trace.build(engine.last_run, reports[-1], clock)
    return times, reports, doc


def cold_runs(spec: BenchSpec, backend: str, transfer: str, tick,
              state: str = "light") -> tuple[list[float], list[dict]]:
    """Wall times (ms, process start to exit) and reports of ``repeats`` fresh ``mlwf run`` processes."""
    argv = [sys.executable, "-m", "mlwf.cli", *_cli_args(spec, backend, transfer, state)]
    what = label(backend, transfer, state)
    times, reports = [], []
    servers = local_servers(spec)
    for i in range(spec.repeats):
        with PeakMemory(also=servers) as peak:
            t = time.perf_counter()
            done = _cold_run(argv, spec, backend, transfer, state)
            times.append((time.perf_counter() - t) * 1e3)
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
            raise StageError(f"cold run {i + 1} on {what} failed: "
                             f"{lines[-1] if lines else f'exit status {done.returncode}'}")
        reports.append(_with_memory(json.loads(done.stdout), peak))
        tick(f"{what} · cold {i + 1}/{spec.repeats}")
    return times, reports


def _cold_run(argv: list[str], spec: BenchSpec, backend: str, transfer: str,
              state: str = "light") -> subprocess.CompletedProcess:
    """One cold ``mlwf run`` process, to its end; on Ctrl-C, :class:`Interrupted` naming its run.

    The process is in the terminal's process group, so the Ctrl-C reached it too: it is given the
    time to record its run ``interrupted`` and say which (its ``--json`` line) before it is killed.
    """
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate()
    except KeyboardInterrupt:
        try:
            out, err = proc.communicate(timeout=5)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            out, err = proc.communicate()
        said: dict[str, Any] = {}
        try:
            said = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        except ValueError:
            pass
        run_id = said.get("run_id") if isinstance(said, dict) else None
        raise Interrupted(spec.workflow, run_id, said.get("status") if run_id else None,
                          resume_command(spec, backend, transfer, run_id, state) if run_id else None) from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


# --------------------------------------------------------------------------- progress
class _BenchBar:
    """One bar over every run of the benchmark, on stderr when it is a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self._p = None
        self.total = total

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

            from mlwf.terminal import show_progress

            self._p = show_progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn())
            self._task = self._p.add_task("bench", total=self.total)
        return self

    def __exit__(self, exc_type, *exc):
        if self._p is not None:
            from mlwf.terminal import hide_progress

            # A benchmark that failed or was interrupted says so in one line, without a half-drawn bar.
            hide_progress(self._p, erase=exc_type is not None)

    def tick(self, what: str) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=1, description=what)

    def note(self, text: str) -> None:
        if self._p is not None:
            from mlwf.terminal import drawing

            with drawing():  # printed above the bar: a frame of the display
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
    from mlwf.storage import StoreSpec

    _check_spec(spec)
    return_large_buffers()  # each configuration's peak memory is its own (mlwf.bench.memory)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    out = Path(spec.out)
    notes: list[str] = []
    pairs = combinations(spec, notes.append)
    if "knative" in {b for b, _ in pairs}:
        check_endpoints(spec.endpoints)
    settings = Settings.resolve(store=spec.store, bucket=spec.bucket)
    store = StoreSpec.from_settings(settings).open(settings)
    if spec.baseline:
        load_baseline()
        _bucket_folder(store, spec.args[0] if spec.workflow == "ml-training" else spec.args[1])
        if spec.workflow == "ml-inference":
            _trained_on(store, spec.args[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "traces").mkdir(exist_ok=True)
    for name in ("breakdown.csv", "summary.csv"):  # the rows kept at the end: one it cannot read stops it now
        read_csv(out / name)

    total = len(pairs) * len(spec.states) * (spec.repeats + 1 + (spec.repeats if spec.cold else 0)) + \
        (spec.repeats + 1 if spec.baseline else 0)
    results: list[dict[str, Any]] = []  # one per configuration: key, times, reports
    written: list[Path] = []
    with _BenchBar(total, progress) as bar:
        for text in notes:
            bar.note(text)
        for state in spec.states:
            for backend, transfer in pairs:
                what = label(backend, transfer, state)
                times, reports, doc = warm_runs(spec, backend, transfer, bar.tick, state)
                results.append({"key": (backend, transfer, spec.workflow, "warm", state), "times": times,
                                "reports": reports})
                from mlwf.engine import trace

                stem = latency_csv_name(backend, transfer, spec.workflow, "warm", state)[:-len(".csv")]
                written.append(trace.write(doc, out / "traces" / f"{stem}.trace.json"))
                if spec.plots:
                    from mlwf import plots

                    written.append(plots.gantt(doc, out / "traces" / f"{stem}.png"))
                bar.note(f"{what} · warm: median {statistics.median(times):.0f} ms "
                         f"({min(times):.0f}–{max(times):.0f})")
                if spec.cold:
                    times, reports = cold_runs(spec, backend, transfer, bar.tick, state)
                    results.append({"key": (backend, transfer, spec.workflow, "cold", state), "times": times,
                                    "reports": reports})
                    bar.note(f"{what} · cold: median {statistics.median(times):.0f} ms "
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
        backend, transfer, workflow, mode, state = key = r["key"]
        replaced.add(key)
        path = out / latency_csv_name(*key)
        write_latency_csv(path, r["times"])
        written.append(path)
        names = dict(zip(("backend", "transfer", "workflow", "mode", "state"), key))
        for i, rep in enumerate(r["reports"]):
            breakdown += breakdown_rows(names, i, rep)
        summary_rows.append(summary_row(names, r["times"], r["reports"], base_median))
    if base:
        path = out / f"baseline-{spec.workflow}.csv"
        write_latency_csv(path, base["times"])
        written.append(path)
        key = ("baseline", "", spec.workflow, "warm", "light")
        replaced.add(key)
        s = stats(base["times"])
        summary_rows.append({"backend": "baseline", "transfer": "", "workflow": spec.workflow, "mode": "warm",
                             "state": "light",
                             "runs": len(base["times"]), "median_ms": round(s["median"], 1),
                             "min_ms": round(s["min"], 1), "max_ms": round(s["max"], 1),
                             "accuracy": round(base["accuracy"], 4), "ratio_to_baseline": 1.0})
    merge_csv(out / "breakdown.csv", BREAKDOWN_COLUMNS, breakdown, replaced)
    merge_csv(out / "summary.csv", SUMMARY_COLUMNS, summary_rows, replaced)
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
        "states": spec.states,
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


