"""Terminal output: progress on stderr when it is a terminal, readable summaries on stdout."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def _stderr_console() -> Console:
    return Console(stderr=True)


class StageProgress:
    """A progress bar per stage, shown only on a terminal; silent otherwise."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty()
        self._progress: Progress | None = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> StageProgress:
        if self.enabled:
            self._progress = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=_stderr_console(), transient=False)
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def stage_started(self, stage: str, total: int) -> None:
        if self._progress is not None:
            self._tasks[stage] = self._progress.add_task(stage, total=total)

    def call_done(self, stage: str) -> None:
        if self._progress is not None:
            self._progress.advance(self._tasks[stage])

    def stage_done(self, stage: str) -> None:
        pass


@contextmanager
def count_progress(description: str, enabled: bool = True):
    """Yield a ``progress(done, total)`` callback drawing one bar on a terminal."""
    if not (enabled and sys.stderr.isatty()):
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_stderr_console()) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def _stdout_console() -> Console:
    # Piped output is not wrapped at 80 columns, so digests and keys stay whole.
    return Console() if sys.stdout.isatty() else Console(width=240)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def print_report(report: dict[str, Any]) -> None:
    """A readable summary of a run report."""
    console = _stdout_console()
    wf = report["workflow"]
    table = Table(title=f"{wf} run {report['run_id']} ({report['backend']} backend)", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("images", str(report.get("num_images")))
    if wf == "ml-training":
        table.add_row("training / validation", f"{report['num_train_images']} / {report['num_validation']}")
        table.add_row("classes", ", ".join(report["classes"]))
        split = report["train_per_pca"]
        table.add_row("functions", f"{len(split)} PCA → {sum(split)} training ({' + '.join(map(str, split))})")
        table.add_row("validation accuracy", _pct(report["validation_accuracy"]))
        table.add_row("model", f"{report['model_prefix'] or '(not published)'}  sha256 {report['model_digest'][:16]}…")
    else:
        table.add_row("predicted", str(report["num_predicted"]))
        table.add_row("accuracy", _pct(report["accuracy"]) if report["num_labelled"] else "n/a (unlabelled)")
        table.add_row("results", report["results_key"])
        table.add_row("model", f"sha256 {report['model_digest'][:16]}…")
    if report.get("skipped"):
        table.add_row("skipped (undecodable)", f"{report['skipped']}, e.g. {', '.join(report['skipped_examples'][:2])}")
    if report.get("unlabelled"):
        table.add_row("ignored (not in a class folder)", str(report["unlabelled"]))
    table.add_row("end to end", f"{report['e2e_ms']:.0f} ms")
    table.add_row("stages", "  ".join(f"{k} {v:.0f} ms" for k, v in report["stage_ms"].items()))
    table.add_row("state transfer", f"{report['state_transfer_ms']:.1f} ms")
    console.print(table)


def print_model(info: dict[str, Any]) -> None:
    console = _stdout_console()
    table = Table(title=f"model at {info['prefix']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("sha256", info["digest"])
    table.add_row("object", f"{info['object']} ({info['bytes']} bytes)")
    table.add_row("published", f"{info['published_at']} by run {info['run_id']}")
    table.add_row("classes", ", ".join(info["classes"]))
    table.add_row("members", f"{info['num_members']} forests, {info['num_trees']} trees, "
                             f"{info['num_projections']} projections")
    table.add_row("image size", f"{info['image_size']}×{info['image_size']}")
    table.add_row("validation accuracy", _pct(info["metrics"].get("validation_accuracy")))
    table.add_row("earlier versions", str(len(info["history"])))
    console.print(table)


def print_bench(result: dict[str, Any]) -> None:
    """The summary of ``mlwf bench``: one row per configuration, then where the files are."""
    console = _stdout_console()
    table = Table(title=f"mlwf bench → {result['out']}")
    for col in ("backend", "transfer", "workflow", "mode", "median", "min–max", "× baseline", "accuracy"):
        table.add_column(col, justify="right" if col in ("median", "min–max", "× baseline", "accuracy") else "left")
    for r in result["summary"]:
        table.add_row(r["backend"], r["transfer"] or "", r["workflow"], r["mode"], f"{r['median_ms']:.0f} ms",
                      f"{r['min_ms']:.0f}–{r['max_ms']:.0f} ms",
                      "" if r.get("ratio_to_baseline") is None else f"{r['ratio_to_baseline']:.2f}",
                      _pct(r.get("accuracy")))
    console.print(table)
    console.print(f"{len(result['files'])} files written: CSVs, traces/ and latency/breakdown plots in {result['out']}")
