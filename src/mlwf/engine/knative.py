"""The Knative backend: every stage call is a signed CloudEvent POSTed to a function service.

The services run ``mlwf serve`` (in a Knative cluster, or on this machine for
tests and benchmarks). ``endpoints`` says where each stage runs:

* ``URL``: one service for every stage;
* ``STAGE=URL``: one service per stage (``pca=http://127.0.0.1:8081``); a
  stage name may be qualified (``ml-training/partition=URL``) or a whole
  workflow (``ml-inference=URL``). Qualified names win over bare stage names,
  which win over a plain URL.

Intermediate state moves through the store only (``transfers = ("store",)``):
a call carries store keys and checksums, never the bytes, and each service
opens the store from its own environment. So the store must be one every
service can reach: S3/MinIO, or a local directory when every endpoint is on
this machine (127.0.0.1/localhost).

Each call is signed with ``MLWF_FUNCTION_SECRET`` (see
:mod:`mlwf.engine.events`), and so is each reply, which is checked. A call is
retried, with exponential backoff and jitter and a fresh event id, when the
service cannot be reached or does not answer within ``timeout``, answers 429,
502, 503 or 504, or reports a stage error it marks retryable; after
``retries`` extra attempts it fails as :class:`StageError` naming the stage,
the call index and the last error. A stage error marked not retryable (bad
input) is raised at once as the same error class with the same one-line
message as on the local backend. At most ``concurrency`` calls are in flight
per service, over one keep-alive ``httpx.Client`` per service.

Worst case for a service that never answers: ``(retries + 1) × (timeout +
max backoff)`` per call (``connect_timeout`` instead of ``timeout`` when
nothing accepts the connection).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import random
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from mlwf import errors
from mlwf.engine import events
from mlwf.engine.calls import Call, Outcome, RunContext
from mlwf.errors import MlwfError, StageError, UsageError

DEFAULT_TIMEOUT = 300.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_RETRIES = 2
DEFAULT_CONCURRENCY = 16
RETRY_STATUS = (429, 502, 503, 504)
_LOCAL_HOSTS = ("localhost", "localhost.localdomain")
#: Errors a service may report that keep their class here (anything else becomes MlwfError).
_ERROR_CLASSES = {cls.__name__: cls for cls in (errors.DataError, errors.ModelError, errors.UsageError,
                                                errors.NotFoundError, errors.StoreError, errors.StageError)}


def _check_url(url: str, entry: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--endpoint {entry!r}: {url!r} is not an http(s):// URL")
    return url


def parse_endpoints(entries) -> tuple[str | None, dict[tuple[str, str], str]]:
    """``(default URL or None, {(workflow, stage): URL})`` from ``URL`` / ``STAGE=URL`` entries."""
    if isinstance(entries, str):
        entries = [entries]
    entries = [e.strip() for e in (entries or []) if e and e.strip()]
    if not entries:
        raise UsageError("the knative backend needs --endpoint URL (one service for every stage) or "
                         "--endpoint STAGE=URL for each stage")
    known = events.known_stages()
    names = ", ".join(f"{w}/{s}" for w, ss in known.items() for s in ss)
    default: str | None = None
    levels: list[dict[tuple[str, str], str]] = [{}, {}]  # 0: bare stage or workflow names, 1: qualified
    for entry in entries:
        head, sep, tail = entry.partition("=")
        if sep and "://" not in head:
            name, url = head.strip(), _check_url(tail.strip(), entry)
            workflow, slash, stage = name.partition("/")
            if slash:
                if workflow not in known or stage not in known[workflow]:
                    raise UsageError(f"--endpoint {entry!r}: unknown stage {name!r}; stages are {names}")
                targets, level = [(workflow, stage)], 1
            elif name in known:
                targets, level = [(name, s) for s in known[name]], 0
            else:
                targets, level = [(w, name) for w, ss in known.items() if name in ss], 0
                if not targets:
                    raise UsageError(f"--endpoint {entry!r}: unknown stage {name!r}; stages are {names}")
            for t in targets:
                if levels[level].get(t, url) != url:
                    raise UsageError(f"--endpoint: two URLs for {t[0]}/{t[1]} ({levels[level][t]} and {url}): "
                                     "give one")
                levels[level][t] = url
        else:
            url = _check_url(entry, entry)
            if default is not None and default != url:
                raise UsageError(f"--endpoint: two URLs for every stage ({default} and {url}): give one, or "
                                 "STAGE=URL for each stage")
            default = url
    return default, {**levels[0], **levels[1]}


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host.lower() in _LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class KnativeBackend:
    """Runs each call by POSTing a signed CloudEvent to the service for its stage."""

    name = "knative"
    transfers = ("store",)

    def __init__(self, endpoints=None, *, timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 concurrency: int = DEFAULT_CONCURRENCY, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 backoff: float = 0.25, max_backoff: float = 8.0, secret: str | None = None,
                 structured: bool = False):
        import httpx  # noqa: F401  (fail here, with the install hint, if the extra is missing)

        self.default, self.routes = parse_endpoints(endpoints)
        for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if not value > 0:
                raise UsageError(f"knative backend: {name} must be a positive number of seconds, got {value!r}")
        if not isinstance(retries, int) or retries < 0:
            raise UsageError(f"knative backend: retries must be 0 or more, got {retries!r}")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise UsageError(f"knative backend: concurrency must be at least 1, got {concurrency!r}")
        self.secret = events.read_secret(secret, who="the knative backend")
        self.timeout = float(timeout)
        self.connect_timeout = min(float(connect_timeout), self.timeout)
        self.retries = retries
        self.concurrency = concurrency
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.structured = structured
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._clients: dict[str, Any] = {}
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._checked: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ protocol
    def start(self) -> None:
        self._start()

    def _start(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                services = len(set(self.routes.values()) | ({self.default} if self.default else set()))
                self._pool = ThreadPoolExecutor(max_workers=min(1024, self.concurrency * max(1, services)),
                                                thread_name_prefix="mlwf-knative")
            return self._pool

    def submit(self, call: Call, ctx: RunContext) -> Future[Outcome]:
        self._check(ctx)
        url = self.url_for(call.workflow, call.stage)
        return self._start().submit(self._invoke, url, call, self._wire_context(ctx))

    def reset(self) -> None:
        """Drop every connection (aborting calls stuck on them); later calls open new ones."""
        with self._lock:
            clients, self._clients = self._clients, {}
        for client in clients.values():
            client.close()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self.reset()

    # ------------------------------------------------------------------ routing
    def url_for(self, workflow: str, stage: str) -> str:
        url = self.routes.get((workflow, stage), self.default)
        if url is None:
            raise UsageError(f"no --endpoint for {workflow}/{stage}: give URL for one service serving every "
                             f"stage, or {stage}=URL")
        return url

    def _check(self, ctx: RunContext) -> None:
        """Before a workflow's first call: every stage has a service, and the store is one they share."""
        key = (ctx.workflow, ctx.store_url)
        if key in self._checked:
            return
        stages = events.known_stages().get(ctx.workflow, [])
        missing = [s for s in stages if (ctx.workflow, s) not in self.routes and self.default is None]
        if missing:
            raise UsageError(f"no --endpoint for {ctx.workflow} stage(s) {', '.join(missing)}: give URL for one "
                             "service serving every stage, or STAGE=URL for each")
        if not ctx.store_url.startswith("s3://"):
            remote = sorted({self.url_for(ctx.workflow, s) for s in stages if not _is_loopback(self.url_for(
                ctx.workflow, s))})
            if remote:
                raise UsageError(f"the knative backend needs a store its services share: the local directory "
                                 f"{ctx.store_url!r} is not reachable from {remote[0]}; use --store s3:// "
                                 "(MinIO/S3), or run the services on this machine (127.0.0.1 endpoints)")
        self._checked.add(key)

    @staticmethod
    def _wire_context(ctx: RunContext) -> RunContext:
        """A local store as an absolute path, so a server with another working directory finds it."""
        url = ctx.store_url
        if url.startswith("s3://"):
            return ctx
        path = url[len("file://"):] if url.startswith("file://") else url
        return dataclasses.replace(ctx, store_url=os.path.abspath(os.path.expanduser(path)))

    def _client(self, url: str):
        import httpx

        with self._lock:
            client = self._clients.get(url)
            if client is None:
                client = self._clients[url] = httpx.Client(
                    timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
                    limits=httpx.Limits(max_connections=self.concurrency,
                                        max_keepalive_connections=self.concurrency))
            slots = self._slots.get(url)
            if slots is None:
                slots = self._slots[url] = threading.BoundedSemaphore(self.concurrency)
            return client, slots

    # ------------------------------------------------------------------ one call
    def _invoke(self, url: str, call: Call, ctx: RunContext) -> Outcome:
        import httpx

        call_json, ctx_json = call.to_json(), ctx.to_json()
        where = f"{call.workflow} stage {call.name}"
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                pause = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
                time.sleep(pause * (0.5 + random.random() / 2))
            event = events.call_event(call_json, ctx_json, self.secret)
            headers, body = events.to_http(event, structured=self.structured)
            client, slots = self._client(url)
            try:
                with slots:
                    resp = client.post(url, content=body, headers=headers)
            except httpx.TimeoutException as e:
                last = f"no answer from {url} within {self._limit(e):g} s ({type(e).__name__})"
                continue
            except (httpx.TransportError, RuntimeError) as e:  # RuntimeError: client closed by reset()
                last = f"cannot reach {url} ({type(e).__name__}: {_one_line(e)})"
                continue
            if resp.status_code == 200:
                try:
                    return self._outcome(resp, event, call, ctx)
                except ValueError as e:
                    last = f"bad reply from {url}: {_one_line(e)}"
                    continue
            err = _error_body(resp)
            if resp.status_code == 500:
                if err.get("retryable") is False:
                    cls = _ERROR_CLASSES.get(str(err.get("type")), MlwfError)
                    raise cls(err["error"])
                kind = err.get("type")
                last = err["error"] if kind in (None, "StageError") else f"{kind}: {err['error']}"
                continue
            if resp.status_code in RETRY_STATUS:
                last = f"{url} answered {resp.status_code}: {err['error']}"
                continue
            raise UsageError(_refusal(resp.status_code, err["error"], where, url))
        raise StageError(f"{where} failed on {url} after {self.retries + 1} attempts: {last}")

    def _limit(self, e) -> float:
        import httpx

        return self.connect_timeout if isinstance(e, httpx.ConnectTimeout) else self.timeout

    def _outcome(self, resp, request, call: Call, ctx: RunContext) -> Outcome:
        try:
            reply = events.from_http(resp.headers, resp.content)
        except Exception as e:
            raise ValueError(f"not a CloudEvent ({_one_line(e)})") from None
        expected_type = events.event_type(call.workflow, call.stage, done=True)
        expected_id = f"{request.get_id()}.done"
        if reply.get_type() != expected_type or reply.get_id() != expected_id:
            raise ValueError(f"got {reply.get_type()!r} id {reply.get_id()!r}, expected {expected_type!r} "
                             f"id {expected_id!r}")
        data = reply.get_data()
        stamp = reply.get_extension(events.TIME_ATTR)
        if not isinstance(data, dict) or not events.verify(
                self.secret, reply.get_extension(events.SIGNATURE_ATTR), "done", call.workflow, call.stage,
                ctx.run_id, data, expected_id, str(stamp)):
            raise ValueError("the reply's signature does not match (is the service's MLWF_FUNCTION_SECRET "
                             "the same as here?)")
        try:
            return Outcome.from_json(data)
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed outcome ({_one_line(e)})") from None


def _error_body(resp) -> dict[str, Any]:
    try:
        body = resp.json()
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return body
    except ValueError:
        pass
    text = " ".join(resp.text.split())[:300] or resp.reason_phrase
    return {"error": text}


def _refusal(status: int, error: str, where: str, url: str) -> str:
    hint = {401: "the service and this machine must share the same MLWF_FUNCTION_SECRET",
            403: "check that this machine's clock and the service's agree",
            404: "check --endpoint: that service does not run this stage",
            413: "the call is larger than the service's --max-body"}.get(status, "")
    return f"{where}: {url} refused the call ({status}: {error})" + (f"; {hint}" if hint else "")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:500] or type(e).__name__
