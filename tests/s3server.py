"""A real S3 endpoint for tests: moto's server mode in a separate process.

Fixtures (load with ``pytest_plugins = ["tests.s3server"]``):

* ``s3_server`` (session): a running :class:`MotoServer`, with ``endpoint``,
  ``user``, ``password`` and ``env()``;
* ``s3_env`` (function): sets ``S3_HOST``/``S3_PORT``/``S3_USER``/
  ``S3_PASSWORD``/``AWS_REGION`` (and clears other AWS variables), creates a
  fresh bucket with boto3 and yields its name.

Helpers: :class:`MotoServer` (``start``/``stop``/``restart``/``set_auth``),
:class:`FaultProxy` (an HTTP proxy answering 503, dropping the connection or
trickling its answers a byte at a time for the first requests) and
:func:`free_port`.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.httpsink import QuietHandler

__all__ = ["FaultProxy", "MotoServer", "free_port", "stop_process", "s3_env", "s3_server", "S3_ENV_VARS"]

#: Variables that could point a store elsewhere; ``s3_env`` clears them.
S3_ENV_VARS = (
    "S3_HOST",
    "S3_PORT",
    "S3_USER",
    "S3_PASSWORD",
    "S3_BUCKET",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "MLWF_S3_TIMEOUT",
    "MLWF_S3_CONCURRENCY",
)


def stop_process(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """Terminate a helper server process, killing it if it does not exit within ``grace`` seconds."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1, started and stopped by us."""

    host = "127.0.0.1"
    user = "mlwf-test-user"
    password = "mlwf-test-password"
    region = "us-east-1"

    def __init__(self, port: int | None = None, *, start_timeout: float = 30.0):
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "S3_HOST": self.host,
            "S3_PORT": str(self.port),
            "S3_USER": self.user,
            "S3_PASSWORD": self.password,
            "AWS_REGION": self.region,
        }

    def start(self) -> MotoServer:
        env = {k: v for k, v in os.environ.items() if k not in S3_ENV_VARS}
        env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self.proc.returncode} on port {self.port}")
            if self._answers():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not answer on {self.endpoint} within {self.start_timeout} s")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=1)
            conn.request("GET", "/moto-api/")
            conn.getresponse().read()
            conn.close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc)

    def restart(self) -> MotoServer:
        """Stop and start again on the same port (all data is lost)."""
        self.stop()
        return self.start()

    def reset(self) -> None:
        """Drop every bucket and object."""
        self._post("/moto-api/reset", b"")

    def set_auth(self, enabled: bool) -> None:
        """Turn moto's IAM authentication (signature and permission checks) on or off."""
        self._post("/moto-api/reset-auth", b"0" if enabled else b"inf")

    def _post(self, path: str, body: bytes) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request("POST", path, body=body)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"moto {path} answered {resp.status}")
        finally:
            conn.close()

    def boto3_client(self, **kwargs):
        import boto3
        from botocore.config import Config

        return boto3.client(
            kwargs.pop("service", "s3"),
            endpoint_url=self.endpoint,
            aws_access_key_id=kwargs.pop("user", self.user),
            aws_secret_access_key=kwargs.pop("password", self.password),
            region_name=self.region,
            config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=30, **kwargs),
        )

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _ProxyServer(http.server.ThreadingHTTPServer):
    # The default backlog of 5 drops connections when two workers open 64 each at once:
    # that would test this proxy, not the client.
    request_queue_size = 1024


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that misbehaves first.

    ``mode="503"`` answers the first ``failures`` requests with 503 SlowDown;
    ``mode="drop"`` closes the connection without answering them;
    ``mode="trickle"`` forwards them but sends the upstream's answer back one
    byte every ``interval`` seconds after its head (``"trickle-head"``: the
    head too). Later requests are forwarded. With ``pass_first=N`` the first N
    requests are forwarded before the faults start (a server that goes down
    mid-run). ``requests`` counts every request seen, ``max_in_flight`` the
    most handled at once.
    """

    MODES = ("503", "drop", "trickle", "trickle-head")

    def __init__(self, upstream: str, *, failures: int = 3, mode: str = "503", pass_first: int = 0,
                 interval: float = 1.0):
        if mode not in self.MODES:
            raise ValueError(mode)
        self.interval = interval
        host, port = upstream.split("://", 1)[1].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.failures = failures
        self.pass_first = pass_first
        self.mode = mode
        self.requests = 0
        self.faults = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = _ProxyServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _should_fail(self) -> bool:
        with self._lock:
            self.requests += 1
            if self.requests > self.pass_first and self.faults < self.failures:
                self.faults += 1
                return True
            return False

    def _handler(self):
        proxy = self

        class Handler(QuietHandler):
            def _any(self) -> None:
                with proxy._lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    self._serve()
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fail = proxy._should_fail()
                if fail and proxy.mode.startswith("trickle"):
                    self._forward(body, trickle=True)
                    return
                if fail:
                    if proxy.mode == "drop":
                        self.close_connection = True
                        with contextlib.suppress(OSError):
                            self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    payload = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message></Error>"
                    )
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self._forward(body)

            def _forward(self, body: bytes, trickle: bool = False) -> None:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                skip = ("connection", "keep-alive", "transfer-encoding", "content-length", "server", "date")
                head = [f"HTTP/1.1 {resp.status} {resp.reason}"]
                head += [f"{k}: {v}" for k, v in resp.getheaders() if k.lower() not in skip]
                head += [f"Content-Length: {len(data)}", "", ""]
                raw = "\r\n".join(head).encode("latin-1")
                payload = data if self.command != "HEAD" else b""
                if not trickle:
                    self.wfile.write(raw + payload)
                    return
                self.close_connection = True
                slow = raw + payload if proxy.mode == "trickle-head" else payload
                if proxy.mode == "trickle":
                    self.wfile.write(raw)
                    self.wfile.flush()
                for i in range(len(slow)):  # until the client gives up (the write then fails)
                    time.sleep(proxy.interval)
                    try:
                        self.wfile.write(slow[i:i + 1])
                        self.wfile.flush()
                    except OSError:
                        return

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler


_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server for the whole test session."""
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point ``s3://`` stores at ``s3_server`` and create a fresh bucket; yields its name."""
    for name in S3_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{next(_bucket_ids)}-{uuid.uuid4().hex[:8]}"
    s3_server.boto3_client().create_bucket(Bucket=bucket)
    yield bucket
