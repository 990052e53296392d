"""The Open Inference Protocol server: a real process on 127.0.0.1, spoken to by standard clients.

Every server here runs :func:`mlwf.serving.oip.serve` in its own process, on a
model the fixtures train and publish in a local store. The protocol is
exercised with NVIDIA's ``tritonclient[http]`` as it is; refusals and hostile
requests are sent raw with httpx and sockets.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

import mlwf.model
from mlwf.workflows.training import TrainingConfig
from tests.conftest import FAST, TRAIN_PREFIX
from tests.s3server import free_port
from tests.serverprocess import ServerProcess

PREFIX = "ml-inference/model"
#: Limits small enough to reach in a test.
LIMITS = {"max_batch": 80, "max_body": 512 << 10, "max_pixels": 1 << 20, "request_timeout": 3.0,
          "max_in_flight": 4}


class ModelServer(ServerProcess):
    """``oip.serve`` on a free 127.0.0.1 port, in its own process, logging to a file."""

    def __init__(self, store_url: str, log: Path, source: str = PREFIX, **options):
        port = free_port()
        limits = {k: options.pop(k) for k in list(options) if k in LIMITS}
        code = ("import json, sys\nfrom mlwf.serving import oip\n"
                "o = json.loads(sys.argv[2])\n"
                "sys.exit(oip.serve(sys.argv[1], host='127.0.0.1', limits=oip.Limits(**o.pop('limits')), **o))")
        kwargs = {"store": store_url, "port": port, "limits": limits, **options}
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLWF_")}
        super().__init__([sys.executable, "-c", code, source, json.dumps(kwargs)], env, log, port,
                         ready_path="/v2/health/ready", name="the model server", log_mode="wb")

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(f"127.0.0.1:{self.port}", network_timeout=30)


@pytest.fixture(scope="module")
def published(tmp_path_factory, digits_dir):
    """A store with the digits model published at PREFIX; its bytes, and a second model's."""
    from mlwf import bulk
    from mlwf.engine.driver import Engine
    from mlwf.storage import StoreSpec

    url = str(tmp_path_factory.mktemp("oip") / "store")
    store = StoreSpec(url, "tless").open()
    bulk.upload_dir(store, digits_dir / "train", TRAIN_PREFIX, create_bucket=True)
    with Engine(url, "tless", workers=2) as engine:
        other = engine.run_training(TRAIN_PREFIX, 2, 4, config=TrainingConfig(**{**FAST.__dict__, "seed": 1}),
                                    model_prefix="models/other")
        first = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    assert first["model_digest"] != other["model_digest"]
    data = {}
    for prefix in (PREFIX, "models/other"):
        blob, manifest = mlwf.model.read_published(store.get, prefix)
        data[manifest["sha256"]] = blob
    return {"url": url, "store": store, "first": first["model_digest"], "other": other["model_digest"],
            "bytes": data}


@pytest.fixture(scope="module")
def server(published, tmp_path_factory):
    proc = ModelServer(published["url"], tmp_path_factory.mktemp("oip-log") / "server.log", **LIMITS).wait_ready()
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def images(digits_dir):
    files = sorted((digits_dir / "batch").rglob("*.png"))[:64]
    return {"files": files, "blobs": [f.read_bytes() for f in files],
            "pixels": np.stack([np.asarray(Image.open(f)) for f in files])}


def _expected(published, digest, images):
    model = mlwf.model.from_bytes(published["bytes"][digest])
    proba = model.predict_proba(images["blobs"])
    return proba.astype(np.float32), [model.classes[i] for i in proba.argmax(axis=1)]


def _bytes_input(blobs, binary=True):
    tensor = triton.InferInput("image", [len(blobs)], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=binary)
    return tensor


def _json_request(blobs) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(blobs)],
                        "data": [base64.b64encode(b).decode() for b in blobs]}]}


