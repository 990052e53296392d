"""Run records: leases and abandoned runs, listing, and a gc that deletes only what it should."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import time

import pytest

from mlwf.cli import main
from mlwf.engine.driver import Engine
from mlwf.errors import UsageError
from mlwf.runs import DEFAULT_LEASE_S, effective_status, gc_runs, list_runs
from mlwf.storage import StoreSpec
from tests.conftest import FAST, TRAIN_PREFIX

NOW = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.UTC)


def at(seconds_ago: float) -> str:
    return (NOW - dt.timedelta(seconds=seconds_ago)).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------- effective_status
@pytest.mark.parametrize("record, status", [
    ({"status": "succeeded", "heartbeat_at": at(10**6)}, "succeeded"),
    ({"status": "failed"}, "failed"),
    ({"status": "running", "heartbeat_at": at(5), "lease_s": 120}, "running"),
    ({"status": "running", "heartbeat_at": at(119), "lease_s": 120}, "running"),
    ({"status": "running", "heartbeat_at": at(121), "lease_s": 120}, "abandoned"),
    ({"status": "running", "heartbeat_at": at(3), "lease_s": 2}, "abandoned"),
    # Records written before leases existed: updated_at and the default lease.
    ({"status": "running", "updated_at": at(DEFAULT_LEASE_S - 1)}, "running"),
    ({"status": "running", "updated_at": at(DEFAULT_LEASE_S + 1)}, "abandoned"),
    # Nothing is renewing these.
    ({"status": "running"}, "abandoned"),
    ({"status": "running", "heartbeat_at": "yesterday"}, "abandoned"),
    ({"status": "running", "heartbeat_at": "2026-11-28T12:00:00"}, "abandoned"),  # no time zone
    ({"status": "running", "heartbeat_at": at(-10**6), "lease_s": 120}, "abandoned"),  # far in the future
    ({"status": "running", "heartbeat_at": at(1), "lease_s": float("nan")}, "running"),  # default lease
    ({"status": "running", "heartbeat_at": at(DEFAULT_LEASE_S + 1), "lease_s": float("inf")}, "abandoned"),
    ({"status": "running", "heartbeat_at": at(DEFAULT_LEASE_S + 1), "lease_s": True}, "abandoned"),
    ({"status": "running", "heartbeat_at": at(DEFAULT_LEASE_S + 1), "lease_s": "9999"}, "abandoned"),
    ({"status": "paused"}, "unknown"),
    ({"status": ["running"]}, "unknown"),
    ({}, "unknown"),
    ([], "unknown"),
])
def test_effective_status(record, status):
    assert effective_status(record, NOW) == status
    assert effective_status(record, NOW.timestamp()) == status  # seconds since the epoch work too


# --------------------------------------------------------------------------- gc
def put_run(store, run_id: str, record: dict | bytes | None, *, workflow="ml-training") -> dict[str, bytes]:
    """A run folder as a driver leaves it (record, intermediates, results) plus a user's own files."""
    base = f"{workflow}/outputs/{run_id}/"
    objects = {
        base + "pca/0-0.bin": b"intermediate",
        base + "pca/0.done.json": b"{}",
        base + "partition/0-1.bin": b"intermediate",
        base + "predictions.csv": b"key,prediction\n",
        base + "summary.json": b"{}",
        base + "notes/0-0.bin": b"a user's file named like an intermediate, in no stage folder",
        base + "pca/MODEL.json": b"{}",                 # a model published inside the run folder
        base + "pca/versions/0-0.bin": b"model bytes",
    }
    if record is not None:
        objects[base + "run.json"] = record if isinstance(record, bytes) else json.dumps(record).encode()
    store.put_many(objects.items())
    return objects


def intermediates(run_id: str, workflow="ml-training") -> set[str]:
    base = f"{workflow}/outputs/{run_id}/"
    return {base + "pca/0-0.bin", base + "pca/0.done.json", base + "partition/0-1.bin"}


def record(run_id: str, status="succeeded", workflow="ml-training", **extra) -> dict:
    return {"run_id": run_id, "workflow": workflow, "status": status, "params": {}, "updated_at": at(0),
            "heartbeat_at": at(0), "lease_s": 120, **extra}


def snapshot(store) -> dict[str, bytes]:
    keys = [o.key for o in store.list()]
    return dict(zip(keys, store.get_many(keys)))


@pytest.fixture
def store(tmp_path):
    spec = StoreSpec(str(tmp_path / "store"), "tless")
    s = spec.open()
    s.create_bucket()
    s.put("ml-inference/model/MODEL.json", b"{}")
    s.put("ml-inference/model/versions/x.mlwf", b"model")
    s.put("data/0/a.png", b"image")
    yield s
    s.close()


