"""S3-only behaviour: time bounds, retries, credentials kept secret, configuration, fork."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import pickle
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import uuid

import pytest

from mlwf.errors import NotFoundError, StoreError
from mlwf.storage import open_store
from mlwf.settings import Settings
from mlwf.storage.s3 import S3Store, S3Timeouts
from tests.s3server import FaultProxy, free_port

SECRET_USER = "AKIAMLWFDISTINCTIVE42"
SECRET_PASSWORD = "s3cr3t-Mlwf-Distinctive-Passw0rd-987"
MARGIN = 2.0  # seconds on top of a bound: scheduling slack, not a benchmark


def everything_printed(exc: BaseException) -> str:
    """All text an exception can show: message, repr, full traceback with causes."""
    return "\n".join([str(exc), repr(exc), "".join(traceback.format_exception(exc))])


def assert_no_secrets(text: str) -> None:
    for secret in (SECRET_USER, SECRET_PASSWORD, SECRET_PASSWORD[:12], SECRET_USER[4:]):
        assert secret not in text


@pytest.fixture
def fake_credentials(monkeypatch):
    monkeypatch.setenv("S3_USER", SECRET_USER)
    monkeypatch.setenv("S3_PASSWORD", SECRET_PASSWORD)


@pytest.fixture
def closed_port() -> int:
    return free_port()  # nothing listens there


@pytest.fixture
def silent_port():
    """A port that accepts connections (kernel backlog) but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def auth_enabled(s3_server):
    """moto checks signatures and IAM permissions while this is active."""
    s3_server.set_auth(True)
    try:
        yield s3_server
    finally:
        s3_server.set_auth(False)


def timed(call):
    start = time.monotonic()
    try:
        call()
    except StoreError as e:
        return time.monotonic() - start, e
    raise AssertionError("expected a StoreError")


# -- bounds ------------------------------------------------------------------------
def test_timeout_bounds_add_up(monkeypatch):
    t = S3Timeouts.from_total(15)
    assert t.connect + t.max_backoff + t.retry == pytest.approx(15)
    assert t.retry > 5 and t.connect <= 5
    monkeypatch.setenv("MLWF_S3_TIMEOUT", "4")
    assert S3Timeouts.from_settings(Settings.resolve()).total == 4
    for bad in ("abc", "0", "-1", "inf", "nan", "1e9"):
        monkeypatch.setenv("MLWF_S3_TIMEOUT", bad)
        with pytest.raises(StoreError, match="MLWF_S3_TIMEOUT"):
            S3Timeouts.from_settings(Settings.resolve())


def test_unreachable_endpoint_fails_within_bound(s3_env, monkeypatch, closed_port):
    bound = 2.0
    monkeypatch.setenv("MLWF_S3_TIMEOUT", str(bound))
    store = open_store(f"s3://127.0.0.1:{closed_port}", "some-bucket")
    for call in (lambda: store.get("k"), lambda: store.get_many([f"k{i}" for i in range(100)]), store.create_bucket):
        elapsed, err = timed(call)
        assert elapsed < bound + MARGIN, elapsed
        assert "cannot reach" in str(err) and f"127.0.0.1:{closed_port}" in str(err)
        assert "MLWF_S3_TIMEOUT" in str(err)


def test_silent_endpoint_fails_within_bound(s3_env, monkeypatch, silent_port):
    bound = 2.0
    monkeypatch.setenv("MLWF_S3_TIMEOUT", str(bound))
    store = open_store(f"s3://127.0.0.1:{silent_port}", "some-bucket")
    for call in (lambda: store.get("k"), lambda: store.put("k", b"v"), lambda: store.list(""), store.create_bucket):
        elapsed, err = timed(call)
        assert elapsed < bound + MARGIN, elapsed
    assert isinstance(err, StoreError) and not isinstance(err, NotFoundError)


