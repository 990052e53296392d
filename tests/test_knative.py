"""The Knative backend and ``mlwf serve``: function servers as separate processes on 127.0.0.1.

Every server here is ``python -m mlwf.cli serve`` in its own process, with its
store credentials pointing at the moto S3 server (tests/s3server.py) and a
test secret; the tests talk to them with the CloudEvents SDK and httpx, or run
whole workflows through ``Engine(backend="knative")``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from mlwf import bulk, codec
from mlwf.backends.knative import events
from mlwf.engine.calls import Call, Ref, RunContext
from mlwf.engine.driver import Engine
from mlwf.errors import DataError, StageError, UsageError
from mlwf.backends.knative.server import REPLAY_PREFIX, ReplayLedger
from mlwf.storage import StoreSpec
from tests.conftest import BATCH_PREFIX, FAST, TRAIN_PREFIX
from tests.s3server import S3_ENV_VARS, FaultProxy, free_port
from tests.serverprocess import ServerProcess

SECRET = "mlwf-test-secret-5f1c0c2a9d8e4b7a"
REPO = Path(__file__).resolve().parent.parent


class ServeProcess(ServerProcess):
    """``mlwf serve`` on a free 127.0.0.1 port, in its own process, logging to a file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str, port: int | None = None):
        port = port or free_port()
        super().__init__([sys.executable, "-m", "mlwf.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                          *args], env, log, port, ready_path="/readyz", name="mlwf serve")


def _server_env(s3_server, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in S3_ENV_VARS and not k.startswith("MLWF_")}
    env.update(s3_server.env())
    env["MLWF_FUNCTION_SECRET"] = SECRET
    env.update(extra)
    return env


def _point_at(monkeypatch, s3_server) -> None:
    """``s3://`` in this process means the test S3 server."""
    for name in S3_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)


def digits_bucket(s3_server, digits_dir, prefix: str) -> str:
    """A new bucket of the test S3 server holding the digits (training set and batch); its name."""
    bucket = f"{prefix}-{uuid.uuid4().hex[:8]}"
    s3_server.boto3_client().create_bucket(Bucket=bucket)
    with pytest.MonkeyPatch.context() as mp:
        _point_at(mp, s3_server)
        store = StoreSpec("s3://", bucket).open()
        bulk.upload_dir(store, digits_dir / "train", TRAIN_PREFIX)
        bulk.upload_dir(store, digits_dir / "batch", BATCH_PREFIX)
        store.close()
    return bucket


@pytest.fixture(scope="module")
def served_bucket(s3_server, digits_dir):
    """The bucket the module's services serve, holding the digits (training set and batch)."""
    return digits_bucket(s3_server, digits_dir, "knative")


@pytest.fixture(scope="module")
def server(s3_server, served_bucket, tmp_path_factory):
    """One service for every stage."""
    proc = ServeProcess(_server_env(s3_server), tmp_path_factory.mktemp("serve") / "all.log",
                        "--store", "s3://", "--bucket", served_bucket).wait_ready()
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def server_b(s3_server, served_bucket, tmp_path_factory):
    """A second service, for training's train and validation only, running calls in 2 worker processes;
    in every run its train[1] fails once and its validation[0] twice."""
    proc = ServeProcess(_server_env(s3_server, MLWF_FAULTS="train:1:raise:1;validation:0:raise:2"),
                        tmp_path_factory.mktemp("serve") / "b.log",
                        "--stages", "ml-training/train,ml-training/score,ml-training/validation", "--workers", "2",
                        "--store", "s3://", "--bucket", served_bucket).wait_ready()
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture
def secret(monkeypatch):
    monkeypatch.setenv("MLWF_FUNCTION_SECRET", SECRET)
    return SECRET


@pytest.fixture
def s3_data(served_bucket, s3_server, monkeypatch, secret):
    """The served bucket, with ``s3://`` in this process pointing at the test S3 server."""
    _point_at(monkeypatch, s3_server)
    return served_bucket


def _keys(s3_server, bucket, *, records: bool = False) -> set[str]:
    """Every key in ``bucket``: the data and run outputs, or (``records``) the servers' replay records."""
    client = s3_server.boto3_client()
    keys = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])}
    return {k for k in keys if k.startswith(REPLAY_PREFIX + "/") == records}


