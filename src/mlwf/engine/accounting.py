"""What a run's calls cost: per stage (calls, attempts, durations, bytes), per edge of the graph, per worker.

:class:`Accounts` gathers a run's :class:`~mlwf.engine.calls.Outcome` figures
as the calls finish (and the driver's own reads); :meth:`Accounts.figures`
turns them into the ``stages`` and ``edges`` of the run's report.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from mlwf.engine.calls import Call, Outcome, Ref


@dataclass
class StageStats:
    """One stage of a run: how many calls, attempts and reused calls, its wall time, its summed figures."""

    calls: int = 0
    wall_ms: float = 0.0
    figures: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    attempts: int = 0
    reused: int = 0


class Accounts:
    """The figures of one run's calls, as they finish."""

    def __init__(self) -> None:
        self.stats: dict[str, StageStats] = {}
        self.edges: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.outcomes: list[tuple[Call, Outcome]] = []
        #: (stage, warning) -> how many calls raised it
        self.warnings: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, call: Call, outcome: Outcome) -> None:
        """Count a finished (or reused) call."""
        if any(ref.data is not None for ref in outcome.refs()):
            # Direct transfer: the outputs rode back with the outcome; the wall
            # clock from the worker's end to here is their transfer time.
            outcome.durations_ms["return_ms"] = max(0.0, (time.time() - outcome.end) * 1e3)
        self.outcomes.append((call, outcome))
        for text in outcome.info.get("warnings", []):
            self.warnings[(call.stage, text)] += 1
        st = self.stats[call.stage]
        for k, v in outcome.figures().items():
            st.figures[k] += v
        for e in outcome.input_edges:
            edge = self.edges[(e["from"], e["to"])]
            edge["bytes"] += e["bytes"]
            edge["transfer_ms"] += e["transfer_ms"]
            edge["deserialize_ms"] += e["deserialize_ms"]
        if "fetch_bytes" in outcome.bytes:
            edge = self.edges[("store", call.stage)]
            edge["bytes"] += outcome.bytes["fetch_bytes"]
            edge["transfer_ms"] += outcome.durations_ms.get("fetch_ms", 0.0)

    def add_read(self, ref: Ref, transfer_ms: float, deserialize_ms: float) -> None:
        """Count the driver reading an output (to merge results)."""
        edge = self.edges[(ref.producer, "driver")]
        edge["bytes"] += ref.nbytes
        edge["transfer_ms"] += transfer_ms
        edge["deserialize_ms"] += deserialize_ms

    def figures(self) -> tuple[dict[str, Any], list[dict[str, Any]], float, dict[str, int]]:
        """``(stages, edges, state transfer ms, peak RSS kB per worker)`` for the run's report."""
        stages = {}
        for name, st in self.stats.items():
            stages[name] = {"calls": st.calls, "attempts": st.attempts, "reused": st.reused,
                            "wall_ms": round(st.wall_ms, 3),
                            **{k: round(v, 3) for k, v in sorted(st.figures.items())}}
        edges = []
        for (src, dst), e in sorted(self.edges.items()):
            edges.append({"from": src, "to": dst, "bytes": int(e["bytes"]),
                          "serialize_ms": 0.0, "transfer_ms": round(e["transfer_ms"], 3),
                          "deserialize_ms": round(e["deserialize_ms"], 3)})
        by_producer = defaultdict(float)
        put_by_producer = defaultdict(float)
        for call, outcome in self.outcomes:
            by_producer[call.stage] += outcome.durations_ms.get("encode_ms", 0.0)
            put_by_producer[call.stage] += (outcome.durations_ms.get("put_ms", 0.0)
                                            + outcome.durations_ms.get("return_ms", 0.0))
        # A producer's serialization and puts are shared among its outgoing edges by bytes.
        out_bytes = defaultdict(int)
        for e in edges:
            out_bytes[e["from"]] += e["bytes"]
        for e in edges:
            share = e["bytes"] / (out_bytes[e["from"]] or 1)
            e["serialize_ms"] = round(by_producer.get(e["from"], 0.0) * share, 3)
            e["transfer_ms"] = round(e["transfer_ms"] + put_by_producer.get(e["from"], 0.0) * share, 3)
        transfer_ms = sum(e["serialize_ms"] + e["transfer_ms"] + e["deserialize_ms"]
                          for e in edges if e["from"] != "store")
        workers: dict[str, int] = {}
        for _, outcome in self.outcomes:
            workers[outcome.worker] = max(workers.get(outcome.worker, 0), outcome.rss_kb)
        return stages, edges, transfer_ms, workers

    def warning_lines(self) -> list[str]:
        """``stage: warning (n of m calls)``, once per stage and warning."""
        return [f"{stage}: {text} ({n} of {self.stats[stage].calls} calls)"
                for (stage, text), n in sorted(self.warnings.items())]