@pytest.mark.parametrize("mode", ["trickle", "trickle-head"])
def test_an_endpoint_that_trickles_its_answers_fails_every_operation_within_the_bound(s3_server, s3_env, monkeypatch,
                                                                                     mode):
    """Headers (or not even those) and then a byte every half second: each operation still ends within
    MLWF_S3_TIMEOUT. (At 1 s, obstore's longest silence inside a response is 1 s, so the bytes come twice as
    often as that: only the operation's own bound can end it.)"""
    bound = 1.0
    assert S3Timeouts.from_total(bound).read >= 2 * 0.5
    direct = open_store("s3://", s3_env)
    direct.put_many((f"t/{i}", bytes(range(256)) * 2) for i in range(8))
    before = {o.key: o.size for o in direct.list("")}
    monkeypatch.setenv("MLWF_S3_TIMEOUT", str(bound))
    with FaultProxy(s3_server.endpoint, failures=10**9, mode=mode, interval=0.5) as proxy:
        store = open_store(f"s3://127.0.0.1:{proxy.port}", s3_env)
        operations = {
            "get": lambda: store.get("t/0"),
            "get_many": lambda: store.get_many([f"t/{i}" for i in range(8)]),
            "get_tagged": lambda: store.get_tagged("t/1"),
            "list": lambda: store.list("t/"),
            "put": lambda: store.put("u/0", b"new"),
            "put_if_absent": lambda: store.put_if_absent("u/1", b"new"),
            "put_many": lambda: store.put_many((f"u/{i}", b"new") for i in range(2, 6)),
            "exists": lambda: store.exists("t/2"),
            "delete_many": lambda: store.delete_many(["t/3", "t/4"]),
            "create_bucket": store.create_bucket,
        }
        if mode == "trickle":  # answers without a body arrive whole: only those with one are slowed
            operations = {k: v for k, v in operations.items() if k in ("get", "get_many", "get_tagged", "list")}
        for name, operation in operations.items():
            elapsed, err = timed(operation)
            assert elapsed < bound + MARGIN, (name, elapsed)
            text = str(err)
            assert "\n" not in text and "MLWF_S3_TIMEOUT" in text and f"127.0.0.1:{proxy.port}" in text, (name, text)
            assert "cannot reach (or get a complete answer from)" in text, (name, text)
        # The abandoned requests' connections are closed, not left reading in the background.
        deadline = time.monotonic() + 5
        while proxy.in_flight:
            assert time.monotonic() < deadline, f"{proxy.in_flight} requests still connected"
            time.sleep(0.1)
    # Nothing lost or half-written: the reads changed nothing; writes and deletes that reached the server
    # before its answer stalled took effect whole.
    after = {o.key: o.size for o in direct.list("")}
    if mode == "trickle":
        assert after == before
    else:
        assert set(before) - set(after) <= {"t/3", "t/4"}
    for key, size in after.items():
        assert key.startswith(("t/", "u/")) and size == (512 if key.startswith("t/") else 3)


def test_large_objects_get_time_in_proportion_to_their_size(s3_env, monkeypatch):
    """The bound is MLWF_S3_TIMEOUT plus a second per MiB: 6 MiB with a 1 s timeout goes through."""
    monkeypatch.setenv("MLWF_S3_TIMEOUT", "1")
    store = open_store("s3://", s3_env)
    data = bytes(range(256)) * (6 * 4096)
    store.put("big/object", data)
    assert store.get("big/object") == data and store.get_many(["big/object", "big/object"]) == [data, data]
    assert S3Timeouts.from_total(1).bound(len(data)) == 7.0


# -- retries -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["503", "drop"])
def test_throttling_and_dropped_connections_are_retried(s3_server, s3_env, monkeypatch, mode):
    with FaultProxy(s3_server.endpoint, failures=4, mode=mode) as proxy:
        store = open_store(f"s3://127.0.0.1:{proxy.port}", s3_env)
        store.put("r/one", b"1")
        assert store.get("r/one") == b"1"
        proxy.faults = 0  # misbehave again, in the middle of bulk calls
        keys = [f"r/{i}" for i in range(40)]
        store.put_many((k, k.encode()) for k in keys)
        assert store.get_many(keys) == [k.encode() for k in keys]
        assert [o.key for o in store.list("r/")] == sorted(keys + ["r/one"])
        assert proxy.faults == 4 and proxy.requests > 80


def test_persistent_503_fails_within_bound(s3_server, s3_env, monkeypatch):
    bound = 2.0
    monkeypatch.setenv("MLWF_S3_TIMEOUT", str(bound))
    with FaultProxy(s3_server.endpoint, failures=10**9, mode="503") as proxy:
        store = open_store(f"s3://127.0.0.1:{proxy.port}", s3_env)
        elapsed, err = timed(lambda: store.get("k"))
        assert elapsed < bound + MARGIN
        assert "503" in str(err) and "try again later" in str(err)
        assert proxy.requests > 2  # it did retry


