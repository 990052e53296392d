"""What a user sees: the demo and the reports on a real terminal, and output into a pipe closed early.

The commands run as separate processes in a pseudo-terminal of 80 and 120
columns; a terminal emulator (pyte) replays what they drew (tests/terminal.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BATCH_PREFIX
from tests.terminal import Screen, run_in_terminal

MLWF = str(Path(sys.executable).parent / "mlwf")
PROGRESS_BAR = "━"


def _env(home: Path) -> dict[str, str]:
    """A user's environment: their own HOME, none of the test run's mlwf settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLWF_")}
    env["HOME"] = str(home)
    return env


def _snapshot(store) -> dict[str, str]:
    return {o.key: hashlib.sha256(store.get(o.key)).hexdigest() for o in store.list("")}


def _value(screen: Screen, name: str, start: int) -> tuple[str, int]:
    """The value printed after ``name`` after line ``start``: on its line (``name  value``), or, when it did
    not fit there, alone on the next line, indented; joined if the terminal wrapped it."""
    pattern = re.compile(rf"{re.escape(name)}(?:\s{{2,}}(\S.*))?$")
    i = screen.index(lambda line: pattern.match(line) is not None, start)
    value = pattern.match(screen.logical_line(i)).group(1)
    if value is None:
        i += 1
        assert screen.lines[i].startswith("  "), screen.text
        value = screen.logical_line(i).strip()
    return value, i


def _assert_report_whole(screen: Screen, report: dict, rows: list[str], values: dict[str, str]) -> int:
    """The report of ``report``'s run is on screen whole: its title on a line of its own, every
    row of its table, every value whole below it, and no progress bar inside; returns its last line."""
    lines = screen.lines
    title = f"{report['workflow']} run {report['run_id']}"
    top = screen.index(lambda line: title in line)
    assert lines[top].strip() == title, f"title glued to other output: {lines[top]!r}\n{screen.text}"
    assert lines[top + 1].startswith("┌"), screen.text
    bottom = screen.index(lambda line: line.startswith("└"), top)
    cells = [row.split("│") for row in lines[top + 2:bottom]]
    assert all(len(c) == 4 for c in cells), f"a row of the table was overwritten:\n{screen.text}"
    names = [c[1].strip() for c in cells]
    assert [n for n in names if n] == rows, screen.text
    stages = " ".join(c[2].strip() for c in cells[names.index("stages"):])
    for stage in report["stage_ms"]:
        assert f"{stage} " in stages, screen.text
    end = bottom
    for name, expected in values.items():
        value, end = _value(screen, name, bottom)
        assert value == expected, (name, screen.text)
    assert not any(PROGRESS_BAR in line for line in lines[top:end + 1]), screen.text
    return end


def _run_record(store, workflow: str, run_id: str) -> dict:
    return json.loads(store.get(f"{workflow}/outputs/{run_id}/run.json"))


