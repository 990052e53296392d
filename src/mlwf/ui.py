"""Terminal output: progress on stderr when it is a terminal, readable summaries on stdout."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # The reader went away: let the command line exit quietly, as for any other output.
        self.quiet = True
        raise BrokenPipeError


def _stderr_console() -> Console:
    return _Console(stderr=True)


#: Progress displays on screen now. A display redraws its lines in place, so
#: anything printed while one is live lands inside it: every printer below
#: ends them first (:func:`end_progress`).
_live: list[Progress] = []


def show_progress(*columns) -> Progress:
    """Start a progress display on stderr with these columns; end it with :func:`hide_progress`.

    Every printer of this module ends it first, so nothing is drawn inside it.
    """
    progress = Progress(*columns, console=_stderr_console())
    progress.start()
    _live.append(progress)
    return progress


def hide_progress(progress: Progress) -> None:
    """End one progress display: its last state stays on screen, above what comes next."""
    if progress in _live:
        _live.remove(progress)
    progress.stop()


def end_progress() -> None:
    """End every progress display still drawing, so what is printed next stands below it, whole."""
    while _live:
        hide_progress(_live[-1])


class StageBars:
    """A progress bar per stage (a :class:`~mlwf.engine.progress.RunProgress`), shown only on a terminal;
    silent otherwise.

    The display starts at a run's first stage and lasts until :meth:`end` (or
    until something is printed through this module), so one object can watch
    several runs, each drawn whole before its report.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty()
        self._progress: Progress | None = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, *exc) -> None:
        self.end()

    def end(self) -> None:
        """Stop drawing; the next stage starts a new display."""
        if self._progress is not None:
            hide_progress(self._progress)
            self._progress = None
            self._tasks = {}

    def stage_started(self, stage: str, total: int) -> None:
        if not self.enabled:
            return
        if self._progress is None or self._progress not in _live:
            self._progress = show_progress(TextColumn("{task.description:<12}"), BarColumn(),
                                           MofNCompleteColumn(), TimeElapsedColumn())
            self._tasks = {}
        self._tasks[stage] = self._progress.add_task(stage, total=total)

    def call_done(self, stage: str) -> None:
        if self._progress is not None and stage in self._tasks:
            self._progress.advance(self._tasks[stage])

    def stage_done(self, stage: str) -> None:
        pass


@contextmanager
def count_bar(description: str, enabled: bool = True):
    """Yield a ``progress(done, total)`` callback drawing one bar on a terminal."""
    if not (enabled and sys.stderr.isatty()):
        yield None
        return
    progress = show_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn())
    try:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update
    finally:
        hide_progress(progress)


def stdout_console() -> Console:
    """The console for results on stdout, once every progress display has ended.

    On a terminal, long values (keys, digests) wrap rather than being cut, so
    they can be copied; piped output is not wrapped at 80 columns at all.
    """
    end_progress()
    return _Console() if sys.stdout.isatty() else _Console(width=240)


def _print_values(console: Console, rows: list[tuple[str, str]]) -> None:
    """Print values a user copies (keys, digests) one per line, never cut or broken by us.

    Each is one logical line: a narrow terminal wraps it softly, so selecting
    it copies the whole value.
    """
    width = max((len(name) for name, _ in rows), default=0)
    for name, value in rows:
        console.print(f"{name:<{width}}  {value}", soft_wrap=True, markup=False, highlight=False)


def _add(table: Table, name: str, value: str) -> None:
    # As text, not markup: a key may hold brackets.
    table.add_row(Text(name), Text(value))


def _pairs(title: str) -> Table:
    """A two-column table of names and values; a value too long for its line wraps, whole."""
    table = Table(title=Text(title), show_header=False)
    table.add_column(style="bold", overflow="fold")
    table.add_column(overflow="fold")
    return table


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _timing_rows(table: Table, report: dict[str, Any]) -> None:
    startup = report.get("startup_ms")
    if startup is not None:
        _add(table, "worker start-up", f"{startup:.0f} ms" if startup else "none (workers already running)")
    _add(table, "end to end", f"{report['e2e_ms']:.0f} ms")
    _add(table, "stages", "  ".join(f"{k} {v:.0f} ms" for k, v in report["stage_ms"].items()))
    _add(table, "state transfer", f"{report['state_transfer_ms']:.1f} ms")


def print_report(report: dict[str, Any]) -> None:
    """A readable summary of a run report."""
    console = stdout_console()
    wf = report["workflow"]
    table = _pairs(f"{wf} run {report['run_id']}")
    _add(table, "backend", report["backend"] + (f", transfer {report['transfer']}" if report.get("transfer") else ""))
    pool = report.get("ray_pool")
    if pool:
        _add(table, "Ray worker pool", f"{pool['pool_calls']} calls on {pool['workers']} warm workers, "
                                       f"{pool['task_calls']} as tasks" if pool["used"] else "not used (see the warning)")
    _add(table, "images", str(report.get("num_images")))
    if wf == "ml-training":
        _add(table, "training / validation", f"{report['num_train_images']} / {report['num_validation']}")
        _add(table, "classes", ", ".join(report["classes"]))
        split = report["train_per_pca"]
        _add(table, "functions", f"{len(split)} PCA → {sum(split)} training ({' + '.join(map(str, split))})")
        _add(table, "validation accuracy", _pct(report["validation_accuracy"]))
        values = [("model", report["model_prefix"] or "(not published)")]
    else:
        _add(table, "predicted", str(report["num_predicted"]))
        _add(table, "accuracy", _pct(report["accuracy"]) if report["num_labelled"] else "n/a (unlabelled)")
        values = [("results", report["results_key"]), ("model", report.get("model_prefix") or "")]
    values.append(("model sha256", report["model_digest"]))
    if report.get("skipped"):
        _add(table, "skipped (not decoded)", _skipped(report))
    if report.get("unlabelled"):
        _add(table, "ignored (not in a class folder)", str(report["unlabelled"]))
    _timing_rows(table, report)
    console.print(table)
    _print_values(console, values)


