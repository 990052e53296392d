"""``mlwf bench plot``: every figure of a benchmark folder, drawn from its files."""

from __future__ import annotations

import json
from pathlib import Path

from mlwf.bench.files import BASELINE_CSV, BASELINE_LABEL, LATENCY_CSV, read_csv, read_latency_csv
from mlwf.bench.files import label as config_label
from mlwf.errors import UsageError


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
        raise UsageError(f"no benchmark CSVs (BACKEND-TRANSFER[-heavy]-WORKFLOW-MODE.csv) in {out}: run "
                         f"'mlwf bench … --out {out}' first")
    def order(p: Path) -> tuple:
        m = LATENCY_CSV.match(p.name)
        return (1,) if m is None else (0, plots.config_order(m["backend"], m["transfer"], m["mode"],
                                                            m["state"] or "light"))

    for p in sorted(found, key=order):  # measured configurations in a fixed order, the baseline last
        if m := LATENCY_CSV.match(p.name):
            label = config_label(m["backend"], m["transfer"], m["state"] or "light", m["mode"])
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
    rows = read_csv(out / "breakdown.csv")
    stage_rows = [r for r in rows if r.get("kind") == "stage"]
    if stage_rows:
        written += plots.breakdown(stage_rows, out / "breakdown")
    edge_rows = [r for r in rows if r.get("kind") == "edge" and r.get("from") != "store"]
    if edge_rows:
        written += plots.transfer(edge_rows, out / "transfer")
    if traces and (out / "traces").is_dir():
        from mlwf.engine import trace

        for p in sorted((out / "traces").glob("*.trace.json")):
            written.append(plots.gantt(trace.load(p), p.with_name(p.name[:-len(".trace.json")] + ".png")))
    return written
