"""``mlwf ui``: the web dashboard over the store (runs, a run's calls, models and rollback, comparisons)."""

from __future__ import annotations

from pathlib import Path

from mlwf.cli.options import common, open_store


def add_parsers(sub) -> None:
    """``mlwf ui``."""
    from mlwf.ui import DEFAULT_PORT

    ui = sub.add_parser("ui", help="a web dashboard over the store: runs of every backend as they go, their calls, "
                                   "published models (and rollback), runs side by side")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    ui.add_argument("--bench", metavar="DIR", help="a 'mlwf bench' output folder to show beside the runs "
                                                   "(its summary.csv and breakdown.csv)")
    common(ui, json_flag=False)


def handle(args) -> int:
    from mlwf.errors import UsageError
    from mlwf.ui import check_port

    check_port(args.port)
    bench = None
    if args.bench is not None:
        bench = Path(args.bench).expanduser()
        if not (bench / "summary.csv").is_file() and not (bench / "breakdown.csv").is_file():
            raise UsageError(f"--bench {args.bench!r} is not a 'mlwf bench' output folder (no summary.csv or "
                             "breakdown.csv in it): give the folder 'mlwf bench --out' wrote")
    import uvicorn  # noqa: F401 - before anything starts: a missing extra is named in one line
    import starlette  # noqa: F401

    from mlwf.ui import serve

    store = open_store(args)
    try:
        store.require_bucket()
        return serve(store, host=args.host, port=args.port, bench=bench)
    finally:
        store.close()