def run_id(i: int) -> str:
    return f"20261101T0000{i:02d}.000000Z-0000{i:02x}"


#: Records gc cannot trust, each a function of the folder it is put in.
ODD = [
    lambda f: {k: v for k, v in record(f).items() if k != "run_id"},
    lambda f: record(None),  # type: ignore[arg-type]
    lambda f: record("20261128T000000.000000Z-aaaaaa"),  # another run's id
    lambda f: record("../.."),
    lambda f: record(""),
    lambda f: record(5),  # type: ignore[arg-type]
    lambda f: record(f, workflow="ml-inference"),
    lambda f: {k: v for k, v in record(f).items() if k != "params"},
    lambda f: b"{not json",
    lambda f: b"[]",
    lambda f: b"[" * 100_000 + b"]" * 100_000,
    lambda f: b'{"pad": "' + b"x" * (5 << 20) + b'"}',
    lambda f: None,  # no run.json at all
]


def test_gc_skips_and_reports_every_run_it_cannot_read_and_deletes_only_intermediates(store):
    odd = [run_id(i) for i in range(len(ODD))]
    for folder, make in zip(odd, ODD):
        put_run(store, folder, make(folder))
    put_run(store, "not-a-run", record("not-a-run"))  # a folder not named like a run id mlwf makes
    old, kept = "20261101T000000.000000Z-a00001", "20261102T000000.000000Z-a00002"
    put_run(store, old, record(old))
    put_run(store, kept, record(kept))
    before = snapshot(store)

    result = gc_runs(store, keep=1)

    assert result["runs"] == [old] and result["kept"] == [kept]
    assert result["deleted"] == len(intermediates(old))
    assert {s["run_id"] for s in result["skipped"]} == {*odd, "not-a-run"}
    assert all(s["reason"].startswith("unreadable") for s in result["skipped"])
    assert snapshot(store) == {k: v for k, v in before.items() if k not in intermediates(old)}


def test_gc_never_deletes_a_run_it_was_told_to_keep_even_with_a_bad_record_beside_it(store):
    # The defect this guards against: one run.json without a run_id made gc delete every run's outputs.
    ids = [f"20261101T00000{i}.000000Z-00000{i}" for i in range(3)]
    for run_id in ids:
        put_run(store, run_id, record(run_id))
    put_run(store, "20261201T000000.000000Z-ffffff", {k: v for k, v in record("x").items() if k != "run_id"})
    before = snapshot(store)
    result = gc_runs(store, keep=3)
    assert result["runs"] == [] and result["deleted"] == 0 and sorted(result["kept"]) == ids
    assert snapshot(store) == before


def test_gc_collects_abandoned_runs_and_leaves_running_ones(store):
    now = dt.datetime.now(dt.UTC)
    live, abandoned, old_style = "20261101T000000.000000Z-000001", "20261101T000000.000000Z-000002", \
        "20261101T000000.000000Z-000003"
    put_run(store, live, record(live, "running", heartbeat_at=now.isoformat()))
    put_run(store, abandoned, record(abandoned, "running", heartbeat_at=(now - dt.timedelta(seconds=121)).isoformat()))
    put_run(store, old_style, {"run_id": old_style, "workflow": "ml-training", "status": "running", "params": {},
                               "updated_at": "2026-01-01T00:00:00+00:00"})  # written before leases existed
    before = snapshot(store)
    statuses = {r["run_id"]: r["status"] for r in list_runs(store)}
    assert statuses == {live: "running", abandoned: "abandoned", old_style: "abandoned"}
    result = gc_runs(store, keep=0)
    assert result["runs"] == sorted([abandoned, old_style])
    assert result["skipped"] == [{"run_id": live, "workflow": "ml-training", "reason": "running"}]
    gone = intermediates(abandoned) | intermediates(old_style)
    assert snapshot(store) == {k: v for k, v in before.items() if k not in gone}


