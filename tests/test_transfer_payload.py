"""``--transfer payload``: state inline in each call and its reply, on the local and the Knative backend.

The Knative side runs against ``mlwf serve`` processes on 127.0.0.1 (as
tests/test_knative.py starts them), over the moto S3 server.
"""

from __future__ import annotations

import pytest

from mlwf.backends.knative import KnativeBackend, events, frames
from mlwf.engine.calls import Call, Ref
from mlwf.engine.driver import Engine
from mlwf.errors import UsageError
from tests.conftest import BATCH_PREFIX, FAST, TRAIN_PREFIX
from tests.test_knative import (
    SECRET,
    ServeProcess,
    _keys,
    _point_at,
    _server_env,
    digits_bucket,
)

MODEL = "ml-inference/model"


def _both(engine: Engine, state: str = "light") -> tuple[dict, dict, bytes]:
    """Training then inference on ``engine``: the two reports and the predictions file."""
    trained = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, state=state)
    inferred = engine.run_inference(MODEL, BATCH_PREFIX, 4, state=state)
    return trained, inferred, engine.store.get(inferred["results_key"])


def _run_outputs(keys, report: dict) -> set[str]:
    """The intermediate outputs (``<stage>/<i>-<part>.bin``) the run of ``report`` left in the store."""
    folder = f"{report['workflow']}/outputs/{report['run_id']}/"
    return {k for k in keys if k.startswith(folder) and k.endswith(".bin")}


def _same_results(store_run, payload_run) -> None:
    (st, si, sp), (pt, pi, pp) = store_run, payload_run
    assert pt["transfer"] == pi["transfer"] == "payload"
    assert pt["model_digest"] == st["model_digest"] and pi["model_digest"] == si["model_digest"]
    assert pi["accuracy"] == si["accuracy"] and pi["num_predicted"] == si["num_predicted"] > 0
    assert pp == sp  # the same prediction for every image


# --------------------------------------------------------------------------- local backend
def test_local_payload_gives_the_store_runs_model_and_predictions_and_keeps_state_out(store_url):
    with Engine(store_url, "tless") as engine:
        store_run = _both(engine)
    with Engine(store_url, "tless", transfer="payload") as engine:
        payload_run = _both(engine)
        keys = set(engine.store.list_keys(""))
    _same_results(store_run, payload_run)
    assert _run_outputs(keys, store_run[0]) and _run_outputs(keys, store_run[1])  # the store run kept them
    assert not _run_outputs(keys, payload_run[0]) and not _run_outputs(keys, payload_run[1])