# --------------------------------------------------------------------------- whole workflows
def test_both_workflows_through_knative_match_the_local_backend(server, s3_data, s3_server, local_reference):
    with Engine("s3://", s3_data, backend="knative", backend_options={"endpoints": [server.url]}) as engine:
        trained = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    # Inference in structured content mode, training in binary mode.
    with Engine("s3://", s3_data, backend="knative",
                backend_options={"endpoints": [server.url], "structured": True}) as engine:
        inferred = engine.run_inference("ml-inference/model", BATCH_PREFIX, 4)
    local_trained, local_inferred = local_reference.trained, local_reference.inferred

    assert trained["backend"] == inferred["backend"] == "knative"
    assert trained["model_digest"] == local_trained["model_digest"]
    # The dashboard (mlwf ui) shows a Knative driver's run as any other: one bar per call from its trace.
    from mlwf.ui.views import run_detail

    shown = run_detail(StoreSpec("s3://", s3_data).open(), trained["run_id"])
    assert shown["backend"] == "knative" and shown["trace"] is True
    assert len(shown["calls"]) == sum(s["calls"] for s in trained["stages"].values())
    assert inferred["accuracy"] == local_inferred["accuracy"] and inferred["num_predicted"] == 120
    assert inferred["model_digest"] == trained["model_digest"]
    keys = _keys(s3_server, s3_data)
    run = trained["run_id"]
    assert {f"ml-training/outputs/{run}/run.json", f"ml-training/outputs/{run}/validation/0-0.bin",
            "ml-inference/model/MODEL.json", inferred["results_key"]} <= keys
    assert sum(k.startswith(f"ml-training/outputs/{run}/train/") for k in keys) >= 4
    log = server.log()
    assert "type=dev.mlwf.ml-training.pca status=200" in log and "type=dev.mlwf.ml-inference.predict status=200" in log
    assert SECRET not in log and s3_server.password not in log


def test_two_services_with_per_stage_endpoints(server, server_b, s3_data):
    with Engine("s3://", s3_data, backend="knative", backend_options={"endpoints": [server.url]}) as engine:
        single = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    endpoints = [f"ml-training/partition={server.url}", f"pca={server.url}",
                 f"train={server_b.url}", f"score={server_b.url}", f"ml-training/validation={server_b.url}"]
    with Engine("s3://", s3_data, backend="knative", retries=2,
                backend_options={"endpoints": endpoints}) as engine:
        split = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    assert split["model_digest"] == single["model_digest"]
    b_log = server_b.log()
    # train[1] failed once on service B (a retryable 500) and the driver tried it there again.
    assert "type=dev.mlwf.ml-training.train status=500" in b_log
    assert b_log.count("type=dev.mlwf.ml-training.train status=200") == 4
    assert b_log.count("type=dev.mlwf.ml-training.validation status=500") == 2
    assert "ml-training.pca" not in b_log and "ml-training.partition" not in b_log

    # With fewer retries than failures, the call fails naming the stage, index, service and last error,
    # after exactly 1 + retries POSTs.
    before = server_b.log().count("type=dev.mlwf.ml-training.validation status=500")
    with Engine("s3://", s3_data, backend="knative", retries=1,
                backend_options={"endpoints": endpoints}) as engine, pytest.raises(StageError) as info:
        engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    text = str(info.value)
    assert text.startswith(f"ml-training stage validation[0] failed on {server_b.url}: ")
    assert "InjectedFault: injected fault in validation[0]" in text and "\n" not in text
    assert server_b.log().count("type=dev.mlwf.ml-training.validation status=500") == before + 2


def test_bad_input_reads_the_same_as_on_the_local_backend(server, s3_data, store_url, capsys):
    from mlwf.cli import main

    with Engine("s3://", s3_data, backend="knative", backend_options={"endpoints": [server.url]}) as engine, \
            pytest.raises(DataError) as remote:
        engine.run_training("ml-training/no-such-images", 2, 4, config=FAST)
    with Engine(store_url, "tless") as local, pytest.raises(DataError) as here:
        local.run_training("ml-training/no-such-images", 2, 4, config=FAST)
    assert str(remote.value) == str(here.value) and "\n" not in str(remote.value)
    # The same through the command line: one line on stderr, status 2.
    code = main(["run", "ml-training", "ml-training/no-such-images", "2", "4", "--store", "s3://", "--bucket", s3_data,
                 "--backend", "knative", "--endpoint", f"ml-training/partition={server.url}",
                 "--endpoint", f"ml-training={server.url}", "--json"])
    captured = capsys.readouterr()
    assert code == 2 and captured.err == f"mlwf: error: {here.value}\n" and captured.out == ""


