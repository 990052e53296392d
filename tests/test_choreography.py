"""Choreography: workflows run by their stages' events alone, on real ``mlwf serve`` processes.

Every server here is ``python -m mlwf.cli serve --sink ...`` in its own
process on 127.0.0.1, acting on a bucket of the moto S3 server
(tests/s3server.py); no driver process runs. Servers are wired to each other
directly (``--sink STAGE=URL``), through test proxies that can duplicate and
reorder every delivery.
"""

from __future__ import annotations

import http.server
import json
import random
import signal
import threading
import time

import httpx
import pytest

from mlwf import workflows
from mlwf.backends.knative import events
from mlwf.cli import main
from mlwf.engine.driver import Engine
from mlwf.errors import DataError, StageError
from mlwf.storage import StoreSpec
from tests.conftest import BATCH_PREFIX, FAST, TRAIN_PREFIX
from tests.httpsink import QuietHandler
from tests.s3server import free_port
from tests.test_knative import SECRET, ServeProcess, _point_at, _server_env, digits_bucket

#: FAST as command-line flags.
FAST_FLAGS = ["--image-size", "16", "--components", "6", "--trees", "12", "--max-depth", "8"]
TRAINING_A = "ml-training/partition,ml-training/pca,ml-inference/partition,ml-inference/load"
TRAINING_B = "ml-training/train,ml-training/score,ml-training/validation,ml-inference/predict"


