"""mlwf ui without a browser: its command line, its guard, its JSON API over a store of 1,000 runs.

The pages themselves, drawn by a real browser, are tests/test_ui_browser.py's.
"""

from __future__ import annotations

import json
import os
import socket
import tomllib
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from mlwf.cli import main
from mlwf.errors import ModelError
from mlwf.runs import list_runs
from mlwf.storage import StoreSpec
from mlwf.ui.app import STATIC, Dashboard
from mlwf.ui.index import MAX_PER_PAGE, PER_PAGE

REPO = Path(__file__).resolve().parent.parent
PORT = 8265
BASE = f"http://127.0.0.1:{PORT}"


def synthetic_run_id(i: int) -> str:
    return f"20261101T{i // 3600 % 24:02d}{i // 60 % 60:02d}{i % 60:02d}.{i:06d}Z-{i % 0xffffff:06x}"


def write_synthetic_runs(store, n: int) -> list[str]:
    """``n`` finished runs, as a driver records them (``run.json`` only: the format mlwf.runs reads)."""
    ids = []
    for i in range(n):
        run_id = synthetic_run_id(i)
        workflow = "ml-training" if i % 3 else "ml-inference"
        report = {"backend": "local", "e2e_ms": 1000.0 + i, "stages": {"partition": {"calls": 1}},
                  ("validation_accuracy" if workflow == "ml-training" else "accuracy"): 0.5 + (i % 50) / 100}
        record = {"run_id": run_id, "workflow": workflow, "status": "succeeded" if i % 7 else "failed",
                  "params": {"i": i}, "backend": "local", "transfer": "store",
                  "started_at": "2026-11-01T00:00:00.000+00:00", "updated_at": "2026-11-01T00:00:01.000+00:00",
                  "heartbeat_at": "2026-11-01T00:00:01.000+00:00", "lease_s": 120,
                  **({"report": report} if i % 7 else {"error": "stage pca failed: boom", "failed_stage": "pca"})}
        store.put(f"{workflow}/outputs/{run_id}/run.json", json.dumps(record).encode())
        ids.append(run_id)
    return ids


@pytest.fixture
def store(tmp_path):
    s = StoreSpec(str(tmp_path / "store"), "tless").open()
    s.create_bucket()
    yield s
    s.close()


@pytest.fixture
def client(store):
    dashboard = Dashboard(store, host="127.0.0.1", port=PORT)
    dashboard.index.list_interval_s = 0.0  # every request lists again: what changed is seen at once
    with TestClient(dashboard.asgi, base_url=BASE) as c:
        c.dashboard = dashboard
        yield c


# --------------------------------------------------------------------------- the command line
def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    return err


def test_a_port_out_of_range_is_one_line(store, capsys):
    err = _one_line_error(capsys, ["ui", "--store", store.location, "--port", "70000"])
    assert "--port 70000 is not a port number" in err


