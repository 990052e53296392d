"""Figures of runs and benchmarks (matplotlib, drawn off-screen, written as PNG and SVG).

* :func:`gantt`: one run from its trace (``mlwf trace plot``): a row per
  worker lane, a bar per call coloured by stage, its store I/O and
  (de)serialization drawn darker inside it, and the driver's stages on top;
* :func:`latency`: end-to-end latency per backend, transfer and mode, with
  the spread of the runs, beside the reference's published figures;
* :func:`breakdown`: where each stage's time goes (compute, fetch,
  serialize, transfer, deserialize), stacked;
* :func:`transfer`: what moving the state costs on each edge of the graph,
  per transfer mode (serialize, transfer, deserialize, stacked), the light
  and heavy variants side by side.

matplotlib is an optional dependency: ``pip install 'mlwf[bench]'``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from mlwf import workflows
from mlwf.errors import UsageError

#: Stage colours, in the order the workflows list their stages (:func:`mlwf.workflows.stage_order`),
#: so a stage looks the same in every figure.
_STAGE_COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"]
STARTUP_COLOUR = "#bab0ac"  # worker start-up, drawn on the driver's row

#: The reference's published end-to-end latencies, seconds, on its own servers (REFERENCE.md).
REFERENCE = {
    "ml-training": {"input": "2k MNIST images, 2 PCA, 8 RF", "Faasm": 22.0, "Knative": 25.2},
    "ml-inference": {"input": "1k images, 16 functions", "Faasm": 2.0, "Knative": 28.1},
}
REFERENCE_LABEL = "reference (published, its own servers)"

#: Components of a stage's time in the breakdown, with the report fields they sum.
COMPONENTS = {
    "compute": ("compute_ms",),
    "fetch": ("fetch_ms", "list_ms"),
    "serialize": ("encode_ms",),
    "transfer": ("put_ms", "get_ms", "return_ms"),
    "deserialize": ("decode_ms",),
}
_COMPONENT_COLOURS = {"compute": "#59a14f", "fetch": "#4e79a7", "serialize": "#f28e2b",
                      "transfer": "#e15759", "deserialize": "#b07aa1"}


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise UsageError("plots need matplotlib: pip install 'mlwf[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_colour(stage: str) -> str:
    order = workflows.stage_order()
    if stage in order and order.index(stage) < len(_STAGE_COLOURS):
        return _STAGE_COLOURS[order.index(stage)]
    return "#9c9c9c"


def _darker(colour: str, factor: float = 0.55) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(colour)
    return (r * factor, g * factor, b * factor)


def save(fig, base: str | Path, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Write ``fig`` as ``base.png`` and ``base.svg`` (or ``base`` itself if it has a suffix); close it."""
    plt = pyplot()
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base] if base.suffix.lower() in (".png", ".svg", ".pdf") else \
        [base.with_name(base.name + "." + f) for f in formats]
    for p in paths:
        fig.savefig(p, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------- gantt
def gantt(trace: dict[str, Any], out: str | Path) -> Path:
    """Draw a trace (see :mod:`mlwf.engine.trace`) as a Gantt chart PNG at ``out``; return the path.

    Raises :class:`UsageError` when the trace has no complete (``X``) events.
    """
    plt = pyplot()
    from matplotlib.patches import Patch

    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    if not events:
        raise UsageError("the trace has no spans (no 'X' events) to draw")
    names = {(e["pid"], None): e["args"].get("name") for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    # One row per (process, thread): the driver first, then workers in pid order.
    rows = sorted({(e["pid"], e.get("tid", 0)) for e in events})
    y_of = {row: i for i, row in enumerate(rows)}
    t_end = max(e["ts"] + e.get("dur", 0) for e in events) / 1e6
    height = max(2.5, 0.42 * len(rows) + 1.6)
    fig, ax = plt.subplots(figsize=(12, height))
    stages_seen: list[str] = []

    def bar(e, h, colour, **kw):
        y = y_of[(e["pid"], e.get("tid", 0))]
        ax.broken_barh([(e["ts"] / 1e6, max(e.get("dur", 0), 0) / 1e6)], (y - h / 2, h), facecolors=colour, **kw)

    for e in events:
        cat, args = e.get("cat"), e.get("args", {})
        if cat == "run":
            bar(e, 0.7, "#d9d9d9", edgecolor="#7f7f7f", linewidth=0.6)
            ax.text(0.005 * t_end, y_of[(e["pid"], e.get("tid", 0))], e["name"], va="center", fontsize=7)
        elif cat == "startup":
            bar(e, 0.7, STARTUP_COLOUR, edgecolor="white", linewidth=0.5)
            ax.text((e["ts"] + e["dur"] / 2) / 1e6, y_of[(e["pid"], e.get("tid", 0))], e["name"],
                    ha="center", va="center", fontsize=6.5, color="black")
        elif cat in ("call", "stage"):
            stage = args.get("stage", e["name"])
            if stage not in stages_seen:
                stages_seen.append(stage)
            bar(e, 0.8 if cat == "call" else 0.7, stage_colour(stage), edgecolor="white", linewidth=0.5)
            if e.get("dur", 0) / 1e6 > 0.045 * t_end:
                y = y_of[(e["pid"], e.get("tid", 0))]
                ax.text((e["ts"] + e["dur"] / 2) / 1e6, y + (0.3 if cat == "call" else 0), e["name"],
                        ha="center", va="center", fontsize=6.5, color="black")
    for e in events:  # nested spans on top of their calls
        cat = e.get("cat")
        call = e.get("args", {}).get("call") or e.get("args", {}).get("of_call", "")
        stage = call.split("[")[0] if call else ""
        if cat == "io":
            bar(e, 0.5, _darker(stage_colour(stage)) if stage else "#555555")
        elif cat == "serde":
            bar(e, 0.5, _darker(stage_colour(stage), 0.75), hatch="////", edgecolor=_darker(stage_colour(stage)),
                linewidth=0)

    labels = []
    for pid, tid in rows:
        name = names.get((pid, None)) or f"pid {pid}"
        thread = next((e["args"].get("name") for e in trace["traceEvents"] if e.get("ph") == "M"
                       and e.get("name") == "thread_name" and e["pid"] == pid and e.get("tid") == tid), "")
        labels.append(f"{name} · {thread}" if name == "driver" or (thread and "lane" in thread) else name)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, t_end * 1.01)
    ax.set_xlabel("seconds since the run started (wall clock)")
    ax.grid(axis="x", alpha=0.3)
    other = trace.get("otherData", {})
    title = " · ".join(str(other[k]) for k in ("workflow", "run_id", "backend", "transfer") if other.get(k))
    if other.get("e2e_ms"):
        title += f" · end to end {other['e2e_ms'] / 1e3:.2f} s"
    ax.set_title(title or "run", fontsize=9)
    handles = [Patch(facecolor=stage_colour(s), label=s) for s in stages_seen]
    if any(e.get("cat") == "startup" for e in events):
        handles.append(Patch(facecolor=STARTUP_COLOUR, label="worker start-up"))
    grey = "#9c9c9c"
    handles += [Patch(facecolor=_darker(grey), label="store read/write (darker)"),
                Patch(facecolor=_darker(grey, 0.75), hatch="////", edgecolor=_darker(grey),
                      label="(de)serialize (darker, hatched)")]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1), frameon=False)
    [path] = save(fig, Path(out) if Path(out).suffix else Path(str(out) + ".png"))
    return path


