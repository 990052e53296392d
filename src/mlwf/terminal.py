"""Terminal output: progress on stderr when it is a terminal, readable summaries on stdout."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleDimensions
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

#: The width of output into a pipe or a file when $COLUMNS does not say: wide enough for a table,
#: narrow enough to read in a pager or a log.
PIPED_WIDTH = 120


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # The reader went away: let the command line exit quietly, as for any other output.
        self.quiet = True
        raise BrokenPipeError


class _ProgressConsole(_Console):
    """Where progress is drawn (stderr): two columns narrower than the terminal.

    The ``^C`` a terminal echoes on Ctrl-C lands after the display's last
    line: on a line drawn to the last column it would wrap onto a line of its
    own, which the display does not know of, and it would erase one line too
    few, leaving itself on screen above the command's last line.
    """

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return ConsoleDimensions(max(1, size.width - 2), size.height)


def _stderr_console() -> Console:
    return _ProgressConsole(stderr=True)


#: Progress displays on screen now. A display redraws its lines in place, so
#: anything printed while one is live lands inside it: every printer below
#: ends them first (:func:`end_progress`).
_live: list[Progress] = []


def show_progress(*columns) -> Progress:
    """Start a progress display on stderr with these columns; end it with :func:`hide_progress`.

    Every printer of this module ends it first, so nothing is drawn inside it.
    Drawing in this thread holds a Ctrl-C until the frame is out (see :func:`drawing`).
    """
    with drawing():
        progress = Progress(*columns, console=_stderr_console())
        progress.start()
        _live.append(progress)
    return progress


def hide_progress(progress: Progress, erase: bool = False) -> None:
    """End one progress display: its last state stays on screen, above what comes next, or with
    ``erase`` is wiped (a command that failed or was interrupted says so in one line instead)."""
    with drawing():
        if progress in _live:
            _live.remove(progress)
        if erase:
            progress.live.transient = True
        progress.stop()


def drawing():
    """Around a frame drawn from the main thread: a Ctrl-C waits until it is out.

    A :class:`KeyboardInterrupt` raised inside rich just after it wrote a frame,
    but before it emptied its buffer, makes it write that frame again at its
    next print, one line out of place: a stale bar left on screen above the
    command's last line. Holding the Ctrl-C for the microseconds of a frame
    keeps the display's idea of the screen true.
    """
    from mlwf.engine.interrupts import deferred

    return deferred()


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

    def __exit__(self, exc_type, *exc) -> None:
        # A run that ended in an error or a Ctrl-C leaves no half-drawn bars: its one line says it all.
        self.end(erase=exc_type is not None)

    def end(self, erase: bool = False) -> None:
        """Stop drawing (with ``erase``, wipe what was drawn); the next stage starts a new display."""
        if self._progress is not None:
            hide_progress(self._progress, erase=erase)
            self._progress = None
            self._tasks = {}

    def stage_started(self, stage: str, total: int) -> None:
        if not self.enabled:
            return
        if self._progress is None or self._progress not in _live:
            self._progress = show_progress(TextColumn("{task.description:<12}"), BarColumn(),
                                           MofNCompleteColumn(), TimeElapsedColumn())
            self._tasks = {}
        with drawing():  # adding a task draws a frame
            self._tasks[stage] = self._progress.add_task(stage, total=total)

    def call_done(self, stage: str) -> None:
        if self._progress is not None and stage in self._tasks:
            self._progress.advance(self._tasks[stage])

    def stage_done(self, stage: str) -> None:
        pass


@contextmanager
def count_bar(description: str, enabled: bool = True):
    """Yield a ``progress(done, total)`` callback drawing one bar on a terminal.

    The bar appears at the first call, once there is work to count: a command
    refused on its input draws nothing before its error line. It is wiped if
    the block raises.
    """
    if not (enabled and sys.stderr.isatty()):
        yield None
        return
    drawn: list = []  # the display and its task, once the first count arrives

    def update(done: int, total: int) -> None:
        if not drawn:
            progress = show_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn())
            drawn.extend((progress, progress.add_task(description, total=None)))
        drawn[0].update(drawn[1], completed=done, total=total)

    try:
        yield update
    except BaseException:
        if drawn:
            hide_progress(drawn[0], erase=True)
        raise
    if drawn:
        hide_progress(drawn[0])


def output_width() -> int | None:
    """The width of output that is not a terminal: ``$COLUMNS`` if set, else :data:`PIPED_WIDTH`;
    None on a terminal (its own width)."""
    if sys.stdout.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else PIPED_WIDTH


def stdout_console() -> Console:
    """The console for results on stdout, once every progress display has ended.

    On a terminal, long values (keys, digests) wrap rather than being cut, so
    they can be copied, and colour is used; output into a pipe or a file is
    as wide as :func:`output_width` says, without colour.
    """
    end_progress()
    return _Console(width=output_width())


class Items:
    """Short items side by side, wrapped only between items, never inside one (``validation 65 ms``
    stays whole); ``sep`` goes between them (``", "`` ends a wrapped line with the comma). An item
    longer than a whole line is folded."""

    def __init__(self, items: list[str], sep: str = "  "):
        self.items = [str(item) for item in items]
        self.mark = sep.rstrip()
        self.space = sep[len(self.mark):] or " "

    def _pieces(self) -> list[str]:
        return [item + (self.mark if i < len(self.items) - 1 else "") for i, item in enumerate(self.items)]

    def __rich_console__(self, console, options):
        lines: list[str] = []
        for piece in self._pieces():
            if lines and cell_len(lines[-1] + self.space + piece) <= options.max_width:
                lines[-1] += self.space + piece
            else:
                lines.append(piece)
        yield Text("\n".join(lines), overflow="fold")

    def __rich_measure__(self, console, options) -> Measurement:
        pieces = self._pieces() or [""]
        return Measurement(max(map(cell_len, pieces)), cell_len(self.space.join(pieces)))


def _print_values(console: Console, rows: list[tuple[str, str]]) -> None:
    """Print values a user copies (keys, digests) one per line, never cut or broken by us.

    Each is one logical line: a narrow terminal wraps it softly, so selecting
    it copies the whole value. Values are aligned; one that does not fit
    aligned (a digest at 80 columns) stands two spaces after its name, or, if
    that does not fit either, on the next line, indented; only a value longer
    than a whole line is wrapped.
    """
    width = max((len(name) for name, _ in rows), default=0)
    for name, value in rows:
        # A line is kept short of the last column: one that fills it reads, when copied, as wrapped.
        line = f"{name:<{width}}  {value}"
        if len(line) >= console.width:
            line = f"{name}  {value}"
        if len(line) >= console.width > len(value) + 2:
            console.print(name, markup=False, highlight=False)
            line = f"  {value}"
        console.print(line, soft_wrap=True, markup=False, highlight=False)


def _add(table: Table, name: str, value) -> None:
    # As text, not markup: a key may hold brackets.
    table.add_row(Text(name), value if isinstance(value, Items) else Text(value))


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
    _add(table, "stages", Items([f"{k} {v:.0f} ms" for k, v in report["stage_ms"].items()]))
    _add(table, "state transfer", f"{report['state_transfer_ms']:.1f} ms")
    stages = report.get("stages") or {}
    reused = sum(int(st.get("reused") or 0) for st in stages.values())
    if reused:  # a resumed run: what it did not have to do again
        calls = sum(int(st.get("calls") or 0) for st in stages.values())
        _add(table, "resumed", f"{reused} of {calls} calls reused from before")


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
        _add(table, "classes", Items(report["classes"], ", "))
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
    _add(table, "started", local_time(info.get("started_at"), seconds=True)
         + (" (resumed)" if info.get("resumed") else ""))
    _add(table, "took" if info["status"] != "running" else "running for", duration(info.get("duration_ms")))
    _add(table, "parameters", Items([f"{k}={v}" for k, v in info["params"].items()]))
    _add(table, "progress", Items([f"{s} {p}" for s, p in info["progress"].items()]))
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
            _add(table, f"  {stage}", Items(figures, ", "))
    console.print(table)
    values = list(info["outputs"].items())
    if info.get("resume"):  # copied whole, so among the values, not folded in the table
        values.append(("resume with", info["resume"]))
    if report.get("model_digest"):
        values.append(("model sha256", report["model_digest"]))
    _print_values(console, values)
    confusion = report.get("confusion")
    if confusion:
        # Training's confusion is a bare matrix over its classes; inference names its labels.
        labels = confusion["labels"] if isinstance(confusion, dict) else report.get("classes", [])
        matrix = confusion["matrix"] if isinstance(confusion, dict) else confusion
        numbered, grid = confusion_table(labels, matrix, console.width)
        console.print(Text("confusion matrix (rows: true class, columns: predicted"
                           + (", numbered as the rows)" if numbered else ")")))
        console.print(grid)


def confusion_table(labels: list[str], matrix: list[list[int]], width: int) -> tuple[bool, Table]:
    """The confusion matrix, its columns headed by the class names when they fit ``width``, else by
    the numbers the rows give them (then ``True``): a class name is never broken across lines."""
    labels = [str(label) for label in labels]
    cells = [len(str(n)) for row in matrix for n in row] or [1]
    label_width = max(map(len, labels), default=0)
    # Each column takes its content plus a border and a space either side (the table's box).
    named = label_width + 3 + sum(max(len(label), max(cells)) + 3 for label in labels) + 1
    numbered = named > width
    grid = Table()
    grid.add_column("", style="bold", no_wrap=True)
    for i, label in enumerate(labels):
        grid.add_column(Text(str(i) if numbered else label), justify="right", no_wrap=True)
    for i, (label, row) in enumerate(zip(labels, matrix)):
        grid.add_row(Text(f"{i:>{len(str(len(labels) - 1))}} {label}" if numbered else label), *map(str, row))
    return numbered, grid


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
    """The summary of ``mlwf bench``: one row per configuration, fastest first within each mode,
    then where the files are.

    Every row is one workflow's, so the workflow is in the title; without
    vertical rules the table fits 80 columns, and a narrower terminal wraps
    headers and cells rather than cutting them. The state, memory and
    × baseline columns show only when they say something (a heavy variant;
    PSS measured; a baseline run), so the usual table fits 80 columns whole.
    """
    console = stdout_console()
    rows = result["summary"]
    workflows = sorted({r["workflow"] for r in rows})
    states = any((r.get("state") or "light") != "light" for r in rows)
    memory = any(r.get("peak_pss_mb") not in (None, "") for r in rows)
    baseline = any(r.get("ratio_to_baseline") is not None for r in rows)
    table = Table(title=Text(f"mlwf bench {', '.join(workflows)}"), box=box.SIMPLE_HEAD, pad_edge=False)
    columns = ["backend", "transfer", *(["state"] * states), "mode", "median", "min–max",
               *(["memory"] * memory), *(["× baseline"] * baseline), "accuracy"]
    for col in columns:
        table.add_column(col, overflow="fold", justify="left" if col in ("backend", "transfer", "state", "mode")
                         else "right")
    ranked = sorted(rows, key=lambda r: (r["backend"] == "baseline", (r.get("state") or "light") != "light",
                                         r["mode"] != "warm", r["median_ms"]))
    for r in ranked:
        cells = [r["backend"], r["transfer"] or "", *([r.get("state") or "light"] * states), r["mode"],
                 f"{r['median_ms']:.0f} ms", f"{r['min_ms']:.0f}–{r['max_ms']:.0f} ms"]
        if memory:
            cells.append("" if r.get("peak_pss_mb") in (None, "") else f"{r['peak_pss_mb']:.0f} MB")
        if baseline:
            cells.append("" if r.get("ratio_to_baseline") is None else f"{r['ratio_to_baseline']:.2f}")
        cells.append(_pct(r.get("accuracy")))
        table.add_row(*cells)
    console.print(table)
    if memory:
        console.print("memory: peak PSS summed over the run's processes (shared pages counted once)",
                      soft_wrap=True, markup=False, highlight=False)
    console.print(f"{len(result['files'])} files written: CSVs, traces/ and latency/breakdown/transfer plots in "
                  f"{result['out']}", soft_wrap=True, markup=False, highlight=False)


def local_time(value: str | None, seconds: bool = False) -> str:
    """A run record's time (ISO 8601, UTC) as this machine's local time, ``2026-12-06 21:41``."""
    import datetime as dt

    try:
        moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        return "?"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M" + (":%S" if seconds else ""))


def duration(ms: float | None) -> str:
    """A duration a person reads at a glance: ``850 ms``, ``2.9 s``, ``42 s``, ``12 min``, ``3.2 h``."""
    if ms is None:
        return "?"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 10_000:
        return f"{ms / 1000:.1f} s"
    if ms < 100_000:
        return f"{ms / 1000:.0f} s"
    if ms < 3_600_000:
        return f"{ms / 60_000:.0f} min"
    return f"{ms / 3_600_000:.1f} h"


def size(n: int) -> str:
    """Bytes in decimal units, as a file manager shows them: ``731 B``, ``12.3 kB``, ``373.2 MB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