class DeliveryProxy:
    """An HTTP proxy in front of one server; with ``duplicate`` on, it misdelivers as an at-least-once channel may.

    Each request is forwarded after a random pause (so deliveries overtake each
    other), and a second copy of it is sent after another random pause; the
    first answer goes back. ``duplicates`` counts the copies sent.
    """

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.duplicate = False
        self.duplicates = 0
        self.requests = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.body()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                with proxy._lock:
                    proxy.requests += 1
                    copy = proxy.duplicate
                    if copy:
                        proxy.duplicates += 1
                if copy:
                    threading.Thread(target=proxy._forward, args=(self.path, headers, body, 0.05), daemon=True).start()
                resp = proxy._forward(self.path, headers, body, 0.05 if copy else 0.0)
                self.send_response(resp.status_code)
                for name in ("content-type",):
                    if name in resp.headers:
                        self.send_header(name, resp.headers[name])
                self.send_header("content-length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _forward(self, path: str, headers: dict, body: bytes, jitter: float):
        time.sleep(random.uniform(0, jitter))
        try:
            return httpx.post(self.upstream + path, content=body, headers=headers, timeout=300)
        except httpx.HTTPError:
            return httpx.Response(502, json={"error": "upstream gone"})

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Recorder:
    """An HTTP endpoint that keeps every CloudEvent POSTed to it (a dead-letter sink)."""

    def __init__(self):
        self.events = []
        recorder = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.0"  # one request per connection, as before

            def do_POST(self) -> None:  # noqa: N802
                body = self.body()
                recorder.events.append(events.from_http(dict(self.headers.items()), body))
                self.send_response(202)
                self.send_header("content-length", "0")
                self.end_headers()

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _sinks(a: str, b: str) -> list[str]:
    """Stage events for A's stages go to ``a``, for B's to ``b``."""
    out = []
    for item in TRAINING_A.split(","):
        out += ["--sink", f"{item}={a}"]
    for item in TRAINING_B.split(","):
        out += ["--sink", f"{item}={b}"]
    return out


@pytest.fixture(scope="module")
def bucket(s3_server, digits_dir):
    return digits_bucket(s3_server, digits_dir, "choreo")


@pytest.fixture(scope="module")
def reference(local_reference):
    """What the local backend makes of the same work (the session's run): the model digest and the inference
    accuracy."""
    return local_reference.trained, local_reference.inferred


class Pair:
    def __init__(self, a: ServeProcess, b: ServeProcess, proxies: list[DeliveryProxy]):
        self.a, self.b, self.proxies = a, b, proxies

    def logs(self) -> str:
        return self.a.log() + self.b.log()


@pytest.fixture(scope="module")
def pair(s3_server, bucket, tmp_path_factory):
    """Server A (partition, pca, load) and server B (train, score, validation, predict), each behind a delivery
    proxy."""
    folder = tmp_path_factory.mktemp("choreo")
    port_a, port_b = free_port(), free_port()
    proxy_a, proxy_b = DeliveryProxy(f"http://127.0.0.1:{port_a}"), DeliveryProxy(f"http://127.0.0.1:{port_b}")
    common = ["--store", "s3://", "--bucket", bucket, *_sinks(proxy_a.url, proxy_b.url)]
    a = ServeProcess(_server_env(s3_server), folder / "a.log", "--stages", TRAINING_A, *common, port=port_a)
    b = ServeProcess(_server_env(s3_server), folder / "b.log", "--stages", TRAINING_B, "--workers", "2", *common,
                     port=port_b)
    a.wait_ready(), b.wait_ready()
    yield Pair(a, b, [proxy_a, proxy_b])
    for proxy in (proxy_a, proxy_b):
        proxy.stop()
    assert a.stop() == 0, a.log()
    assert b.stop() == 0, b.log()


@pytest.fixture
def s3_env(bucket, s3_server, monkeypatch):
    """``s3://`` in this process is the test S3 server; the function secret is set."""
    _point_at(monkeypatch, s3_server)
    monkeypatch.setenv("MLWF_FUNCTION_SECRET", SECRET)
    return bucket


def _invoke(capsys, endpoint: str, bucket: str, workflow: str, *args: str, wait: bool = True) -> tuple[int, str, str]:
    argv = ["invoke", workflow, *args, "--endpoint", endpoint, "--store", "s3://", "--bucket", bucket, "--json"]
    code = main(argv + (["--wait"] if wait else []))
    out = capsys.readouterr()
    return code, out.out, out.err


def _train(capsys, endpoint, bucket, *extra, wait: bool = True):
    return _invoke(capsys, endpoint, bucket, "ml-training", TRAIN_PREFIX, "2", "4", *FAST_FLAGS, *extra, wait=wait)


def test_invoke_wait_on_a_narrow_terminal_prints_the_whole_report(pair, s3_server, s3_env, tmp_path):
    """What a person sees: the report as `mlwf run` prints it, every value whole, no progress bar inside."""
    from tests.terminal import Screen, run_in_terminal
    from tests.test_terminal import MLWF, _assert_report_whole, _run_record

    env = {**_server_env(s3_server), "HOME": str(tmp_path)}
    screen = run_in_terminal([MLWF, "invoke", "ml-training", TRAIN_PREFIX, "2", "4", *FAST_FLAGS, "--endpoint",
                              pair.a.url, "--store", "s3://", "--bucket", s3_env, "--wait"], columns=60, env=env)
    assert screen.returncode == 0, screen.text
    started = screen.index(lambda line: line.startswith("started ml-training run "))
    run_id = screen.logical_line(started).split()[3].rstrip(";")
    report = _run_record(StoreSpec("s3://", s3_env).open(), "ml-training", run_id)["report"]
    # The report follows the line saying the run started (which names the run too).
    below = Screen(screen.returncode, screen.columns, screen.lines[started + 1:],
                   wrapped=screen.wrapped[started + 1:])
    _assert_report_whole(below, report, ["backend", "images", "training / validation", "classes", "functions",
                                          "validation accuracy", "end to end", "stages", "state transfer"],
                         {"model": "ml-inference/model", "model sha256": report["model_digest"]})


def _infer(capsys, endpoint, bucket):
    return _invoke(capsys, endpoint, bucket, "ml-inference", "ml-inference/model", BATCH_PREFIX, "4")


# --------------------------------------------------------------------------- whole workflows
def test_both_workflows_run_by_their_events_alone_and_match_the_local_backend(pair, s3_env, reference, capsys):
    local_trained, local_inferred = reference
    code, out, err = _train(capsys, pair.a.url, s3_env)
    assert code == 0, err
    trained = json.loads(out)
    assert trained["model_digest"] == local_trained["model_digest"] and trained["choreography"] is True
    assert trained["validation_accuracy"] == local_trained["validation_accuracy"]
    assert set(trained["stages"]) == {"partition", "pca", "train", "score", "validation"}
    code, out, err = _infer(capsys, pair.a.url, s3_env)
    assert code == 0, err
    inferred = json.loads(out)
    assert inferred["model_digest"] == local_trained["model_digest"]
    assert inferred["accuracy"] == local_inferred["accuracy"] and inferred["num_predicted"] == 120

    # The stages ran where they were sent, each once; A never ran a train call, B never a pca call.
    a_log, b_log = pair.a.log(), pair.b.log()
    run = trained["run_id"]
    assert a_log.count(f"run={run} call=ml-training/pca[") == 2 and "call=ml-training/train" not in a_log
    assert b_log.count(f"run={run} call=ml-training/train[") == 4 and "call=ml-training/pca" not in b_log
    assert b_log.count(f"run={run} call=ml-training/validation[0] ran") == 1
    assert SECRET not in a_log + b_log

    # mlwf runs show reads a choreographed run as any other.
    assert main(["runs", "show", run, "--store", "s3://", "--bucket", s3_env, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "succeeded" and shown["report"]["model_digest"] == trained["model_digest"]
    assert shown["progress"] == {"partition": "1/1", "pca": "2/2", "train": "4/4", "score": "2/2",
                                 "validation": "1/1"}
    # The dashboard (mlwf ui) draws it with no driver's trace: one bar per call, from its servers' records.
    from mlwf.ui.views import run_detail

    detail = run_detail(StoreSpec("s3://", s3_env).open(), run)
    assert detail["mode"] == "choreography" and detail["trace"] is False and detail["status"] == "succeeded"
    assert sorted(c["name"] for c in detail["calls"]) == sorted(
        f"{stage}[{i}]" for stage, n in {"partition": 1, "pca": 2, "train": 4, "score": 2, "validation": 1}.items()
        for i in range(n))

    # Without --wait, invoke prints the run id as soon as the run has started.
    code, out, err = _invoke(capsys, pair.a.url, s3_env, "ml-inference", "ml-inference/model", BATCH_PREFIX, "3",
                             wait=False)
    started = json.loads(out)
    assert code == 0 and started["status"] == "started"
    store = StoreSpec("s3://", s3_env).open()
    from mlwf.choreography.invoke import wait

    report = wait(store, "ml-inference", started["run_id"], timeout=60)
    assert report["num_funcs"] == 3 and report["accuracy"] == local_inferred["accuracy"]

    # mlwf runs gc takes a finished choreographed run's claims and batch markers with its intermediates.
    folder = f"ml-training/outputs/{run}/"
    assert {f"{folder}choreography/claims/train-3.json", f"{folder}choreography/claims/finish.json",
            f"{folder}choreography/batches/validation.json"} <= {o.key for o in store.list(folder)}
    from mlwf.runs import gc_runs

    assert run in gc_runs(store, keep=0)["runs"]
    assert [o.key for o in store.list(folder)] == [folder + "run.json"]
    store.close()


def test_heavy_state_runs_by_events_too_with_the_same_model_and_accuracy(pair, s3_env, reference, capsys):
    """--state heavy changes only the calls' arguments, so the choreography replays it as it is."""
    local_trained, local_inferred = reference
    code, out, err = _train(capsys, pair.a.url, s3_env, "--state", "heavy")
    assert code == 0, err
    trained = json.loads(out)
    assert trained["state"] == "heavy" and trained["model_digest"] == local_trained["model_digest"]
    assert any(e["from"] == "store" and e["to"] == "partition" for e in trained["edges"])
    code, out, err = _invoke(capsys, pair.a.url, s3_env, "ml-inference", "ml-inference/model", BATCH_PREFIX, "4",
                             "--state", "heavy")
    assert code == 0, err
    inferred = json.loads(out)
    assert inferred["state"] == "heavy" and inferred["accuracy"] == local_inferred["accuracy"]


def test_duplicated_and_reordered_deliveries_validate_once_and_make_the_same_model(pair, s3_env, reference, capsys):
    for proxy in pair.proxies:
        proxy.duplicate = True
    try:
        # The start event goes through the proxy too: the run is started twice, once.
        code, out, err = _train(capsys, pair.proxies[0].url, s3_env)
        assert code == 0, err
        trained = json.loads(out)
        code, out, err = _infer(capsys, pair.proxies[0].url, s3_env)
        assert code == 0, err
        inferred = json.loads(out)
    finally:
        for proxy in pair.proxies:
            proxy.duplicate = False
    assert trained["model_digest"] == reference[0]["model_digest"]
    assert inferred["accuracy"] == reference[1]["accuracy"] and inferred["num_predicted"] == 120
    assert all(proxy.duplicates >= 3 for proxy in pair.proxies)
    logs = pair.logs()
    run = trained["run_id"]
    assert logs.count(f"run={run} call=ml-training/validation[0] ran") == 1
    for i in range(4):
        assert logs.count(f"run={run} call=ml-training/train[{i}] ran") == 1
    assert f"run={run} call=ml-training/" in logs and "skipped" in logs  # duplicates arrived, and were skipped
    assert logs.count(f"run {run} succeeded") == 1
    for i in range(4):
        assert logs.count(f"run={inferred['run_id']} call=ml-inference/predict[{i}] ran") == 1
    # One publication of this run's model, not two.
    store = StoreSpec("s3://", s3_env).open()
    manifest = json.loads(store.get("ml-inference/model/MODEL.json"))
    store.close()
    assert manifest["run_id"] == run and manifest["sha256"] == trained["model_digest"]


def _kill_once_written(store, key: str, server: ServeProcess, settle: float = 0.0) -> None:
    """Kill ``server`` (SIGKILL) as soon as ``key`` is in ``store`` (and ``settle`` seconds more)."""
    deadline = time.monotonic() + 60
    while not store.exists(key):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    time.sleep(settle)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    server.stop()


def test_a_server_killed_mid_run_and_restarted_lets_the_run_finish(s3_server, s3_env, reference, capsys, tmp_path):
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    common = ["--store", "s3://", "--bucket", s3_env, "--claim-lease", "2", *_sinks(url_a, url_b)]
    a = ServeProcess(_server_env(s3_server), tmp_path / "a.log", "--stages", TRAINING_A, *common, port=port_a)
    # B's train[1] hangs the first time, in every run: B is killed while it runs.
    b_env = _server_env(s3_server, MLWF_FAULTS="train:1:hang:1")
    b = ServeProcess(b_env, tmp_path / "b.log", "--stages", TRAINING_B, *common, port=port_b)
    a.wait_ready(), b.wait_ready()
    try:
        code, out, err = _train(capsys, url_a, s3_env, "--no-publish", wait=False)
        assert code == 0, err
        run = json.loads(out)["run_id"]
        store = StoreSpec("s3://", s3_env).open()
        _kill_once_written(store, f"ml-training/outputs/{run}/choreography/claims/train-1.json", b, settle=0.3)
        b = ServeProcess(b_env, tmp_path / "b.log", "--stages", TRAINING_B, *common, port=port_b).wait_ready()
        from mlwf.choreography.invoke import wait

        report = wait(store, "ml-training", run, timeout=120)
        store.close()
        assert report["model_digest"] == reference[0]["model_digest"]
        assert b.log().count(f"run={run} call=ml-training/train[1] ran") == 1  # by the restarted server
    finally:
        a.stop(), b.stop()


def test_events_lost_with_a_killed_server_are_sent_again_when_it_starts(s3_server, s3_env, reference, capsys,
                                                                        tmp_path):
    """The train events wait in A's memory (their sink does not answer) when A is killed: once nothing has kept
    the run alive for its lease (four claim leases), the restarted A takes it up and sends them."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    nowhere = f"http://127.0.0.1:{free_port()}"
    common = ["--store", "s3://", "--bucket", s3_env, "--stages", "ml-training", "--claim-lease", "1"]
    first = ServeProcess(_server_env(s3_server), tmp_path / "a.log", *common, "--sink", url, "--sink", f"train={nowhere}",
                         "--delivery-retries", "100", port=port).wait_ready()
    try:
        code, out, err = _train(capsys, url, s3_env, "--no-publish", wait=False)
        assert code == 0, err
        run = json.loads(out)["run_id"]
        store = StoreSpec("s3://", s3_env).open()
        _kill_once_written(store, f"ml-training/outputs/{run}/choreography/batches/train.json", first)
    finally:
        first.stop()
    second = ServeProcess(_server_env(s3_server), tmp_path / "a.log", *common, "--sink", url, port=port).wait_ready()
    try:
        from mlwf.choreography.invoke import wait

        report = wait(store, "ml-training", run, timeout=120)
        store.close()
        assert report["model_digest"] == reference[0]["model_digest"]
        assert "found 1 running choreographed runs" in second.log() and f"run {run}: resuming it" in second.log()
    finally:
        second.stop()


def test_a_stage_that_always_fails_ends_the_run_failed_with_its_reason(s3_server, s3_env, capsys, tmp_path):
    recorder = Recorder()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = ServeProcess(_server_env(s3_server, MLWF_FAULTS="validation:0:raise:1000"), tmp_path / "g.log",
                          "--store", "s3://", "--bucket", s3_env, "--sink", url, "--retries", "1",
                          "--delivery-retries", "1", "--dead-letter", recorder.url, port=port).wait_ready()
    try:
        code, out, err = _train(capsys, url, s3_env, "--no-publish")
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith("mlwf: error: run ") and " failed at validation[0]: " in err
        assert "validation[0] failed: gave up after 2 deliveries: " in err and "InjectedFault: injected fault in validation[0]" in err
        run = err.split()[3]
        assert main(["runs", "show", run, "--store", "s3://", "--bucket", s3_env, "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["status"] == "failed" and "InjectedFault" in shown["error"]
        [dead] = recorder.events
        assert dead.get_type() == "dev.mlwf.ml-training.validation" and dead.get_extension("knativeerrorcode") == "500"
        assert dead.get_extension("knativeerrordest") == url
        # Four attempts in all: two deliveries, each tried twice by the server.
        assert server.log().count(f"run={run} call=ml-training/validation[0] failed") == 2

        # A bad-input failure ends the run at once, without redeliveries: a model validated on too few images.
        code, out, err = _train(capsys, url, s3_env, "--holdout", "0.01")
        assert code == 2 and "refusing to publish a model validated on too few images" in err, err
        # The dead letter mlwf sent is signed whole: taken, though its run had ended already; once only.
        headers, body = events.to_http(dead)
        resp = httpx.post(url + "/dead-letter", content=body, headers=headers)
        assert resp.status_code == 200 and resp.json()["status"] == "ended", resp.text
        resp = httpx.post(url + "/dead-letter", content=body, headers=headers)
        assert resp.status_code == 403 and "already used" in resp.json()["error"]
        # A start the Broker could not deliver (the service refused its parameters, 400): behind a Broker
        # mlwf invoke saw a 202, so Knative's dead letter has the run recorded failed and --wait says why,
        # in the words of the service that refused it (noted in the store), not of the dead letter.
        import base64

        from mlwf.choreography.invoke import start_event, wait
        from mlwf.engine.layout import new_run_id

        run = new_run_id()
        start = start_event("ml-training", run, {"args": [TRAIN_PREFIX, 4, 2], "options": {}},
                            StoreSpec("s3://", s3_env), SECRET)
        headers, body = events.to_http(start)
        assert httpx.post(url, content=body, headers=headers).status_code == 400  # what the Broker was told
        attrs = {**start.get_attributes(), "knativeerrorcode": "400", "knativeerrordest": "http://partition",
                 "knativeerrordata": base64.b64encode(b"text Knative (or anyone) wrote").decode()}
        headers, body = events.to_http(events.make_event(attrs, start.get_data()))
        assert httpx.post(url + "/dead-letter", content=body, headers=headers).status_code == 200
        store = StoreSpec("s3://", s3_env).open()
        with pytest.raises(StageError) as info:
            wait(store, "ml-training", run, timeout=10)
        store.close()
        assert str(info.value) == f"run {run} failed at start: ml-training start: refused: NUM_TRAIN (2) must be " \
                                  "at least NUM_PCA (4): each PCA function feeds at least one training function"
    finally:
        server.stop()
        recorder.stop()


# --------------------------------------------------------------------------- refusals
def test_bad_settings_and_bad_input_end_in_one_line(pair, s3_env, capsys, store_url, in_process_serve):
    cases = [
        (["serve", "--sink", "ftp://x"], "--sink 'ftp://x': 'ftp://x' is not an http(s):// URL"),
        (["serve", "--sink", "nope=http://127.0.0.1:1"], "--sink 'nope=http://127.0.0.1:1': unknown stage 'nope'"),
        (["serve", "--sink", ""], "--sink is empty"),
        (["serve", "--dead-letter", "http://127.0.0.1:1"], "--dead-letter needs a sink"),
        (["serve", "--sink", "http://127.0.0.1:1", "--claim-lease", "inf"], "--claim-lease must be"),
        (["serve", "--delivery-retries", "3"], "--delivery-retries is for choreography"),
        (["serve", "--sink", "http://127.0.0.1:1", "--sink-connections", "0"], "--sink-connections must be 1 to 1024"),
        (["serve", "--run-deadline", "600"], "--run-deadline is for choreography"),
        (["invoke", "ml-training", TRAIN_PREFIX, "2", "4"], "needs --endpoint URL"),
        (["invoke", "ml-training", TRAIN_PREFIX, "2", "4", "--endpoint", " "], "needs --endpoint URL"),
        (["invoke", "ml-training", TRAIN_PREFIX, "2", "4", "--endpoint", "http://[::1"], "is not an http(s):// URL"),
        (["invoke", "ml-training", TRAIN_PREFIX, "2", "4", "--endpoint", f"http://127.0.0.1:{free_port()}"],
         "cannot start ml-training at http://127.0.0.1:"),
        (["runs", "show", "20261128T000000.000000Z-000000", "--store", "s3://", "--bucket", s3_env],
         "unknown run id"),
    ]
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("mlwf: error: "), (argv, err)
    # Bad input reads as it does on the local backend: refused at the start (nothing written), or
    # the run fails at the stage that found it, with the same reason.
    code, out, err = _invoke(capsys, pair.a.url, s3_env, "ml-training", TRAIN_PREFIX, "4", "2")
    assert code == 2 and out == "" and err == "mlwf: error: NUM_TRAIN (2) must be at least NUM_PCA (4): each PCA " \
        "function feeds at least one training function\n"
    code, _, err = _invoke(capsys, pair.a.url, s3_env, "ml-training", "ml-training/no-such-images", "2", "4")
    with Engine(store_url, "tless") as local, pytest.raises(DataError) as here:
        local.run_training("ml-training/no-such-images", 2, 4, config=FAST)
    assert code == 2 and err.startswith("mlwf: error: run ") and err.endswith(f" failed at partition[0]: {here.value}\n")



def test_a_start_signed_with_another_secret_is_refused(pair, s3_env, capsys, monkeypatch):
    monkeypatch.setenv("MLWF_FUNCTION_SECRET", "another-secret-0123456789")
    code, out, err = _train(capsys, pair.a.url, s3_env)
    assert code == 2 and out == "" and "refused the start of ml-training (401: bad signature" in err, err
    assert "share the same MLWF_FUNCTION_SECRET" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- deployment
def test_deploy_choreography_renders_eventing_a_cluster_can_use(tmp_path, capsys):
    import yaml

    from tests.test_knative import REPO

    base = ["deploy", "knative", "--image", "registry.example.com/mlwf:0.1.0", "--namespace", "mlwf",
            "--s3-host", "minio.tless.svc.cluster.local", "--s3-port", "9000", "--bucket", "tless", "--choreography"]
    assert main([*base, "--out", str(tmp_path / "c"), "--json"]) == 0
    assert main([*base, "--single", "--out", str(tmp_path / "single"), "--json"]) == 0
    capsys.readouterr()
    folder = tmp_path / "c"

    def load(name, root=folder):
        return list(yaml.safe_load_all((root / name).read_text()))

    services = {d["metadata"]["name"]: d for d in load("20-services.yaml")}
    assert all(d["kind"] == "Service" and d["apiVersion"] == "serving.knative.dev/v1" for d in services.values())
    assert len(services) == 9 and "mlwf-dead-letter" in services
    docs = load("30-eventing.yaml")
    kinds = [d["kind"] for d in docs]
    assert kinds.count("Broker") == 1 and kinds.count("SinkBinding") == 1 and kinds.count("Trigger") == 10
    [broker] = [d for d in docs if d["kind"] == "Broker"]
    [binding] = [d for d in docs if d["kind"] == "SinkBinding"]
    # K_SINK: the Broker, in every function Service (the SinkBinding selects them by label; none sets it itself).
    assert binding["spec"]["sink"]["ref"] == {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker",
                                              "name": broker["metadata"]["name"]}
    selector = binding["spec"]["subject"]["selector"]["matchLabels"]
    for svc in services.values():
        labels = svc["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in selector.items()), svc["metadata"]["name"]
        env = {e["name"] for e in svc["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert "K_SINK" not in env and "PORT" not in env and "MLWF_FUNCTION_SECRET" in env
    # A Trigger per stage and per start event, filtered on the event type, to the Service running that stage.
    triggers = {d["spec"]["filter"]["attributes"]["type"]: d for d in docs if d["kind"] == "Trigger"}
    expected = {f"dev.mlwf.{w}.{s}" for w, ss in workflows.known_stages().items() for s in [*ss, "start"]}
    assert set(triggers) == expected
    for event_type, trigger in triggers.items():
        assert trigger["spec"]["broker"] == broker["metadata"]["name"] and trigger["metadata"]["namespace"] == "mlwf"
        target = services[trigger["spec"]["subscriber"]["ref"]["name"]]
        workflow, stage = events.parse_type(event_type)
        served = target["spec"]["template"]["spec"]["containers"][0]["args"][2]
        assert served == f"{workflow}/{stage if stage != 'start' else 'partition'}", (event_type, served)
        delivery = trigger["spec"]["delivery"]
        assert delivery["retry"] == 10 and delivery["backoffPolicy"] == "exponential"
        assert delivery["deadLetterSink"]["ref"]["name"] == "mlwf-dead-letter"
        assert delivery["deadLetterSink"]["uri"] == "/dead-letter"
    # The start Jobs POST one event to the Broker's ingress and follow the run.
    [job] = load("run/ml-training.yaml")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert job["kind"] == "Job" and args[:5] == ["invoke", "ml-training", "ml-training/mnist-images-2k", "2", "8"]
    assert args[args.index("--endpoint") + 1] == \
        "http://broker-ingress.knative-eventing.svc.cluster.local/mlwf/mlwf" and "--wait" in args
    assert not (folder / "endpoints.txt").exists()
    [namespace] = load("00-namespace.yaml")
    assert namespace["metadata"]["labels"]["bindings.knative.dev/include"] == "true"  # the SinkBinding acts there
    # --single: every Trigger goes to the one Service.
    single = load("30-eventing.yaml", tmp_path / "single")
    assert {d["spec"]["subscriber"]["ref"]["name"] for d in single if d["kind"] == "Trigger"} == {"mlwf"}
    # The committed manifests are exactly what the command renders.
    committed = REPO / "deploy" / "knative-choreography"
    for name in ("00-namespace.yaml", "20-services.yaml", "30-eventing.yaml", "templates/secret.yaml",
                 "run/ml-training.yaml", "run/ml-inference.yaml"):
        assert (committed / name).read_text() == (folder / name).read_text(), name


def test_the_readme_commands_of_the_choreographed_mode_parse():
    """Every mlwf command of the docs' choreography example is accepted by mlwf's own parser."""
    import re
    import shlex

    from mlwf.backends.knative.server.serve import parse_stages
    from mlwf.choreography.sinks import parse_sinks
    from mlwf.cli import build_parser
    from tests.test_knative import REPO

    text = (REPO / "docs" / "knative.md").read_text()
    section = text[text.index("## Without a driver"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    values: dict[str, str] = {}
    commands = 0
    for line in block.splitlines():
        line = line.strip().rstrip("&").strip()
        for name, value in re.findall(r"\b([A-Z]+)=(\"[^\"]*\"|\S+)", line if not line.startswith(("mlwf", "export"))
                                      else ""):
            values[name] = value.strip('"')
        if not line.startswith("mlwf "):
            continue
        expanded = re.sub(r"\$([A-Z]+)", lambda m: values[m.group(1)], line)
        expanded = re.sub(r"\$([A-Z]+)", lambda m: values[m.group(1)], expanded)
        args = build_parser().parse_args(shlex.split(expanded)[1:])
        commands += 1
        if args.command == "serve":
            parse_stages(args.stages)
            assert parse_sinks(args.sink) is not None
        else:
            assert args.command == "invoke" and args.endpoint and args.wait
    assert commands == 4


def test_a_start_events_invocation_is_checked_before_anything_runs():
    from mlwf.choreography.replay import invocation_arguments
    from mlwf.errors import UsageError
    from mlwf.workflows.training import TrainingConfig

    args, options = invocation_arguments("ml-training", {"args": ["d", 2, 4], "options": {"config": {"seed": 3},
                                                                                      "publish": False}})
    assert args == ["d", 2, 4] and options == {"config": TrainingConfig(seed=3), "publish": False}
    for invocation, message in (
            ("x", "must hold"), ({"args": [{"d": 1}, 2, 4]}, "DATA_PREFIX must be text"),
            ({"args": ["d", True, 4]}, "NUM_PCA must be text, a whole number"),
            ({"args": ["d", 2]}, "takes 3 arguments"),
            ({"args": ["d", 2, 4], "options": {"publish": "no"}}, "'publish' must be true or false"),
            ({"args": ["d", 2, 4], "options": {"config": {"trees": 1}}}, "bad settings in option 'config'"),
            ({"args": ["d", 2, 4], "options": {"resume": "20261128T000000.000000Z-000000"}}, "unknown ml-training"),
            ({"args": ["d", 2, 4], "options": {"config": []}}, "'config' must be an object")):
        with pytest.raises(UsageError, match=message):
            invocation_arguments("ml-training", invocation)
    with pytest.raises(UsageError, match="unknown workflow"):
        invocation_arguments("ml-nothing", {"args": []})


@pytest.mark.parametrize("value", ["", "   "])
def test_a_blank_k_sink_is_refused_in_one_line_not_taken_for_no_sink(value):
    from mlwf.choreography.sinks import parse_sinks
    from mlwf.errors import UsageError

    with pytest.raises(UsageError, match="K_SINK is set but blank"):
        parse_sinks(None, k_sink=value)
    assert parse_sinks(None, k_sink=None) is None
    assert parse_sinks(["http://127.0.0.1:9/"], k_sink=value) is not None  # --sink wins over K_SINK

