"""``mlwf serve`` against hostile clients and replayed events, as real processes on 127.0.0.1.

Slow and incomplete connections, slow bodies, huge heads, clients that never
read, replays across two servers and across a restart (on a directory store
and on the moto S3 server), and the replay records' clean-up. The bounds are
asserted with a generous margin: they say "within seconds, not for ever".
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import threading
import time

import httpx
import pytest

from mlwf.backends.knative import events
from mlwf.engine.calls import Call, RunContext
from mlwf.backends.knative.server import REPLAY_PREFIX, REPLAY_SLOT_S, ReplayLedger
from mlwf.storage import StoreSpec
from tests.conftest import BATCH_PREFIX
from tests.s3server import FaultProxy
from tests.test_knative import SECRET, ServeProcess, _server_env

#: The request timeout the guarded servers here run with (seconds), and the slack allowed on top.
REQUEST_TIMEOUT = 2.0
SLACK = 3.0


def _signed(store_url: str, bucket: str, *, event_id: str | None = None, timestamp: str | None = None):
    """Headers and body of a signed ml-inference partition call over the digits batch, and its event."""
    run = f"hostile-{time.time_ns()}"
    ctx = RunContext(run, "ml-inference", store_url, bucket, f"ml-inference/outputs/{run}").to_json()
    call = Call("ml-inference", "partition", 0, {"prefix": BATCH_PREFIX, "num_funcs": 2}).to_json()
    event = events.call_event(call, ctx, SECRET, event_id=event_id, timestamp=timestamp)
    headers, body = events.to_http(event)
    return event, headers, body


def _open(port: int, first: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if first:
        sock.sendall(first)
    return sock


def _wait_closed(socks: list[socket.socket], within: float) -> dict[socket.socket, tuple[float, bytes]]:
    """For each socket: when the server closed it (monotonic) and what it sent first; fails after ``within`` s."""
    deadline = time.monotonic() + within
    got: dict[socket.socket, bytearray] = {s: bytearray() for s in socks}
    closed: dict[socket.socket, tuple[float, bytes]] = {}
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    while len(closed) < len(socks):
        left = deadline - time.monotonic()
        assert left > 0, f"{len(socks) - len(closed)} of {len(socks)} connections still open after {within} s"
        for key, _ in sel.select(timeout=min(left, 0.5)):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if data:
                got[s] += data
            else:
                closed[s] = (time.monotonic(), bytes(got[s]))
                sel.unregister(s)
    sel.close()
    return closed


@pytest.fixture
def local_server(store_url, tmp_path):
    """``mlwf serve`` on the digits' directory store, with a 2 s request timeout."""
    env = _server_env_local()
    proc = ServeProcess(env, tmp_path / "serve.log", "--store", store_url, "--bucket", "tless",
                        "--request-timeout", str(REQUEST_TIMEOUT)).wait_ready()
    yield proc
    assert proc.stop() == 0, proc.log()