def test_endpoint_settings_are_checked_in_one_line(secret, s3_data, monkeypatch, tmp_path):
    cases = [
        ({"endpoints": ["ml-training/pcaa=http://127.0.0.1:1"]}, "s3://", "unknown stage 'ml-training/pcaa'"),
        ({"endpoints": ["nope=http://127.0.0.1:1"]}, "s3://", "unknown stage 'nope'"),
        ({"endpoints": ["ftp://example.org"]}, "s3://", "is not an http(s):// URL"),
        ({"endpoints": []}, "s3://", "needs --endpoint"),
        ({"endpoints": ["partition=http://127.0.0.1:1"]}, "s3://", "no --endpoint for ml-training stage(s) pca"),
        ({"endpoints": ["http://functions.example.org"]}, str(tmp_path / "store"), "needs a store its services share"),
    ]
    StoreSpec(str(tmp_path / "store"), s3_data).open().create_bucket()
    for options, store, message in cases:
        with pytest.raises(UsageError) as info:
            with Engine(store, s3_data, backend="knative", backend_options=options) as engine:
                engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
        assert message in str(info.value) and "\n" not in str(info.value), (options, str(info.value))
    monkeypatch.delenv("MLWF_FUNCTION_SECRET")
    with pytest.raises(UsageError, match="MLWF_FUNCTION_SECRET"):
        Engine("s3://", s3_data, backend="knative", backend_options={"endpoints": ["http://127.0.0.1:1"]})