# --------------------------------------------------------------------------- the protocol, with a standard client
def test_health_metadata_and_readiness_through_tritonclient(server, published):
    client = server.client()
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlwf")
    assert not client.is_model_ready("other")
    meta = client.get_server_metadata()
    assert meta["name"] == "mlwf" and {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    model = client.get_model_metadata("mlwf")
    assert model["name"] == "mlwf" and model["versions"] == [published["first"]]
    assert model["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert model["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert model["parameters"]["classes"] == [str(d) for d in range(10)]
    assert model["parameters"]["image_size"] == 16
    assert client.get_model_metadata("mlwf", model_version=published["first"])["name"] == "mlwf"
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("resnet")
    with pytest.raises(InferenceServerException, match="no version"):
        client.get_model_metadata("mlwf", model_version="7")


def test_encoded_images_give_mlwfs_own_predictions_in_binary_and_json(server, published, images):
    proba, labels = _expected(published, published["first"], images)
    client = server.client()
    result = client.infer("mlwf", [_bytes_input(images["blobs"])], request_id="batch-1")
    response = result.get_response()
    assert response["model_name"] == "mlwf" and response["id"] == "batch-1"
    assert response["model_version"] == published["first"]
    assert np.array_equal(result.as_numpy("probabilities"), proba)
    assert [b.decode() for b in result.as_numpy("label")] == labels
    # Outputs as JSON, and one output only.
    wanted = [triton.InferRequestedOutput("probabilities", binary_data=False),
              triton.InferRequestedOutput("label", binary_data=False)]
    result = client.infer("mlwf", [_bytes_input(images["blobs"])], outputs=wanted)
    assert np.array_equal(result.as_numpy("probabilities"), proba)
    assert result.as_numpy("label").tolist() == labels
    result = client.infer("mlwf", [_bytes_input(images["blobs"][:3])],
                          outputs=[triton.InferRequestedOutput("label")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]
    # A plain JSON request, as curl sends it: each image in base64.
    resp = httpx.post(server.url + "/v2/models/mlwf/infer", json=_json_request(images["blobs"][:5]))
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    body = resp.json()
    [label] = [o for o in body["outputs"] if o["name"] == "label"]
    [probabilities] = [o for o in body["outputs"] if o["name"] == "probabilities"]
    assert label == {"name": "label", "datatype": "BYTES", "shape": [5], "data": labels[:5]}
    assert probabilities["shape"] == [5, 10]
    assert np.array_equal(np.asarray(probabilities["data"], np.float32).reshape(5, 10), proba[:5])
    assert isinstance(body["id"], str) and body["id"]  # one is made up when the request has none


def test_uint8_pixels_give_the_same_answer_as_the_files(server, published, images):
    proba, labels = _expected(published, published["first"], images)
    client = server.client()
    for binary in (True, False):
        tensor = triton.InferInput("image", list(images["pixels"].shape), "UINT8")
        tensor.set_data_from_numpy(images["pixels"], binary_data=binary)
        result = client.infer("mlwf", [tensor])
        assert np.array_equal(result.as_numpy("probabilities"), proba)
        assert [b.decode() for b in result.as_numpy("label")] == labels
    nested = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 8, 8],
                          "data": images["pixels"][:2].tolist()}]}
    resp = httpx.post(server.url + "/v2/models/mlwf/infer", json=nested)
    assert resp.status_code == 200, resp.text
    assert resp.json()["outputs"][0]["data"] == labels[:2]


def test_compressed_requests_are_read(server, published, images):
    _, labels = _expected(published, published["first"], images)
    client = server.client()
    for algorithm in ("gzip", "deflate"):
        result = client.infer("mlwf", [_bytes_input(images["blobs"][:4])], request_compression_algorithm=algorithm)
        assert [b.decode() for b in result.as_numpy("label")] == labels[:4]


# --------------------------------------------------------------------------- bad input: 4xx, {"error"}, still serving
def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height)).save(out, format="PNG")
    return out.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims to be width × height pixels and holds none: costs nothing to send."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _binary(header: dict, *sections: bytes) -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    return text + b"".join(sections), {"Inference-Header-Content-Length": str(len(text))}