#: How each status shows on a terminal (no colour elsewhere).
_STATUS_STYLE = {"succeeded": "green", "failed": "red", "interrupted": "yellow", "running": "cyan",
                 "abandoned": "magenta", "unreadable": "red", "unknown": "red"}


def print_runs(listing: dict[str, Any]) -> None:
    """``mlwf runs ls``: where the store is and what its runs keep, then a table per workflow.

    One line per run (id, status, start, duration, accuracy), which fits 80
    columns; on a narrower one each run takes two lines, its id alone on the
    first. Below a run that did not succeed, indented, how far it got or its
    error, wrapped between words or stages, never inside one.
    """
    console = stdout_console()
    runs = listing["runs"]
    where = f"bucket {listing['bucket']} of {listing['store']}"
    if not runs:
        console.print(Text(f"No runs in {where} yet: 'mlwf run' starts one."))
        return
    console.print(Text(f"{len(runs)} run{'s' if len(runs) != 1 else ''} in {where} keep "
                       f"{size(listing['bytes'])}, {size(listing['intermediate_bytes'])} of it intermediates"))
    console.print(Text("('mlwf runs gc --keep N' deletes the intermediates of all but the N newest runs of each "
                       "workflow)", style="dim"))
    id_width = max(len(r["run_id"]) for r in runs)
    status_width = max(6, *(len(r["status"]) for r in runs))
    # Status, start, duration and accuracy: the part of a row after the run id.
    rest_width = status_width + 2 + 16 + 2 + 6 + 2 + 8
    stacked = id_width + 2 + rest_width > console.width
    indent = 2 if stacked else id_width + 2
    rest_header = f"{'STATUS':<{status_width}}  {'STARTED':<16}  {'TOOK':>6}  {'ACCURACY':>8}"
    by_workflow: dict[str, list[dict]] = {}
    for run in runs:
        by_workflow.setdefault(run["workflow"], []).append(run)
    for workflow, group in by_workflow.items():
        console.print()
        console.print(Text(workflow, style="bold"))
        if stacked:
            console.print(Text("RUN ID", style="dim"))
            console.print(Text(" " * indent + rest_header, style="dim"))
        else:
            console.print(Text(f"{'RUN ID':<{id_width}}  {rest_header}", style="dim"))
        for run in group:
            accuracy = "" if run.get("accuracy") is None else f"{100 * run['accuracy']:.1f} %"
            took = duration(run.get("duration_ms")) if run.get("duration_ms") is not None else ""
            if stacked:
                console.print(Text(run["run_id"]), soft_wrap=True)
                line = Text(" " * indent)
            else:
                line = Text(f"{run['run_id']:<{id_width}}  ")
            line.append(f"{run['status']:<{status_width}}", style=_STATUS_STYLE.get(run["status"], ""))
            line.append(f"  {local_time(run.get('started_at')):<16}  {took:>6}  {accuracy:>8}".rstrip())
            console.print(line, soft_wrap=True)
            for text in _detail_lines(console, _run_detail(run), console.width - indent):
                console.print(Text(" " * indent + text), soft_wrap=True)
    if any(r["status"] in ("interrupted", "abandoned") for r in runs):
        console.print()
        console.print(Text("To resume an interrupted run: 'mlwf runs show RUN_ID' prints its command."))


def _detail_lines(console: Console, detail, width: int) -> list[str]:
    """``detail`` (a :class:`Text` or :class:`Items`) as the lines it takes at ``width``, right-stripped."""
    if detail is None:
        return []
    options = console.options.update_width(max(20, width))
    return ["".join(segment.text for segment in line).rstrip()
            for line in console.render_lines(detail, options, pad=False)]


def _run_detail(run: dict[str, Any]):
    """What to say below a run that did not succeed: its error, or how far it got."""
    if run["status"] == "succeeded":
        return None
    if run.get("error"):
        return Text(str(run["error"]))
    progress = [f"{stage} {done}" for stage, done in (run.get("progress") or {}).items()]
    return Items(progress) if progress else None