def test_concurrency_is_bounded(s3_server, s3_env, monkeypatch):
    keys = [f"c/{i}" for i in range(60)]
    open_store("s3://", s3_env).put_many((k, b"x" * 800) for k in keys)
    with FaultProxy(s3_server.endpoint, failures=0) as proxy:
        monkeypatch.setenv("MLWF_S3_CONCURRENCY", "3")
        store = open_store(f"s3://127.0.0.1:{proxy.port}", s3_env)
        assert store.concurrency == 3
        assert len(store.get_many(keys)) == 60
        assert 1 <= proxy.max_in_flight <= 3
        proxy.max_in_flight = 0
        monkeypatch.setenv("MLWF_S3_CONCURRENCY", "16")
        store = open_store(f"s3://127.0.0.1:{proxy.port}", s3_env)
        store.get_many(keys)
        assert 1 < proxy.max_in_flight <= 16
    for bad in ("0", "x", "-2"):
        monkeypatch.setenv("MLWF_S3_CONCURRENCY", bad)
        with pytest.raises(StoreError, match="MLWF_S3_CONCURRENCY"):
            open_store("s3://", s3_env)


# -- credentials ------------------------------------------------------------------------
def test_wrong_credentials_are_access_denied(s3_env, auth_enabled, fake_credentials):
    store = open_store("s3://", s3_env)
    for call in (store.list, lambda: store.get("k"), lambda: store.put("k", b"v"), store.create_bucket,
                 store.bucket_exists, lambda: store.get_many(["a", "b"])):
        with pytest.raises(StoreError) as info:
            call()
        message = str(info.value)
        assert not isinstance(info.value, NotFoundError)
        assert "access denied" in message
        assert "S3_USER/S3_PASSWORD" in message and "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in message
        assert_no_secrets(everything_printed(info.value))


def test_real_credentials_sign_every_request(s3_server, s3_env, monkeypatch):
    """moto with IAM auth on verifies SigV4 signatures, ours for create_bucket included."""
    iam = s3_server.boto3_client(service="iam")
    user = f"u{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.delenv("S3_USER")
    monkeypatch.delenv("S3_PASSWORD")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    s3_server.set_auth(True)
    try:
        store = open_store("s3://", f"signed-{uuid.uuid4().hex[:8]}")
        store.create_bucket()
        store.put_many([("ü x/1", b"1"), ("ü x/2", b"2")])
        assert store.get_many(["ü x/1", "ü x/2"]) == [b"1", b"2"]
        assert [o.key for o in store.list("ü")] == ["ü x/1", "ü x/2"]
        assert store.delete_many(["ü x/1", "ü x/2"]) == 2
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong" + key["SecretAccessKey"][5:])
        wrong = open_store("s3://", store.bucket)
        for call in (wrong.list, wrong.create_bucket):
            with pytest.raises(StoreError, match="access denied"):
                call()
    finally:
        s3_server.set_auth(False)