def test_runs_ls_and_gc_on_the_command_line_show_abandoned_and_unreadable_runs(store, capsys):
    abandoned = run_id(1)
    put_run(store, abandoned, record(abandoned, "running", heartbeat_at="2026-01-01T00:00:00+00:00"))
    put_run(store, run_id(2), b"{not json")
    where = ["--store", store.root.as_posix(), "--bucket", "tless"]
    assert main(["runs", "ls", "--json", *where]) == 0
    runs = {r["run_id"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert runs[abandoned]["status"] == "abandoned" and runs[abandoned]["progress"]["pca"] == "1/0"
    assert runs[run_id(2)]["status"] == "unreadable" and "not valid JSON" in runs[run_id(2)]["error"]
    assert main(["runs", "ls", *where]) == 0
    assert "abandoned" in capsys.readouterr().out
    assert main(["runs", "gc", "--keep", "0", *where]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("deleted 3 intermediate objects (26 B) of 1 run; 1 unreadable") and "1 unreadable" in out
    assert err == (f"mlwf: warning: left ml-training/outputs/{run_id(2)}/ alone: unreadable: run.json is not "
                   "valid JSON\n")


@pytest.mark.parametrize("keep", ["-1", "x", "1.5", ""])
def test_gc_refuses_a_bad_keep_in_one_line_and_deletes_nothing(store, capsys, keep):
    put_run(store, "20261101T000000.000000Z-000001", record("20261101T000000.000000Z-000001"))
    before = snapshot(store)
    assert main(["runs", "gc", "--keep", keep, "--store", store.root.as_posix()]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--keep" in err
    assert snapshot(store) == before
    with pytest.raises(UsageError):
        gc_runs(store, True)


# --------------------------------------------------------------------------- the driver's lease
def test_a_run_renews_its_lease_while_going_and_its_end_is_never_overwritten(engine):
    with Engine(engine.spec.url, "tless", heartbeat_s=0.05, lease_s=0.5) as e:
        run = e.start_run("ml-training", {"probe": 1})
        key = f"ml-training/outputs/{run.run_id}/run.json"
        first = json.loads(e.store.get(key))
        assert first["status"] == "running" and first["lease_s"] == 0.5
        deadline = time.monotonic() + 30
        while json.loads(e.store.get(key))["heartbeat_at"] == first["heartbeat_at"]:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.02)
        run.finish({"e2e_ms": 1})
        time.sleep(0.3)  # several heartbeat intervals: a late beat must not bring 'running' back
        last = json.loads(e.store.get(key))
        assert last["status"] == "succeeded" and not run._heartbeat.is_alive()


def test_a_live_run_cannot_be_resumed_but_an_abandoned_one_can(engine):
    report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    key = f"ml-training/outputs/{report['run_id']}/run.json"
    rec = json.loads(engine.store.get(key))
    now = dt.datetime.now(dt.UTC)
    engine.store.put(key, json.dumps({**rec, "status": "running", "heartbeat_at": now.isoformat(),
                                      "lease_s": 600}).encode())
    with pytest.raises(UsageError, match="is still running"):
        engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False, resume=report["run_id"])
    engine.store.put(key, json.dumps({**rec, "status": "running", "lease_s": 600,
                                      "heartbeat_at": (now - dt.timedelta(seconds=601)).isoformat()}).encode())
    resumed = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False, resume=report["run_id"])
    assert resumed["model_digest"] == report["model_digest"] and resumed["stages"]["train"]["reused"] == 4
    assert json.loads(engine.store.get(key))["status"] == "succeeded"


@pytest.mark.parametrize("content, match", [(b"{not json", r"not a run record mlwf can read \(its run.json is not valid JSON\)"),
                                            (b'{"run_id": "someone-else"}', "names another run")])
def test_resuming_a_run_whose_record_is_unreadable_is_one_line(engine, content, match):
    report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    engine.store.put(f"ml-training/outputs/{report['run_id']}/run.json", content)
    with pytest.raises(UsageError, match=match):
        engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False, resume=report["run_id"])


@pytest.mark.parametrize("name, value", [("heartbeat_s", 0), ("heartbeat_s", float("inf")), ("lease_s", -1),
                                         ("lease_s", float("nan")), ("lease_s", 0.01)])
def test_bad_lease_settings_are_refused(store_url, name, value):
    with pytest.raises(UsageError, match="heartbeat|lease"):
        Engine(store_url, "tless", **{name: value})


def test_bad_lease_settings_from_the_environment_are_refused(store_url, monkeypatch, capsys):
    monkeypatch.setenv("MLWF_LEASE_S", "soon")
    assert main(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url]) == 2
    assert "MLWF_LEASE_S" in capsys.readouterr().err


def test_gc_says_what_it_kept_per_workflow_and_what_it_freed(store, capsys):
    # Three runs of each workflow: '--keep 2' keeps the two newest of each (4 runs), collects the other two.
    for i in range(1, 7):
        workflow = "ml-training" if i % 2 else "ml-inference"
        put_run(store, run_id(i), record(run_id(i), workflow=workflow), workflow=workflow)
    where = ["--store", store.root.as_posix(), "--bucket", "tless"]
    assert main(["runs", "gc", "--keep", "2", *where]) == 0
    assert capsys.readouterr().out == (
        "deleted 4 intermediate objects (38 B) of 2 runs; kept the 2 newest runs of each workflow whole (4 runs) "
        "(run records, results and models are never deleted)\n")
    assert main(["runs", "gc", "--keep", "2", "--json", *where]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["keep"], len(result["kept"]), result["runs"], result["freed_bytes"]) == (2, 4, [], 0)


