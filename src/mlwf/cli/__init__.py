"""The ``mlwf`` command: parse, call, print. Kept thin (and light to import).

One module per command group, each with ``add_parsers(sub)`` and ``handle(args)``:
:mod:`~mlwf.cli.run`, :mod:`~mlwf.cli.invoke`, :mod:`~mlwf.cli.data` (dataset, s3), :mod:`~mlwf.cli.model`,
:mod:`~mlwf.cli.runs`, :mod:`~mlwf.cli.serve` (serve, deploy), :mod:`~mlwf.cli.raypool` (ray pool), :mod:`~mlwf.cli.bench`
(bench, trace), :mod:`~mlwf.cli.demo`, :mod:`~mlwf.cli.ui`; the flags they share are in :mod:`~mlwf.cli.options`.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import signal
import sys
import threading
import time
from types import ModuleType

from mlwf.cli.options import INTERRUPTED_EXIT, Parser, version
from mlwf.errors import MlwfError

#: Each command and the module of :mod:`mlwf.cli` that handles it, in the order ``--help`` lists them.
_GROUPS = {"run": "run", "invoke": "invoke", "dataset": "data", "s3": "data", "model": "model", "runs": "runs",
           "ui": "ui", "serve": "serve", "deploy": "serve", "ray": "raypool", "bench": "bench", "trace": "bench",
           "demo": "demo"}


def _group(name: str) -> ModuleType:
    return importlib.import_module(f"mlwf.cli.{name}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``mlwf`` command line: every command, or, when ``argv`` names one, its group's commands only.

    Importing and building one group instead of all (`mlwf run`: 24 ms instead of 47; every help
    and error text unchanged, ``19d8891``) lets a command start sooner; `mlwf run` asks for its
    fork server first thing (at 47 ms instead of 62; a cold run's wall time moved within its noise).
    """
    parser = Parser(prog="mlwf", description="Serverless ML training and inference workflows.")
    parser.add_argument("--version", action="version", version=f"mlwf {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    # Only a command in first place: `mlwf --help run` lists every command, as `mlwf --help` does.
    groups = [_GROUPS[argv[0]]] if argv and argv[0] in _GROUPS else dict.fromkeys(_GROUPS.values())
    for name in groups:
        _group(name).add_parsers(sub)
    return parser


#: Exit status after the reader of our output went away (as a process killed by SIGPIPE).
CLOSED_PIPE_EXIT = 141


def main(argv: list[str] | None = None) -> int:
    """Run the ``mlwf`` command line; return the exit status.

    A reader that stops early (``mlwf runs ls | head -1``) is a normal way to
    stop: the command then exits quietly with status 141, as a Unix tool
    stopped by SIGPIPE does.
    """
    try:
        return _main(argv)
    except BrokenPipeError:
        _quiet_closed_streams()
        return CLOSED_PIPE_EXIT


def command(argv: list[str] | None = None) -> int:
    """The ``mlwf`` executable (and ``python -m mlwf.cli``): :func:`main`, as the process's last work.

    Before the interpreter exits, what the command created is frozen for the
    garbage collector: its last collection would walk every object of NumPy,
    the engine and the display only to free memory the process gives back
    anyway. From the end of :func:`main` to the process being gone (read
    through a pipe): 48 ms before, 23 ms frozen (2026-11-28,
    ``benchmarks/results/cold_start/2026-11-28-exit-cost.json``). Leaving with
    ``os._exit`` after the atexit handlers took 16 ms, and was not done: the
    frozen exit gets most of it and still runs everything at exit (flushing,
    closing). The local backend's fork server, if the command started one, is
    stopped.
    """
    code = main(argv)
    forkserver = sys.modules.get("mlwf.backends.forkserver")
    if forkserver is not None:
        # Every engine is closed: a fork server still importing (a run refused or interrupted at
        # start-up) would otherwise outlive the command, holding its terminal, for as long as that takes.
        forkserver.stop()
    gc.freeze()
    return code


def _quiet_closed_streams() -> None:
    """Point stdout and stderr at /dev/null, so flushing them at exit raises nothing more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                os.dup2(devnull, stream.fileno())
            except (AttributeError, OSError, ValueError):
                pass  # not a file descriptor (a test's captured stream)
    finally:
        os.close(devnull)


#: Seconds a command may take to wind down after Ctrl-C before a second Ctrl-C ends it at once.
WIND_DOWN_S = 2.0


class _CtrlC:
    """The command's SIGINT handler: the first Ctrl-C raises :class:`KeyboardInterrupt` (the command
    winds down: its run recorded ``interrupted``, its workers stopped, one line printed).

    A second Ctrl-C while it winds down is ignored (people often press twice, and cutting the
    winding down short would leave the run's record and its workers behind), unless winding down
    has taken over :data:`WIND_DOWN_S` seconds (a store that does not answer): then the command
    leaves at once; its workers follow their driver (:mod:`mlwf.backends.lifeline`).
    """

    def __init__(self):
        self.first: float | None = None

    def __call__(self, signum, frame) -> None:
        if self.first is None:
            self.first = time.monotonic()
            raise KeyboardInterrupt
        if time.monotonic() - self.first > WIND_DOWN_S:
            os.write(2, b"\nmlwf: interrupted again: leaving now, before the run's record says so\n")
            os._exit(INTERRUPTED_EXIT)


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    # Only in the main thread, and only where Python's own handler is in place (not under a caller's).
    handle_ctrl_c = (threading.current_thread() is threading.main_thread()
                     and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if handle_ctrl_c:
        signal.signal(signal.SIGINT, _CtrlC())
    try:
        args = build_parser(argv).parse_args(argv)
        args.argv = argv  # the command line as typed: what 'mlwf run' prints to resume a run
        return _dispatch(args)
    except MlwfError as e:
        if debug:
            raise
        print(f"mlwf: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        if debug:
            raise
        # 'mlwf run' and 'mlwf bench' say more themselves; any other command that ran a run names it.
        run_id = getattr(e, "run_id", None)
        command = next((a for a in argv if not a.startswith("-")), None)
        if run_id is None and command == "run":
            # Pressed while the command line was read or the stage code imported: no run exists yet.
            print("mlwf: interrupted before the run started: nothing was written; run the same command to start it",
                  file=sys.stderr)
            return INTERRUPTED_EXIT
        print("mlwf: interrupted" + (f" run {run_id} ('mlwf runs show {run_id}' shows it)" if run_id else ""),
              file=sys.stderr)
        return INTERRUPTED_EXIT
    except BrokenPipeError:
        raise  # the reader went away: main() exits quietly
    except ModuleNotFoundError as e:
        extra = missing_extra(e.name, argv)
        if debug or extra is None:
            if debug:
                raise
            print(f"mlwf: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                  file=sys.stderr)
            return 1
        command = " ".join(a for a in argv[:2] if not a.startswith("-"))
        print(f"mlwf: error: mlwf {command} needs {e.name.split('.')[0]}, an optional library: "
              f"pip install 'mlwf[{extra}]'", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            raise
        print(f"mlwf: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        if handle_ctrl_c:
            signal.signal(signal.SIGINT, signal.default_int_handler)


#: The optional libraries (top-level modules) and the extra of pyproject.toml that installs each; uvicorn and
#: starlette are in three extras: ``mlwf model serve`` needs ``serve``, ``mlwf ui`` needs ``ui``, everything
#: else ``knative``.
_EXTRA_OF = {"ray": "ray", "httpx": "knative", "cloudevents": "knative", "h11": "knative", "yaml": "knative",
             "uvicorn": "knative", "starlette": "knative", "onnx": "onnx", "onnxruntime": "onnx",
             "matplotlib": "bench"}


def missing_extra(module: str | None, argv: list[str]) -> str | None:
    """The extra that installs ``module`` for the command ``argv``, or None when ``module`` is not an
    optional library of mlwf (its absence is then a bug, not a missing extra)."""
    top = (module or "").split(".")[0]
    extra = _EXTRA_OF.get(top)
    if extra == "knative" and top in ("uvicorn", "starlette") and argv[:2] == ["model", "serve"]:
        return "serve"
    if extra == "knative" and top in ("uvicorn", "starlette") and argv[:1] == ["ui"]:
        return "ui"
    return extra


def _dispatch(args) -> int:
    return _group(_GROUPS[args.command]).handle(args)
