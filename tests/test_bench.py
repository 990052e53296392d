"""Traces of runs (`mlwf run --trace`, `mlwf trace plot`) and the latency benchmark (`mlwf bench`)."""

from __future__ import annotations

import csv
import json
import os
import socket

import pytest

from mlwf import cli
from mlwf.engine import trace
from mlwf.engine.driver import Engine

from tests.conftest import BATCH_PREFIX, FAST, TRAIN_PREFIX

FAST_FLAGS = ["--image-size", str(FAST.image_size), "--components", str(FAST.n_components),
              "--trees", str(FAST.n_trees), "--max-depth", str(FAST.max_depth)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _one_error_line(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("mlwf: error: "), err
    return err[0]


def _calls_and_spans(doc: dict) -> tuple[list[dict], list[dict]]:
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    return [e for e in xs if e["cat"] == "call"], [e for e in xs if "call" in e.get("args", {})]


def _check_nesting(calls: list[dict], spans: list[dict]) -> None:
    by_name = {c["name"]: c for c in calls}
    assert spans
    for s in spans:
        c = by_name[s["args"]["call"]]
        assert (s["pid"], s["tid"]) == (c["pid"], c["tid"])
        assert c["ts"] <= s["ts"] and s["ts"] + s["dur"] <= c["ts"] + c["dur"], (s, c)


def test_run_trace_has_one_event_per_call_with_spans_inside(store_url, tmp_path, capsys):
    path = tmp_path / "train.trace.json"
    code = cli.main(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url, *FAST_FLAGS,
                     "--trace", str(path), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)  # stdout is the report alone, without the trace
    assert "trace" not in report and report["workflow"] == "ml-training"

    doc = json.loads(path.read_text())
    calls, spans = _calls_and_spans(doc)
    expected = {"partition[0]", "pca[0]", "pca[1]", "score[0]", "score[1]", "validation[0]",
                *(f"train[{i}]" for i in range(4))}
    assert sorted(c["name"] for c in calls) == sorted(expected)
    for c in calls:
        assert c["name"] == f"{c['args']['stage']}[{c['args']['index']}]"
        assert c["args"]["worker"].count(":") == 1 and c["dur"] > 0
    _check_nesting(calls, spans)
    names = {s["name"] for s in spans}
    assert {"compute", "store read", "input read", "deserialize", "serialize", "store write"} <= names
    # Every worker is a named process; the driver has one span per stage.
    procs = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M"
             and e["name"] == "process_name"}
    assert {procs[c["pid"]] for c in calls} == {f"worker {c['args']['worker']}" for c in calls}
    driver = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["cat"] == "stage"]
    assert sorted(e["name"] for e in driver) == ["partition", "pca", "score", "train", "validation"]
    assert all(procs[e["pid"]] == "driver" and e["args"]["source"] == "driver" for e in driver)
    assert doc["otherData"]["run_id"] == report["run_id"]


def test_trace_of_a_direct_inference_run_from_the_engine(trained, store_url):
    _, _ = trained
    clock = trace.StageClock()
    with Engine(store_url, "tless", transfer="direct", progress=clock) as engine:
        report = engine.run_inference("ml-inference/model", BATCH_PREFIX, 3)
        doc = trace.build(engine.last_run, report, clock)
    calls, spans = _calls_and_spans(doc)
    assert sorted(c["name"] for c in calls) == ["load[0]", "partition[0]", "predict[0]", "predict[1]", "predict[2]"]
    _check_nesting(calls, spans)
    assert not any(s["name"] in ("store write", "input read") for s in spans)  # direct: nothing via the store
    returns = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["name"].endswith("outputs → driver")]
    assert len(returns) == len(calls)
    # partition and load ran concurrently: their driver spans sit on separate lanes
    stages = {e["name"]: e for e in doc["traceEvents"] if e["ph"] == "X" and e["cat"] == "stage"}
    assert stages["partition"]["tid"] != stages["load"]["tid"]