def test_credentials_never_printed(s3_server, s3_env, monkeypatch, fake_credentials, closed_port):
    monkeypatch.setenv("MLWF_S3_TIMEOUT", "1")
    errors: list[BaseException] = []

    def provoke(call):
        try:
            call()
        except StoreError as e:
            errors.append(e)
        else:
            raise AssertionError("expected a StoreError")

    store = open_store("s3://", s3_env)
    assert_no_secrets(repr(store) + store.location + repr(vars(store)) + str(vars(store)))
    assert_no_secrets(pickle.dumps(store).decode("latin-1"))
    store.list()  # the obstore client exists now; its visible config holds no keys either
    assert_no_secrets(repr(store._client()) + repr(store._client().config))
    provoke(lambda: store.get("missing"))
    provoke(lambda: open_store("s3://", "no-such-bucket-here").list())
    provoke(lambda: store.put("../x", b""))
    provoke(lambda: open_store(f"s3://127.0.0.1:{closed_port}", s3_env).get("k"))
    provoke(lambda: open_store(f"s3://127.0.0.1:{closed_port}", s3_env).create_bucket())
    with FaultProxy(s3_server.endpoint, failures=10**9) as proxy:
        provoke(lambda: open_store(f"s3://127.0.0.1:{proxy.port}", s3_env).get_many(["a", "b"]))
    s3_server.set_auth(True)
    try:
        provoke(store.list)
        provoke(store.create_bucket)
        provoke(lambda: store.get_many(["a", "b"]))
    finally:
        s3_server.set_auth(False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{SECRET_USER}:{SECRET_PASSWORD}@127.0.0.1:{closed_port}")
    monkeypatch.delenv("S3_HOST")
    leaky = open_store("s3://", s3_env)
    assert_no_secrets(repr(leaky) + leaky.location)
    provoke(lambda: leaky.get("k"))
    assert len(errors) == 10
    for err in errors:
        assert_no_secrets(everything_printed(err))


# -- configuration ------------------------------------------------------------------------
def test_from_url_and_environment(monkeypatch):
    for name in ("S3_HOST", "S3_PORT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "S3_USER", "S3_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    aws = S3Store.from_url("s3://", "tless")
    assert aws.location == "s3://aws" and aws.endpoint is None and aws.region == "us-east-1"
    assert S3Store.from_url("s3://minio.local:9000", "tless").location == "s3://minio.local:9000"
    monkeypatch.setenv("S3_HOST", "10.0.0.5")
    monkeypatch.setenv("S3_PORT", "9100")
    assert S3Store.from_url("s3://", "tless").endpoint == "http://10.0.0.5:9100"
    assert S3Store.from_url("s3://127.0.0.1:9", "tless").endpoint == "http://127.0.0.1:9"  # URL wins
    monkeypatch.setenv("S3_HOST", "https://minio.example.org")
    https = S3Store.from_url("s3://", "tless")
    assert https.endpoint == "https://minio.example.org" and https.location == "s3+https://minio.example.org"
    monkeypatch.delenv("S3_HOST")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://ceph:7480/")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    ceph = S3Store.from_url("s3://", "tless")
    assert ceph.endpoint == "http://ceph:7480" and ceph.region == "eu-west-3"
    for bad in ("s3://tless", "s3://host:9000/path", "s3://user:pw@host:9000", "s3://host:port"):
        with pytest.raises(StoreError) as info:
            S3Store.from_url(bad, "tless")
        assert "pw" not in str(info.value)
    for bad_bucket in ("", "A", "Up", "a/b", "../x", "x" * 64):
        with pytest.raises(StoreError, match="bucket"):
            S3Store.from_url("s3://", bad_bucket)
    monkeypatch.setenv("S3_USER", "only-user")
    with pytest.raises(StoreError, match="S3_PASSWORD"):
        S3Store.from_url("s3://", "tless")


# -- threads, loops, processes ---------------------------------------------------------------
def test_usable_from_threads_and_inside_running_loop(s3_env):
    store = open_store("s3://", s3_env)
    keys = [f"t/{i}" for i in range(50)]
    store.put_many((k, k.encode()) for k in keys)
    results, errors = [], []

    def work():
        try:
            results.append(store.get_many(keys))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 6 and all(r == [k.encode() for k in keys] for r in results)

    async def inside_a_loop():
        return store.get_many(keys[:3]), store.list("t/1")

    got, listed = asyncio.run(inside_a_loop())
    assert got == [b"t/0", b"t/1", b"t/2"]
    assert [o.key for o in listed][:2] == ["t/1", "t/10"]
    before = threading.active_count()
    for _ in range(20):
        store.get_many(keys[:4])
    assert threading.active_count() <= before  # no thread per call


def _child_reads(store, keys, queue):
    try:
        queue.put(store.get_many(keys))
    except BaseException as e:  # noqa: BLE001
        queue.put(e)


def test_spawned_workers_reopen_from_environment(s3_env):
    """A pickled store carries no credentials; the child reads them from its environment.

    (Not forkserver here: a forkserver started earlier in this session has the
    environment of that moment. FORK_SCRIPT covers forkserver in a fresh process.)
    """
    store = open_store("s3://", s3_env)
    store.put_many([("w/1", b"1"), ("w/2", b"2")])
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_reads, args=(store, ["w/1", "w/2"], queue))
    proc.start()
    try:
        assert queue.get(timeout=30) == [b"1", b"2"]
    finally:
        proc.join(10)


FORK_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, sys
    from mlwf.storage import open_store

    def child(store, queue):
        try:
            queue.put(("ok", store.get("f/1")))
        except Exception as e:
            queue.put((type(e).__name__, str(e)))

    def run(store, method="fork"):
        ctx = multiprocessing.get_context(method)
        queue = ctx.Queue()
        proc = ctx.Process(target=child, args=(store, queue))
        proc.start()
        result = queue.get(timeout=20)
        proc.join(10)
        return result

    if __name__ == "__main__":
        store = open_store("s3://", sys.argv[1])
        print(run(store), flush=True)      # forked before any S3 request: works
        store.put("f/2", b"2")
        print(run(store), flush=True)      # forked after: a clear error, not a hang
        print(run(store, "forkserver"), flush=True)  # forkserver: works
    """
)


def test_fork_before_use_works_and_after_use_fails_fast(s3_env, tmp_path):
    open_store("s3://", s3_env).put("f/1", b"1")
    script = tmp_path / "fork_script.py"
    script.write_text(FORK_SCRIPT)
    out = subprocess.run([sys.executable, str(script), s3_env], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    first, second, third = out.stdout.strip().splitlines()
    assert first == "('ok', b'1')"
    assert second.startswith("('StoreError'") and "forkserver" in second
    assert third == "('ok', b'1')"
