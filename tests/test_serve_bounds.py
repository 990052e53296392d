"""``mlwf serve`` bounded by design: no event makes it burn memory, and slow clients take no one's place.

One real ``mlwf serve`` (a process on 127.0.0.1, a directory store) with a
small memory budget: JSON bombs in a CloudEvent's body, compressed bodies
that inflate past the budget, numbers that do not fit, the budget shared
with a client that stalls, and clients trickling their bodies (and
reconnecting as fast as they are dropped) while signed calls from another
client keep being run. Each attack ends in one clean 4xx within seconds,
the server's peak memory (``VmHWM``) stays far below what the attacks took
before, and the next signed call runs.
"""

from __future__ import annotations

import gzip
import json
import socket
import time

import httpx
import pytest

from mlwf.storage import StoreSpec
from tests.conftest import BATCH_PREFIX
from tests.hostileclients import Tricklers, compress, peak_rss_mib, zeros_bomb
from tests.test_knative import ServeProcess
from tests.test_serve_hostile import _server_env_local, _signed

#: The server's memory budget and body limit (the body limit above the budget, so that what stops a large
#: body is the budget), and its request timeout.
MEMORY = "32MiB"
REQUEST_TIMEOUT = 2.0
#: The server's peak resident memory may not pass this (it starts at about 110 MiB; 12 MiB of JSON took
#: +300 MB before the budget).
PEAK_MIB = 260
PROMPT_S = 5.0
STRUCTURED = {"content-type": "application/cloudevents+json"}


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits_dir) -> str:
    from mlwf import bulk

    url = str(tmp_path_factory.mktemp("serve-bounds") / "store")
    opened = StoreSpec(url, "tless").open()
    bulk.upload_dir(opened, digits_dir / "batch", BATCH_PREFIX, create_bucket=True)
    opened.close()
    return url


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    proc = ServeProcess(_server_env_local(), tmp_path_factory.mktemp("serve-bounds-log") / "serve.log",
                        "--store", store, "--bucket", "tless", "--max-memory", MEMORY, "--max-body", "64MiB",
                        "--request-timeout", str(REQUEST_TIMEOUT), "--max-connections", "64").wait_ready()
    yield proc
    assert proc.stop() == 0, proc.log()
    assert "Traceback" not in proc.log()


def _refused(server, body: bytes, headers: dict, status: int, *words: str) -> dict:
    started = time.monotonic()
    resp = httpx.post(server.url, content=body, headers=headers, timeout=60)
    took = time.monotonic() - started
    assert resp.status_code == status, f"{resp.status_code} {resp.text[:300]}"
    answer = resp.json()
    assert all(w in answer["error"] for w in words) and "\n" not in answer["error"], answer
    assert took < PROMPT_S, f"answered after {took:.1f} s"
    return answer


