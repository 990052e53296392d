"""The dashboard's web server: its pages, its JSON API, and the guard around its one write.

Every page is the same HTML shell (``static/page.html``) naming the page;
``static/app.js`` draws it from the JSON API and polls it. Every asset comes
from this package, and the Content-Security-Policy lets a page load nothing,
and send nothing, anywhere but here.

The one write is a rollback of a published model (``POST
/api/models/rollback``). It is refused unless it carries the token this
server drew at start (in the page it served, sent back in the
``X-MLWF-Token`` header: another site's page cannot read it) and its
``Origin`` is this server's own. Every request, a read too, must name this
server in its ``Host``: a name that resolves here only by DNS rebinding
(an attacker's domain pointed at 127.0.0.1) is refused, so another site's
scripts can read nothing either.
"""

from __future__ import annotations

import html
import ipaddress
import json
import secrets
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mlwf import runs
from mlwf.errors import MlwfError
from mlwf.ui import views
from mlwf.ui.index import PER_PAGE, RunIndex, is_run_id

STATIC = Path(__file__).resolve().parent / "static"
TOKEN_HEADER = "x-mlwf-token"
#: Nothing is loaded from, or sent to, anywhere but this server; no page may frame this one.
_SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
_TITLES = {"runs": "Runs", "run": "Run", "models": "Models", "compare": "Compare"}


