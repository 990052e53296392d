"""The Knative backend: every stage call is a signed CloudEvent POSTed to a function service.

The services run ``mlwf serve`` (in a Knative cluster, or on this machine for
tests and benchmarks). ``endpoints`` says where each stage runs:

* ``URL``: one service for every stage;
* ``STAGE=URL``: one service per stage (``pca=http://127.0.0.1:8081``); a
  stage name may be qualified (``ml-training/partition=URL``) or a whole
  workflow (``ml-inference=URL``). Qualified names win over bare stage names,
  which win over a plain URL.

Intermediate state moves through the store (``--transfer store``, the
default: a call carries store keys and checksums, never the bytes) or inline
(``--transfer payload``, RMMap's "rpc": each call's inputs ride in its
request and its outputs in the reply, framed as raw bytes after the call's
JSON in binary content mode, :mod:`mlwf.backends.knative.frames`; nothing of
the state goes to the store). There is no ``direct``: a service holds no
outputs between calls. A payload request is as big as the state it carries,
so it meets the services' body limit (``mlwf serve --max-body``, which each
service advertises on ``GET /healthz``): a call over a service's limit is
refused here before it is sent, and a 413 from anything on the way (an
ingress's own limit) the same way, in one line naming the limit and
``--transfer store``; never by quietly putting the state in the store.

Either way each service acts on the one store it was started with
(``mlwf serve --store/--bucket``), with its own credentials (stages still
read their data from it). So the run's store must be the one the services
serve, named the same way (``s3://`` with each side's S3_HOST/S3_PORT, or
``s3://HOST:PORT``, or the same directory when every endpoint is on this
machine, 127.0.0.1/localhost); a service serving another store refuses the
call, and the run stops at once with one line naming both.

Each call is signed with ``MLWF_FUNCTION_SECRET`` (see
:mod:`mlwf.backends.knative.events`), and so is each reply, which is checked.
One attempt is exactly one POST (with a fresh event id); this backend never
retries by itself. It says whether a failed attempt is worth another, and the
driver decides (:mod:`mlwf.engine.retry`, at most ``1 + --retries`` attempts
in all): a service that cannot be reached or does not answer within
``timeout``, answers 429, 502, 503 or 504, refuses the event id as seen
before (a 403 marked retryable: something between us resent it), or sends a
reply that does not check out fails the attempt with a retryable
:class:`StageError` naming the stage, the call index and the service. A
stage error comes back as the same error class with the same one-line message
as on the local backend, retryable as the service's reply says (from the
error's own :attr:`~mlwf.errors.MlwfError.retryable`). At most
``concurrency`` calls are in flight per service, over one keep-alive
``httpx.AsyncClient`` per service, on the process's background event loop
(:mod:`mlwf.aio`).

``timeout`` bounds each attempt as a whole, from connecting to the last byte
of the reply: a service that accepts and never answers, or answers a byte at
a time, is cut off at ``timeout`` (httpx's own timeouts bound each read, not
the exchange). Worst case for a call: ``(retries + 1) × timeout`` plus the
driver's pauses between attempts (``connect_timeout`` instead of ``timeout``
when nothing accepts the connection).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import threading
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar

from mlwf import errors, workflows
from mlwf.aio import BACKGROUND
from mlwf.backends.base import BackendConfig, HoldsNoOutputs
from mlwf.backends.knative import events, frames
from mlwf.engine.calls import Call, Outcome, RunContext
from mlwf.errors import MlwfError, StageError, UsageError, one_line
from mlwf.settings import Settings

DEFAULT_TIMEOUT = 300.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_CONCURRENCY = 16
RETRY_STATUS = (429, 502, 503, 504)
_LOCAL_HOSTS = ("localhost", "localhost.localdomain")
#: Errors a service may report that keep their class here (anything else becomes MlwfError).
_ERROR_CLASSES = {cls.__name__: cls for cls in (errors.DataError, errors.ModelError, errors.UsageError,
                                                errors.NotFoundError, errors.StoreError,
                                                errors.TransientStoreError, errors.StageError)}


def check_url(url: str, entry: str, flag: str = "--endpoint") -> str:
    """``url`` if it is an http(s) URL with a host; else :class:`UsageError` naming ``flag`` and ``entry``."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError:  # e.g. a bracketed host that is no IPv6 address, or a port that is no number
        parts, host = None, None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise UsageError(f"{flag} {entry!r}: {url!r} is not an http(s):// URL")
    try:
        parts.port
    except ValueError:
        raise UsageError(f"{flag} {entry!r}: {url!r} has no valid port") from None
    return url


