"""``mlwf model export``, ``mlwf model serve`` and ``mlwf deploy kserve`` on the command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import onnxruntime
import pytest

import mlwf.model
from mlwf.cli import main
from mlwf.serving.prepare import prepare
from tests.s3server import free_port
from tests.test_serving_kserve import COMMITTED, REPO


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLWF_")}


def test_export_writes_a_checked_onnx_file_from_a_prefix_or_a_model_file(trained, digits_dir, tmp_path, capsys):
    engine, report = trained
    store = engine.spec.url
    out = tmp_path / "model.onnx"
    assert main(["model", "export", "--format", "onnx", "-o", str(out), "--store", store, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_digest"] == report["model_digest"] and result["check"]["label_agreement"] == 1.0
    model = mlwf.model.load("ml-inference/model", store=engine.store)
    files = sorted((digits_dir / "batch").rglob("*.png"))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    label, _ = session.run(None, {"pixels": prepare(files, model.image_size)})
    assert np.asarray(model.classes)[label].tolist() == model.predict(files).tolist()
    # From a model file, with the plain output.
    data, _ = mlwf.model.read_published(engine.store.get, "ml-inference/model")
    (tmp_path / "m.mlwf").write_bytes(data)
    assert main(["model", "export", str(tmp_path / "m.mlwf"), "--format", "onnx", "-o", str(tmp_path / "f.onnx")]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"wrote {tmp_path / 'f.onnx'}") and "same labels" in text
    assert (tmp_path / "f.onnx").read_bytes() == out.read_bytes()  # the export is deterministic


@pytest.mark.parametrize("args, message", [
    (["models/none", "--format", "onnx", "-o", "{out}"], "no model at 'models/none'"),
    (["--format", "onnx", "-o", "/nonexistent/dir/m.onnx"], "directory /nonexistent/dir does not exist"),
    (["--format", "onnx", "-o", "{tmp}"], "is a directory"),
    (["--format", "tflite", "-o", "{out}"], "--format 'tflite' is not one of"),
    (["--format", "onnx"], "required: -o/--output"),
])
def test_export_refusals_are_one_line(trained, tmp_path, capsys, args, message):
    engine, _ = trained
    out = tmp_path / "m.onnx"
    argv = ["model", "export", *(a.format(out=out, tmp=tmp_path) for a in args),
            "--store", engine.spec.url]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlwf: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_serve_starts_answers_and_stops_cleanly_and_a_bad_start_is_one_line(trained, tmp_path):
    engine, report = trained
    store = engine.spec.url
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlwf.cli", "model", "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--store", store, "--name", "digits", "--max-batch", "4"],
                            stdout=log, stderr=subprocess.STDOUT, env=_env())
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        meta = httpx.get(f"http://127.0.0.1:{port}/v2/models/digits").json()
        assert meta["versions"] == [report["model_digest"]]
        body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [5, 8, 8], "data": [0] * 320}]}
        resp = httpx.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=body)
        assert resp.status_code == 413 and "--max-batch" in resp.json()["error"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log.close()
    assert "mlwf model serve on 127.0.0.1" in (tmp_path / "serve.log").read_text()
    # A start that cannot work: one line on stderr, status 2, nothing listening.
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        for args, message in ((["models/none"], "no model at 'models/none'"),
                              (["--port", str(busy.getsockname()[1])], "cannot listen on 127.0.0.1"),
                              (["--max-body", "lots"], "--max-body 'lots' is not a size"),
                              (["--threads", "0"], "--threads must be at least 1")):
            out = subprocess.run([sys.executable, "-m", "mlwf.cli", "model", "serve", "--host", "127.0.0.1",
                                  "--store", store, *args], capture_output=True, text=True, timeout=60, env=_env())
            assert out.returncode == 2 and out.stderr.startswith("mlwf: error: "), out.stderr
            assert message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    finally:
        busy.close()


def test_deploy_kserve_writes_the_committed_manifests(tmp_path, capsys):
    argv = ["deploy", "kserve", "--image", COMMITTED["image"], "--namespace", COMMITTED["namespace"],
            "--s3-host", COMMITTED["s3_host"], "--s3-port", str(COMMITTED["s3_port"]), "--bucket",
            COMMITTED["bucket"], "--out", str(tmp_path / "k"), "--json"]
    assert main(argv) == 0
    assert len(json.loads(capsys.readouterr().out)["files"]) == 3
    for name in ("00-namespace.yaml", "10-inferenceservice.yaml", "templates/secret.yaml"):
        assert (tmp_path / "k" / name).read_text() == (REPO / "deploy" / "kserve" / name).read_text()
    assert main([*argv[:-3], "--name", "Bad Name", "--out", str(tmp_path / "bad")]) == 2
    assert "--name 'Bad Name'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
