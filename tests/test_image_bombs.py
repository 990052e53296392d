"""Images made to burn memory or CPU, against a real ``mlwf model serve`` process and real workflow runs.

Issue 24 measured a 1 × 64,000,000 PNG (124 KB) taking ``mlwf model serve``
to 1.62 GB and a worker of ``mlwf run ml-inference`` to 1.67 GB, a 1.4 MB
progressive JPEG repeating its scans taking 66.8 s of CPU, and a PNG missing
rows decoded with black ones. Here each of those, and the same attacks in
other shapes (the other orientation, RGBA, 16-bit and palette PNGs, a
progressive JPEG's coefficients, compressed text and ICC bombs, other
formats), must end in a clean 4xx (a skip with its reason in a workflow)
within seconds, with the process's peak RSS (VmHWM) well under 1 GiB, and the
server must answer the next ordinary request correctly. The files are made
by :mod:`tests.crafted_images` (under 1.5 MB each, nothing downloaded); one
server and one trained model serve the whole module.
"""

from __future__ import annotations

import base64
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

import mlwf.model
from mlwf import budget, bulk, images
from mlwf.cli import main
from mlwf.engine.driver import Engine
from mlwf.storage import StoreSpec
from tests import crafted_images as craft
from tests.conftest import FAST, TRAIN_PREFIX
from tests.test_serving_oip import PREFIX, ModelServer

#: Peak resident memory (VmHWM) the server and the workflow's workers must stay under, whatever they are sent.
PEAK_RSS_BOUND = 640 << 20
#: Seconds a refusal may take, with room for a loaded machine (the refusals themselves take milliseconds).
REFUSED_WITHIN = 5.0
HOSTILE_PREFIX = "ml-inference/hostile"


def _hostile() -> dict[str, tuple[bytes, int, str]]:
    """name → (file, the server's status, a part of its message); a workflow skips each with that message."""
    budget_bites = "--max-memory / MLWF_MAX_MEMORY"
    cases = {
        # Issue 24's rows.
        "a 1 x 64,000,000 PNG": (craft.zero_png(1, 64_000_000), 413, budget_bites),
        "a progressive JPEG repeating a scan 100,000 times": (craft.repeated_scans_jpeg(), 413, "scans"),
        "a PNG declaring more rows than it holds": (craft.zero_png(28, 28, rows=10), 400, "truncated"),
        # The same attacks in other shapes.
        "a 64,000,000 x 1 PNG": (craft.zero_png(64_000_000, 1), 413, budget_bites),
        "a 6000 x 6000 RGBA PNG": (craft.zero_png(6000, 6000, color=6), 413, budget_bites),
        "a 6000 x 6000 16-bit RGBA PNG": (craft.zero_png(6000, 6000, color=6, depth=16), 413, budget_bites),
        "a 7000 x 7000 palette PNG with transparency": (craft.zero_png(7000, 7000, color=3), 413, budget_bites),
        "an 8000 x 8000 progressive JPEG": (craft.jpeg_claiming(8000, 8000), 413, budget_bites),
        "an RGB PNG declaring more rows than it holds": (craft.zero_png(28, 28, color=2, rows=10), 400, "truncated"),
    }
    for name, data in craft.other_formats().items():
        cases[f"a {name} file"] = (data, 400, f"a {name} file: mlwf decodes PNG and JPEG images only")
    return cases


