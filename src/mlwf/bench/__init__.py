"""``mlwf bench``: end-to-end latency of a workflow per backend and transfer, with its breakdown.

For each backend × transfer, a workflow runs ``repeats`` times *warm* (one
:class:`~mlwf.engine.driver.Engine`, after one warm-up run that is not
counted) and, with ``cold``, ``repeats`` times as fresh ``python -m mlwf.cli
run … --json`` processes, timed from process start to exit. With
``baseline``, the same work runs in this process as plain scikit-learn
(:mod:`mlwf.bench.baseline`), after one warm-up run.

Files written into the output folder:

* ``<backend>-<transfer>-<workflow>-<warm|cold>.csv`` and
  ``baseline-<workflow>.csv``: ``Run,TimeMs``, one row per run (the reference's
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

from mlwf.bench.files import machine
from mlwf.bench.plots import plot_dir
from mlwf.bench.runner import BenchSpec, command_line, run

__all__ = ["BenchSpec", "command_line", "machine", "plot_dir", "run"]