def test_trace_plot_writes_a_png(store_url, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "t.json"
    assert cli.main(["run", "ml-training", TRAIN_PREFIX, "2", "2", "--store", store_url, *FAST_FLAGS,
                     "--trace", str(path), "--json"]) == 0
    out = tmp_path / "gantt.png"
    assert cli.main(["trace", "plot", str(path), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 5000
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    _one_error_line(capsys, cli.main(["trace", "plot", str(bad)]))


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_local_writes_csvs_breakdown_summary_and_plots(store_url, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    code = cli.main(["bench", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url, *FAST_FLAGS,
                     "--backend", "local", "--transfer", "store,direct", "--repeats", "2", "--cold", "--baseline",
                     "--out", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for name in ("local-store-ml-training-warm.csv", "local-direct-ml-training-warm.csv",
                 "local-store-ml-training-cold.csv", "baseline-ml-training.csv"):
        lines = (out / name).read_text().splitlines()
        assert lines[0] == "Run,TimeMs" and len(lines) == 3, (name, lines)
        assert all(float(line.split(",")[1]) > 0 for line in lines[1:])
    breakdown = _rows(out / "breakdown.csv")
    stage_rows = [r for r in breakdown if r["kind"] == "stage" and r["transfer"] == "store" and r["mode"] == "warm"]
    assert sorted({(r["run"], r["stage"]) for r in stage_rows}) == sorted(
        (run, s) for run in ("0", "1") for s in ("partition", "pca", "train", "score", "validation"))
    for col in ("compute_ms", "fetch_ms", "encode_ms", "put_ms", "get_ms", "decode_ms", "bytes"):
        assert all(r[col] != "" for r in stage_rows)
    assert float(next(r for r in stage_rows if r["stage"] == "pca")["fetch_ms"]) > 0
    edges = [r for r in breakdown if r["kind"] == "edge"]
    assert {("pca", "train"), ("train", "validation")} <= {(r["from"], r["to"]) for r in edges}
    assert all(r[c] != "" for r in edges for c in ("bytes", "serialize_ms", "transfer_ms", "deserialize_ms"))
    summary = {(r["backend"], r["transfer"], r["mode"]): r for r in _rows(out / "summary.csv")}
    assert set(summary) == {("local", "store", "warm"), ("local", "direct", "warm"), ("local", "store", "cold"),
                            ("local", "direct", "cold"), ("baseline", "", "warm")}
    warm = summary[("local", "store", "warm")]
    assert warm["runs"] == "2" and float(warm["min_ms"]) <= float(warm["median_ms"]) <= float(warm["max_ms"])
    assert float(warm["ratio_to_baseline"]) > 0 and float(warm["accuracy"]) > 0.5
    # The memory the run's processes hold together (PSS, shared pages once): at least the driver's
    # Python and NumPy, and less than every process's RSS added up would say.
    assert all(r["state"] == "light" for r in summary.values())
    assert 30 < float(warm["peak_pss_mb"]) < 4000 and int(warm["state_bytes"]) > 0
    assert int(summary[("local", "direct", "warm")]["state_bytes"]) > 0
    for fig in ("latency", "breakdown", "transfer"):
        for ext, magic in (("png", PNG_MAGIC), ("svg", b"<?xml")):
            assert (out / f"{fig}.{ext}").read_bytes().startswith(magic)
    assert (out / "traces" / "local-store-ml-training-warm.png").stat().st_size > 5000
    assert json.loads((out / "traces" / "local-direct-ml-training-warm.trace.json").read_text())["traceEvents"]
    assert len(result["summary"]) == 5

    # `mlwf bench plot` redraws everything from the files
    for fig in ("latency.png", "breakdown.svg", "transfer.png"):
        (out / fig).unlink()
    assert cli.main(["bench", "plot", str(out)]) == 0
    assert (out / "latency.png").stat().st_size > 5000 and (out / "breakdown.svg").exists()
    assert (out / "transfer.png").stat().st_size > 5000


def test_bench_inference_with_baseline_keeps_the_training_rows(trained, store_url, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    args = ["--store", store_url, "--repeats", "1", "--baseline", "--out", str(out), "--json", "--no-plots"]
    assert cli.main(["bench", "ml-training", TRAIN_PREFIX, "2", "2", *FAST_FLAGS, *args]) == 0
    assert cli.main(["bench", "ml-inference", "ml-inference/model", BATCH_PREFIX, "4", *args]) == 0
    summary = _rows(out / "summary.csv")
    assert {(r["backend"], r["workflow"]) for r in summary} == {
        ("local", "ml-training"), ("baseline", "ml-training"), ("local", "ml-inference"), ("baseline", "ml-inference")}
    base = next(r for r in summary if r["backend"] == "baseline" and r["workflow"] == "ml-inference")
    assert float(base["accuracy"]) > 0.5
    assert (out / "baseline-ml-inference.csv").read_text().startswith("Run,TimeMs\n0,")


def test_bench_measures_every_transfer_and_state_and_draws_the_transfer_figure(trained, store_url, tmp_path,
                                                                                capsys):
    """The study's command: every transfer × state into one summary and breakdown with a state column,
    the same accuracy everywhere, heavy moving more, and transfer.png with both variants."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "study"
    assert cli.main(["bench", "ml-inference", "ml-inference/model", BATCH_PREFIX, "3", "--store", store_url,
                     "--transfer", "store,direct,payload,shm", "--state", "light,heavy", "--repeats", "1",
                     "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = {(r["transfer"], r["state"]): r for r in _rows(out / "summary.csv")}
    assert set(summary) == {(t, s) for t in ("store", "direct", "payload", "shm") for s in ("light", "heavy")}
    assert len({r["accuracy"] for r in summary.values()}) == 1
    pixels = {(r["transfer"], r["state"]): int(r["bytes"]) for r in _rows(out / "breakdown.csv")
              if r["kind"] == "edge" and (r["from"], r["to"]) == ("partition", "predict")}
    for t in ("store", "direct", "payload", "shm"):
        assert int(summary[(t, "heavy")]["state_bytes"]) > int(summary[(t, "light")]["state_bytes"])
        assert pixels[(t, "heavy")] > 10 * pixels[(t, "light")]  # pixels, not keys
        assert float(summary[(t, "heavy")]["peak_pss_mb"]) > 0
    assert float(summary[("store", "heavy")]["peak_shm_mb"]) == 0  # only shm makes segments
    assert (out / "local-shm-heavy-ml-inference-warm.csv").exists() and (out / "local-shm-ml-inference-warm.csv").exists()
    assert [r["state"] for r in result["summary"]].count("heavy") == 4
    (out / "transfer.png").unlink()
    assert cli.main(["bench", "plot", str(out)]) == 0
    assert (out / "transfer.png").stat().st_size > 5000


def test_bench_plot_on_a_folder_without_csv_fails_in_one_line(tmp_path, capsys):
    _one_error_line(capsys, cli.main(["bench", "plot", str(tmp_path)]))
    _one_error_line(capsys, cli.main(["bench", "plot", str(tmp_path / "missing")]))


def test_bench_and_bench_plot_refuse_a_csv_they_cannot_read_in_one_line_before_any_run(store_url, tmp_path,
                                                                                       capsys):
    """A FIFO named breakdown.csv would make a read wait forever; a file of gigabytes would fill memory."""
    out = tmp_path / "b"
    out.mkdir()
    (out / "cpu-store-ml-training-warm.csv").write_text("Run,TimeMs\n0,5\n")
    os.mkfifo(out / "breakdown.csv")
    line = _one_error_line(capsys, cli.main(["bench", "plot", str(out)]))
    assert f"{out / 'breakdown.csv'} is not a regular file" in line
    line = _one_error_line(capsys, cli.main(["bench", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url,
                                             "--repeats", "1", "--out", str(out)]))
    assert f"{out / 'breakdown.csv'} is not a regular file" in line
    assert not list((out / "traces").iterdir()) and not (out / "summary.csv").exists()  # no run was made
    (out / "breakdown.csv").unlink()
    with open(out / "breakdown.csv", "wb") as f:
        f.truncate((16 << 20) + 1)
    line = _one_error_line(capsys, cli.main(["bench", "plot", str(out)]))
    assert "over the 16 MiB a benchmark CSV file may take" in line


@pytest.mark.parametrize("argv, says", [
    (["bench", "ml-training", TRAIN_PREFIX, "2", "4", "--backend", "local,lambda"], "unknown backend 'lambda'"),
    (["bench", "ml-training", TRAIN_PREFIX, "2", "4", "--transfer", "rdma"], "unknown transfer 'rdma'"),
    (["bench", "word-count", "x", "1"], "unknown command 'mlwf bench word-count'"),
    (["bench", "ml-training", TRAIN_PREFIX, "2", "4", "--repeats", "0"], "--repeats must be at least 1"),
])
def test_bench_bad_input_is_one_line(argv, says, tmp_path, capsys):
    line = _one_error_line(capsys, cli.main([*argv, "--out", str(tmp_path / "b")]))
    assert says in line


def test_bench_knative_endpoint_that_does_not_answer(store_url, tmp_path, capsys):
    pytest.importorskip("httpx")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = _one_error_line(capsys, cli.main(["bench", "ml-training", TRAIN_PREFIX, "2", "4", "--store", store_url,
                                             "--backend", "knative", "--endpoint", f"http://127.0.0.1:{port}",
                                             "--out", str(tmp_path / "b")]))
    assert f"http://127.0.0.1:{port} does not answer" in line
    assert not (tmp_path / "b").exists()


def test_peak_memory_counts_a_function_server_listening_on_loopback(tmp_path):
    """A Knative run against 'mlwf serve' on this machine: the server's processes hold the state the calls
    handle, so the bench's peak PSS counts them (the process listening on the endpoint's port, and its
    children), not the driver's alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlwf.bench.memory import PeakMemory, listening_pids

    # A stand-in server, started apart (not a child of this process, as 'mlwf serve' is not a child of the
    # bench): it listens on a loopback port and a child of its own holds 200 MB of touched memory.
    port_file = tmp_path / "port"
    code = ("import socket, subprocess, sys, time\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "child = subprocess.Popen([sys.executable, '-c', "
            "'import sys, time; b = bytearray(200 << 20); b[::4096] = b\"x\" * len(b[::4096]); "
            "print(1, flush=True); time.sleep(60)'], stdout=subprocess.PIPE)\n"
            "child.stdout.readline(); open(sys.argv[1] + '.tmp', 'w').write(str(s.getsockname()[1]))\n"
            "import os; os.rename(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(60)\n")
    launcher = subprocess.run([sys.executable, "-c", "import subprocess, sys; print(subprocess.Popen("
                               "sys.argv[1:], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)", sys.executable, "-c", code,
                               str(port_file)], capture_output=True, text=True, check=True)
    server = int(launcher.stdout)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert time.monotonic() < deadline, "the stand-in server did not start"
            time.sleep(0.05)
        port = int(port_file.read_text())
        assert listening_pids([f"http://127.0.0.1:{port}/"]) == [server]
        assert listening_pids([f"http://localhost:{port}"]) == [server]
        assert listening_pids([f"http://10.1.2.3:{port}/", "not a url"]) == []  # not this machine's loopback
        with PeakMemory() as alone:
            time.sleep(0.1)
        with PeakMemory(also=[server]) as counted:
            time.sleep(0.1)
        assert counted.pss_mb - alone.pss_mb > 190
    finally:
        os.killpg(server, signal.SIGKILL)


def test_transfer_figure_leaves_room_above_the_tallest_bar_for_its_label(tmp_path, monkeypatch):
    """A bar whose top part is empty (an edge with no deserialize, as Ray's direct load → predict) is still
    the tallest: the axis goes above it, so the mode's label over it is not cut off."""
    pytest.importorskip("matplotlib")
    from mlwf import plots

    drawn = []
    monkeypatch.setattr(plots, "save", lambda fig, base: drawn.append(fig) or [])
    row = {"workflow": "ml-inference", "backend": "ray", "state": "light", "mode": "warm", "bytes": "100"}
    rows = [{**row, "transfer": "direct", "from": "load", "to": "predict", "serialize_ms": "0.002",
             "transfer_ms": "46.6", "deserialize_ms": "0"},
            {**row, "transfer": "store", "from": "partition", "to": "predict", "serialize_ms": "12",
             "transfer_ms": "5", "deserialize_ms": "13"}]
    plots.transfer(rows, tmp_path / "transfer")
    try:
        ax = next(a for a in drawn[0].axes if a.get_visible() and a.patches)
        tallest = max(p.get_y() + p.get_height() for p in ax.patches)
        assert tallest == pytest.approx(46.602)
        assert ax.get_ylim()[1] > tallest * 1.1
    finally:
        plots.pyplot().close(drawn[0])


def test_breakdown_figure_leaves_room_above_the_tallest_bar(tmp_path, monkeypatch):
    """A stage whose only time is compute (every later part empty) is the tallest bar: the axis still goes
    above it, as for the transfer figure."""
    pytest.importorskip("matplotlib")
    from mlwf import plots

    drawn = []
    monkeypatch.setattr(plots, "save", lambda fig, base: drawn.append(fig) or [])
    row = {"workflow": "ml-training", "backend": "local", "transfer": "store", "mode": "warm", "run": "0",
           "stage": "partition", "wall_ms": "10", "compute_ms": "50"}
    plots.breakdown([row], tmp_path / "breakdown")
    try:
        ax = drawn[0].axes[0]
        tallest = max(p.get_y() + p.get_height() for p in ax.patches)
        assert tallest == pytest.approx(50)
        assert ax.get_ylim()[1] > tallest * 1.03
    finally:
        plots.pyplot().close(drawn[0])
