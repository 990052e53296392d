"""Where a server's emitted events go, and their delivery.

``mlwf serve --sink URL`` sends every event to URL; ``--sink STAGE=URL``
sends the events that start STAGE (``train``, ``ml-training/train`` or a
whole workflow) to URL instead; without ``--sink``, ``K_SINK`` (what a
Knative SinkBinding or a ContainerSource sets) is the one sink. What is
behind a sink is Knative's business: a Broker, a Channel, or the next
Service itself.

Delivery works as Knative's own delivery spec does: each event is POSTed
(binary content mode), a 2xx answer means delivered, and a transport error or
a 408/409/429/5xx answer is retried with exponential backoff (``retries``
times, ``backoff`` doubling up to ``max_backoff``); each attempt is signed
afresh (same event id), so a long backoff never outlives the signature. An
event that could not be delivered goes to the dead-letter sink, if there is
one (with Knative's ``knativeerrordest``, ``knativeerrorcode`` and
``knativeerrordata`` attributes), and its run ends ``failed``, naming the
stage and the last answer.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from mlwf.aio import BACKGROUND
from mlwf.backends.knative import events
from mlwf.engine.calls import Call, RunContext
from mlwf.backends.knative.backend import check_url, parse_endpoints
from mlwf.errors import UsageError, one_line

log = logging.getLogger("mlwf.choreography")

DEFAULT_DELIVERY_RETRIES = 10
DEFAULT_DELIVERY_TIMEOUT = 300.0
RETRY_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True)
class Sinks:
    """Where events go: a default sink, per-stage sinks and the dead-letter sink."""

    default: str | None
    routes: dict[tuple[str, str], str] = field(default_factory=dict)
    dead_letter: str | None = None

    def url_for(self, workflow: str, stage: str) -> str | None:
        return self.routes.get((workflow, stage), self.default)


def parse_sinks(entries: list[str] | None, *, k_sink: str | None = None, dead_letter: str | None = None) -> Sinks | None:
    """The sinks of ``--sink`` entries (else ``K_SINK``) and ``--dead-letter``; None when there is none.

    Raises
    ------
    UsageError
        For a URL that is not http(s), an unknown stage, two URLs for one
        stage, a blank ``K_SINK``, or a dead-letter sink without any sink.
    """
    entries = [e for e in (entries or []) if e is not None]
    if any(not e.strip() for e in entries):
        raise UsageError("--sink is empty: give URL or STAGE=URL")
    if dead_letter is not None:
        check_url(dead_letter.strip(), dead_letter, "--dead-letter")
        dead_letter = dead_letter.strip()
    if entries:
        default, routes = parse_endpoints(entries, flag="--sink")
    elif k_sink is not None:
        if not k_sink.strip():
            raise UsageError("K_SINK is set but blank: give it the sink's URL, or unset it to emit no events")
        default, routes = check_url(k_sink.strip(), k_sink, "K_SINK"), {}
    else:
        if dead_letter is not None:
            raise UsageError("--dead-letter needs a sink to deliver to: give --sink URL (or set K_SINK)")
        return None
    return Sinks(default, routes, dead_letter)


class Dispatcher:
    """Delivers a server's emitted events to its sinks, on the process's background loop.

    Parameters
    ----------
    sinks : where events go.
    secret : the shared secret the events are signed with (None: unsigned).
    source : the events' ``source``.
    give_up : ``give_up(call, ctx, reason)``, called (in a worker thread) for
        an event that could not be delivered: it ends the run ``failed``.
    retries, backoff, max_backoff : redeliveries and their pauses (seconds).
    timeout : seconds one delivery may take, the whole exchange (a sink that
        is the next service itself answers when its call is done).
    """

    def __init__(self, sinks: Sinks, secret: str | None, source: str,
                 give_up: Callable[[Call, RunContext, str], None], *, retries: int = DEFAULT_DELIVERY_RETRIES,
                 backoff: float = 0.2, max_backoff: float = 10.0, timeout: float = DEFAULT_DELIVERY_TIMEOUT):
        self.sinks = sinks
        self.secret = secret
        self.source = source
        self.give_up = give_up
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self._client = None  # on the background loop only
        self._pending: set[Future] = set()

    def send(self, call: Call, ctx: RunContext) -> None:
        """Deliver the event that starts ``call`` (in the background)."""
        url = self.sinks.url_for(call.workflow, call.stage)
        if url is None:
            self.give_up(call, ctx, f"no sink for {call.workflow}/{call.stage}: start mlwf serve with --sink URL "
                                    f"or --sink {call.stage}=URL")
            return
        future = BACKGROUND.submit(self._deliver(url, call, ctx))
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    def in_flight(self) -> int:
        return len(self._pending)

    async def _post(self, url: str, event):
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=5.0),
                                             limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        headers, body = events.to_http(event)
        async with asyncio.timeout(self.timeout):
            return await self._client.post(url, content=body, headers=headers)

    async def _deliver(self, url: str, call: Call, ctx: RunContext) -> None:
        import httpx

        call_json, ctx_json = call.to_json(), ctx.to_json()
        event_id = events.new_event_id()
        last, code = "no attempt", None
        attempts = 0
        for attempt in range(self.retries + 1):
            if attempt:
                pause = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
                await asyncio.sleep(pause * (0.5 + random.random() / 2))
            attempts += 1
            event = events.call_event(call_json, ctx_json, self.secret, source=self.source, event_id=event_id,
                                      kind="event")
            try:
                resp = await self._post(url, event)
            except (httpx.TimeoutException, TimeoutError) as e:
                last, code = f"no answer from {url} within {self.timeout:g} s ({type(e).__name__})", None
                continue
            except (httpx.TransportError, RuntimeError) as e:
                last, code = f"cannot reach {url} ({type(e).__name__}: {one_line(e)})", None
                continue
            if 200 <= resp.status_code < 300:
                return
            code = resp.status_code
            last = f"{url} answered {resp.status_code}: {_error_text(resp)}"
            if resp.status_code not in RETRY_STATUS and resp.status_code < 500:
                break
        reason = f"failed: gave up after {attempts} deliver{'ies' if attempts > 1 else 'y'}: {last}"
        log.error("%s/%s of run %s %s", call.workflow, call.name, ctx.run_id, reason)
        if self.sinks.dead_letter:
            await self._dead_letter(call_json, ctx_json, event_id, url, code, last)
        await asyncio.get_running_loop().run_in_executor(None, self.give_up, call, ctx, reason)

    async def _dead_letter(self, call_json: dict, ctx_json: dict, event_id: str, url: str, code: int | None,
                           last: str) -> None:
        event = events.call_event(call_json, ctx_json, self.secret, source=self.source, event_id=event_id,
                                  kind="event")
        attrs = dict(event.get_attributes())
        attrs.update({"knativeerrordest": url, "knativeerrordata": base64.b64encode(last.encode()[:1024]).decode()})
        if code is not None:
            attrs["knativeerrorcode"] = str(code)
        try:
            resp = await self._post(self.sinks.dead_letter, events.make_event(attrs, event.get_data()))
            if not 200 <= resp.status_code < 300:
                log.error("the dead-letter sink %s answered %d", self.sinks.dead_letter, resp.status_code)
        except Exception as e:  # noqa: BLE001 - the run is marked failed anyway
            log.error("could not reach the dead-letter sink %s: %s", self.sinks.dead_letter, one_line(e))

    def close(self) -> None:
        async def close():
            if self._client is not None:
                await self._client.aclose()
                self._client = None

        try:
            BACKGROUND.run(close())
        except RuntimeError:
            pass


def _error_text(resp) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            kind = body.get("type")
            text = one_line(body["error"], 1000)
            return text if kind in (None, "StageError") else f"{str(kind)[:40]}: {text}"
    except ValueError:
        pass
    return one_line(resp.text, 300) or resp.reason_phrase