def test_runs_ls_json_has_what_the_table_shows_and_what_the_store_keeps(engine, capsys):
    report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    where = ["--store", engine.spec.url]
    assert main(["runs", "ls", "--json", *where]) == 0
    listing = json.loads(capsys.readouterr().out)
    [run] = listing["runs"]
    assert run["status"] == "succeeded" and run["accuracy"] == report["validation_accuracy"]
    assert run["duration_ms"] == report["e2e_ms"] and run["started_at"].endswith("+00:00")
    assert 0 < run["intermediate_bytes"] < run["bytes"] == listing["bytes"]
    assert (listing["store"], listing["bucket"]) == (engine.store.location, "tless")


# --------------------------------------------------------------------------- how to resume a run
FAST_FLAGS = ["--image-size", "16", "--components", "6", "--trees", "12", "--max-depth", "8"]


def _abandon(store, workflow: str, run_id: str) -> None:
    """Make the run's record say what a killed driver's says: ``running``, its lease long expired."""
    key = f"{workflow}/outputs/{run_id}/run.json"
    rec = json.loads(store.get(key))
    store.put(key, json.dumps({**rec, "status": "running", "lease_s": 1,
                               "heartbeat_at": at(10**6)}).encode())


def test_runs_show_prints_the_command_that_resumes_an_abandoned_run_and_it_does(store_url, capsys):
    where = ["--store", store_url]
    assert main(["run", "ml-training", TRAIN_PREFIX, "2", "4", *FAST_FLAGS, "--no-publish", "--json",
                 *where]) == 0
    run_id = json.loads(capsys.readouterr().out)["run_id"]
    store = StoreSpec(store_url, "tless").open()
    _abandon(store, "ml-training", run_id)
    store.close()
    assert main(["runs", "show", run_id, "--json", *where]) == 0
    shown = json.loads(capsys.readouterr().out)
    command = (f"mlwf run ml-training {TRAIN_PREFIX} 2 4 {' '.join(FAST_FLAGS)} --no-publish --json "
               f"--store {store_url} --resume {run_id}")
    assert shown["status"] == "abandoned" and shown["resume"] == command
    assert main(["runs", "show", run_id, *where]) == 0
    # One line, whole, to copy (a pipe is wide enough for it: never folded inside the table's frame).
    assert f"resume with  {command}" in capsys.readouterr().out.splitlines()
    # The printed command finishes the run, reusing its calls; then there is nothing to resume.
    assert main(shlex.split(command)[1:]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run_id"] == run_id and report["stages"]["train"]["reused"] == 4
    assert main(["runs", "show", run_id, "--json", *where]) == 0
    assert json.loads(capsys.readouterr().out)["resume"] is None


@pytest.mark.parametrize("command", [
    None,                                                                  # a run started from Python
    ["bench", "ml-training"],                                              # not a run's command line
    ["run", "ml-training", "--store", "s3://key:secret@host/x"],            # credentials
    ["run", "ml-training", "--bucket", "a\x1b[2Jb"],                        # a terminal escape
    ["run", "ml-training", "x\ny"],                                         # a line break
    ["run", "ml-training", *["x"] * 1000],                                  # too many words
    ["run", "ml-training", "x" * 100_000],                                  # too long
    "run ml-training",                                                     # not a list of words
    ["run", 5],
])
def test_runs_show_gives_no_command_it_should_not_and_says_how_to_resume_instead(store, capsys, command):
    rid = run_id(1)
    put_run(store, rid, record(rid, status="interrupted", **({} if command is None else {"command": command})))
    assert main(["runs", "show", rid, "--json", "--store", store.root.as_posix(), "--bucket", "tless"]) == 0
    assert json.loads(capsys.readouterr().out)["resume"] == f"its own command line and '--resume {rid}'"


@pytest.mark.parametrize("status, transfer", [("succeeded", "store"), ("failed", "store"),
                                              ("interrupted", "direct"), ("interrupted", "shm")])
def test_runs_show_offers_no_resume_for_a_run_that_cannot_be_resumed(store, capsys, status, transfer):
    rid = run_id(2)
    put_run(store, rid, record(rid, status=status, transfer=transfer, command=["run", "ml-training", "x"]))
    assert main(["runs", "show", rid, "--json", "--store", store.root.as_posix(), "--bucket", "tless"]) == 0
    assert json.loads(capsys.readouterr().out)["resume"] is None
    assert main(["runs", "show", rid, "--store", store.root.as_posix(), "--bucket", "tless"]) == 0
    assert "resume with" not in capsys.readouterr().out