@pytest.mark.parametrize("retries", [0, 2])
def test_a_service_that_always_answers_503_gets_exactly_one_post_per_attempt(secret, store_url, retries):
    """One retry policy: the driver's. A call is POSTed 1 + --retries times in all, never more."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    posts = []

    class Unavailable(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            posts.append(self.headers.get("ce-type"))
            body = json.dumps({"error": "overloaded", "retryable": True}).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    service = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{service.server_address[1]}"
    try:
        with Engine(store_url, "tless", backend="knative", retries=retries,
                    backend_options={"endpoints": [url]}) as engine, pytest.raises(StageError) as info:
            engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    finally:
        service.shutdown()
        service.server_close()
    assert posts == ["dev.mlwf.ml-training.partition"] * (1 + retries)
    assert f"partition[0] failed on {url}: it answered 503: overloaded" in str(info.value)


def test_an_endpoint_that_does_not_answer_fails_clearly_within_bounds(server, s3_data):
    refused = f"http://127.0.0.1:{free_port()}"
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # accepts connections (in the kernel) and never answers
    silent = f"http://127.0.0.1:{hole.getsockname()[1]}"
    # A service whose answers come a byte every half second: after the head, or head included.
    # Every read gets a byte in time, so only a bound on the whole exchange stops it.
    trickling = [FaultProxy(server.url, failures=10**6, mode=mode, interval=0.5).start()
                 for mode in ("trickle", "trickle-head")]
    try:
        cases = [(refused, "cannot reach"), (silent, "no answer from")]
        cases += [(proxy.endpoint, "no answer from") for proxy in trickling]
        for url, message in cases:
            options = {"endpoints": [url], "timeout": 1.0}
            t = time.monotonic()
            with Engine("s3://", s3_data, backend="knative", retries=1, backend_options=options) as engine, \
                    pytest.raises(StageError) as info:
                engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
            text = str(info.value)
            assert "partition[0]" in text and url in text and message in text, text
            assert time.monotonic() - t < 2 * (1.0 + 0.05) + 3, (url, time.monotonic() - t)
        assert all(proxy.requests == 2 for proxy in trickling)  # both attempts reached the service
    finally:
        hole.close()
        for proxy in trickling:
            proxy.stop()


def test_an_event_id_the_service_has_seen_is_retried_as_a_new_event_not_fatal(server, s3_data, monkeypatch):
    """A proxy that resends an event makes the service refuse it as a replay: the driver tries again."""
    from mlwf.backends.knative import events as wire

    ids = iter(["resent-event-id"] * 2 + [wire.uuid.uuid4().hex for _ in range(100)])
    monkeypatch.setattr(wire, "new_event_id", lambda: next(ids))
    options = {"endpoints": [server.url]}
    with Engine("s3://", s3_data, backend="knative", retries=1, backend_options=options) as engine:
        report = engine.run_training(TRAIN_PREFIX, 2, 2, config=FAST, publish=False)
    assert report["backend"] == "knative" and report["stages"]["pca"]["calls"] == 2
    log = server.log()
    assert "event=resent-event-id type=dev.mlwf.ml-training.partition status=200" in log
    assert "event=resent-event-id type=dev.mlwf.ml-training.pca status=403" in log  # then a new id ran


def test_a_run_on_another_store_than_the_services_stops_at_once_naming_both(server, s3_data, s3_server, store_url,
                                                                            capsys):
    from mlwf.cli import main

    other = f"other-{uuid.uuid4().hex[:8]}"
    s3_server.boto3_client().create_bucket(Bucket=other)
    for store, bucket in (("s3://", other), (store_url, "tless")):
        t = time.monotonic()
        with Engine(store, bucket, backend="knative", backend_options={"endpoints": [server.url]}) as engine, \
                pytest.raises(UsageError) as info:
            engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
        text = str(info.value)
        named = store if store == "s3://" else os.path.realpath(store)
        assert f"{server.url} serves store s3:// bucket {s3_data!r}, but this run uses {named} bucket {bucket!r}" \
            in text and f"--store s3:// --bucket {s3_data}" in text and "\n" not in text, text
        assert time.monotonic() - t < 10  # refused, not retried
    # Nothing ran: the other bucket holds only the failed run's own record.
    assert all(k.startswith("ml-training/outputs/") and k.endswith("/run.json") for k in _keys(s3_server, other))
    # From the command line: one line on stderr, status 2.
    code = main(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", "s3://", "--bucket", other,
                 "--backend", "knative", "--endpoint", server.url, "--image-size", "16"])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.startswith("mlwf: error: ml-training stage partition[0]: ")
    assert captured.err.count("\n") == 1 and "serves store s3://" in captured.err


# --------------------------------------------------------------------------- refusals
def _call(stage="partition", workflow="ml-inference", args=None, bucket="", **kw) -> tuple[dict, dict]:
    """A call's and its context's JSON (default: ml-inference partition of the digits batch)."""
    args = args if args is not None else (kw or {"prefix": BATCH_PREFIX, "num_funcs": 2})
    run = f"refusal-{time.time_ns()}"
    ctx = RunContext(run, workflow, "s3://", bucket, f"{workflow}/outputs/{run}")
    return Call(workflow, stage, 0, args).to_json(), ctx.to_json()


def _send(url, call, ctx, *, secret=SECRET, structured=False, event_id=None, timestamp=None, tamper=None):
    event = events.call_event(call, ctx, secret, event_id=event_id, timestamp=timestamp)
    if tamper is not None:
        data = json.loads(json.dumps(event.get_data()))
        tamper(data)
        event = events.make_event(dict(event.get_attributes()), data)
    headers, body = events.to_http(event, structured=structured)
    return event, httpx.post(url, content=body, headers=headers, timeout=30)


def test_every_refusal_runs_nothing_and_the_server_stays_up(server, server_b, s3_data, s3_server):
    url = server.url

    def call(**kw):
        return _call(bucket=s3_data, **kw)

    before, records_before = _keys(s3_server, s3_data), _keys(s3_server, s3_data, records=True)
    refusals = []
    # 400: not a CloudEvent (a binary event without ce-source; structured JSON that does not parse; no call)
    good_call, good_ctx = call()
    headers, body = events.to_http(events.call_event(good_call, good_ctx, SECRET))
    del headers["ce-source"]
    refusals.append((httpx.post(url, content=body, headers=headers), 400))
    refusals.append((httpx.post(url, content=b'{"specversion": "1.0", "id": ',
                                headers={"content-type": "application/cloudevents+json"}), 400))
    refusals.append((httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/cloudevents+json"}),
                     400))
    bad = events.make_event({"type": "dev.mlwf.ml-inference.partition", "source": "/t", "id": "x1",
                             "datacontenttype": "application/json"}, {"hello": "world"})
    refusals.append((httpx.post(url, content=events.to_http(bad)[1], headers=events.to_http(bad)[0]), 400))
    # 404: unknown stage, unknown workflow, a stage service B does not serve (all correctly signed)
    refusals.append((_send(url, *call(stage="nope"))[1], 404))
    c, x = call(workflow="ml-nothing")
    refusals.append((_send(url, c, x)[1], 404))
    refusals.append((_send(server_b.url, *call(stage="pca", workflow="ml-training"))[1], 404))
    # 413: over 1 MiB, announced by Content-Length and streamed without one
    big = b"x" * (2 << 20)
    refusals.append((httpx.post(url, content=big, headers={"content-type": "application/cloudevents+json"}), 413))
    refusals.append((httpx.post(url, content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                                headers={"content-type": "application/cloudevents+json"}), 413))
    # 401: unsigned, signed with another secret, altered after signing
    refusals.append((_send(url, *call(), secret=None)[1], 401))
    refusals.append((_send(url, *call(), secret="another-secret-0123456789")[1], 401))
    refusals.append((_send(url, *call(), tamper=lambda d: d["call"]["args"].update(num_funcs=3))[1], 401))
    # 403: signed too long ago, or too far in the future
    refusals.append((_send(url, *call(), timestamp=str(int(time.time()) - 1000))[1], 403))
    refusals.append((_send(url, *call(), timestamp=str(int(time.time()) + 1000))[1], 403))
    # 403: signed, but naming a store or bucket other than the one the server serves: another bucket,
    # another endpoint (where the server would sign requests with its credentials), a directory.
    elsewhere = []
    for store_url, bucket in (("s3://", "another-bucket"), ("s3://attacker.example.com:80", s3_data),
                              ("s3://127.0.0.1:1", s3_data), ("/tmp", s3_data), ("file:///", s3_data)):
        c, x = call()
        elsewhere.append(_send(url, c, {**x, "store_url": store_url, "bucket": bucket})[1])
    for resp in elsewhere:
        assert resp.status_code == 403 and resp.json()["store"] == "s3://" and resp.json()["bucket"] == s3_data
        assert "acts only on store s3:// bucket" in resp.json()["error"], resp.text
    refusals += [(resp, 403) for resp in elsewhere]
    # 400: signed, but writing outside its run's folder, or asking for inline outputs
    for change in ({"outputs_prefix": "ml-inference/model"}, {"outputs_prefix": "ml-inference/outputs/x/../../model"},
                   {"run_id": "../model", "outputs_prefix": "ml-inference/outputs/../model"}, {"run_id": ""},
                   {"transfer": "direct"}):
        c, x = call()
        refusals.append((_send(url, c, {**x, **change})[1], 400))
    for resp, status in refusals:
        assert resp.status_code == status, (status, resp.text)
        assert isinstance(resp.json()["error"], str) and resp.json()["error"]
    assert _keys(s3_server, s3_data) == before  # nothing ran
    assert _keys(s3_server, s3_data, records=True) == records_before  # and nothing was recorded as run

    # A good call runs (binary in, binary out), and its replay is refused without running again.
    event, resp = _send(url, good_call, good_ctx)
    assert resp.status_code == 200, resp.text
    reply = events.from_http(resp.headers, resp.content)
    assert reply.get_type() == "dev.mlwf.ml-inference.partition.done" and reply.get_id() == event.get_id() + ".done"
    outputs = reply.get_data()["outputs"]["assignments"]
    assert len(outputs) == 2 and all(o["key"].startswith(good_ctx["outputs_prefix"]) for o in outputs)
    after_good = _keys(s3_server, s3_data)
    assert {o["key"] for o in outputs} == after_good - before
    assert _keys(s3_server, s3_data, records=True) - records_before == {
        ReplayLedger.key(event.get_id(), event.get_extension("mlwftime"))}
    _, replay = _send(url, good_call, good_ctx, event_id=event.get_id(), timestamp=event.get_extension("mlwftime"))
    assert replay.status_code == 403 and "already used" in replay.json()["error"]
    assert replay.json()["retryable"] is True  # as a new event, that is (the driver sends one per attempt)

    # Structured in, structured out.
    event, resp = _send(url, *call(), structured=True)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/cloudevents+json")
    assert events.from_http(resp.headers, resp.content).get_id() == event.get_id() + ".done"
    after_structured = _keys(s3_server, s3_data)

    # 500: the stage raised. Bad input is not retryable; a crash is.
    _, resp = _send(url, *call(args={"prefix": "ml-inference/nothing-here", "num_funcs": 2}))
    assert resp.status_code == 500 and resp.json()["retryable"] is False and resp.json()["type"] == "DataError"
    c, x = call(stage="train", workflow="ml-training", data={"features": "not numbers", "labels": [1]},
                num_classes=2, n_trees=2, max_depth=2, min_samples_split=2, seed=0, index=0, projection=0)
    _, resp = _send(url, c, x)
    assert resp.status_code == 500 and resp.json()["retryable"] is True, resp.text
    assert "train[0]" in resp.json()["error"]
    assert _keys(s3_server, s3_data) == after_structured

    assert httpx.get(url + "/readyz").status_code == 200 and httpx.get(url + "/healthz").status_code == 200
    log = server.log()
    assert "status=401" in log and "status=413" in log and SECRET not in log


# --------------------------------------------------------------------------- process lifecycle
def test_sigterm_lets_the_call_in_flight_finish_then_exits_cleanly(s3_server, s3_data, tmp_path):
    proc = ServeProcess(_server_env(s3_server), tmp_path / "serve.log", "--threads", "2",
                        "--store", "s3://", "--bucket", s3_data).wait_ready()
    rng = np.random.default_rng(0)
    data = codec.encode({"features": rng.normal(size=(4000, 10)), "labels": rng.integers(0, 10, 4000).astype(np.int32)})
    ref = Ref(sha256=codec.digest(data), nbytes=len(data), data=data, producer="test")
    call, ctx = _call(stage="train", workflow="ml-training", bucket=s3_data, data=ref, num_classes=10, n_trees=60,
                      max_depth=12, min_samples_split=5, seed=0, index=0, projection=0)
    result = {}
    sender = threading.Thread(target=lambda: result.update(resp=_send(proc.url, call, ctx)[1]))
    sender.start()
    deadline = time.monotonic() + 20
    while httpx.get(proc.url + "/readyz").json().get("in_flight") != 1:
        assert time.monotonic() < deadline, proc.log()
        time.sleep(0.02)
    proc.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(httpx.TransportError):  # no new connections once draining
        httpx.get(proc.url + "/healthz", timeout=1)
    sender.join(30)
    assert result["resp"].status_code == 200, result["resp"].text
    assert proc.proc.wait(30) == 0
    proc.stop()
    log = proc.log()
    assert "received SIGTERM" in log and "type=dev.mlwf.ml-training.train status=200" in log
    assert "stopped cleanly" in log


def test_the_server_refuses_to_start_without_a_secret_unless_told_to_be_insecure(s3_server, s3_data, tmp_path):
    for secret, message in (("", "MLWF_FUNCTION_SECRET"), ("short", "too short"),
                            (events.PLACEHOLDER_SECRET, "placeholder")):
        env = _server_env(s3_server, MLWF_FUNCTION_SECRET=secret)
        out = subprocess.run([sys.executable, "-m", "mlwf.cli", "serve", "--port", str(free_port())], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    env = _server_env(s3_server)
    del env["MLWF_FUNCTION_SECRET"]
    proc = ServeProcess(env, tmp_path / "insecure.log", "--insecure-no-auth", "--store", "s3://",
                        "--bucket", s3_data).wait_ready()
    try:
        call, ctx = _call(args={"prefix": "ml-inference/nothing", "num_funcs": 1}, bucket=s3_data)
        _, resp = _send(proc.url, call, ctx, secret=None)
        assert resp.status_code == 500 and resp.json()["type"] == "DataError"  # ran, unsigned
    finally:
        assert proc.stop() == 0
    assert "AUTHENTICATION DISABLED" in proc.log()


# --------------------------------------------------------------------------- deployment
def test_deploy_renders_manifests_a_cluster_can_use(tmp_path, capsys):
    from mlwf.cli import main

    base = ["deploy", "knative", "--image", "registry.example.com/mlwf:0.1.0", "--namespace", "mlwf",
            "--s3-host", "minio.tless.svc.cluster.local", "--s3-port", "9000", "--bucket", "tless"]
    assert main([*base, "--out", str(tmp_path / "per-stage"), "--json"]) == 0
    assert main([*base, "--single", "--out", str(tmp_path / "single"), "--json"]) == 0
    capsys.readouterr()

    def services(folder):
        docs = list(yaml.safe_load_all((folder / "20-services.yaml").read_text()))
        assert all(d["apiVersion"] == "serving.knative.dev/v1" and d["kind"] == "Service" for d in docs)
        return docs

    per_stage, single = services(tmp_path / "per-stage"), services(tmp_path / "single")
    assert len(per_stage) == 8 and len(single) == 1
    served = {d["spec"]["template"]["spec"]["containers"][0]["args"][2] for d in per_stage}
    assert served == {"ml-training/partition", "ml-training/pca", "ml-training/train", "ml-training/score",
                      "ml-training/validation",
                      "ml-inference/partition", "ml-inference/load", "ml-inference/predict"}
    assert single[0]["spec"]["template"]["spec"]["containers"][0]["args"][:3] == ["serve", "--stages", "all"]
    for svc in per_stage + single:
        assert svc["metadata"]["namespace"] == "mlwf"
        template = svc["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert int(annotations["autoscaling.knative.dev/min-scale"]) == 0
        assert int(annotations["autoscaling.knative.dev/max-scale"]) >= 1
        spec = template["spec"]
        assert isinstance(spec["containerConcurrency"], int) and spec["containerConcurrency"] >= 1
        [container] = spec["containers"]
        assert container["image"] == "registry.example.com/mlwf:0.1.0"
        assert container["args"][-1] == str(spec["containerConcurrency"])  # --threads matches
        assert container["args"][3:7] == ["--store", "s3://", "--bucket", "tless"]  # serves that bucket only
        env = {e["name"]: e for e in container["env"]}
        assert "PORT" not in env  # Knative reserves PORT and sets it itself
        for name, key in (("MLWF_FUNCTION_SECRET", "function-secret"), ("S3_USER", "s3-user"),
                          ("S3_PASSWORD", "s3-password")):
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "mlwf-secrets", "key": key}
            assert "value" not in env[name]
        assert env["S3_HOST"]["value"] == "minio.tless.svc.cluster.local" and env["S3_PORT"]["value"] == "9000"
        assert [p["containerPort"] for p in container["ports"]] == [8080]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["securityContext"]["runAsNonRoot"] is True
    cpu_bound = {d["metadata"]["labels"]["mlwf.dev/stage"]: d["spec"]["template"]["spec"]["containerConcurrency"]
                 for d in per_stage if d["metadata"]["labels"]["mlwf.dev/workflow"] == "ml-training"}
    assert cpu_bound["pca"] == cpu_bound["train"] == 1

    [ns] = yaml.safe_load_all((tmp_path / "per-stage/00-namespace.yaml").read_text())
    assert ns["kind"] == "Namespace" and ns["metadata"]["name"] == "mlwf"
    [secret] = yaml.safe_load_all((tmp_path / "per-stage/templates/secret.yaml").read_text())
    assert secret["kind"] == "Secret" and set(secret["stringData"]) == {"function-secret", "s3-user", "s3-password"}
    [job] = yaml.safe_load_all((tmp_path / "per-stage/run/ml-training.yaml").read_text())
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert job["kind"] == "Job" and args[:2] == ["run", "ml-training"] and args.count("--endpoint") == 5
    assert "http://mlwf-training-pca.mlwf.svc.cluster.local" in (tmp_path / "per-stage/endpoints.txt").read_text()

    # The committed manifests are exactly what the command renders.
    committed = REPO / "deploy" / "knative"
    for name in ("00-namespace.yaml", "20-services.yaml", "templates/secret.yaml", "run/ml-training.yaml",
                 "run/ml-inference.yaml", "endpoints.txt"):
        assert (committed / name).read_text() == (tmp_path / "per-stage" / name).read_text(), name
    assert main([*base[:2], "--image", "x", "--namespace", "Bad_NS", "--s3-host", "h", "--s3-port", "1"]) == 2


def test_dockerfile_runs_serve_as_a_non_root_user_with_only_the_server_extras():
    text = (REPO / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text and 'CMD ["mlwf", "serve", "--host", "0.0.0.0"]' in text and "ENV PORT=8080" in text
    assert '".[knative,serve]"' in text and "[test]" not in text and "onnx" not in text.split("FROM")[1]
    user = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