def _refused_before_too() -> dict[str, tuple[bytes, int, str]]:
    """Files Pillow already refused before issue 24 (still refused, now from their headers, with a reason)."""
    good_png = craft.encode(craft.noise((28, 28), "L"))
    good_jpeg = craft.encode(craft.noise((64, 64), "RGB"), "JPEG", progressive=True)
    return {
        "a 30000 x 30000 PNG": (craft.zero_png(30_000, 30_000, rows=1), 413, "more pixels than any image"),
        "an interlaced PNG declaring more rows than it holds": (craft.zero_png(28, 28, color=2, rows=10, interlace=1),
                                                                400, "truncated"),
        "a PNG cut short": (good_png[: len(good_png) - 30], 400, "truncated"),
        "a JPEG cut short": (good_jpeg[: len(good_jpeg) // 2], 400, "truncated"),
    }


#: Sent to the server one by one (each was accepted before, or cost more than it may); a workflow skips
#: these and the ones Pillow refused before, each with its reason.
HOSTILE = _hostile()
SKIPPED = {**HOSTILE, **_refused_before_too()}


def _accepted_kinds() -> dict[str, bytes]:
    """One image of each kind mlwf accepts: every PNG colour type and depth, JPEG baseline, progressive,
    gray and CMYK."""
    gray = craft.noise((28, 28), "L", seed=1)
    return {
        "8-bit gray PNG": craft.encode(gray),
        "8-bit gray PNG, interlaced": craft.encode(gray, interlace=1),
        "16-bit gray PNG": craft.encode(Image.fromarray(np.random.default_rng(2).integers(0, 65536, (28, 28),
                                                                                        dtype=np.uint16))),
        "1-bit PNG": craft.encode(gray.convert("1")),
        "RGB PNG": craft.encode(craft.noise((30, 26), "RGB", seed=3)),
        "RGBA PNG": craft.encode(craft.noise((28, 28), "RGBA", seed=4)),
        "gray + alpha PNG": craft.encode(craft.noise((28, 28), "LA", seed=5)),
        "palette PNG with transparency": craft.encode(craft.noise((40, 30), "RGB", seed=6).convert("P"),
                                                      transparency=3),
        "baseline JPEG": craft.encode(craft.noise((28, 28), "RGB", seed=7), "JPEG", quality=90),
        "progressive JPEG": craft.encode(craft.noise((64, 48), "RGB", seed=8), "JPEG", progressive=True),
        "gray JPEG": craft.encode(gray, "JPEG"),
        "CMYK JPEG": craft.encode(craft.noise((28, 28), "CMYK", seed=9), "JPEG"),
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits_dir):
    """A store with the digits model published at PREFIX, the digits batch and the hostile files under
    HOSTILE_PREFIX (the hostile ones in class folder 0)."""
    url = str(tmp_path_factory.mktemp("bombs") / "store")
    store = StoreSpec(url, "tless").open()
    bulk.upload_dir(store, digits_dir / "train", TRAIN_PREFIX, create_bucket=True)
    bulk.upload_dir(store, digits_dir / "batch", HOSTILE_PREFIX)
    for i, (data, _, _) in enumerate(SKIPPED.values()):
        store.put(f"{HOSTILE_PREFIX}/0/hostile-{i:02d}.img", data)
    with Engine(url, "tless", workers=2) as engine:
        engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    return {"url": url, "store": store}


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """``mlwf model serve`` with its default limits (--max-pixels 64 Mi, a 512 MiB budget)."""
    proc = ModelServer(store["url"], tmp_path_factory.mktemp("bombs-log") / "server.log").wait_ready()
    yield proc
    assert proc.stop() == 0, proc.log()
    assert "Traceback" not in proc.log()


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:"))


def _infer(http: httpx.Client, blobs: list[bytes]) -> httpx.Response:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(blobs)],
                        "data": [base64.b64encode(b).decode() for b in blobs]}]}
    return http.post("/v2/models/mlwf/infer", json=body)