def _server_env_local(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLWF_", "S3_", "AWS_"))}
    env["MLWF_FUNCTION_SECRET"] = SECRET
    env.update(extra)
    return env


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def _json_body(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


# --------------------------------------------------------------------------- slow clients
def test_hundreds_of_incomplete_requests_are_dropped_while_health_checks_and_calls_answer(local_server, store_url):
    url, port = local_server.url, local_server.port
    opened = time.monotonic()
    # 300 connections from one address: 100 silent, 100 stopping mid-request-line, 100 mid-headers and
    # then trickling a header byte every 0.3 s. More than the 256 one address may hold: the oldest are
    # pushed out at once (503), the rest dropped at the request timeout (408, or silently if silent).
    silent = [_open(port) for _ in range(100)]
    halves = [_open(port, b"POST / HT") for _ in range(100)]
    tricklers = [_open(port, b"POST / HTTP/1.1\r\nHost: x\r\n") for _ in range(100)]
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.3):
            for s in tricklers:
                try:
                    s.send(b"x")
                except OSError:
                    pass

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        # The server still answers health checks and signed calls, at once.
        for _ in range(3):
            assert httpx.get(url + "/healthz", timeout=5).status_code == 200
        _, headers, body = _signed(store_url, "tless")
        resp = httpx.post(url, content=body, headers=headers, timeout=10)
        assert resp.status_code == 200, resp.text
        closed = _wait_closed(silent + halves + tricklers, within=REQUEST_TIMEOUT + 3 * SLACK)
    finally:
        stop.set()
        trickler.join()
    for s, (when, raw) in closed.items():
        assert when - opened < REQUEST_TIMEOUT + SLACK, when - opened
        if raw:
            assert _status(raw) in (408, 503) and "error" in _json_body(raw), raw
    statuses = [_status(raw) for _, raw in closed.values()]
    assert statuses.count(503) >= 300 - 256 and statuses.count(408) >= 100  # pushed out, and timed out
    assert httpx.get(url + "/readyz", timeout=5).status_code == 200
    deadline = time.monotonic() + 10  # the guard logs what it closed, summed every few seconds
    while "request-timeout" not in local_server.log() or "client-limit" not in local_server.log():
        assert time.monotonic() < deadline, local_server.log()
        time.sleep(0.2)


def test_a_slow_body_a_huge_head_and_a_silent_connection_are_each_bounded(local_server, store_url):
    url, port = local_server.url, local_server.port
    # A whole head, then a body trickled a byte every 0.3 s: 408 at the request timeout.
    _, headers, body = _signed(store_url, "tless")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() != "content-length")
    slow = _open(port, f"POST / HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode())
    started = time.monotonic()
    done = threading.Event()

    def trickle():
        for b in body:
            if done.wait(0.3):
                return
            try:
                slow.send(bytes([b]))
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    huge = _open(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    silent = _open(port)
    try:
        closed = _wait_closed([slow, huge, silent], within=REQUEST_TIMEOUT + 3 * SLACK)
    finally:
        done.set()
    when, raw = closed[slow]
    assert _status(raw) == 408 and "--request-timeout" in _json_body(raw)["error"]
    assert when - started < REQUEST_TIMEOUT + SLACK
    when, raw = closed[huge]
    assert _status(raw) == 400 and "16384 bytes" in _json_body(raw)["error"] and when - started < SLACK
    when, raw = closed[silent]
    assert _status(raw) == 408 and when - started < REQUEST_TIMEOUT + SLACK
    # The slow call never ran; the server logged it as a client that went away (499).
    assert httpx.get(url + "/healthz", timeout=5).status_code == 200
    deadline = time.monotonic() + 10
    while "status=499" not in local_server.log():
        assert time.monotonic() < deadline, local_server.log()
        time.sleep(0.1)
    assert "status=200" not in local_server.log()


def test_a_client_that_never_reads_its_replies_is_cut_off(local_server):
    url, port = local_server.url, local_server.port
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast: the server's replies pile up
    sock.connect(("127.0.0.1", port))
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
    sock.settimeout(1.0)
    sent = 0
    reset = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            sock.sendall(request)
            sent += 1
        except TimeoutError:
            break  # the server stopped reading: its replies are not being read
        except (ConnectionResetError, BrokenPipeError):
            reset = True
            break
    assert sent, "the server read nothing"
    stalled = time.monotonic()
    assert httpx.get(url + "/healthz", timeout=5).status_code == 200  # others are served meanwhile
    sock.settimeout(0.2)
    # The server first answers what it has already read (thousands of requests, CPU-bound on a busy
    # machine); its deadline counts from when its replies stop moving, which the client cannot see.
    while not reset:
        assert time.monotonic() - stalled < 30, "a client that never reads is held"
        try:
            sock.send(b"x")
            time.sleep(0.2)
        except TimeoutError:
            time.sleep(0.2)
        except (ConnectionResetError, BrokenPipeError):
            reset = True
    sock.close()
    deadline = time.monotonic() + 10
    while "unread-reply" not in local_server.log():
        assert time.monotonic() < deadline, local_server.log()
        time.sleep(0.2)


# --------------------------------------------------------------------------- replays
def _two_servers(tmp_path, env, store, bucket):
    return [ServeProcess(env, tmp_path / f"{name}.log", "--store", store, "--bucket", bucket) for name in "ab"]


@pytest.mark.parametrize("kind", ["directory", "s3"])
def test_a_captured_event_runs_once_across_servers_and_restarts(kind, store_url, tmp_path, s3_server, s3_env,
                                                               digits_dir):
    from mlwf import bulk

    if kind == "directory":
        store, bucket, env = store_url, "tless", _server_env_local()
    else:
        store, bucket, env = "s3://", s3_env, _server_env(s3_server)
        spec = StoreSpec("s3://", bucket).open()
        bulk.upload_dir(spec, digits_dir / "batch", BATCH_PREFIX)
        spec.close()
    a, b = [p.wait_ready() for p in _two_servers(tmp_path, env, store, bucket)]
    try:
        event, headers, body = _signed(store, bucket)
        first = httpx.post(a.url, content=body, headers=headers, timeout=30)
        assert first.status_code == 200, first.text
        # The same bytes, captured and sent to the other replica, and again to the first.
        for server in (b, a):
            again = httpx.post(server.url, content=body, headers=headers, timeout=30)
            assert again.status_code == 403 and "already used" in again.json()["error"], again.text
        # A restarted replica has forgotten nothing: the record is in the store.
        assert b.stop() == 0
        b = ServeProcess(env, tmp_path / "b2.log", "--store", store, "--bucket", bucket).wait_ready()
        again = httpx.post(b.url, content=body, headers=headers, timeout=30)
        assert again.status_code == 403 and "recorded by a server of this store" in again.json()["error"]
        # Two replicas racing for one new event: exactly one runs it.
        event, headers, body = _signed(store, bucket)
        results = []
        threads = [threading.Thread(target=lambda s=s: results.append(
            httpx.post(s.url, content=body, headers=headers, timeout=30).status_code)) for s in (a, b, a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [200, 403, 403, 403], results
        opened = StoreSpec(store, bucket).open()
        records = [o.key for o in opened.list(REPLAY_PREFIX + "/")]
        opened.close()
        assert ReplayLedger.key(event.get_id(), event.get_extension("mlwftime")) in records and len(records) == 2
    finally:
        for server in (a, b):
            server.stop()


def test_a_server_that_cannot_record_an_event_runs_nothing(s3_server, s3_env, tmp_path):
    with FaultProxy(s3_server.endpoint, failures=10_000) as proxy:  # S3 answers 503 SlowDown to everything
        env = _server_env(s3_server, S3_PORT=str(proxy.port), MLWF_S3_TIMEOUT="1")
        server = ServeProcess(env, tmp_path / "serve.log", "--store", "s3://", "--bucket", s3_env).wait_ready()
        try:
            _, headers, body = _signed("s3://", s3_env)
            resp = httpx.post(server.url, content=body, headers=headers, timeout=30)
        finally:
            assert server.stop() == 0
    assert resp.status_code == 503 and resp.json()["retryable"] is True
    assert "replay protection" in resp.json()["error"] and "status=200" not in server.log()


@pytest.mark.parametrize("kind", ["directory", "s3"])
def test_replay_records_are_deleted_once_no_server_can_accept_their_event(kind, tmp_path, s3_env):
    spec = StoreSpec(str(tmp_path / "store"), "tless") if kind == "directory" else StoreSpec("s3://", s3_env)
    store = spec.open()
    store.create_bucket()
    now = [1_800_000_000.0]
    ledger = ReplayLedger(store, max_age=300, clock=lambda: now[0])
    signed = {f"e{i}": str(int(now[0]) - age) for i, age in enumerate((1000, 500, 420, 100, 0))}
    for event_id, stamp in signed.items():
        ledger.claim(event_id, stamp)
    store.put(f"{REPLAY_PREFIX}/not-a-record", b"kept")

    def alive() -> set[str]:
        return {o.key for o in store.list(REPLAY_PREFIX + "/")}

    deleted = ledger.clean()
    horizon = ledger.expired_through(now[0])
    for event_id, stamp in signed.items():
        age = now[0] - int(stamp)
        kept = ReplayLedger.key(event_id, stamp) in alive()
        assert kept == (int(stamp) // REPLAY_SLOT_S > horizon), (event_id, age)
        if age <= 300 + 60:  # a server whose clock is up to 60 s behind could still accept it
            assert kept, (event_id, age)
    assert ReplayLedger.key("e0", signed["e0"]) not in alive() and deleted >= 1
    assert f"{REPLAY_PREFIX}/not-a-record" in alive()
    # An hour later every record is gone; a cleaned store stays cleaned (nothing listed again).
    now[0] += 3600
    ledger.clean()
    assert alive() == {f"{REPLAY_PREFIX}/not-a-record"}
    assert ledger.clean() == 0
    store.close()


# --------------------------------------------------------------------------- settings
@pytest.mark.parametrize("flags, message", [
    (["--request-timeout", "inf"], "--request-timeout must be a positive number of seconds"),
    (["--request-timeout", "nan"], "--request-timeout must be a positive number of seconds"),
    (["--request-timeout", "-1"], "--request-timeout must be a positive number of seconds"),
    (["--max-connections", "0"], "--max-connections must be between 1 and 1000000"),
    (["--max-client-connections", "0"], "--max-client-connections must be between 1 and --max-connections"),
    (["--max-client-connections", "9999"], "--max-client-connections must be between 1 and --max-connections"),
    (["--workers", "1000000"], "--workers must be 0 (threads) to 1024 processes"),
    (["--threads", "99999"], "--threads must be at most 1024"),
    (["--max-body", "10GB"], "--max-body '10GB' is too large"),
    (["--max-memory", "lots"], "--max-memory 'lots' is not a size"),
    (["--max-memory", "1MiB"], "--max-memory '1MiB' is out of range"),
    (["--max-age", "0"], "--max-age must be between 1 and 86400 seconds"),
    (["--grace", "inf"], "--grace must be 0 or more seconds"),
    (["--store", "ftp://x"], "unknown store scheme 'ftp'"),
    (["--store", "s3://user:pass@host:9000"], "do not put credentials in the store URL"),
    (["--bucket", "../x"], "refused bucket name '../x'"),
])
def test_bad_serve_settings_are_one_line_and_nothing_starts(flags, message, capsys, monkeypatch, in_process_serve):
    from mlwf.cli import main

    monkeypatch.setenv("MLWF_FUNCTION_SECRET", SECRET)
    assert main(["serve", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlwf: error: ") and message in err and err.count("\n") == 1, err
    assert "pass@" not in err


def test_a_bad_memory_budget_in_the_environment_is_one_line(capsys, monkeypatch, in_process_serve):
    from mlwf.cli import main

    monkeypatch.setenv("MLWF_FUNCTION_SECRET", SECRET)
    monkeypatch.setenv("MLWF_MAX_MEMORY", "lots")
    assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlwf: error: MLWF_MAX_MEMORY 'lots' is not a size") and err.count("\n") == 1, err
    # The flag wins over the variable.
    monkeypatch.setenv("MLWF_MAX_MEMORY", "64MiB")
    assert main(["serve", "--port", "0", "--max-memory", "2MiB"]) == 2
    assert "--max-memory '2MiB' is out of range" in capsys.readouterr().err