def test_ray_refuses_payload_in_one_line_saying_why(capsys):
    pytest.importorskip("ray")
    from mlwf.cli import main

    code = main(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--backend", "ray", "--transfer", "payload"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("mlwf: error: the ray backend cannot do --transfer payload (Ray moves any task argument "
                          "over 100 KB through its object store")
    assert err.endswith(": use store or direct\n")


# --------------------------------------------------------------------------- the wire format
def test_a_framed_call_is_rebuilt_whole_and_a_changed_byte_is_refused():
    a, b = b"\x00" * 1000, bytes(range(256)) * 3
    refs = [Ref(frames.codec.digest(x), len(x), data=x, producer="pca") for x in (a, b)]
    call = Call("ml-training", "train", 1, {"projection": refs[0], "parts": [refs[1]], "seed": 3})
    bare, blobs = frames.split_call(call)
    assert blobs == [a, b] and all(r.data is None for r in [bare.args["projection"], *bare.args["parts"]])
    head, rest = frames.split_body(frames.frame({"call": bare.to_json()}, blobs))
    rebuilt = frames.join_call(Call.from_json(frames.parse_header(head)["call"]), rest)
    assert rebuilt == call
    body = bytearray(frames.frame({"call": bare.to_json()}, blobs))
    body[-1] ^= 1
    head, rest = frames.split_body(body)
    with pytest.raises(frames.FrameError, match="does not match its SHA-256"):
        frames.join_call(Call.from_json(frames.parse_header(head)["call"]), rest)
    with pytest.raises(frames.FrameError, match="bytes after the last inline output"):
        frames.join_call(bare, memoryview(a + b + b"!"))


# --------------------------------------------------------------------------- knative backend
@pytest.fixture(scope="module")
def bucket(s3_server, digits_dir):
    return digits_bucket(s3_server, digits_dir, "payload")


@pytest.fixture(scope="module")
def big_server(s3_server, bucket, tmp_path_factory):
    """A service whose body limit admits the runs' payload calls."""
    yield from _serving(s3_server, bucket, tmp_path_factory, "big", "64MiB")


@pytest.fixture(scope="module")
def small_server(s3_server, bucket, tmp_path_factory):
    """A service with a small body limit: ample for store-mode calls, too small for payload ones."""
    yield from _serving(s3_server, bucket, tmp_path_factory, "small", "32KiB")


def _serving(s3_server, bucket, tmp_path_factory, name: str, max_body: str):
    """An ``mlwf serve`` on the test's S3 bucket with ``--max-body max_body``, stopped cleanly after."""
    proc = ServeProcess(_server_env(s3_server), tmp_path_factory.mktemp("serve") / f"{name}.log",
                        "--store", "s3://", "--bucket", bucket, "--max-body", max_body).wait_ready()
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture
def s3(bucket, s3_server, monkeypatch):
    _point_at(monkeypatch, s3_server)
    monkeypatch.setenv("MLWF_FUNCTION_SECRET", SECRET)
    return bucket


def _knative(bucket: str, url: str, transfer: str, **options) -> Engine:
    return Engine("s3://", bucket, backend="knative", transfer=transfer,
                  backend_options={"endpoints": [url], **options})


def test_knative_payload_gives_the_store_runs_results_with_no_state_in_the_store(big_server, s3, s3_server):
    with _knative(s3, big_server.url, "store") as engine:
        store_run = _both(engine)
    with _knative(s3, big_server.url, "payload") as engine:
        payload_run = _both(engine)
        heavy_run = _both(engine, "heavy")  # pixels and whole feature matrices in the requests' bodies
    _same_results(store_run, payload_run)
    _same_results(store_run, heavy_run)
    for light, heavy in zip(payload_run[:2], heavy_run[:2]):
        moved = [sum(e["bytes"] for e in r["edges"] if e["from"] == "partition") for r in (light, heavy)]
        assert moved[1] > 10 * moved[0]
    keys = _keys(s3_server, s3)
    assert _run_outputs(keys, store_run[0]) and _run_outputs(keys, store_run[1])
    assert not any(_run_outputs(keys, r) for r in (*payload_run[:2], *heavy_run[:2]))
    # The calls went framed (binary mode), and their inputs did arrive inline: edges moved bytes.
    edges = {(e["from"], e["to"]): e for e in payload_run[0]["edges"]}
    assert edges[("pca", "train")]["bytes"] > 0 and edges[("train", "validation")]["bytes"] > 0
    # Structured mode cannot frame: the same run in JSON (the bytes in base64) gives the same answer.
    with _knative(s3, big_server.url, "payload", structured=True) as engine:
        inferred = engine.run_inference(MODEL, BATCH_PREFIX, 4)
    assert inferred["accuracy"] == store_run[1]["accuracy"] and not _run_outputs(_keys(s3_server, s3), inferred)


def test_a_payload_over_the_body_limit_is_refused_in_one_line_and_the_server_serves_on(
        small_server, s3, monkeypatch, capsys):
    from mlwf.cli import main

    argv = ["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", "s3://", "--bucket", s3, "--backend", "knative",
            "--endpoint", small_server.url, "--image-size", "16", "--components", "6", "--trees", "12", "--max-depth", "8",
            "--retries", "0"]
    # The limit the service advertises is checked before sending: nothing over it leaves the driver.
    code = main([*argv, "--transfer", "payload", "--json"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("mlwf: error: ml-training stage ")
    assert "(--transfer payload)" in captured.err and "over its limit of 32,768 bytes (mlwf serve --max-body " \
           "32KiB)" in captured.err and captured.err.endswith("or run with --transfer store\n")
    assert "status=413" not in small_server.log()

    # A limit it does not know (say, an ingress's): the service's 413 becomes the same kind of line.
    monkeypatch.setattr(KnativeBackend, "_advertised_max_body", lambda self, url: None)
    with _knative(s3, small_server.url, "payload") as engine, pytest.raises(UsageError) as info:
        engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    text = str(info.value)
    assert "\n" not in text and "a body limit on the way (413: request body over the limit of 32768 bytes" in text
    assert "'mlwf serve --max-body SIZE'" in text and text.endswith("or run with --transfer store")
    assert "status=413" in small_server.log()

    # The server stays up, and a store-mode run through it succeeds: never a silent fall back.
    code = main([*argv, "--json"])
    assert code == 0, capsys.readouterr().err


def test_the_server_advertises_its_body_limit_and_refuses_a_framed_choreographed_event(small_server):
    import httpx

    assert httpx.get(f"{small_server.url}/healthz").json() == {"status": "ok", "max_body": 32 << 10}
    ref = Ref(frames.codec.digest(b"x"), 1, data=b"x", producer="pca")
    bare, blobs = frames.split_call(Call("ml-training", "train", 0, {"projection": ref}))
    event = events.call_event(bare.to_json(), {"run_id": "r"}, SECRET, kind="event")
    headers, body = frames.to_http(event, blobs)
    resp = httpx.post(small_server.url, content=body, headers=headers)
    assert resp.status_code == 400 and "choreographed event carries no inline state" in resp.json()["error"]