def _skipped(report: dict[str, Any]) -> str:
    """How many images a run skipped, and the first two with why (``--json`` names them all)."""
    reasons = report.get("skipped_reasons")
    if reasons is None:  # a report written before reasons were kept
        return f"{report['skipped']}, e.g. {', '.join(report.get('skipped_examples', [])[:2])}"
    examples = "; ".join(f"{key}: {reason}" for key, reason in list(reasons.items())[:2])
    return f"{report['skipped']}, e.g. {examples}"


def print_run(info: dict[str, Any]) -> None:
    """``mlwf runs show``: a run's parameters, status, figures and where its outputs are."""
    console = stdout_console()
    report = info.get("report") or {}
    table = _pairs(f"{info['workflow']} run {info['run_id']}")
    _add(table, "status", info["status"] + (f": {info['error']}" if info.get("error") else ""))
    _add(table, "updated", str(info.get("updated_at")))
    _add(table, "parameters", "  ".join(f"{k}={v}" for k, v in info["params"].items()))
    _add(table, "progress", "  ".join(f"{s} {p}" for s, p in info["progress"].items()))
    if report:
        accuracy = report.get("validation_accuracy" if info["workflow"] == "ml-training" else "accuracy")
        _add(table, "accuracy", _pct(accuracy))
        if report.get("skipped"):
            _add(table, "skipped (not decoded)", _skipped(report))
        _timing_rows(table, report)
        for stage, st in report.get("stages", {}).items():
            calls = st.get("calls")
            figures = [f"{calls} call{'' if calls == 1 else 's'}", f"wall {st.get('wall_ms', 0):.0f} ms",
                       f"compute {st.get('compute_ms', 0):.0f} ms"]
            for name in ("fetch", "input_get", "put"):
                if st.get(f"{name}_ms"):
                    figures.append(f"{name.replace('_', ' ')} {st[f'{name}_ms']:.0f} ms")
            _add(table, f"  {stage}", ", ".join(figures))
    console.print(table)
    values = list(info["outputs"].items())
    if report.get("model_digest"):
        values.append(("model sha256", report["model_digest"]))
    _print_values(console, values)
    confusion = report.get("confusion")
    if confusion:
        # Training's confusion is a bare matrix over its classes; inference names its labels.
        labels = confusion["labels"] if isinstance(confusion, dict) else report.get("classes", [])
        matrix = confusion["matrix"] if isinstance(confusion, dict) else confusion
        grid = Table(title="confusion matrix (rows: true class, columns: predicted)")
        grid.add_column("", style="bold", overflow="fold")
        for label in labels:
            grid.add_column(Text(label), justify="right", overflow="fold")
        for label, row in zip(labels, matrix):
            grid.add_row(Text(label), *map(str, row))
        console.print(grid)


def print_model(info: dict[str, Any]) -> None:
    console = stdout_console()
    table = _pairs(f"model at {info['prefix']}")
    _add(table, "size", f"{info['bytes']} bytes")
    _add(table, "published", f"{info['published_at']} by run {info['run_id']}")
    _add(table, "classes", ", ".join(info["classes"]))
    _add(table, "members", f"{info['num_members']} forests, {info['num_trees']} trees, "
                             f"{info['num_projections']} projections")
    _add(table, "image size", f"{info['image_size']}×{info['image_size']}")
    _add(table, "validation accuracy", _pct(info["metrics"].get("validation_accuracy")))
    _add(table, "earlier versions", str(len(info["history"])))
    console.print(table)
    _print_values(console, [("object", info["object"]), ("sha256", info["digest"])])


def print_bench(result: dict[str, Any]) -> None:
    """The summary of ``mlwf bench``: one row per configuration, then where the files are.

    Every row is one workflow's, so the workflow is in the title; without
    vertical rules the table fits 80 columns, and a narrower terminal wraps
    headers and cells rather than cutting them.
    """
    console = stdout_console()
    workflows = sorted({r["workflow"] for r in result["summary"]})
    table = Table(title=Text(f"mlwf bench {', '.join(workflows)}"), box=box.SIMPLE_HEAD)
    for col in ("backend", "transfer", "mode", "median", "min–max", "× baseline", "accuracy"):
        table.add_column(col, overflow="fold",
                         justify="right" if col in ("median", "min–max", "× baseline", "accuracy") else "left")
    for r in result["summary"]:
        table.add_row(r["backend"], r["transfer"] or "", r["mode"], f"{r['median_ms']:.0f} ms",
                      f"{r['min_ms']:.0f}–{r['max_ms']:.0f} ms",
                      "" if r.get("ratio_to_baseline") is None else f"{r['ratio_to_baseline']:.2f}",
                      _pct(r.get("accuracy")))
    console.print(table)
    console.print(f"{len(result['files'])} files written: CSVs, traces/ and latency/breakdown plots in "
                  f"{result['out']}", soft_wrap=True, markup=False, highlight=False)