def _served_proba(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    return np.asarray(outputs["probabilities"]["data"], dtype=np.float32).reshape(outputs["probabilities"]["shape"])


def _pillow_pixels(data: bytes, size: int) -> np.ndarray:
    """What the image is to mlwf, by Pillow alone: the reference every path must give."""
    with Image.open(__import__("io").BytesIO(data)) as im:
        im.load()
        return images.to_pixels(im, size)


@pytest.fixture(scope="module")
def model(store):
    return mlwf.model.load(PREFIX, store=store["store"])


# --------------------------------------------------------------------------- mlwf model serve
@pytest.mark.parametrize("name", list(HOSTILE))
def test_model_serve_refuses_each_hostile_image_at_once_within_its_memory_and_keeps_serving(server, model, name):
    data, status, message = HOSTILE[name]
    ordinary = [craft.encode(craft.noise((28, 28), "L", seed=s)) for s in range(3)]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        started = time.monotonic()
        resp = _infer(http, [ordinary[0], data])
        took = time.monotonic() - started
        assert resp.status_code == status, f"{name}: {resp.status_code} {resp.text[:300]}"
        error = resp.json()["error"]
        assert error.startswith("image 1 ") and message in error and "\n" not in error, error
        assert took < REFUSED_WITHIN, f"{name}: refused after {took:.1f} s"
        assert _peak_rss(server.proc.pid) < PEAK_RSS_BOUND, f"{name}: {_peak_rss(server.proc.pid) >> 20} MiB"
        # The next ordinary request gets the model's own answer.
        expected = model.proba_from_pixels(np.stack([_pillow_pixels(b, model.image_size) for b in ordinary]))
        np.testing.assert_allclose(_served_proba(_infer(http, ordinary)), expected, rtol=1e-6)


def test_model_serve_decodes_every_accepted_format_as_pillow_does(server, model):
    kinds = _accepted_kinds()
    blobs = list(kinds.values())
    with httpx.Client(base_url=server.url, timeout=60) as http:
        served = _served_proba(_infer(http, blobs))
    expected = model.proba_from_pixels(np.stack([_pillow_pixels(b, model.image_size) for b in blobs]))
    for name, got, want in zip(kinds, served, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)


def test_compressed_text_and_icc_bombs_are_dropped_unread(server, model):
    """zTXt, iTXt and iCCP chunks inflating to 3 × 128 MiB: mlwf's pixels do not depend on them."""
    bomb = craft.deflate_bomb(128)
    for mode in ("L", "RGBA"):
        plain = craft.encode(craft.noise((28, 28), mode, seed=11))
        crafted = plain[:33] + craft.png_chunk(b"zTXt", b"Comment\0\0" + bomb) \
            + craft.png_chunk(b"iTXt", b"XML\0\1\0\0\0" + bomb) + craft.png_chunk(b"iCCP", b"icc\0\0" + bomb) \
            + plain[33:]
        with httpx.Client(base_url=server.url, timeout=60) as http:
            started = time.monotonic()
            served = _served_proba(_infer(http, [crafted, plain]))
            assert time.monotonic() - started < REFUSED_WITHIN
        np.testing.assert_array_equal(served[0], served[1])
    assert _peak_rss(server.proc.pid) < PEAK_RSS_BOUND


def test_a_large_image_within_the_budget_is_still_served(server):
    """8000 × 8000 gray (64 million pixels): within the default budget, decoded and classified."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        proba = _served_proba(_infer(http, [craft.zero_png(8000, 8000)]))
    assert proba.shape == (1, 10)
    assert _peak_rss(server.proc.pid) < PEAK_RSS_BOUND


def test_the_model_servers_decode_answers_413_for_over_the_budget_and_503_while_it_is_held():
    from mlwf.serving.protocol import ProtocolError, _decode
    from mlwf.serving.settings import Limits

    with pytest.raises(ProtocolError) as e:
        _decode([craft.zero_png(1, 64_000_000)], 28, Limits())
    assert e.value.status == 413 and "image 0 is too large to decode" in e.value.message
    with budget.MEMORY.reserve(budget.MEMORY.limit - (8 << 20), "another request"):
        with pytest.raises(ProtocolError) as e:
            _decode([craft.zero_png(3000, 3000)], 28, Limits())
    assert e.value.status == 503 and "retry shortly" in e.value.message
    with pytest.raises(ProtocolError) as e:
        _decode([craft.zero_png(28, 28, rows=3)], 28, Limits())
    assert e.value.status == 400 and "image 0 is not an image mlwf decodes: a truncated 28x28 PNG" in e.value.message


# --------------------------------------------------------------------------- workflows
def _json(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_ml_inference_skips_each_hostile_image_with_its_reason_and_classifies_the_rest(store, capsys):
    where = ["--store", store["url"], "--bucket", "tless"]
    report = _json(capsys, "run", "ml-inference", PREFIX, HOSTILE_PREFIX, "2", *where, "--json")
    expected = {f"{HOSTILE_PREFIX}/0/hostile-{i:02d}.img": (name, message)
                for i, (name, (_, _, message)) in enumerate(SKIPPED.items())}
    assert report["skipped"] == len(SKIPPED) and report["num_predicted"] == 120
    assert sorted(report["skipped_reasons"]) == sorted(expected)
    for key, reason in report["skipped_reasons"].items():
        name, message = expected[key]
        assert message in reason and "\n" not in reason, f"{name}: {reason}"
    assert report["memory"]["worker_peak_mb"] < PEAK_RSS_BOUND >> 20, report["memory"]
    shown = _json(capsys, "runs", "show", report["run_id"], *where, "--json")
    assert shown["report"]["skipped_reasons"] == report["skipped_reasons"]
    assert main(["runs", "show", report["run_id"], *where]) == 0
    assert "skipped (not decoded)" in capsys.readouterr().out


def test_ml_training_skips_a_hostile_image_with_its_reason(store, capsys):
    prefix = "ml-training/hostile"
    for key in store["store"].list_keys(TRAIN_PREFIX + "/"):
        store["store"].put(prefix + key[len(TRAIN_PREFIX):], store["store"].get(key))
    store["store"].put(f"{prefix}/3/tall.png", HOSTILE["a 1 x 64,000,000 PNG"][0])
    store["store"].put(f"{prefix}/4/short.png", HOSTILE["a PNG declaring more rows than it holds"][0])
    flags = ["--image-size", "16", "--components", "6", "--trees", "12", "--max-depth", "8"]
    report = _json(capsys, "run", "ml-training", prefix, "2", "4", *flags, "--model-prefix", "models/hostile",
                   "--store", store["url"], "--bucket", "tless", "--json")
    reasons = report["skipped_reasons"]
    assert report["skipped"] == 2 and sorted(reasons) == [f"{prefix}/3/tall.png", f"{prefix}/4/short.png"]
    assert "MLWF_MAX_MEMORY" in reasons[f"{prefix}/3/tall.png"]
    assert "truncated" in reasons[f"{prefix}/4/short.png"]
    assert report["memory"]["worker_peak_mb"] < PEAK_RSS_BOUND >> 20, report["memory"]


def test_workers_take_their_memory_budget_from_MLWF_MAX_MEMORY(store, capsys, monkeypatch):
    """A 3000 × 3000 PNG needs about 27 MB to decode: classified within the default budget, skipped
    (saying which limit) within 16 MiB."""
    prefix = "ml-inference/budgeted"
    keys = sorted(store["store"].list_keys(HOSTILE_PREFIX + "/1/"))[:4]
    for key in keys:
        store["store"].put(prefix + "/1/" + key.rsplit("/", 1)[1], store["store"].get(key))
    store["store"].put(f"{prefix}/1/large.png", craft.zero_png(3000, 3000))
    where = ["--store", store["url"], "--bucket", "tless"]
    report = _json(capsys, "run", "ml-inference", PREFIX, prefix, "2", *where, "--json")
    assert report["skipped"] == 0 and report["num_predicted"] == 5
    monkeypatch.setenv("MLWF_MAX_MEMORY", "16MiB")
    report = _json(capsys, "run", "ml-inference", PREFIX, prefix, "2", *where, "--json")
    assert report["num_predicted"] == 4
    assert list(report["skipped_reasons"]) == [f"{prefix}/1/large.png"]
    assert "over this process's limit of 16 MiB" in report["skipped_reasons"][f"{prefix}/1/large.png"]


def test_a_bad_MLWF_MAX_MEMORY_is_refused_by_the_driver_before_any_worker_starts(store, capsys, monkeypatch):
    from mlwf.cli import main

    monkeypatch.setenv("MLWF_MAX_MEMORY", "lots")
    before = set(store["store"].list_keys("ml-inference/"))
    assert main(["run", "ml-inference", PREFIX, HOSTILE_PREFIX, "2", "--store", store["url"], "--bucket",
                 "tless"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MLWF_MAX_MEMORY 'lots' is not a size" in err
    assert set(store["store"].list_keys("ml-inference/")) == before  # no run was started


def test_an_image_path_that_is_not_a_regular_file_is_refused_not_read(tmp_path):
    import os

    import mlwf.images

    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"image 0 .*image.png is a named pipe \(FIFO\), not a regular file"):
        mlwf.images.as_pixels([fifo], 8)
    with pytest.raises(ValueError, match=r"image 1 /dev/zero is a character device"):
        mlwf.images.as_pixels([craft.zero_png(4, 4), "/dev/zero"], 8)
