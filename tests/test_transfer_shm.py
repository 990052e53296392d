"""``--transfer shm``: the same results as the store, no state in the store, and no segment left behind.

Segments are files in /dev/shm named after the driver (``mlwf-<pid>.<start>-…``,
:mod:`mlwf.engine.shm`); each test looks only at its own drivers' segments, so
other processes on the machine using /dev/shm do not disturb it.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import pytest

from mlwf import codec
from mlwf.cli import main
from mlwf.engine import runner, shm
from mlwf.engine.calls import Call, Ref, RunContext
from mlwf.engine.driver import Engine
from mlwf.errors import DataError, MlwfError, UsageError
from tests.conftest import BATCH_PREFIX, FAST, TRAIN_PREFIX
from tests.procfs import wait_for_empty_group

pytestmark = pytest.mark.skipif(not os.path.isdir(shm.DIR), reason="shared memory segments need Linux's /dev/shm")

FAST_FLAGS = ["--image-size", "16", "--components", "6", "--trees", "12", "--max-depth", "8"]
MODEL = "ml-inference/model"


def _driver_segments(pid: int) -> list[str]:
    """Every mlwf segment in /dev/shm named after the driver process ``pid``."""
    return sorted(n for n in os.listdir(shm.DIR) if n.startswith(f"mlwf-{pid}."))


def _run_keys(engine: Engine, report: dict) -> set[str]:
    folder = f"{report['workflow']}/outputs/{report['run_id']}/"
    return {o.key[len(folder):] for o in engine.store.list(folder)}


class _SeenAfter:
    """A run's progress that notes this driver's segments as a stage ends (and can hold the run there)."""

    def __init__(self, stage: str, hold: threading.Event | None = None):
        self.stage, self.hold, self.seen = stage, hold, None
        self.reached = threading.Event()

    def stage_started(self, stage, total):
        pass

    def call_done(self, stage):
        pass

    def stage_done(self, stage):
        if stage == self.stage:
            self.seen = _driver_segments(os.getpid())
            self.reached.set()
            if self.hold is not None:
                assert self.hold.wait(120)


# --------------------------------------------------------------------------- codec
def test_a_payload_written_into_a_buffer_is_the_bytes_encode_makes():
    rng = np.random.default_rng(0)
    value = {"pixels": rng.random((5, 7)).astype(np.float32), "labels": ["a", "b", None],
             "nested": [{"strided": rng.random((6, 8))[::2, 1:7], "big": np.arange(6, dtype=">i4").reshape(2, 3)},
                        np.array(2.5), np.zeros(0, np.uint8), np.array([True, False]), np.float64(1.5)],
             "plain": {"k": 3, "s": "x"}}
    for v in (value, np.arange(12, dtype=np.int16).reshape(3, 4).T, {"empty": []}, 7):
        expected = codec.encode(v)
        plan = codec.Plan(v)
        buf = bytearray(b"\xff" * plan.size)  # padding must be written, not assumed zero
        assert plan.size == len(expected)
        assert plan.write_into(buf) == codec.digest(expected)
        assert bytes(buf) == expected
    back = codec.decode(bytes(buf))
    assert back == 7
    # Unhashed (shm's way): the same layout and arrays, read back only without verification.
    plan = codec.Plan(value)
    unchecked = bytearray(plan.size)
    assert plan.write_into(unchecked, checksum=False) is None
    # What a segment is written with: the arrays' own buffers, in pieces, the same bytes.
    assert b"".join(bytes(memoryview(p).cast("B")) for p in plan.unchecked_pieces()) == unchecked
    encoded = codec.encode(value)
    assert len(unchecked) == len(encoded) and unchecked[plan.head_size:] == encoded[plan.head_size:]
    got = codec.decode(unchecked, verify=False)
    assert np.array_equal(got["nested"][0]["strided"], value["nested"][0]["strided"]) and got["labels"] == ["a", "b", None]
    with pytest.raises(codec.CodecError, match="carries no checksum"):
        codec.decode(unchecked)
    with pytest.raises(ValueError, match="needs a buffer of that size"):
        codec.Plan(value).write_into(bytearray(10))


# --------------------------------------------------------------------------- results
def test_shm_gives_the_store_s_model_and_predictions_and_leaves_no_state_in_the_store(store_url):
    reports = {}
    for transfer in ("store", "shm"):
        seen = _SeenAfter("train")
        with Engine(store_url, "tless", transfer=transfer, workers=2, progress=seen) as engine:
            training = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
            inference = engine.run_inference(MODEL, BATCH_PREFIX, 3)
            predictions = engine.store.get(inference["results_key"])
            reports[transfer] = (training, inference, predictions, _run_keys(engine, training),
                                 _run_keys(engine, inference), seen.seen)
    (st_train, st_inf, st_pred, st_tkeys, st_ikeys, _), (sh_train, sh_inf, sh_pred, sh_tkeys, sh_ikeys, seen) = \
        reports["store"], reports["shm"]
    assert sh_train["transfer"] == "shm"
    assert sh_train["model_digest"] == st_train["model_digest"]
    assert sh_train["validation_accuracy"] == st_train["validation_accuracy"]
    assert sh_inf["accuracy"] == st_inf["accuracy"] and sh_pred == st_pred
    # The state went through shared memory: segments of this run existed while it ran, none is left.
    assert seen and all(name.startswith(f"mlwf-{shm.owner()}-{sh_train['run_id']}-") for name in seen)
    assert _driver_segments(os.getpid()) == []
    # In the store, only what every run writes (its record and results), none of the intermediates.
    intermediate = {k for k in st_tkeys | st_ikeys if k.endswith((".bin", ".done.json"))}
    assert intermediate and sh_tkeys == st_tkeys - intermediate and sh_ikeys == st_ikeys - intermediate
    # Every stage-to-stage edge is accounted for, with the bytes it handed on.
    st_edges = {(e["from"], e["to"]): e["bytes"] for e in st_train["edges"]}
    assert {(e["from"], e["to"]): e["bytes"] for e in sh_train["edges"]} == st_edges


# --------------------------------------------------------------------------- no leaks
def test_a_run_whose_call_fails_leaves_no_segment(store_url, monkeypatch):
    monkeypatch.setenv("MLWF_FAULTS", "score:1:raise:9")
    seen = _SeenAfter("train")
    with Engine(store_url, "tless", transfer="shm", workers=2, retries=0, progress=seen) as engine:
        with pytest.raises(MlwfError, match=r"score\[1\]"):
            engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
        assert seen.seen  # the failed run had made segments
        assert _driver_segments(os.getpid()) == []


def test_a_retried_call_replaces_its_earlier_attempt_s_segment(store_url):
    ctx = RunContext("r1", "ml-inference", store_url, "tless", "ml-inference/outputs/r1", "shm", shm_owner=shm.owner())
    call = Call("ml-inference", "partition", 0, {"prefix": BATCH_PREFIX, "num_funcs": 2})
    try:
        first = runner.execute(call, ctx)
        ref = next(first.refs())
        written = bytes(shm.open_view(ref.shm, ref.nbytes, owner_tag=ctx.shm_owner, run_id="r1", what="test"))
        again = runner.execute(call, ctx)  # as a retry would, with the same segment names
        refs = list(again.refs())
        assert [r.shm for r in refs] == [r.shm for r in first.refs()] and all(r.shm for r in refs)
        assert [r.nbytes for r in refs] == [r.nbytes for r in first.refs()]
        # Nothing hashed (a random id names each output), but the same bytes in the same place.
        assert len({r.sha256 for r in refs} | {r.sha256 for r in first.refs()}) == 2 * len(refs)
        assert shm.listed(shm.owner()) == sorted(r.shm for r in refs)  # no temporary left over
        view = shm.open_view(refs[0].shm, refs[0].nbytes, owner_tag=ctx.shm_owner, run_id="r1", what="test")
        assert bytes(view) == written and view.readonly
        assert codec.decode(view, verify=False)["keys"] == codec.decode(written, verify=False)["keys"]
        # A payload with no checksum never passes where payloads are verified (the store's, the network's).
        with pytest.raises(codec.CodecError, match="carries no checksum"):
            codec.decode(written)
    finally:
        shm.remove_run(shm.owner(), "r1")
    assert shm.listed(shm.owner()) == []


def _start_cli(args: list[str], log, **env) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MLWF_")}
    full.update(env)
    return subprocess.Popen([sys.executable, "-m", "mlwf.cli", *args], stdin=subprocess.DEVNULL,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=full, start_new_session=True)


def test_a_killed_driver_s_segments_go_with_the_next_run(store_url, tmp_path):
    marker = f"score:0:hang:{uuid.uuid4().int % 90 + 10}"
    claims = os.path.join(tempfile.gettempdir(), "mlwf-faults", "*", marker.replace(":", "-") + "-0")
    since = time.time() - 1
    log = tmp_path / "run.log"
    proc = _start_cli(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url, "--workers", "2",
                       "--transfer", "shm", *FAST_FLAGS], log, MLWF_FAULTS=marker)
    deadline = time.monotonic() + 120
    while not any(os.path.getmtime(p) >= since for p in glob.glob(claims)):  # until score[0] hangs
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.1)
    assert any("-train-" in n for n in _driver_segments(proc.pid))  # train's outputs are in shared memory
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_for_empty_group(proc.pid, 15) == {}  # its workers are gone too
    left = _driver_segments(proc.pid)  # score[1] may have written its output meanwhile
    assert any("-train-" in n for n in left), left  # nobody removed them: the driver was killed
    with Engine(store_url, "tless", transfer="shm", workers=1):
        assert _driver_segments(proc.pid) == []


def test_two_runs_at_once_never_remove_each_other_s_segments(store_url, tmp_path):
    hold = threading.Event()
    seen = _SeenAfter("train", hold)
    result = {}

    def first_run():
        try:
            with Engine(store_url, "tless", transfer="shm", workers=2, progress=seen) as engine:
                result["report"] = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e
            seen.reached.set()

    thread = threading.Thread(target=first_run)
    thread.start()
    try:
        assert seen.reached.wait(120) and "error" not in result, result
        mine = _driver_segments(os.getpid())
        assert mine
        # Meanwhile another driver runs a whole shm run (its start sweeps /dev/shm), and runs gc sweeps too.
        other = _start_cli(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url, "--workers", "1",
                            "--transfer", "shm", "--no-publish", *FAST_FLAGS], tmp_path / "other.log")
        assert other.wait(120) == 0, (tmp_path / "other.log").read_text(errors="replace")
        assert main(["runs", "gc", "--keep", "100", "--store", store_url, "--bucket", "tless"]) == 0
        assert _driver_segments(other.pid) == []
        assert _driver_segments(os.getpid()) == mine
    finally:
        hold.set()
        thread.join(120)
    assert "error" not in result, result
    assert _driver_segments(os.getpid()) == []


def test_runs_gc_removes_dead_drivers_segments_only(store_url, capsys):
    """Other drivers on the machine may have left segments too: only these three are looked at."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = int(done.stdout)
    me = shm.owner()
    pid, start = me.split(".")
    names = [f"mlwf-{dead}.{shm.start_time(os.getpid())}-run-train-0-0",  # a pid no longer running
             f"mlwf-{pid}.{int(start) + 1}-run-train-0-0",  # this pid, but another process's start: reused
             f"mlwf-{me}-{uuid.uuid4().hex}-train-0-0"]  # this live driver's: kept
    for name in names:
        with open(os.path.join(shm.DIR, name), "wb") as f:
            f.write(b"x")
    try:
        assert main(["runs", "gc", "--keep", "1", "--store", store_url, "--bucket", "tless", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["shm_segments"] >= 2
        assert [n for n in names if os.path.exists(os.path.join(shm.DIR, n))] == names[2:]
    finally:
        for name in names:
            if os.path.exists(os.path.join(shm.DIR, name)):
                os.unlink(os.path.join(shm.DIR, name))


# --------------------------------------------------------------------------- refusals
def test_a_crafted_reference_is_refused_before_the_stage_runs(store_url, tmp_path):
    owner = shm.owner()
    run_id = f"r{uuid.uuid4().hex[:8]}"
    ctx = RunContext(run_id, "ml-inference", store_url, "tless", f"ml-inference/outputs/{run_id}", "shm",
                     shm_owner=owner)
    target = tmp_path / "secret.bin"
    target.write_bytes(b"x" * 64)
    link = f"mlwf-{owner}-{run_id}-load-0-0"
    os.symlink(target, os.path.join(shm.DIR, link))
    try:
        for name, why in (("../x", "not one of this run's"), ("/etc/passwd", "not one of this run's"),
                          ("mlwf-1.2-other-load-0-0", "not one of this run's"), ("psm_1234", "not one of this run's"),
                          (f"mlwf-{owner}-{run_id}-load-0-0/../../x", "not one of this run's"),
                          (link, "is a symbolic link"), (f"mlwf-{owner}-{run_id}-load-0-1", "is gone")):
            ref = Ref(sha256="0" * 64, nbytes=64, shm=name, producer="load")
            call = Call("ml-inference", "predict", 0, {"model": ref, "assignment": {"keys": [], "labels": []}})
            with pytest.raises(DataError, match=why) as info:
                runner.execute(call, ctx)
            assert "\n" not in str(info.value) and "predict[0]" in str(info.value)
    finally:
        os.unlink(os.path.join(shm.DIR, link))


def test_resume_and_backends_without_shared_memory_refuse_shm(store_url, monkeypatch):
    with Engine(store_url, "tless", transfer="shm", workers=1) as engine, \
            pytest.raises(UsageError, match="--resume needs --transfer store: a shm-transfer run keeps no outputs"):
        engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, resume="latest")
    monkeypatch.setenv("MLWF_FUNCTION_SECRET", "s" * 32)
    with pytest.raises(UsageError, match=r"cannot do --transfer shm \(each function runs in its own pod.*use store"):
        Engine(store_url, "tless", backend="knative", transfer="shm",
               backend_options={"endpoints": "http://127.0.0.1:9"})
