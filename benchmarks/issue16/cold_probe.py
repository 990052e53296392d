"""Issue 16 (a): run ``mlwf`` as a cold process with time marks, and with prototype changes applied.

    python benchmarks/issue16/cold_probe.py [--variant NAME[,NAME…]] -- run ml-training … --json

Runs mlwf's own command line (``mlwf.cli.command``) in this process, after
applying the named prototype changes as patches (nothing under src/ changes).
With ``MLWF_PROBE_MARKS=FILE`` set, every process involved appends what it did
and when (``time.time()``) to FILE as JSON lines: the driver (imports done,
fork server asked for, engine ready, run started, workers ready, run done,
engine closed), the fork server (its preload began, the stage code and
scikit-learn imported) and each worker (its initializer began and ended).
``cold_start_anatomy.py`` runs this and adds up the timeline.

Variants (prototypes of further changes; the first two tried are now what
``mlwf run`` does: the fork server started before the driver's own imports,
and paying the first-call costs of Pillow and scikit-learn in the fork server,
mlwf.workflows.warmup):

``nowait``     closing the engine does not wait for the workers to exit
               (they exit with the driver: mlwf.engine.lifeline).
``fastexit``   the process ends with ``os._exit`` once its output is
               flushed, skipping the interpreter's teardown.
"""

from __future__ import annotations

import json
import os
import sys
import time

T0 = time.time()
HERE = os.path.dirname(os.path.abspath(__file__))
MARKS = os.environ.get("MLWF_PROBE_MARKS")


def mark(event: str, **extra) -> None:
    if MARKS:
        with open(MARKS, "a") as f:
            f.write(json.dumps({"t": time.time(), "pid": os.getpid(), "who": "driver", "event": event,
                                **extra}) + "\n")


def _patch_driver(variants: set[str]) -> None:
    """Marks around the engine's steps (imported here, where `mlwf run` imports them)."""
    from mlwf.backends import local
    from mlwf.engine import driver

    import mlwf.ui  # noqa: F401

    mark("driver imports done")
    original_warm_up = local.LocalBackend.warm_up

    def warm_up(self):
        mark("waiting for workers")
        started = original_warm_up(self)
        mark("workers ready", started=started)
        return started

    local.LocalBackend.warm_up = warm_up

    original_run_init = driver.Run.__init__

    def run_init(self, *a, **k):
        mark("run started")
        original_run_init(self, *a, **k)

    driver.Run.__init__ = run_init

    original_finish = driver.Run.finish

    def finish(self, report):
        original_finish(self, report)
        mark("run finished", e2e_ms=report["e2e_ms"], stage_ms=report["stage_ms"],
             startup_ms=report.get("startup_ms"))

    driver.Run.finish = finish

    if "nowait" in variants:
        def close(self):
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
                self._workers_started = False

        local.LocalBackend.close = close

    original_close = driver.Engine.close

    def engine_close(self):
        mark("closing engine")
        original_close(self)
        mark("engine closed")

    driver.Engine.close = engine_close


def main() -> int:
    argv = sys.argv[1:]
    variants: set[str] = set()
    if argv[:1] == ["--variant"]:
        variants = {v for v in argv[1].split(",") if v and v != "today"}
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    unknown = variants - {"nowait", "fastexit"}
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}")
    # The fork server and the workers find our mark modules here.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, HERE)
    mark("probe started", variants=sorted(variants), since_process_start=_since_process_start())
    from mlwf.backends import forkserver

    # The fork server's preload, with our marks around it (probe_fs_begin also marks where
    # scikit-learn's import and the warm-up begin).
    forkserver.PRELOAD = ["probe_fs_begin", *forkserver.PRELOAD, "probe_fs_end"]
    original_start = forkserver.start

    def start(workflow=None):
        mark("fork server asked for")
        original_start(workflow)
        if not getattr(start, "patched", False):  # the driver imports its engine right after this
            start.patched = True
            _patch_driver(variants)

    forkserver.start = start
    import mlwf.cli  # noqa: F401  (what `mlwf` imports first)

    code = mlwf.cli.command(argv)
    mark("main returned")
    if "fastexit" in variants:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _since_process_start() -> float | None:
    """Seconds since the kernel started this process (clock ticks: 10 ms resolution)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return None


if __name__ == "__main__":
    sys.exit(main())