def _bytes_tensor(*blobs: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in blobs)


def _image_input(datatype="BYTES", shape=(1,), **fields):
    return {"inputs": [{"name": "image", "datatype": datatype, "shape": list(shape), **fields}]}


def _bad_requests(png: bytes):
    good_b64 = base64.b64encode(png).decode()
    big = _png(1100, 1000)  # 1.1 Mpx, over the test server's 1 Mpx
    tensor = _bytes_tensor(png)
    return {
        "not json": (b"{inputs", {}, 400, "not valid JSON"),
        "json not an object": (b"[1, 2]", {}, 400, "JSON object"),
        "NaN": (b'{"inputs": [], "id": NaN}', {}, 400, "not valid JSON"),
        "deep nesting": (b"[" * 100_000 + b"]" * 100_000, {}, 400, "not valid JSON"),
        "no inputs": (b"{}", {}, 400, "exactly one input"),
        "two inputs": (json.dumps({"inputs": [_image_input()["inputs"][0]] * 2}).encode(), {}, 400, "exactly one"),
        "wrong input name": (json.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1],
                                                     "data": [good_b64]}]}).encode(), {}, 400, "unknown input"),
        "wrong datatype": (json.dumps(_image_input("FP32", (1,), data=[0.5])).encode(), {}, 400, "datatype"),
        "BYTES shape [N, 1]": (json.dumps(_image_input("BYTES", (1, 1), data=[good_b64])).encode(), {}, 400,
                               "shape [N]"),
        "UINT8 shape [N, H]": (json.dumps(_image_input("UINT8", (1, 4), data=[0] * 4)).encode(), {}, 400,
                               "[N, H, W]"),
        "negative dimension": (json.dumps(_image_input("UINT8", (1, -4, -4), data=[])).encode(), {}, 400,
                               "negative"),
        "shape of booleans": (json.dumps(_image_input("BYTES", (True,), data=[good_b64])).encode(), {}, 400,
                              "shape"),
        "huge shape": (json.dumps(_image_input("UINT8", (10**30, 1, 1), data=[])).encode(), {}, 413,
                       "--max-batch"),
        "empty batch": (json.dumps(_image_input("BYTES", (0,), data=[])).encode(), {}, 400, "empty batch"),
        "batch over the limit": (json.dumps(_image_input("BYTES", (81,), data=[good_b64] * 81)).encode(), {},
                                 413, "--max-batch"),
        "fewer elements than the shape": (json.dumps(_image_input("BYTES", (2,), data=[good_b64])).encode(), {},
                                          400, "shape [2]"),
        "not base64": (json.dumps(_image_input(data=["***"])).encode(), {}, 400, "base64"),
        "not an image": (json.dumps(_image_input(data=[base64.b64encode(b"hello").decode()])).encode(), {}, 400,
                         "image 0 is not an image"),
        "truncated PNG": (json.dumps(_image_input(data=[base64.b64encode(png[: len(png) // 2]).decode()])).encode(),
                          {}, 400, "image 0"),
        "empty element": (json.dumps(_image_input(data=[""])).encode(), {}, 400, "image 0 is empty"),
        "too many pixels": (json.dumps(_image_input(data=[base64.b64encode(big).decode()])).encode(), {}, 413,
                            "--max-pixels"),
        "a claimed 25 Mpx": (json.dumps(_image_input(data=[base64.b64encode(_png_header(5000, 5000)).decode()])
                                        ).encode(), {}, 413, "--max-pixels"),
        "a claimed 900 Mpx": (json.dumps(_image_input(data=[base64.b64encode(_png_header(30000, 30000)).decode()])
                                         ).encode(), {}, 413, "more pixels than any image"),
        "UINT8 over 255": (json.dumps(_image_input("UINT8", (1, 2, 2), data=[0, 1, 2, 300])).encode(), {}, 400,
                           "0..255"),
        "UINT8 floats": (json.dumps(_image_input("UINT8", (1, 2, 2), data=[0, 1, 2, 0.5])).encode(), {}, 400,
                         "whole numbers"),
        "UINT8 ragged": (json.dumps(_image_input("UINT8", (1, 2, 2), data=[[0, 1], [2]])).encode(), {}, 400,
                         "needs 4 values"),
        "UINT8 too many pixels": (json.dumps(_image_input("UINT8", (2, 1024, 1024), data=[])).encode(), {}, 413,
                                  "--max-pixels"),
        "unknown output": (json.dumps({**_image_input(data=[good_b64]), "outputs": [{"name": "logits"}]}).encode(),
                           {}, 400, "unknown output"),
        "id not a string": (json.dumps({**_image_input(data=[good_b64]), "id": 7}).encode(), {}, 400, "\"id\""),
        "binary header longer than the body": (b"{}", {"Inference-Header-Content-Length": "99"}, 400, "does not fit"),
        "binary header not a number": (b"{}", {"Inference-Header-Content-Length": "x"}, 400, "whole number"),
        "binary size mismatch": _binary(_image_input(parameters={"binary_data_size": len(tensor) + 1}), tensor)
        + (400, "binary_data_size says"),
        "binary element overruns": _binary(_image_input(parameters={"binary_data_size": 8}),
                                           struct.pack("<I", 1000) + b"abcd") + (400, "data ends first"),
        "binary bytes left over": _binary(_image_input(parameters={"binary_data_size": len(tensor) + 3}),
                                          tensor + b"xyz") + (400, "left over"),
        "binary data nobody declared": _binary(_image_input(data=[good_b64]), b"\x00" * 10) + (400, "no input"),
        "both data and binary": _binary(_image_input(data=[good_b64], parameters={"binary_data_size": len(tensor)}),
                                        tensor) + (400, "both"),
    }


def test_every_bad_request_is_a_4xx_with_the_protocols_error_and_the_server_keeps_serving(server, images):
    bad = _bad_requests(images["blobs"][0])
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for name, (body, headers, status, message) in bad.items():
            resp = http.post("/v2/models/mlwf/infer", content=body, headers=headers)
            assert resp.status_code == status, f"{name}: {resp.status_code} {resp.text}"
            error = resp.json()
            assert list(error) == ["error"] and isinstance(error["error"], str), name
            assert message in error["error"] and "\n" not in error["error"], f"{name}: {error}"
        assert http.post("/v2/models/mlwf/infer", json=_json_request(images["blobs"][:2])).status_code == 200
    assert server.proc.poll() is None
    assert "Traceback" not in server.log()


def test_refusals_outside_inference_use_the_error_object_too(server, images):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        cases = [
            ("POST", "/v2/models/resnet/infer", 404, "unknown model"),
            ("POST", f"/v2/models/mlwf/versions/{'0' * 64}/infer", 404, "no version"),
            ("GET", "/v2/models/mlwf/infer", 405, "not allowed"),
            ("GET", "/v3/anything", 404, "no such endpoint"),
            ("POST", "/v2/repository/models/resnet/load", 404, "unknown model"),
            ("POST", "/v2/repository/models/mlwf/unload", 400, "does not unload"),
        ]
        for method, path, status, message in cases:
            resp = http.request(method, path, json=_json_request(images["blobs"][:1]))
            assert resp.status_code == status and message in resp.json()["error"], (path, resp.text)
        resp = http.post("/v2/models/mlwf/infer", content=b"xx", headers={"Content-Encoding": "br"})
        assert resp.status_code == 415 and "Content-Encoding" in resp.json()["error"]
        bomb = gzip.compress(b"\0" * (8 << 20))  # 8 MiB of zeros in a few KiB
        resp = http.post("/v2/models/mlwf/infer", content=bomb, headers={"Content-Encoding": "gzip"})
        assert resp.status_code == 413 and "--max-body" in resp.json()["error"]
        resp = http.post("/v2/models/mlwf/infer", content=b"{" + b" " * (600 << 10) + b"}")
        assert resp.status_code == 413 and "--max-body" in resp.json()["error"]
        # Model files or configs in a load request are never taken from the network.
        resp = http.post("/v2/repository/models/mlwf/load",
                         json={"parameters": {"file:1/model.onnx": base64.b64encode(b"x").decode()}})
        assert resp.status_code == 400 and "takes no model files" in resp.json()["error"]
        assert http.post("/v2/models/mlwf/infer", json=_json_request(images["blobs"][:1])).status_code == 200


def _slow_request(port: int) -> socket.socket:
    """A client that sends its headers and the start of its body, then nothing."""
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"POST /v2/models/mlwf/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"inputs\"")
    return slow


def _answer(sock: socket.socket) -> tuple[bytes, dict]:
    sock.settimeout(10)
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, json.loads(body)


def test_slow_and_idle_clients_do_not_hold_up_the_others(server, images):
    idle = socket.create_connection(("127.0.0.1", server.port))
    half_head = socket.create_connection(("127.0.0.1", server.port))
    half_head.sendall(b"POST /v2/models/mlwf/infer HTTP/1.1\r\nHost: x\r\nContent-Le")
    slow = [_slow_request(server.port)]
    try:
        time.sleep(0.1)
        result = server.client().infer("mlwf", [_bytes_input(images["blobs"][:8])])
        assert len(result.as_numpy("label")) == 8
        # Answered while the slow request still waits for its body (no answer for it yet).
        slow[0].setblocking(False)
        with pytest.raises(BlockingIOError):
            slow[0].recv(1)
        slow[0].setblocking(True)
        # Twice as many slow requests as --max-in-flight: a request counts in flight only once its body
        # has arrived, so they take no slot and the next request is answered at once.
        slow += [_slow_request(server.port) for _ in range(2 * LIMITS["max_in_flight"] - 1)]
        time.sleep(0.2)
        result = server.client().infer("mlwf", [_bytes_input(images["blobs"][:1])])
        assert len(result.as_numpy("label")) == 1
        for sock in [*slow, half_head]:  # a request whose head never ends is closed too (mlwf.httpguard)
            head, error = _answer(sock)
            assert head.startswith(b"HTTP/1.1 408") and "--request-timeout" in error["error"], head
    finally:
        idle.close()
        half_head.close()
        for sock in slow:
            sock.close()
    result = server.client().infer("mlwf", [_bytes_input(images["blobs"][:1])])
    assert len(result.as_numpy("label")) == 1


# --------------------------------------------------------------------------- reloading
def _publish(published, digest):
    mlwf.model.publish(published["store"], PREFIX, published["bytes"][digest], run_id=f"test-{digest[:8]}")


def test_reload_serves_a_newly_published_model_and_refuses_a_bad_one(published, images, tmp_path):
    _publish(published, published["first"])
    proc = ModelServer(published["url"], tmp_path / "reload.log").wait_ready()
    try:
        client = proc.client()
        assert client.get_model_metadata("mlwf")["versions"] == [published["first"]]
        resp = httpx.post(proc.url + "/v2/repository/models/mlwf/load")
        assert resp.status_code == 200 and resp.json()["changed"] is False
        _publish(published, published["other"])
        client.load_model("mlwf")  # tritonclient's call: POST /v2/repository/models/mlwf/load
        proba, labels = _expected(published, published["other"], images)
        result = client.infer("mlwf", [_bytes_input(images["blobs"])])
        assert result.get_response()["model_version"] == published["other"]
        assert np.array_equal(result.as_numpy("probabilities"), proba)
        # A manifest naming a tampered object: refused, and the model in service stays.
        store = published["store"]
        manifest = json.loads(store.get(f"{PREFIX}/MODEL.json"))
        good_manifest = json.dumps(manifest).encode()
        store.put(f"{PREFIX}/MODEL.json", json.dumps({**manifest, "sha256": "0" * 64}).encode())
        resp = httpx.post(proc.url + "/v2/repository/models/mlwf/load")
        assert resp.status_code == 400 and "still serving" in resp.json()["error"], resp.text
        assert client.get_model_metadata("mlwf")["versions"] == [published["other"]]
        assert client.is_server_ready()
        store.put(f"{PREFIX}/MODEL.json", good_manifest)
    finally:
        assert proc.stop() == 0, proc.log()
    _publish(published, published["first"])
    assert "reload refused" in proc.log() and "reloaded: serving" in proc.log()


def test_every_answer_comes_from_exactly_one_model_while_reloading(published, images, tmp_path):
    """Four clients infer while the published model flips between two versions and the server reloads."""
    _publish(published, published["first"])
    expected = {d: _expected(published, d, images) for d in (published["first"], published["other"])}
    assert not np.array_equal(expected[published["first"]][0], expected[published["other"]][0])
    proc = ModelServer(published["url"], tmp_path / "flip.log", threads=2).wait_ready()
    seen: dict[str, int] = {d: 0 for d in expected}
    failures: list[str] = []
    stop = threading.Event()

    def infer_until_stopped(offset: int):
        client = proc.client()
        blobs = images["blobs"][offset:] + images["blobs"][:offset]
        while not stop.is_set():
            try:
                result = client.infer("mlwf", [_bytes_input(blobs)])
            except Exception as e:  # any failure is a finding, not a reason to stop the others
                failures.append(repr(e))
                return
            version = result.get_response()["model_version"]
            proba, labels = expected[version]
            order = list(range(offset, len(blobs))) + list(range(offset))
            if not (np.array_equal(result.as_numpy("probabilities"), proba[order])
                    and [b.decode() for b in result.as_numpy("label")] == [labels[i] for i in order]):
                failures.append(f"answer of version {version[:12]} does not match that model")
            seen[version] += 1

    workers = [threading.Thread(target=infer_until_stopped, args=(i * 16,)) for i in range(4)]
    try:
        for w in workers:
            w.start()
        versions = []
        for flip in range(12):
            digest = published["other"] if flip % 2 == 0 else published["first"]
            _publish(published, digest)
            resp = httpx.post(proc.url + "/v2/repository/models/mlwf/load", timeout=30)
            assert resp.status_code == 200 and resp.json()["version"] == digest, resp.text
            versions.append(resp.json()["version"])
            time.sleep(0.1)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
        assert proc.stop() == 0, proc.log()
    _publish(published, published["first"])
    assert not failures, failures[:5]
    assert all(n > 0 for n in seen.values()), seen  # both versions answered
    assert versions[-1] == published["first"]


def test_watch_picks_up_a_published_model_by_itself(published, images, tmp_path):
    _publish(published, published["first"])
    proc = ModelServer(published["url"], tmp_path / "watch.log", watch=0.2).wait_ready()
    try:
        client = proc.client()
        _publish(published, published["other"])
        deadline = time.monotonic() + 20
        while client.get_model_metadata("mlwf")["versions"] != [published["other"]]:
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.1)
        result = client.infer("mlwf", [_bytes_input(images["blobs"][:4])])
        assert result.get_response()["model_version"] == published["other"]
    finally:
        assert proc.stop() == 0, proc.log()
        _publish(published, published["first"])
    assert "--watch: new model published" in proc.log()


def test_a_model_file_can_be_served_and_a_missing_model_stops_the_start(published, tmp_path):
    path = tmp_path / "model.mlwf"
    path.write_bytes(published["bytes"][published["first"]])
    proc = ModelServer(published["url"], tmp_path / "file.log", source=str(path), store=None).wait_ready()
    try:
        assert proc.client().get_model_metadata("mlwf")["versions"] == [published["first"]]
    finally:
        assert proc.stop() == 0
    missing = ModelServer(published["url"], tmp_path / "missing.log", source="models/none")
    assert missing.proc.wait(60) != 0
    missing.stop()
    assert "no model at 'models/none'" in missing.log()