def test_a_port_in_use_is_one_line(store, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        err = _one_line_error(capsys, ["ui", "--store", store.location, "--port", str(port)])
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err


@pytest.mark.parametrize("argv, expected", [
    (["--host", "no such host.invalid"], "cannot listen on no such host.invalid"),
    (["--port", "eighty"], "invalid int value"),
    (["--bench", "/nonexistent/bench"], "is not a 'mlwf bench' output folder"),
])
def test_bad_input_is_one_line(store, capsys, argv, expected):
    err = _one_line_error(capsys, ["ui", "--store", store.location, *argv])
    assert expected in err


def test_the_assets_ship_with_the_package():
    """A non-editable install carries the page, script and style sheet (pyproject's package-data)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["package-data"]["mlwf.ui"] == ["static/*"]
    assert {p.name for p in STATIC.iterdir()} >= {"page.html", "app.js", "style.css"}
    page = (STATIC / "page.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere
    for asset in ("app.js", "style.css"):
        text = (STATIC / asset).read_text()
        assert "https://" not in text and "@import" not in text and "url(" not in text, asset


# --------------------------------------------------------------------------- the runs list
def test_1000_runs_come_a_page_at_a_time_and_are_read_once(client, store):
    ids = write_synthetic_runs(store, 1000)
    first = client.get("/api/runs").json()
    assert first["total"] == first["all"] == 1000
    assert [r["run_id"] for r in first["runs"]] == sorted(ids, reverse=True)[:PER_PAGE]
    assert first["records_read"] == 1000  # each record read once...
    again = client.get("/api/runs", params={"page": 3}).json()
    assert again["records_read"] == 1000  # ...and not again while it has not changed
    assert [r["run_id"] for r in again["runs"]] == sorted(ids, reverse=True)[2 * PER_PAGE:3 * PER_PAGE]
    # A reply is one page, whatever is asked for: its size does not grow with the store.
    huge = client.get("/api/runs", params={"per_page": 10**6})
    assert len(huge.json()["runs"]) == MAX_PER_PAGE and len(huge.content) < 200 * MAX_PER_PAGE * 4
    failed = client.get("/api/runs", params={"status": "failed", "workflow": "ml-inference"}).json()
    assert failed["total"] == sum(1 for i in range(1000) if i % 7 == 0 and i % 3 == 0)
    assert client.get("/api/runs", params={"q": ids[123]}).json()["runs"][0]["run_id"] == ids[123]


def test_the_list_is_what_list_runs_says_and_a_changed_record_is_read_again(client, store):
    ids = write_synthetic_runs(store, 30)
    listed = client.get("/api/runs", params={"per_page": 100}).json()["runs"]
    expected = list_runs(store)
    keys = ("run_id", "workflow", "status", "accuracy", "duration_ms", "progress", "error")
    assert [{k: r[k] for k in keys} for r in listed] == [{k: r[k] for k in keys} for r in expected]
    key = f"ml-training/outputs/{ids[1]}/run.json"
    record = json.loads(store.get(key))
    store.put(key, json.dumps({**record, "status": "interrupted", "report": None}).encode())
    row = next(r for r in client.get("/api/runs", params={"q": ids[1]}).json()["runs"])
    assert row["status"] == "interrupted"


# --------------------------------------------------------------------------- 404s and the guard
@pytest.mark.parametrize("path", ["/runs/nope", "/runs/20261101T000000.000000Z-zzzzzz", "/runs/..%2F..%2Fetc%2Fpasswd",
                                  "/runs/%00", "/nowhere", "/static/..%2Fapp.py", "/api/runs/..%2Frun.json/trace.json"])
def test_a_wrong_or_malformed_id_is_a_clean_404(client, path):
    answer = client.get(path)
    assert answer.status_code == 404
    assert "Traceback" not in answer.text and "root:" not in answer.text
    if not path.startswith("/api/"):
        assert answer.headers["content-type"].startswith("text/html") and "Not found" in answer.text


def test_an_unknown_run_is_404_in_the_api_too(client, store):
    write_synthetic_runs(store, 2)
    assert client.get(f"/api/runs/{synthetic_run_id(5)}").status_code == 404
    assert client.get(f"/api/runs/{synthetic_run_id(1)}").status_code == 200
    assert client.get(f"/api/runs/{synthetic_run_id(1)}/trace.json").status_code == 404  # none kept


def test_requests_naming_another_host_are_refused(client):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 reads nothing."""
    assert client.get("/api/runs", headers={"host": f"evil.example:{PORT}"}).status_code == 421
    assert client.get("/api/runs", headers={"host": "127.0.0.1:1"}).status_code == 421
    assert client.get("/api/runs", headers={"host": f"localhost:{PORT}"}).status_code == 200


def test_every_page_forbids_loading_anything_from_elsewhere(client):
    policy = client.get("/").headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "http" not in policy


def _publish_two(store) -> tuple[str, str]:
    from mlwf import codec
    from mlwf.model.registry import publish
    from tests.test_model import _tree_meta

    first = codec.encode(_tree_meta())
    second = codec.encode(_tree_meta(threshold=np.array([0.25, 0.5, 0, 0, 0], np.float64)))
    publish(store, "ml-inference/model", first, run_id="a")
    publish(store, "ml-inference/model", second, run_id="b")
    return codec.digest(first), codec.digest(second)


def test_a_rollback_needs_the_token_the_origin_and_a_post(client, store):
    older, current = _publish_two(store)
    body = {"prefix": "ml-inference/model", "expected": current}
    token, origin = client.dashboard.token, BASE
    assert client.post("/api/models/rollback", json=body, headers={"origin": origin}).status_code == 403
    assert client.post("/api/models/rollback", json=body,
                       headers={"origin": "http://evil.example", "x-mlwf-token": token}).status_code == 403
    assert client.post("/api/models/rollback", json=body, headers={"x-mlwf-token": token}).status_code == 403
    assert client.put("/api/models/rollback", json=body,
                      headers={"origin": origin, "x-mlwf-token": token}).status_code == 405
    assert client.get("/api/models/rollback").status_code in (404, 405)
    manifest = json.loads(store.get("ml-inference/model/MODEL.json"))
    assert manifest["sha256"] == current  # nothing of that wrote
    done = client.post("/api/models/rollback", json=body, headers={"origin": origin, "x-mlwf-token": token})
    assert done.status_code == 200 and done.json()["sha256"] == older
    # The same change 'mlwf model rollback' makes: the older version current, the replaced one first in history.
    manifest = json.loads(store.get("ml-inference/model/MODEL.json"))
    assert manifest["sha256"] == older and manifest["history"][0]["sha256"] == current


def test_a_rollback_of_a_version_no_longer_current_is_refused(client, store):
    older, current = _publish_two(store)
    answer = client.post("/api/models/rollback", json={"prefix": "ml-inference/model", "expected": older},
                         headers={"origin": BASE, "x-mlwf-token": client.dashboard.token})
    assert answer.status_code == 409 and "changed since you looked" in answer.json()["error"]
    assert json.loads(store.get("ml-inference/model/MODEL.json"))["sha256"] == current


def test_rollback_with_expected_is_checked_inside_the_compare_and_swap(store):
    from mlwf.model.registry import rollback

    older, current = _publish_two(store)
    with pytest.raises(ModelError, match="changed since you looked"):
        rollback(store, "ml-inference/model", expected=older)
    assert rollback(store, "ml-inference/model", expected=current)["sha256"] == older


def test_a_bench_folder_is_read_as_summary_and_median_edges(tmp_path):
    import csv

    from mlwf.bench.files import BREAKDOWN_COLUMNS, SUMMARY_COLUMNS
    from mlwf.ui import views

    with open(tmp_path / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, SUMMARY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerow({"backend": "local", "transfer": "store", "workflow": "ml-training", "mode": "warm",
                    "state": "light", "runs": 2, "median_ms": 120.5, "min_ms": 110, "max_ms": 131})
    with open(tmp_path / "breakdown.csv", "w", newline="") as f:
        w = csv.DictWriter(f, BREAKDOWN_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for run, ms in enumerate((1.0, 3.0)):
            w.writerow({"backend": "local", "transfer": "store", "workflow": "ml-training", "mode": "warm",
                        "state": "light", "run": run, "kind": "edge", "from": "pca", "to": "train", "bytes": 100,
                        "serialize_ms": ms, "transfer_ms": ms, "deserialize_ms": ms})
    found = views.bench(tmp_path)
    assert found["summary"][0]["median_ms"] == "120.5"
    assert found["edges"] == [{"backend": "local", "transfer": "store", "workflow": "ml-training", "mode": "warm",
                               "state": "light", "edge": "pca→train", "serialize_ms": 2.0, "transfer_ms": 2.0,
                               "deserialize_ms": 2.0, "bytes": 100.0}]


def test_a_run_that_kept_no_trace_is_drawn_from_its_done_records(engine):
    """A choreographed run has no driver to write a trace; its done records say where each call ran."""
    from mlwf.ui import views
    from tests.conftest import FAST, TRAIN_PREFIX

    report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST, publish=False)
    key = f"ml-training/outputs/{report['run_id']}/trace.json"
    traced = views.gantt_calls(json.loads(engine.store.get(key)))
    engine.store.delete(key)
    detail = views.run_detail(engine.store, report["run_id"])
    assert detail["trace"] is False
    assert sorted(c["name"] for c in detail["calls"]) == sorted(c["name"] for c in traced)
    assert len(detail["calls"]) == sum(s["calls"] for s in report["stages"].values())
    assert {c["worker"] for c in detail["calls"]} == {c["worker"] for c in traced}
    assert min(c["start_ms"] for c in detail["calls"]) == 0 and all(c["duration_ms"] > 0 for c in detail["calls"])


def test_a_bench_folder_with_non_finite_figures_leaves_them_out(tmp_path):
    """A hand-edited breakdown.csv with 'nan' or 'inf' must not break the Compare page's JSON."""
    import json as _json

    from mlwf.ui.views import bench

    (tmp_path / "summary.csv").write_text("backend,transfer,workflow,mode,median_ms\nlocal,store,ml-training,warm,5\n")
    (tmp_path / "breakdown.csv").write_text(
        "backend,transfer,workflow,mode,kind,from,to,serialize_ms,transfer_ms,deserialize_ms,bytes\n"
        "local,store,ml-training,warm,edge,pca,train,nan,inf,1.5,10\n"
        "local,store,ml-training,warm,edge,pca,train,2.0,3.0,2.5,10\n")
    found = bench(tmp_path)
    [edge] = found["edges"]
    assert edge["serialize_ms"] == 2.0 and edge["transfer_ms"] == 3.0 and edge["deserialize_ms"] == 2.0
    _json.dumps(found, allow_nan=False)


def test_a_bench_folder_is_read_again_only_when_a_file_changed(tmp_path, monkeypatch):
    """A Compare page loaded again costs a stat of each file, not a parse of 200 KB of CSV."""
    import os

    from mlwf.ui import views

    (tmp_path / "summary.csv").write_text("backend,transfer,workflow,mode,median_ms\nlocal,store,ml-training,warm,5\n")
    from mlwf.bench import files

    reads = []
    real = files.read_csv
    monkeypatch.setattr(files, "read_csv", lambda path: reads.append(path.name) or real(path))
    first = views.bench(tmp_path)
    assert views.bench(tmp_path) == first and reads == ["summary.csv", "breakdown.csv"]
    (tmp_path / "summary.csv").write_text("backend,transfer,workflow,mode,median_ms\nlocal,store,ml-training,warm,7\n")
    os.utime(tmp_path / "summary.csv", ns=(1, 1))  # a changed time, even within the clock's tick
    assert views.bench(tmp_path)["summary"][0]["median_ms"] == "7" and len(reads) == 4


@pytest.mark.parametrize("make, says", [
    (lambda p: os.mkfifo(p), "is not a regular file"),                      # a read would wait forever
    (lambda p: p.mkdir(), "is not a regular file"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00garbage\n"), "is not a CSV file 'mlwf bench' wrote"),
    (lambda p: p.write_text("a,b\n\"" + "x" * 200_000 + "\"\n"), "is not a CSV file 'mlwf bench' wrote"),
    (lambda p: os.truncate(p.write_bytes(b"") or p, (16 << 20) + 1), "over the 16 MiB a benchmark CSV file may take"),
])
def test_a_bench_file_the_dashboard_cannot_read_gives_one_line_and_no_rows(tmp_path, make, says):
    from mlwf.ui import views

    (tmp_path / "summary.csv").write_text("backend,transfer,workflow,mode,median_ms\nlocal,store,ml-training,warm,5\n")
    make(tmp_path / "breakdown.csv")
    found = views.bench(tmp_path)
    assert found["summary"] == [] and found["edges"] == [], found
    assert says in found["error"] and str(tmp_path / "breakdown.csv") in found["error"], found["error"]
    assert "\n" not in found["error"]