@pytest.mark.parametrize("columns", [80, 120])
def test_demo_on_a_terminal_prints_whole_reports_and_touches_nothing_of_the_user(trained, tmp_path, columns):
    engine, _ = trained  # the user's own model at ml-inference/model, their images beside it
    store = engine.store
    before = _snapshot(store)
    screen = run_in_terminal([MLWF, "demo", "--store", engine.spec.url], columns=columns,
                             env=_env(tmp_path / "home"))
    assert screen.returncode == 0, screen.text

    after = _snapshot(store)
    new_runs = {}
    for key in set(after) - set(before):
        parts = key.split("/")
        if parts[1:2] == ["outputs"] and parts[-1] == "run.json":
            new_runs[parts[0]] = parts[2]
    assert set(new_runs) == {"ml-training", "ml-inference"}
    training = _run_record(store, "ml-training", new_runs["ml-training"])["report"]
    inference = _run_record(store, "ml-inference", new_runs["ml-inference"])["report"]
    end = _assert_report_whole(
        screen, training,
        ["backend", "images", "training / validation", "classes", "functions", "validation accuracy",
         "worker start-up", "end to end", "stages", "state transfer"],
        {"model": "mlwf-demo/model", "model sha256": training["model_digest"]})
    second = screen.index(lambda line: line.startswith("2. mlwf run ml-inference"), end)
    _assert_report_whole(
        screen, inference,
        ["backend", "images", "predicted", "accuracy", "worker start-up", "end to end", "stages", "state transfer"],
        {"results": inference["results_key"], "model": "mlwf-demo/model",
         "model sha256": inference["model_digest"]})
    # Both runs drew their progress, and each display ended complete, above its report.
    bars = [line for line in screen.lines if PROGRESS_BAR in line]
    assert len(bars) == 8, screen.text  # five training stages, three inference ones
    for line in bars:
        done, total = re.search(r"(\d+)/(\d+)", line).groups()
        assert done == total, line
    assert screen.index(lambda line: line.startswith("predict ") and PROGRESS_BAR in line) > second
    # Nothing was cut short, and the closing lines give the whole key and a command to copy.
    assert "…" not in screen.text
    final = screen.index(lambda line: line.startswith("Predictions (bucket tless): "))
    assert screen.logical_line(final).endswith(inference["results_key"])
    show = screen.index(lambda line: line.startswith("The whole run: "), final)
    command = screen.logical_line(show).removeprefix("The whole run: ")
    assert command == f"mlwf runs show {inference['run_id']} --store {engine.spec.url}"

    # Everything the user had is as it was; everything new is the demo's own.
    assert {k: after.get(k) for k in before} == before
    for key in set(after) - set(before):
        assert key.startswith("mlwf-demo/") or any(key.startswith(f"{wf}/outputs/{run_id}/")
                                                   for wf, run_id in new_runs.items()), key

    # That command, as printed, shows the run on the same terminal.
    shown = run_in_terminal([MLWF, *command.split()[1:]], columns=columns, env=_env(tmp_path / "home"))
    assert shown.returncode == 0, shown.text
    assert _value(shown, "predictions", 0)[0] == inference["results_key"]
    assert _value(shown, "model sha256", 0)[0] == inference["model_digest"]
    assert "confusion matrix (rows: true class, columns: predicted)" in shown.text
    assert "…" not in shown.text


def test_run_on_a_narrow_terminal_wraps_the_values_to_copy(trained, tmp_path):
    engine, _ = trained
    screen = run_in_terminal([MLWF, "run", "ml-inference", "ml-inference/model", BATCH_PREFIX, "3",
                              "--store", engine.spec.url, "--trace", str(tmp_path / "t.json")],
                             columns=60, env=_env(tmp_path / "home"))
    assert screen.returncode == 0, screen.text
    [record] = [json.loads(engine.store.get(o.key)) for o in engine.store.list("ml-inference/outputs/")
                if o.key.endswith("/run.json")]
    report = record["report"]
    _assert_report_whole(screen, report,
                         ["backend", "images", "predicted", "accuracy", "worker start-up", "end to end", "stages",
                          "state transfer"],
                         {"results": report["results_key"], "model": "ml-inference/model",
                          "model sha256": report["model_digest"]})
    note = screen.index(lambda line: line.startswith("trace written to "))
    assert PROGRESS_BAR not in screen.lines[note] and "…" not in screen.text


def test_model_export_on_a_narrow_terminal_prints_the_whole_file_name(trained, tmp_path):
    engine, _ = trained
    out = tmp_path / ("a-folder-name-long-enough-to-wrap-at-sixty-columns" + "/x" * 8) / "model.onnx"
    out.parent.mkdir(parents=True)
    screen = run_in_terminal([MLWF, "model", "export", "ml-inference/model", "--format", "onnx", "-o", str(out),
                              "--store", engine.spec.url], columns=60, env=_env(tmp_path / "home"))
    assert screen.returncode == 0, screen.text
    assert out.stat().st_size > 0
    line = screen.logical_line(screen.index(lambda text: text.startswith("wrote ")))
    # The whole path to copy, and the line to its end (the digest is shortened by the message itself).
    assert line.startswith(f"wrote {out} ("), screen.text
    assert re.search(r"; model [0-9a-f]{16}…$", line), screen.text