def _still_serving(server, store) -> None:
    assert peak_rss_mib(server.proc.pid) < PEAK_MIB, f"peak {peak_rss_mib(server.proc.pid):.0f} MiB"
    _, headers, body = _signed(store, "tless")
    resp = httpx.post(server.url, content=body, headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text


def _event(data: bytes, **attributes) -> bytes:
    """A structured CloudEvent whose data is the JSON text ``data`` (written as is: it may hold 1e400)."""
    attrs = {"specversion": "1.0", "id": f"bounds-{time.time_ns()}", "source": "/tests",
             "type": "dev.mlwf.ml-inference.partition", "datacontenttype": "application/json", **attributes}
    return json.dumps(attrs)[:-1].encode() + b', "data": ' + data + b"}"


# --------------------------------------------------------------------------- JSON
@pytest.mark.parametrize("mode, encoding", [("structured", None), ("binary", None), ("structured", "gzip"),
                                            ("binary", "deflate")])
def test_a_json_bomb_in_an_event_is_refused_before_it_is_parsed(server, store, mode, encoding):
    pad = b'{"call": {}, "pad": [' + b"{}," * ((12 << 20) // 3) + b"{}]}"  # 12 MiB: +300 MB once parsed
    if mode == "structured":
        body, headers = _event(pad), dict(STRUCTURED)
    else:
        body, headers = pad, {"ce-specversion": "1.0", "ce-id": "bomb", "ce-source": "/tests",
                              "ce-type": "dev.mlwf.ml-inference.partition", "content-type": "application/json"}
    if encoding:
        body, headers = compress(body, encoding), {**headers, "content-encoding": encoding}
    answer = _refused(server, body, headers, 413, "the JSON of this event", "--max-memory")
    assert answer["retryable"] is False
    _still_serving(server, store)


# --------------------------------------------------------------------------- compressed layers
def test_a_compressed_event_is_read_and_counted_while_it_inflates(server, store):
    _, headers, body = _signed(store, "tless")
    resp = httpx.post(server.url, content=gzip.compress(body), headers={**headers, "content-encoding": "gzip"},
                      timeout=30)
    assert resp.status_code == 200, resp.text
    for encoding in ("gzip", "deflate"):
        answer = _refused(server, zeros_bomb(60 << 20, encoding), {**STRUCTURED, "content-encoding": encoding}, 413,
                          f"the {encoding} request body, inflated", "32 MiB", "--max-memory")
        assert answer["retryable"] is False
    _refused(server, b"{}", {**STRUCTURED, "content-encoding": "br"}, 415, "Content-Encoding 'br'")
    _refused(server, zeros_bomb(1 << 20)[:-100], {**STRUCTURED, "content-encoding": "gzip"}, 400, "truncated")
    _still_serving(server, store)


# --------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("index", [b"1e400", b"-1e400", b"1" + b"0" * 100, b"-1", b'"3"', b"true", b"2.5"])
def test_a_call_index_that_is_not_a_small_whole_number_is_a_400(server, store, index):
    ctx = {"run_id": "r", "workflow": "ml-inference", "store_url": store, "bucket": "tless",
           "outputs_prefix": "ml-inference/outputs/r"}
    data = (b'{"call": {"workflow": "ml-inference", "stage": "partition", "index": ' + index
            + b', "args": {}}, "context": ' + json.dumps(ctx).encode() + b"}")
    _refused(server, _event(data), STRUCTURED, 400, "call.index must be a whole number 0..2147483647")


def test_malformed_call_arguments_are_a_400(server, store):
    ctx = {"run_id": "r", "workflow": "ml-inference", "store_url": store, "bucket": "tless",
           "outputs_prefix": "ml-inference/outputs/r"}
    for args in (b"[]", b'"x"', b'{"a": {"__ref__": 5}}'):
        data = (b'{"call": {"workflow": "ml-inference", "stage": "partition", "index": 0, "args": ' + args
                + b'}, "context": ' + json.dumps(ctx).encode() + b"}")
        _refused(server, _event(data), STRUCTURED, 400, "call")
    _still_serving(server, store)


# --------------------------------------------------------------------------- one budget, shared
def test_one_budget_is_shared_and_a_stalled_body_gives_it_back_when_dropped(server, store):
    staller = socket.create_connection(("127.0.0.1", server.port))
    staller.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/cloudevents+json\r\n"
                    b"Content-Length: 31457280\r\n\r\n" + b" " * (24 << 20))
    # 2 MiB of JSON text: with its parse and its canonical copy about 18 MiB, which fits the budget alone.
    event = _event(json.dumps({"call": {}, "pad": "x" * (2 << 20)}).encode())
    try:
        time.sleep(0.3)
        answer = _refused(server, event, STRUCTURED, 503, "other work holds the rest", "--max-memory", "retry")
        assert answer["retryable"] is True
    finally:
        staller.close()
    deadline = time.monotonic() + PROMPT_S
    while True:  # the stalled body's memory is given back once its connection is gone
        resp = httpx.post(server.url, content=event, headers=STRUCTURED, timeout=30)
        if resp.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert resp.status_code == 400 and "data must be" in resp.json()["error"], resp.text  # parsed, then judged
    _still_serving(server, store)


# --------------------------------------------------------------------------- slow clients
def test_slow_clients_never_lock_out_the_calls_of_others(server, store):
    head = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/cloudevents+json\r\n"
            b"Content-Length: 100000\r\n\r\n{\"specversion\"")
    statuses = []
    transport = httpx.HTTPTransport(local_address="127.0.0.2")  # another client than the tricklers'
    with Tricklers(server.port, head, 64) as tricklers, httpx.Client(transport=transport, timeout=30) as http:
        started = time.monotonic()
        while time.monotonic() - started < 2 * REQUEST_TIMEOUT + 1:  # across drops
            _, headers, body = _signed(store, "tless")
            statuses.append(http.post(server.url, content=body, headers=headers).status_code)
            assert http.get(server.url + "/readyz").status_code == 200
        opened = tricklers.opened
    assert statuses and set(statuses) == {200}, statuses
    assert opened > 64 and tricklers.answered and set(tricklers.answered) <= {408, 503}, tricklers.answered
    _still_serving(server, store)


def test_the_start_line_names_the_budget(server):
    assert "memory budget 32 MiB (--max-memory)" in server.log()
