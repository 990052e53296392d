"""Traces of finished runs in the Chrome / Perfetto trace-event format.

:func:`build` turns a :class:`~mlwf.engine.driver.Run` (kept by the engine as
``engine.last_run``) into a trace-event document, from the spans every call's
:class:`~mlwf.engine.calls.Outcome` carries, so it works the same on every
backend. Open the file in https://ui.perfetto.dev or ``chrome://tracing``;
``mlwf trace plot`` draws it as a Gantt chart.

Layout of the trace:

* one process per worker (``host:pid`` numbered from 2, named in ``process_name``
  metadata), one thread per lane: calls that overlap on one worker (threads of
  an HTTP function server) go to separate lanes so every lane nests properly;
* one ``X`` (complete) event per function call, named ``stage[index]``, with
  ``args`` ``stage``, ``index``, ``worker``, ``attempts`` (1 + its retries) and the call's timings, and inside
  it one event per span the worker recorded: store reads and writes
  (``store list``, ``store read``, ``input read``, ``store write``),
  ``serialize``/``deserialize`` and ``compute`` (store reads a stage asks for
  while it computes nest inside ``compute``);
* process 1 is the driver: the whole run, the worker start-up it waited for
  before its first stage (``worker start-up``, on a cold local backend), one
  span per stage from the moment the driver submitted it to the moment its
  last call came back (when a :class:`StageClock` watched the run), and on
  ``--transfer direct`` the return of each call's outputs to the driver.

Timestamps (``ts``, ``dur``) are microseconds since the run started, on the
wall clock (``time.time()``), so spans from different processes line up on
one machine; workers on other hosts are only as aligned as the hosts' clocks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mlwf.engine.progress import StageClock

#: Span names recorded by :mod:`mlwf.engine.runner` → (name in the trace, category).
SPANS = {
    "list": ("store list", "io"),
    "fetch": ("store read", "io"),
    "input_get": ("input read", "io"),
    "input_decode": ("deserialize", "serde"),
    "compute": ("compute", "compute"),
    "encode": ("serialize", "serde"),
    "put": ("store write", "io"),
}
DRIVER_PID = 1


def assign_lanes(intervals: list[tuple[float, float]]) -> list[int]:
    """A lane per interval such that intervals in one lane never overlap (greedy, by start)."""
    order = sorted(range(len(intervals)), key=lambda i: (intervals[i][0], -intervals[i][1]))
    ends: list[float] = []
    lane = [0] * len(intervals)
    for i in order:
        start, end = intervals[i]
        for k, last in enumerate(ends):
            if last <= start:
                ends[k] = end
                lane[i] = k
                break
        else:
            lane[i] = len(ends)
            ends.append(end)
    return lane


def build(run, report: dict[str, Any] | None = None, stage_clock: StageClock | None = None) -> dict[str, Any]:
    """The trace-event document (a dict ready for ``json.dump``) of a finished run.

    Parameters
    ----------
    run : the :class:`~mlwf.engine.driver.Run` (``engine.last_run`` after a run).
    report : its report, for the run's end-to-end time and summary (optional).
    stage_clock : the :class:`StageClock` the engine used as its progress, for
        the driver's stage spans; without it each stage spans its calls.

    Calls a resumed run reused from an earlier run did not run in this one and
    are left out (counted in ``otherData.reused_calls``).
    """
    now = time.time()
    t0 = now - (time.perf_counter() - run.t0)  # the run's start on the wall clock
    end = t0 + report["e2e_ms"] / 1e3 if report and "e2e_ms" in report else now

    def us(t: float) -> float:
        return round((t - t0) * 1e6, 3)

    ran = [(c, o) for c, o in run.accounts.outcomes if "compute_ms" in o.durations_ms]
    reused = len(run.accounts.outcomes) - len(ran)
    workers: list[str] = []
    for _, o in sorted(ran, key=lambda co: co[1].start):
        if o.worker not in workers:
            workers.append(o.worker)
    pid_of = {w: DRIVER_PID + 1 + i for i, w in enumerate(workers)}
    events: list[dict[str, Any]] = []

    def meta(pid: int, tid: int | None, name: str, value: str | int) -> None:
        ev = {"ph": "M", "pid": pid, "name": name, "args": {"name" if "name" in name else "sort_index": value}}
        if tid is not None:
            ev["tid"] = tid
        events.append(ev)

    # --- workers: one X event per call, its spans nested inside
    for worker in workers:
        pid = pid_of[worker]
        meta(pid, None, "process_name", f"worker {worker}")
        meta(pid, None, "process_sort_index", pid)
        mine = [(c, o) for c, o in ran if o.worker == worker]
        lanes = assign_lanes([(o.start, o.end) for _, o in mine])
        for lane in sorted(set(lanes)):
            meta(pid, lane + 1, "thread_name", f"calls (lane {lane + 1})" if max(lanes) else "calls")
        for (call, o), lane in zip(mine, lanes):
            start, stop = us(o.start), us(o.end)
            timings = {k: round(v, 3) for k, v in sorted(o.figures().items())}
            events.append({"ph": "X", "cat": "call", "name": call.name, "pid": pid, "tid": lane + 1,
                           "ts": start, "dur": round(stop - start, 3),
                           "args": {"stage": call.stage, "index": call.index, "worker": o.worker,
                                    "workflow": call.workflow,
                                    "attempts": getattr(run, "attempts", {}).get((call.stage, call.index), 1),
                                    **timings}})
            for name, s, e in o.spans:
                label, cat = SPANS.get(name, (name, "other"))
                s_us, e_us = max(start, us(s)), min(stop, us(e))  # rounding never pokes out of the call
                events.append({"ph": "X", "cat": cat, "name": label, "pid": pid, "tid": lane + 1,
                               "ts": s_us, "dur": round(max(0.0, e_us - s_us), 3),
                               "args": {"call": call.name, "span": name}})

    # --- the driver: the run, its stages, and outputs returning to it
    meta(DRIVER_PID, None, "process_name", "driver")
    meta(DRIVER_PID, None, "process_sort_index", 0)
    meta(DRIVER_PID, 0, "thread_name", "run")
    summary = {k: report[k] for k in ("workflow", "run_id", "backend", "transfer", "e2e_ms")
               if report and k in report}
    events.append({"ph": "X", "cat": "run", "name": f"{run.workflow} {run.run_id}", "pid": DRIVER_PID, "tid": 0,
                   "ts": 0.0, "dur": us(end), "args": summary or {"workflow": run.workflow}})
    if run.startup_span is not None:
        meta(DRIVER_PID, 5, "thread_name", "start-up")
        a, b = run.startup_span
        events.append({"ph": "X", "cat": "startup", "name": "worker start-up", "pid": DRIVER_PID, "tid": 5,
                       "ts": us(a), "dur": round(us(b) - us(a), 3),
                       "args": {"startup_ms": round(run.startup_ms, 3), "backend": run.engine.backend.name}})
    stage_spans: list[tuple[str, float, float]] = []
    if stage_clock is not None:
        stage_spans = [(s, a, b) for s, a, b in stage_clock.spans if a >= t0 - 1e-3 and b <= now + 1e-3]
    if not stage_spans:
        by_stage: dict[str, list[float]] = {}
        for call, o in ran:
            span = by_stage.setdefault(call.stage, [o.start, o.end])
            span[0], span[1] = min(span[0], o.start), max(span[1], o.end)
        stage_spans = [(s, a, b) for s, (a, b) in by_stage.items()]
    lanes = assign_lanes([(a, b) for _, a, b in stage_spans])
    for lane in sorted(set(lanes)):
        meta(DRIVER_PID, 10 + lane, "thread_name", "stages" if not lane else f"stages ({lane + 1})")
    for (stage, a, b), lane in zip(stage_spans, lanes):
        st = run.accounts.stats.get(stage)
        events.append({"ph": "X", "cat": "stage", "name": stage, "pid": DRIVER_PID, "tid": 10 + lane,
                       "ts": us(a), "dur": round(us(b) - us(a), 3),
                       "args": {"stage": stage, "calls": st.calls if st else None,
                                "source": "driver" if stage_clock is not None else "calls"}})
    returns = [(c, o) for c, o in ran if "return_ms" in o.durations_ms]
    lanes = assign_lanes([(o.end, o.end + o.durations_ms["return_ms"] / 1e3) for _, o in returns])
    for lane in sorted(set(lanes)):
        meta(DRIVER_PID, 100 + lane, "thread_name", "outputs returning" + (f" ({lane + 1})" if lane else ""))
    for (call, o), lane in zip(returns, lanes):
        events.append({"ph": "X", "cat": "io", "name": f"{call.name} outputs → driver", "pid": DRIVER_PID,
                       "tid": 100 + lane, "ts": us(o.end), "dur": round(o.durations_ms["return_ms"] * 1e3, 3),
                       "args": {"of_call": call.name, "bytes": int(o.bytes.get("output_bytes", 0))}})

    events.sort(key=lambda ev: (ev["ph"] != "M", ev.get("ts", 0.0), -ev.get("dur", 0.0)))
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {**summary, "workflow": run.workflow, "run_id": run.run_id,
                          "start_unix_s": round(t0, 6), "calls": len(ran), "reused_calls": reused,
                          "workers": workers, "clock": "wall clock (time.time) of each process, µs since run start"}}


def write(trace: dict[str, Any], path: str | Path) -> Path:
    """Write ``trace`` as JSON to ``path`` (folders created); return the path."""
    from mlwf.errors import UsageError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(trace))
    except OSError as e:
        raise UsageError(f"cannot write the trace to {str(path)!r}: {e.strerror or e}") from None
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Read a trace file written by :func:`write` (or any trace-event JSON with ``traceEvents``).

    Raises :class:`~mlwf.errors.UsageError` when the file is missing or not a trace.
    """
    from mlwf.errors import UsageError

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no trace file {str(path)!r}: write one with 'mlwf run … --trace FILE'") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"{str(path)!r} is not a trace file (JSON): {e}") from None
    if isinstance(doc, list):
        doc = {"traceEvents": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        raise UsageError(f"{str(path)!r} is not a trace file: no 'traceEvents' list")
    return doc