def parse_endpoints(entries, flag: str = "--endpoint") -> tuple[str | None, dict[tuple[str, str], str]]:
    """``(default URL or None, {(workflow, stage): URL})`` from ``URL`` / ``STAGE=URL`` entries.

    ``flag`` names the option in error messages (``--endpoint``, ``--sink``).
    """
    if isinstance(entries, str):
        entries = [entries]
    entries = [e.strip() for e in (entries or []) if e and e.strip()]
    if not entries:
        raise UsageError(f"the knative backend needs {flag} URL (one service for every stage) or "
                         f"{flag} STAGE=URL for each stage")
    known = workflows.known_stages()
    names = ", ".join(f"{w}/{s}" for w, ss in known.items() for s in ss)
    default: str | None = None
    levels: list[dict[tuple[str, str], str]] = [{}, {}]  # 0: bare stage or workflow names, 1: qualified
    for entry in entries:
        head, sep, tail = entry.partition("=")
        if sep and "://" not in head:
            name, url = head.strip(), check_url(tail.strip(), entry, flag)
            workflow, slash, stage = name.partition("/")
            if slash:
                if workflow not in known or stage not in known[workflow]:
                    raise UsageError(f"{flag} {entry!r}: unknown stage {name!r}; stages are {names}")
                targets, level = [(workflow, stage)], 1
            elif name in known:
                targets, level = [(name, s) for s in known[name]], 0
            else:
                targets, level = [(w, name) for w, ss in known.items() if name in ss], 0
                if not targets:
                    raise UsageError(f"{flag} {entry!r}: unknown stage {name!r}; stages are {names}")
            for t in targets:
                if levels[level].get(t, url) != url:
                    raise UsageError(f"{flag}: two URLs for {t[0]}/{t[1]} ({levels[level][t]} and {url}): "
                                     "give one")
                levels[level][t] = url
        else:
            url = check_url(entry, entry, flag)
            if default is not None and default != url:
                raise UsageError(f"{flag}: two URLs for every stage ({default} and {url}): give one, or "
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


@dataclass(frozen=True)
class KnativeConfig(BackendConfig):
    """The Knative backend's settings.

    Parameters
    ----------
    endpoints : ``URL`` or ``STAGE=URL`` entries (see the module docstring).
    timeout : seconds one attempt may take, from connecting to the reply's last byte.
    connect_timeout : seconds to wait for a connection (at most ``timeout``).
    concurrency : calls in flight per service.
    structured : send CloudEvents in structured mode (binary otherwise).
    secret : the shared secret (default ``MLWF_FUNCTION_SECRET``).
    """

    backend: ClassVar[str] = "knative"
    endpoints: Sequence[str] | str | None = None
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    concurrency: int = DEFAULT_CONCURRENCY
    structured: bool = False
    secret: str | None = None


class KnativeBackend(HoldsNoOutputs):
    """Runs each call by POSTing a signed CloudEvent to the service for its stage."""

    name = "knative"
    #: ``payload``: state inline in each request and reply (see the module docstring).
    transfers = ("store", "payload")
    #: Why a transfer mode is not taken, for the error that refuses it.
    transfer_notes: ClassVar[dict[str, str]] = {
        "shm": "each function runs in its own pod, possibly on another node, with no memory in common with the others"}
    Config = KnativeConfig

    def __init__(self, config: KnativeConfig | None = None, settings: Settings | None = None):
        import httpx  # noqa: F401  (fail here, with the install hint, if the extra is missing)

        config = config or KnativeConfig()
        settings = settings or Settings.resolve()
        self.default, self.routes = parse_endpoints(config.endpoints)
        for name, value in (("timeout", config.timeout), ("connect_timeout", config.connect_timeout)):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < 86_400):
                raise UsageError(f"knative backend: {name} must be a positive number of seconds (under a day), "
                                 f"got {value!r}")
        concurrency = config.concurrency
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise UsageError(f"knative backend: concurrency must be at least 1, got {concurrency!r}")
        self.secret = events.read_secret(config.secret if config.secret is not None else settings.function_secret,
                                         who="the knative backend")
        self.timeout = float(config.timeout)
        self.connect_timeout = min(float(config.connect_timeout), self.timeout)
        self.concurrency = concurrency
        self.structured = config.structured
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}  # used on the background loop only
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._in_flight: set[Future] = set()
        self._checked: set[tuple[str, str, str]] = set()
        #: Each service's advertised body limit (``mlwf serve --max-body``), None when it says none.
        self._max_body: dict[str, int | None] = {}

    # ------------------------------------------------------------------ protocol
    def start(self) -> None:
        BACKGROUND.loop()

    def submit(self, call: Call, ctx: RunContext) -> Future[Outcome]:
        self._check(ctx)
        url = self.url_for(call.workflow, call.stage)
        future = BACKGROUND.submit(self._invoke(url, call, self._wire_context(ctx)))
        with self._lock:
            self._in_flight.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future) -> None:
        with self._lock:
            self._in_flight.discard(future)

    def cancel_all(self) -> None:
        """Abort every call in flight and drop every connection; later calls open new ones."""
        with self._lock:
            futures, self._in_flight = self._in_flight, set()
        for future in futures:
            future.cancel()
        BACKGROUND.run(self._close_clients())

    def close(self) -> None:
        self.cancel_all()

    async def _close_clients(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()

    # ------------------------------------------------------------------ routing
    def url_for(self, workflow: str, stage: str) -> str:
        url = self.routes.get((workflow, stage), self.default)
        if url is None:
            raise UsageError(f"no --endpoint for {workflow}/{stage}: give URL for one service serving every "
                             f"stage, or {stage}=URL")
        return url

    def _check(self, ctx: RunContext) -> None:
        """Before a workflow's first call: every stage has a service, and the store is one they share."""
        key = (ctx.workflow, ctx.store_url, ctx.transfer)
        if key in self._checked:
            return
        stages = workflows.known_stages().get(ctx.workflow, [])
        missing = [s for s in stages if (ctx.workflow, s) not in self.routes and self.default is None]
        if missing:
            raise UsageError(f"no --endpoint for {ctx.workflow} stage(s) {', '.join(missing)}: give URL for one "
                             "service serving every stage, or STAGE=URL for each")
        if ctx.store.is_local:
            remote = sorted({self.url_for(ctx.workflow, s) for s in stages if not _is_loopback(self.url_for(
                ctx.workflow, s))})
            if remote:
                raise UsageError(f"the knative backend needs a store its services share: the local directory "
                                 f"{ctx.store_url!r} is not reachable from {remote[0]}; use --store s3:// "
                                 "(MinIO/S3), or run the services on this machine (127.0.0.1 endpoints)")
        if ctx.transfer == "payload":
            for url in {self.url_for(ctx.workflow, s) for s in stages}:
                if url not in self._max_body:
                    self._max_body[url] = self._advertised_max_body(url)
        self._checked.add(key)

    def _advertised_max_body(self, url: str) -> int | None:
        """The body limit ``url`` advertises on ``GET /healthz`` (``mlwf serve --max-body``), or None.

        None (no answer, or no limit in it) leaves the check to the service's
        413; a platform in front of it (an ingress) may have a lower limit of
        its own, which only its 413 tells.
        """
        import httpx

        try:
            resp = httpx.get(urllib.parse.urljoin(url.rstrip("/") + "/", "healthz"), timeout=self.connect_timeout)
            limit = resp.json().get("max_body") if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return limit if type(limit) is int and limit > 0 else None

    @staticmethod
    def _wire_context(ctx: RunContext) -> RunContext:
        """The store named as a server compares it (a directory: its absolute real path)."""
        spec = ctx.store.canonical()
        return dataclasses.replace(ctx, store_url=spec.url, bucket=spec.bucket)

    def _client(self, url: str):
        """The keep-alive client and the concurrency slots of one service (on the background loop)."""
        import httpx

        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
                limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency))
        slots = self._slots.get(url)
        if slots is None:
            slots = self._slots[url] = asyncio.Semaphore(self.concurrency)
        return client, slots

    # ------------------------------------------------------------------ one call
    async def _invoke(self, url: str, call: Call, ctx: RunContext) -> Outcome:
        """One attempt: one POST. Its failure says whether another may succeed (the driver decides)."""
        import httpx

        where = f"{call.workflow} stage {call.name}"
        if ctx.transfer == "payload" and not self.structured:
            bare, blobs = frames.split_call(call)
            event = events.call_event(bare.to_json(), ctx.to_json(), self.secret)
            headers, body = frames.to_http(event, blobs)
        else:  # JSON (a payload's bytes in base64 in it: structured mode has no other way)
            event = events.call_event(call.to_json(), ctx.to_json(), self.secret)
            headers, body = events.to_http(event, structured=self.structured)
        limit = self._max_body.get(url) if ctx.transfer == "payload" else None
        if limit is not None and len(body) > limit:
            raise UsageError(_too_big(where, url, len(body), f"its limit of {limit:,} bytes (mlwf serve "
                                                             f"--max-body {events.size_arg(limit)})"))
        client, slots = self._client(url)
        try:
            async with slots:
                # The whole exchange, not each read: a reply trickled a byte at a time is cut off too.
                async with asyncio.timeout(self.timeout):
                    resp = await client.post(url, content=body, headers=headers)
        except (httpx.TimeoutException, TimeoutError) as e:
            raise StageError(f"{where} failed: no answer from {url} within {self._limit(e):g} s "
                             f"({type(e).__name__})") from None
        except (httpx.TransportError, RuntimeError) as e:  # RuntimeError: client closed by cancel_all()
            raise StageError(f"{where} failed: cannot reach {url} ({type(e).__name__}: {one_line(e, 500)})") from None
        if resp.status_code == 200:
            try:
                return self._outcome(resp, event, call, ctx)
            except ValueError as e:
                raise StageError(f"{where} failed on {url}: bad reply: {one_line(e, 500)}") from None
        err = _error_body(resp)
        if resp.status_code == 500:
            kind, retryable = err.get("type"), err.get("retryable") is not False
            cls = _ERROR_CLASSES.get(str(kind), StageError if retryable else MlwfError)
            message = err["error"] if str(kind) in _ERROR_CLASSES or kind is None else f"{kind}: {err['error']}"
            # Bad input reads as it does on every backend; a failure worth retrying names the service.
            error = cls(f"{where} failed on {url}: {message}" if retryable else message)
            error.retryable = retryable  # as the service's error said of itself
            raise error
        if resp.status_code in RETRY_STATUS or (resp.status_code == 403 and err.get("retryable") is True):
            # 403 retryable: this event id was seen before (say, a proxy resent it); a new attempt is a
            # new event, and a call run twice writes the same bytes.
            raise StageError(f"{where} failed on {url}: it answered {resp.status_code}: {err['error']}")
        if resp.status_code == 403 and isinstance(err.get("store"), str):
            raise UsageError(f"{where}: {url} serves store {err['store']} bucket {err.get('bucket')!r}, but "
                             f"this run uses {ctx.store_url} bucket {ctx.bucket!r}: run with --store "
                             f"{err['store']} --bucket {err.get('bucket')} (S3: with S3_HOST/S3_PORT pointing at "
                             "the same service), or start the services with 'mlwf serve --store ... --bucket ...' "
                             "for this store")
        if resp.status_code == 413 and ctx.transfer == "payload":
            raise UsageError(_too_big(where, url, len(body), f"a body limit on the way (413: {err['error']})"))
        raise UsageError(_refusal(resp.status_code, err["error"], where, url))

    def _limit(self, e) -> float:
        import httpx

        return self.connect_timeout if isinstance(e, httpx.ConnectTimeout) else self.timeout

    def _outcome(self, resp, request, call: Call, ctx: RunContext) -> Outcome:
        rest = None
        try:
            if frames.is_frames(resp.headers.get("content-type")):
                reply, rest = frames.from_http(resp.headers, resp.content)
            else:
                reply = events.from_http(resp.headers, resp.content)
        except Exception as e:
            raise ValueError(f"not a CloudEvent ({one_line(e, 500)})") from None
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
            outcome = Outcome.from_json(data)
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed outcome ({one_line(e, 500)})") from None
        return outcome if rest is None else frames.join_outcome(outcome, rest)


def _error_body(resp) -> dict[str, Any]:
    try:
        body = resp.json()
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return body
    except ValueError:
        pass
    text = " ".join(resp.text.split())[:300] or resp.reason_phrase
    return {"error": text}


def _too_big(where: str, url: str, nbytes: int, limit: str) -> str:
    """The one line for a payload call too big for a service: what, where, and the two ways out."""
    return (f"{where}: the call carries its inputs inline (--transfer payload), {nbytes:,} bytes, over {limit} "
            f"at {url}: start the service with a larger 'mlwf serve --max-body SIZE' (up to "
            f"{events.size_arg(events.MAX_BODY)}, with --max-memory to match), or run with --transfer store")


def _refusal(status: int, error: str, where: str, url: str) -> str:
    hint = {401: "the service and this machine must share the same MLWF_FUNCTION_SECRET",
            403: "check that this machine's clock and the service's agree",
            404: "check --endpoint: that service does not run this stage",
            413: "the call is larger than the service's --max-body"}.get(status, "")
    return f"{where}: {url} refused the call ({status}: {error})" + (f"; {hint}" if hint else "")


BACKEND = KnativeBackend