class Dashboard:
    """The state one ``mlwf ui`` server keeps: the store, its run index, its token, where it listens."""

    def __init__(self, store, *, host: str, port: int, bench: Path | None = None):
        self.store = store
        self.index = RunIndex(store)
        self.bench = bench
        self.host = host
        self.port = port
        self.token = secrets.token_urlsafe(32)
        self.draining = False  # for mlwf.httpserver.make_server: nothing to drain here
        self.in_flight = 0
        self._shell = (STATIC / "page.html").read_text()
        self.asgi = Starlette(routes=[
            Route("/", self.page("runs")),
            Route("/runs/{run_id}", self.run_page),
            Route("/models", self.page("models")),
            Route("/compare", self.page("compare")),
            Route("/healthz", lambda request: JSONResponse({"ok": True})),
            Route("/api/runs", self.api_runs),
            Route("/api/runs/{run_id}", self.api_run),
            Route("/api/runs/{run_id}/trace.json", self.api_trace),
            Route("/api/models", self.api_models),
            Route("/api/models/rollback", self.api_rollback, methods=["POST"]),
            Route("/api/compare", self.api_compare),
            Route("/api/bench", self.api_bench),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ], exception_handlers={HTTPException: self.http_error, Exception: self.internal_error})
        self.asgi.add_middleware(_Guard, dashboard=self)

    # ------------------------------------------------------------------ pages
    def shell(self, page: str, status: int = 200, **data: str) -> HTMLResponse:
        attrs = " ".join(f'data-{k.replace("_", "-")}="{html.escape(v)}"' for k, v in data.items())
        text = (self._shell.replace("{{title}}", html.escape(data.get("title") or _TITLES.get(page, page)))
                .replace("{{token}}", self.token).replace("{{page}}", page).replace("{{data}}", attrs)
                .replace("{{message}}", html.escape(data.get("message", ""))))
        return HTMLResponse(text, status_code=status)

    def page(self, name: str):
        def endpoint(request: Request) -> HTMLResponse:
            return self.shell(name)
        return endpoint

    def run_page(self, request: Request) -> HTMLResponse:
        run_id = request.path_params["run_id"]
        if not is_run_id(run_id) or runs.find_run(self.store, run_id) is None:
            return self.not_found(f"no run {run_id[:80]!r} in this store")
        return self.shell("run", run_id=run_id, title=f"Run {run_id}")

    def not_found(self, message: str) -> HTMLResponse:
        return self.shell("missing", 404, title="Not found", message=message)

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
        if exc.status_code == 404:
            return self.not_found(f"nothing at {request.url.path[:120]}")
        return self.shell("missing", exc.status_code, title=str(exc.detail), message=str(exc.detail))

    async def internal_error(self, request: Request, exc: Exception) -> Response:
        message = str(exc) if isinstance(exc, MlwfError) else f"internal error: {type(exc).__name__}: {exc}"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=500)
        return self.shell("missing", 500, title="Error", message=message)

    # ------------------------------------------------------------------ the API
    def api_runs(self, request: Request) -> JSONResponse:
        q = request.query_params
        try:
            page, per_page = int(q.get("page", 1)), int(q.get("per_page", PER_PAGE))
        except ValueError:
            return JSONResponse({"error": "page and per_page are whole numbers"}, status_code=400)
        return JSONResponse(self.index.page(q=q.get("q", "")[:200], workflow=q.get("workflow", ""),
                                            status=q.get("status", ""), backend=q.get("backend", ""),
                                            page=page, per_page=per_page))

    def api_run(self, request: Request) -> JSONResponse:
        run_id = request.path_params["run_id"]
        detail = views.run_detail(self.store, run_id) if is_run_id(run_id) else None
        if detail is None:
            return JSONResponse({"error": f"no run {run_id[:80]!r} in this store"}, status_code=404)
        return JSONResponse(detail)

    def api_trace(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        record = runs.find_run(self.store, run_id) if is_run_id(run_id) else None
        raw = views.read_trace_bytes(self.store, record["workflow"], run_id) if record else None
        if raw is None:
            return JSONResponse({"error": f"no trace kept for run {run_id[:80]!r}"}, status_code=404)
        return Response(raw, media_type="application/json",
                        headers={"content-disposition": f'attachment; filename="{run_id}.trace.json"'})

    def api_models(self, request: Request) -> JSONResponse:
        rows = self.index.rows()
        found = views.models(self.store, self.index.model_prefixes())
        views.add_accuracies(found, rows)
        return JSONResponse({"models": found})

    async def api_rollback(self, request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
            prefix, expected = body["prefix"], body["expected"]
            if not isinstance(prefix, str) or not isinstance(expected, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "send JSON {\"prefix\": ..., \"expected\": sha256}"}, status_code=400)
        from starlette.concurrency import run_in_threadpool

        from mlwf.model.registry import rollback

        try:
            manifest = await run_in_threadpool(rollback, self.store, prefix, expected=expected)
        except MlwfError as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        return JSONResponse({"prefix": prefix, "sha256": manifest["sha256"], "run_id": manifest.get("run_id"),
                             "replaced": manifest["history"][0]["sha256"]})

    def api_compare(self, request: Request) -> JSONResponse:
        wanted = [r for r in request.query_params.get("runs", "").split(",") if r][:views.MAX_COMPARED]
        return JSONResponse(views.compare(self.store, [r for r in wanted if is_run_id(r)]))

    def api_bench(self, request: Request) -> JSONResponse:
        return JSONResponse({"bench": views.bench(self.bench)})

    # ------------------------------------------------------------------ the guard
    def host_allowed(self, host_header: str) -> bool:
        """Whether a ``Host`` names this server: its port, and an address or ``localhost`` (or the
        ``--host`` it was given), never another name (DNS rebinding)."""
        name, _, port = host_header.rpartition(":")
        if not name or port != str(self.port):
            return False
        name = name.strip("[]").lower()
        if name in ("localhost", self.host.lower()):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


class _Guard:
    """Refuses requests naming another host, and writes without this server's token and origin."""

    def __init__(self, app, dashboard: Dashboard):
        self.app = app
        self.dashboard = dashboard

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            await JSONResponse({"error": refusal[1]}, status_code=refusal[0], headers=_SECURITY_HEADERS)(
                scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [
                    (k.encode(), v.encode()) for k, v in _SECURITY_HEADERS.items()]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def refusal(self, scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "")
        if not self.dashboard.host_allowed(host):
            return 421, f"this server does not answer for host {host[:80]!r}: open it at its own address"
        if scope["method"] in ("GET", "HEAD"):
            return None
        if scope["method"] != "POST":
            return 405, "the dashboard only reads (GET), and rolls back with POST"
        origin = headers.get("origin")
        if origin != f"http://{host}":
            return 403, "refused: a write must come from the dashboard's own page (Origin)"
        if not secrets.compare_digest(headers.get(TOKEN_HEADER, ""), self.dashboard.token):
            return 403, "refused: a write must carry this server's token (reload the page)"
        return None