# --------------------------------------------------------------------------- latency
def _fmt_s(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"


#: Transfer modes in the order figures show them: the store (the reference's) first.
TRANSFER_ORDER = ["store", "direct", "payload", "shm"]


def config_order(backend: str, transfer: str, mode: str, state: str = "light") -> tuple:
    """Sort key of a measured configuration: light before heavy, by backend, the store transfer
    first, warm before cold."""
    backends = ["local", "ray", "knative"]
    return (state != "light", backends.index(backend) if backend in backends else 9, backend,
            TRANSFER_ORDER.index(transfer) if transfer in TRANSFER_ORDER else 9, transfer, mode != "warm")


def latency(series: dict[str, dict[str, list[float]]], out_base: str | Path,
            inputs: dict[str, str] | None = None) -> list[Path]:
    """End-to-end latency per workflow: bars at the median, error bars min–max, a dot per run.

    ``series`` maps a workflow to ``{label: [ms, …]}`` (labels such as
    ``"local · store · warm"``, ``"baseline (1 process)"``); ``inputs`` maps a
    workflow to a description of its input for the title. The reference's
    published figures are drawn beside them, hatched. Log scale.
    """
    plt = pyplot()
    workflows = [w for w in ("ml-training", "ml-inference") if w in series] + \
        [w for w in series if w not in ("ml-training", "ml-inference")]
    fig, axes = plt.subplots(1, len(workflows), figsize=(max(6.5, 1.1 * max(len(series[w]) + 2
                                                                         for w in workflows)) * len(workflows), 5),
                             squeeze=False)
    for ax, wf in zip(axes[0], workflows):
        labels = list(series[wf])
        ref = REFERENCE.get(wf)
        x = 0
        ticks, ticklabels = [], []
        for label in labels:
            secs = [v / 1e3 for v in series[wf][label]]
            med = statistics.median(secs)
            colour = "#8c8c8c" if label.startswith("baseline") else \
                ("#4e79a7" if "warm" in label else "#f28e2b")
            ax.bar(x, med, width=0.6, color=colour, alpha=0.85)
            ax.errorbar(x, med, yerr=[[med - min(secs)], [max(secs) - med]], color="black", capsize=4, lw=1)
            ax.scatter([x + 0.18] * len(secs), secs, s=9, color="black", zorder=3)
            ax.text(x, max(secs) * 1.12, _fmt_s(med), ha="center", fontsize=7.5)
            ticks.append(x)
            ticklabels.append(label.replace(" · ", "\n"))
            x += 1
        if ref:
            x += 0.4
            for system in ("Faasm", "Knative"):
                ax.bar(x, ref[system], width=0.6, color="white", edgecolor="#555555", hatch="//")
                ax.text(x, ref[system] * 1.12, _fmt_s(ref[system]), ha="center", fontsize=7.5)
                ticks.append(x)
                ticklabels.append(f"{system}\nreference\n(published)")
                x += 1
        ax.set_xticks(ticks)
        ax.set_xticklabels(ticklabels, fontsize=7.5)
        ax.set_yscale("log")
        ax.set_ylabel("end-to-end latency, s (log scale)")
        title = wf + (f": {inputs[wf]}" if inputs and inputs.get(wf) else "")
        if ref:
            title += f"\nhatched: {REFERENCE_LABEL}, {ref['input']}"
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", which="both", alpha=0.25)
        lo = min(min(v) for v in series[wf].values()) / 1e3
        hi = max([max(v) for v in series[wf].values()]) / 1e3
        if ref:
            hi = max(hi, ref["Knative"], ref["Faasm"])
            lo = min(lo, ref["Faasm"])
        ax.set_ylim(lo / 2.5, hi * 2.2)
    fig.text(0.01, -0.02, "bars: median of the runs; error bars: min–max; dots: each run. "
             "warm: one engine reused after a warm-up run; cold: a fresh 'mlwf run' process, start to exit.",
             fontsize=7.5)
    fig.tight_layout()
    return save(fig, out_base)


# --------------------------------------------------------------------------- breakdown
def _segments(ax, xs, heights, bottoms, **style) -> None:
    """One layer of stacked bars, its empty segments left out: an empty segment's bottom is a sticky edge,
    and on the tallest bar it would keep the axis from leaving room above the bar (for its label, or the
    stage's wall-time tick)."""
    keep = [(x, h, b) for x, h, b in zip(xs, heights, bottoms) if h > 0]
    if keep:
        ax.bar([k[0] for k in keep], [k[1] for k in keep], bottom=[k[2] for k in keep], **style)


def breakdown(stage_rows: list[dict[str, Any]], out_base: str | Path) -> list[Path]:
    """Stacked bars of where each stage's time goes, one panel per workflow and configuration.

    ``stage_rows`` are the ``kind == "stage"`` rows of the breakdown CSV
    (``backend``, ``transfer``, ``workflow``, ``mode``, ``run``, ``stage``,
    ``wall_ms`` and the fields of :data:`COMPONENTS`); each bar is the median
    over runs of the time summed over the stage's calls, and a black tick marks
    the stage's wall time as the driver saw it (below the bar when calls ran
    in parallel).
    """
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    panels: dict[tuple[str, str, str, str, str], dict[str, dict[str, list[float]]]] = {}
    for r in stage_rows:
        key = (r["workflow"], r["backend"], r["transfer"], r["mode"], r.get("state") or "light")
        stage = panels.setdefault(key, {}).setdefault(r["stage"], {})
        for comp, fields in COMPONENTS.items():
            stage.setdefault(comp, []).append(sum(float(r.get(f) or 0) for f in fields))
        stage.setdefault("wall", []).append(float(r.get("wall_ms") or 0))
    if not panels:
        raise UsageError("no per-stage rows to draw a breakdown from")
    keys = sorted(panels, key=lambda k: (k[0] != "ml-training", k[0], config_order(k[1], k[2], k[3], k[4])))
    ncols = min(4, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        order = workflows.stage_order()
        stages = sorted(panels[key], key=lambda s: order.index(s) if s in order else len(order))
        bottom = [0.0] * len(stages)
        for comp in COMPONENTS:
            vals = [statistics.median(panels[key][s][comp]) for s in stages]
            _segments(ax, range(len(stages)), vals, bottom, color=_COMPONENT_COLOURS[comp], width=0.65)
            bottom = [b + v for b, v in zip(bottom, vals)]
        walls = [statistics.median(panels[key][s]["wall"]) for s in stages]
        ax.scatter(range(len(stages)), walls, marker="_", s=500, color="black", zorder=3, linewidths=2)
        ax.set_xticks(range(len(stages)))
        ax.set_xticklabels(stages, fontsize=8)
        ax.set_title(f"{key[0]}\n{key[1]} · {key[2]} · {key[4]} · {key[3]}", fontsize=8.5)
        ax.set_ylabel("ms", fontsize=8)
        ax.tick_params(axis="y", labelsize=7.5)
        ax.grid(axis="y", alpha=0.25)
    handles = [Patch(facecolor=_COMPONENT_COLOURS[c], label=c) for c in COMPONENTS]
    handles.append(Line2D([], [], color="black", marker="_", linestyle="none", markersize=14,
                          markeredgewidth=2, label="stage wall time"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.06))
    fig.suptitle("Where the time goes: ms summed over each stage's calls (median of the runs); "
                 "transfer = store writes + reads (or the return to the driver)", fontsize=9)
    fig.tight_layout()
    return save(fig, out_base)


#: The parts of an edge's cost in :func:`transfer`, with their colours (as in :func:`breakdown`).
EDGE_PARTS = {"serialize": "serialize_ms", "transfer": "transfer_ms", "deserialize": "deserialize_ms"}


def transfer(edge_rows: list[dict[str, Any]], out_base: str | Path) -> list[Path]:
    """What moving the state costs, per edge of the graph and transfer mode: stacked bars of
    serialize / transfer / deserialize (ms summed over the edge's calls, median of the runs).

    ``edge_rows`` are the ``kind == "edge"`` rows of the breakdown CSV (warm runs are drawn where
    there are any, else cold ones). A row of panels per workflow and backend, a column per state
    (light, then heavy, side by side: their scales differ), in each a group of bars per edge, a bar
    per transfer mode, labelled with the bytes the edge moved. Edges from the store (a stage reading
    its input images) are left out: they are data, not state handed on.
    """
    plt = pyplot()
    from matplotlib.patches import Patch

    from mlwf.terminal import size

    rows = [r for r in edge_rows if r.get("from") != "store"]
    if any(r.get("mode") == "warm" for r in rows):
        rows = [r for r in rows if r.get("mode") == "warm"]
    panels: dict[tuple[str, str, str], dict[tuple[str, str], dict[str, dict[str, list[float]]]]] = {}
    for r in rows:
        key = (r["workflow"], r["backend"], r.get("state") or "light")
        edge = (r["from"], r["to"])
        parts = panels.setdefault(key, {}).setdefault(edge, {}).setdefault(r["transfer"], {})
        for part, column in EDGE_PARTS.items():
            parts.setdefault(part, []).append(float(r.get(column) or 0))
        parts.setdefault("bytes", []).append(float(r.get("bytes") or 0))
    if not panels:
        raise UsageError("no per-edge rows to draw the transfer figure from")
    lines = sorted({k[:2] for k in panels}, key=lambda k: (k[0] != "ml-training", k[0],
                                                          config_order(k[1], "store", "warm")))
    states = sorted({k[2] for k in panels}, key=lambda s: s != "light")
    most = max(len(edges) for edges in panels.values())
    fig, axes = plt.subplots(len(lines), len(states), squeeze=False,
                             figsize=(max(5.5, (0.95 * most + 1.2) * len(states)), 3.6 * len(lines)))
    order = workflows.stage_order() + ["driver"]

    def edge_key(e):
        return tuple(order.index(s) if s in order else len(order) for s in e)

    for row, (flow, backend) in enumerate(lines):
        for col, state in enumerate(states):
            ax = axes[row][col]
            edges = panels.get((flow, backend, state))
            if not edges:
                ax.set_visible(False)
                continue
            modes = sorted({m for e in edges.values() for m in e},
                           key=lambda m: TRANSFER_ORDER.index(m) if m in TRANSFER_ORDER else 9)
            width = 0.8 / len(modes)
            names = sorted(edges, key=edge_key)
            for i, edge in enumerate(names):
                for j, mode in enumerate(modes):
                    parts = edges[edge].get(mode)
                    if parts is None:
                        continue
                    x = i + (j - (len(modes) - 1) / 2) * width
                    bottom = 0.0
                    for part in EDGE_PARTS:
                        v = statistics.median(parts[part])
                        _segments(ax, [x], [v], [bottom], width=width * 0.92, color=_COMPONENT_COLOURS[part])
                        bottom += v
                    ax.text(x, bottom, mode, rotation=90, ha="center", va="bottom", fontsize=6.5)
            ax.set_xticks(range(len(names)))
            moved = [max(statistics.median(p["bytes"]) for p in edges[e].values()) for e in names]
            ax.set_xticklabels([f"{a} →\n{b}\n{size(int(n))}" for (a, b), n in zip(names, moved)], fontsize=7)
            ax.set_title(f"{flow} · {backend} · {state} state", fontsize=8.5)
            ax.set_ylabel("ms (summed over the calls)", fontsize=7.5)
            ax.tick_params(axis="y", labelsize=7.5)
            ax.grid(axis="y", alpha=0.25)
            ax.margins(y=0.18)
    handles = [Patch(facecolor=_COMPONENT_COLOURS[p], label=p) for p in EDGE_PARTS]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.01 * len(lines)))
    fig.suptitle("Moving the state between functions, per edge and transfer mode\n(median of the runs; "
                 "under each edge: the bytes it moved)", fontsize=9)
    fig.tight_layout()
    return save(fig, out_base)