# --------------------------------------------------------------------------- a reader that stops early
def _into_closed_pipe(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``mlwf argv`` with stdout a pipe whose reader has already gone (``mlwf … | head -0``)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([MLWF, *argv], stdout=write_end, stderr=subprocess.PIPE, text=True, env=env,
                              timeout=120)
    finally:
        os.close(write_end)


def test_every_command_exits_quietly_when_the_reader_closes_the_pipe(trained, tmp_path):
    engine, training = trained
    where = ["--store", engine.spec.url]
    env = _env(tmp_path / "home")
    for argv in (["runs", "ls", *where], ["runs", "ls", "--json", *where],
                 ["runs", "show", training["run_id"], *where],
                 ["runs", "show", training["run_id"], "--json", *where],
                 ["s3", "ls", *where], ["model", "show", *where],
                 ["dataset", "digits", str(tmp_path / "d"), "--n", "20"],
                 ["run", "ml-inference", "ml-inference/model", BATCH_PREFIX, "2", *where]):
        proc = _into_closed_pipe(argv, env)
        assert (proc.returncode, proc.stderr) == (141, ""), argv
    # The run whose report had nowhere to go still ran, whole.
    records = [json.loads(engine.store.get(o.key)) for o in engine.store.list("ml-inference/outputs/")
               if o.key.endswith("/run.json")]
    assert [r["status"] for r in records] == ["succeeded"]



def test_bench_table_fits_80_columns_with_every_header_whole(trained, tmp_path):
    engine, _ = trained
    out = tmp_path / "a-results-folder-with-a-long-name" / "that-goes-on-past-the-edge-of-the-terminal"
    screen = run_in_terminal([MLWF, "bench", "ml-inference", "ml-inference/model", BATCH_PREFIX, "2",
                              "--repeats", "1", "--no-plots", "--out", str(out), "--store", engine.spec.url],
                             columns=80, env=_env(tmp_path / "home"))
    assert screen.returncode == 0, screen.text
    header = screen.index(lambda line: line.split() and line.split()[0] == "backend")
    # No baseline was run: no "× baseline" column to leave empty.
    assert screen.lines[header].split() == ["backend", "transfer", "mode", "median", "min–max", "memory",
                                            "accuracy"], screen.text
    row = screen.lines[screen.index(lambda line: line.split()[:1] == ["local"], header)].split()
    assert row[:3] == ["local", "store", "warm"] and row[-1] == "%", row
    assert "mlwf bench ml-inference" in screen.text and "…" not in screen.text
    written = screen.index(lambda line: line.startswith("5 files written"), header)
    assert screen.logical_line(written).endswith(f" in {out}")


# --------------------------------------------------------------------------- tables a person reads
FASHION = ("t-shirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


class _CtrlCAfter:
    """A progress watcher that presses Ctrl-C (raises KeyboardInterrupt in the driver) once a call of
    ``stage`` has finished."""

    def __init__(self, stage: str):
        self.stage = stage

    def stage_started(self, stage, total):
        pass

    def call_done(self, stage):
        if stage == self.stage:
            raise KeyboardInterrupt

    def stage_done(self, stage):
        pass


@pytest.fixture(scope="module")
def many_runs(tmp_path_factory, digits_dir):
    """A store with runs of every kind: succeeded (training with long class names, inference), failed,
    interrupted (through the Python API: Engine.run raises Interrupted). Read only, by several tests."""
    tmp_path = tmp_path_factory.mktemp("many-runs")
    from mlwf import bulk
    from mlwf.engine.driver import Engine
    from mlwf.errors import DataError
    from mlwf.storage import StoreSpec
    from tests.conftest import FAST

    url = str(tmp_path / "store")
    store = StoreSpec(url, "tless").open()
    data = tmp_path / "fashion"
    for digit, name in enumerate(FASHION):
        (data / name).mkdir(parents=True)
        for png in (digits_dir / "train" / str(digit)).glob("*.png"):
            (data / name / png.name).write_bytes(png.read_bytes())
    bulk.upload_dir(store, data, "ml-training/fashion", create_bucket=True)
    bulk.upload_dir(store, digits_dir / "batch", BATCH_PREFIX)
    store.close()
    with Engine(url, "tless") as engine:
        training = engine.run_training("ml-training/fashion", 2, 4, config=FAST)
        with pytest.raises(DataError):
            engine.run_training("ml-training/nothing-here", 2, 4, config=FAST)
        inference = engine.run_inference("ml-inference/model", BATCH_PREFIX, 3)
        engine.progress = _CtrlCAfter("train")
        with pytest.raises(KeyboardInterrupt) as interrupted:  # an Interrupted, naming the run
            engine.run_training("ml-training/fashion", 2, 4, config=FAST, publish=False)
        assert getattr(interrupted.value, "run_id", None) == engine.last_run.run_id
    return url, training, inference, engine.last_run.run_id


def _listing(url: str, capsys) -> dict:
    from mlwf.cli import main

    capsys.readouterr()
    assert main(["runs", "ls", "--json", "--store", url]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("columns", [80, 120])
def test_runs_ls_on_a_terminal_is_a_table_with_headers_that_fits(many_runs, tmp_path, capsys, columns):
    url, training, inference, interrupted = many_runs
    listing = _listing(url, capsys)
    statuses = {r["run_id"]: r["status"] for r in listing["runs"]}
    assert sorted(statuses.values()) == ["failed", "interrupted", "succeeded", "succeeded"]
    assert statuses[interrupted] == "interrupted"
    screen = run_in_terminal([MLWF, "runs", "ls", "--store", url], columns=columns, rows=60, env=_env(tmp_path))
    assert screen.returncode == 0, screen.text
    assert all(len(line) <= columns for line in screen.lines), screen.text
    assert "…" not in screen.text
    assert " ".join(screen.lines[:3]).startswith(f"4 runs in bucket tless of file://{url} keep "), screen.text
    headers = [i for i, line in enumerate(screen.lines) if line.split() == ["RUN", "ID", "STATUS", "STARTED", "TOOK",
                                                                          "ACCURACY"]]
    assert [screen.lines[i - 1] for i in headers] == ["ml-training", "ml-inference"], screen.text
    for run in listing["runs"]:
        row = screen.lines[screen.index(lambda line: line.startswith(run["run_id"] + " "))].split()
        assert row[1] == run["status"], row
        if run["accuracy"] is not None:
            assert row[-2:] == [f"{100 * run['accuracy']:.1f}", "%"], row
    # Below the interrupted run, how far it got: every stage's count whole on one line.
    below = screen.index(lambda line: line.startswith(interrupted)) + 1
    detail = []
    while screen.lines[below].startswith("   "):
        detail.append(screen.lines[below].strip())
        below += 1
    progress = {r["run_id"]: r for r in listing["runs"]}[interrupted]["progress"]
    assert "  ".join(detail) == "  ".join(f"{stage} {done}" for stage, done in progress.items()), screen.text
    assert "To resume an interrupted run: 'mlwf runs show RUN_ID' prints its command." in screen.lines, screen.text


def test_runs_ls_piped_follows_columns_else_120_and_has_no_colour(many_runs, tmp_path):
    url = many_runs[0]
    env = _env(tmp_path)
    for columns, width in ((None, 120), ("90", 90), ("200", 200)):
        env.pop("COLUMNS", None)
        if columns:
            env["COLUMNS"] = columns
        out = subprocess.run([MLWF, "runs", "ls", "--store", url], capture_output=True, text=True, env=env,
                             timeout=120).stdout
        assert "\x1b" not in out and "RUN ID" in out
        assert max(map(len, out.splitlines())) <= width, out
    # The failed run's error, wrapped between words below it, reads whole.
    assert "no objects under prefix 'ml-training/nothing-here/'" in " ".join(out.split())


def test_runs_show_at_80_columns_splits_no_class_name_stage_figure_or_digest(many_runs, tmp_path):
    url, training, _, _ = many_runs
    screen = run_in_terminal([MLWF, "runs", "show", training["run_id"], "--store", url], columns=80, rows=80,
                             env=_env(tmp_path))
    assert screen.returncode == 0, screen.text
    assert all(len(line) <= 80 for line in screen.lines), screen.text
    assert "…" not in screen.text
    matrix = screen.index(lambda line: line.startswith("confusion matrix (rows: true class"))
    rows = "\n".join(screen.lines[matrix:])
    for name in FASHION:
        assert f" {name} " in rows, rows  # every class name whole, on one line
    for stage, ms in training["stage_ms"].items():
        assert any(f"{stage} {ms:.0f} ms" in line for line in screen.lines), (stage, screen.text)
    assert any(line.strip() == training["model_digest"] or line.endswith(f"  {training['model_digest']}")
               for line in screen.lines), screen.text


def test_no_progress_display_comes_before_an_error_on_bad_input(store_url, tmp_path):
    for argv in (["run", "ml-training", "ml-training/nothing-here", "2", "4", "--store", store_url],
                 ["s3", "upload-dir", "--host-path", str(tmp_path / "nope"), "--s3-path", "x", "--store", store_url]):
        screen = run_in_terminal([MLWF, *argv], columns=80, env=_env(tmp_path))
        assert screen.returncode == 2, screen.text
        assert screen.lines[0].startswith("mlwf: error: "), screen.text
        assert PROGRESS_BAR not in screen.text, screen.text
        assert not re.search(r"(^|\s)\d+/(\d+|\?)(\s|$)", screen.text), screen.text  # no "0/?" nor "0/1"
