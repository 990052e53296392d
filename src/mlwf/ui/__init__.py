"""``mlwf ui``: a local web dashboard over the store, for runs of every backend.

* :mod:`~mlwf.ui.index`: the runs list, read from the store and kept between requests;
* :mod:`~mlwf.ui.views`: a run (stages, Gantt of its calls from its trace, edges, confusion
  matrix), the published models, runs side by side, a ``mlwf bench`` folder;
* :mod:`~mlwf.ui.app`: the pages, the JSON API, the guard around the one write (a rollback);
* ``static/``: the page shell, its script and its style sheet (no build step, nothing from elsewhere).

It reads only, but for a rollback of a published model, which asks first and
goes through :func:`mlwf.model.registry.rollback`. It listens on 127.0.0.1
unless told otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_PORT = 8265


def check_port(port) -> int:
    """``port`` if it is a port number (0: any free one); :class:`~mlwf.errors.UsageError` (one line) if not."""
    from mlwf.errors import UsageError

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port number: give one from 1 to 65535 (0: any free port)")
    return port


def serve(store, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, bench: Path | None = None) -> int:
    """Serve the dashboard over ``store`` on ``host:port`` until Ctrl-C or SIGTERM; return 0.

    Raises :class:`~mlwf.errors.UsageError` (one line) if ``port`` is not a
    port or ``host:port`` cannot be listened on.
    """
    import logging

    import uvicorn

    from mlwf.httpserver import bind, make_server
    from mlwf.ui.app import Dashboard

    sock = bind(host, check_port(port))
    try:
        port = sock.getsockname()[1]
        dashboard = Dashboard(store, host=host, port=port, bench=bench)
        shown = f"[{host}]" if ":" in host else host
        print(f"mlwf ui: serving the runs of bucket {store.bucket!r} of {store.location} at "
              f"http://{shown}:{port}/ (Ctrl-C to stop)", file=sys.stderr, flush=True)
        config = uvicorn.Config(dashboard.asgi, log_config=None, access_log=False, lifespan="off", ws="none",
                                server_header=False, proxy_headers=False, timeout_graceful_shutdown=2)
        logging.getLogger("uvicorn.error").setLevel(logging.ERROR)
        make_server(config, dashboard).run(sockets=[sock])
    finally:
        sock.close()
    print("mlwf ui: stopped", file=sys.stderr)
    return 0
