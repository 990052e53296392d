"""Ctrl-C as part of the interface: what a person sees and what is left when they press it.

Each command runs in a pseudo-terminal whose foreground process group it is
(tests/terminal.py), as under a shell, and Ctrl-C is typed on that terminal:
SIGINT reaches the driver, the fork server and every worker at once. At every
moment (start-up, a stage, publishing; both workflows and `mlwf bench`) the
command must end within a second with one line naming the run and the command
that resumes it, exit status 130, no traceback and nothing of its process
group left running; the run must say `interrupted`, and the printed command,
run as printed, must finish it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


from mlwf.cli import main
from tests.conftest import BATCH_PREFIX, TRAIN_PREFIX
from tests.terminal import Screen, run_in_terminal

BIN = Path(sys.executable).parent
MLWF = str(BIN / "mlwf")
FAST_FLAGS = ["--image-size", "16", "--components", "6", "--trees", "12", "--max-depth", "8"]
#: How long the command may take to end after Ctrl-C.
WITHIN_S = 1.0


def _env(home: Path, **extra: str) -> dict[str, str]:
    """A user's environment (their own HOME, none of the test run's mlwf settings), with ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLWF_")}
    env["HOME"] = str(home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def _runs(store_url: str, workflow: str) -> Path:
    return Path(store_url) / "tless" / workflow / "outputs"


def _records(store_url: str, workflow: str) -> dict[str, dict]:
    folder = _runs(store_url, workflow)
    return {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*/run.json")} if folder.is_dir() else {}


def _done(store_url: str, workflow: str, stage: str, but: frozenset[str] = frozenset()) -> bool:
    """Whether a call of ``stage`` of some run of ``workflow`` (other than the runs ``but`` names) has finished."""
    return any(p.parent.parent.name not in but for p in _runs(store_url, workflow).glob(f"*/{stage}/*.done.json"))


def _message(screen: Screen) -> str:
    """The command's last line, whole: the terminal wrapped it at its width (trailing spaces restored)."""
    first = screen.index(lambda line: "mlwf:" in line)
    lines = screen.lines[first:]
    return "".join(line.ljust(screen.columns) for line in lines[:-1]) + lines[-1]


def _assert_interrupted_cleanly(screen: Screen, *, above: tuple[str, ...] = ()) -> str:
    """Exit 130 within a second of Ctrl-C, one line and nothing else on screen (but lines starting with
    ``above``), nothing left running; returns that line (without the ``^C`` the terminal echoed)."""
    assert screen.interrupted_at is not None, f"the command ended before Ctrl-C:\n{screen.text}"
    assert screen.returncode == 130, screen.text
    assert "Traceback" not in screen.text and "KeyboardInterrupt" not in screen.text, screen.text
    message = _message(screen)
    first = screen.index(lambda line: "mlwf:" in line)
    assert all(line.startswith(above) for line in screen.lines[:first]) if above else first == 0, screen.text
    assert screen.lines[first].startswith(("^Cmlwf: ", "mlwf: ")), screen.text  # no progress bar above it
    assert message.removeprefix("^C").startswith("mlwf: interrupted"), screen.text
    assert screen.text.count("mlwf:") == 1, screen.text
    assert screen.left == {}, f"left running: {screen.left}"
    assert screen.exit_after_interrupt <= WITHIN_S, f"ended {screen.exit_after_interrupt:.2f} s after Ctrl-C"
    return message.removeprefix("^C")


def _resume_command(line: str, run_id: str) -> str:
    command = line.split("resume it with: ", 1)[1] if "resume it with: " in line else \
        line.split("finish that run with: ", 1)[1]
    assert shlex.split(command)[-2:] == ["--resume", run_id], line
    return command


def _status_everywhere(store_url: str, workflow: str, run_id: str, capsys) -> str:
    """The run's status as ``mlwf runs ls``, ``runs show`` and their ``--json`` say it (all the same)."""
    where = ["--store", store_url]
    capsys.readouterr()
    assert main(["runs", "ls", "--json", *where]) == 0
    listed = {r["run_id"]: r for r in json.loads(capsys.readouterr().out)["runs"]}[run_id]
    assert main(["runs", "show", run_id, "--json", *where]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert main(["runs", "ls", *where]) == 0
    table = capsys.readouterr().out
    assert main(["runs", "show", run_id, *where]) == 0
    page = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith(run_id))
    assert listed["status"] == shown["status"] and shown["status"] in row.split(), (listed, shown, row)
    assert f"status          │ {shown['status']}" in page or f"│ {shown['status']}" in page, page
    return listed["status"]


def _finish_as_printed(command: str, env: dict[str, str], workflow: str, run_id: str) -> dict:
    """Run the printed command through a shell, as a person would paste it; returns its report."""
    done = subprocess.run(command + " --json", shell=True, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["run_id"] == run_id and report["workflow"] == workflow
    return report


def _training(store_url: str, *extra: str) -> list[str]:
    return [MLWF, "run", "ml-training", TRAIN_PREFIX, "2", "4", *FAST_FLAGS, "--store", store_url, *extra]


# --------------------------------------------------------------------------- ml-training
def test_ctrl_c_at_start_up_ends_at_once_with_one_line(store_url, tmp_path):
    """Pressed while the command imports and the fork server preloads the stage code (before the run
    exists, or as it starts its workers), the command ends at once, leaving nothing."""
    started = time.monotonic()
    screen = run_in_terminal(_training(store_url), columns=80, env=_env(tmp_path),
                             interrupt_when=lambda _: time.monotonic() - started > 0.3)
    line = _assert_interrupted_cleanly(screen)
    records = _records(store_url, "ml-training")
    if not records:
        assert line == ("mlwf: interrupted before the run started: nothing was written; run the same command to "
                        "start it"), line
    else:
        [(run_id, record)] = records.items()
        assert record["status"] == "interrupted" and f"interrupted run {run_id}; resume it with: " in line


def test_ctrl_c_while_the_workers_start_leaves_a_run_the_printed_command_finishes(store_url, tmp_path, capsys):
    screen = run_in_terminal(_training(store_url, "--seed", "3"), columns=80, env=_env(tmp_path),
                             interrupt_when=lambda _: bool(_records(store_url, "ml-training")))
    line = _assert_interrupted_cleanly(screen)
    [run_id] = _records(store_url, "ml-training")
    command = _resume_command(line, run_id)
    assert command == (f"mlwf run ml-training {TRAIN_PREFIX} 2 4 {' '.join(FAST_FLAGS)} --store {store_url} "
                       f"--seed 3 --resume {run_id}")
    assert _status_everywhere(store_url, "ml-training", run_id, capsys) == "interrupted"
    assert main(["runs", "show", run_id, "--json", "--store", store_url]) == 0
    assert json.loads(capsys.readouterr().out)["resume"] == command  # the same command, asked for later
    report = _finish_as_printed(command, _env(tmp_path), "ml-training", run_id)
    assert report["model_prefix"] == "ml-inference/model" and report["validation_accuracy"] > 0.8
    assert _status_everywhere(store_url, "ml-training", run_id, capsys) == "succeeded"


def test_ctrl_c_mid_stage_kills_a_busy_worker_and_the_resumed_run_reuses_what_finished(store_url, tmp_path,
                                                                                       capsys):
    # One training call hangs: only Ctrl-C can end this run, and its worker is busy when it comes.
    env = _env(tmp_path, MLWF_FAULTS="train:1:hang:1")
    screen = run_in_terminal(_training(store_url), columns=120, env=env,
                             interrupt_when=lambda _: _done(store_url, "ml-training", "train"))
    line = _assert_interrupted_cleanly(screen)
    [run_id] = _records(store_url, "ml-training")
    assert _status_everywhere(store_url, "ml-training", run_id, capsys) == "interrupted"
    report = _finish_as_printed(_resume_command(line, run_id), _env(tmp_path), "ml-training", run_id)
    assert report["stages"]["partition"]["reused"] == 1 and report["stages"]["train"]["reused"] >= 1


def _manifest(store_url: str) -> dict:
    return json.loads((Path(store_url) / "tless" / "ml-inference" / "model" / "MODEL.json").read_text())


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _publishing(store_url: str):
    """True once a new run has validated its model and is (slowly) publishing it."""
    seen = []
    earlier = frozenset(_records(store_url, "ml-training"))

    def check(_: bytes) -> bool:
        if not seen and _done(store_url, "ml-training", "validation", but=earlier):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] > 0.4
    return check


#: Publishing takes 3 s: the model object's existence check and its write each wait 1.5 s.
SLOW_PUBLISH = "slow:/versions/:1500"


def test_ctrl_c_while_publishing_waits_for_the_publish_and_a_resume_then_changes_nothing(trained, tmp_path,
                                                                                        capsys):
    engine, first = trained
    store_url = engine.spec.url
    env = _env(tmp_path, MLWF_STORE_FAULTS=SLOW_PUBLISH)
    screen = run_in_terminal(_training(store_url, "--seed", "5"), columns=80, env=env,
                             interrupt_when=_publishing(store_url))
    assert screen.returncode == 130 and "Traceback" not in screen.text and screen.left == {}, screen.text
    run_id = max(_records(store_url, "ml-training"))
    # The publish was not cut in two: it finished, and so did the run, before the command ended.
    record = _records(store_url, "ml-training")[run_id]
    assert record["status"] == "succeeded"
    assert _manifest(store_url)["sha256"] == record["report"]["model_digest"] != first["model_digest"]
    assert _message(screen).removeprefix("^C") == (f"mlwf: interrupted after run {run_id} had succeeded: "
                                                   f"'mlwf runs show {run_id}' shows it")
    assert screen.exit_after_interrupt <= 3.0 + WITHIN_S

    # Resuming a run that succeeded changes nothing: no stage runs, nothing is published again.
    before = _snapshot(Path(store_url))
    done = subprocess.run([*_training(store_url, "--seed", "5"), "--resume", run_id], capture_output=True,
                          text=True, env=_env(tmp_path), timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"run {run_id} already succeeded: nothing to do, nothing changed ('mlwf runs show "
                           f"{run_id}' shows it)\n")
    assert _snapshot(Path(store_url)) == before


def test_ctrl_c_twice_while_publishing_cuts_it_short_leaving_the_old_model_whole(trained, tmp_path, capsys):
    engine, first = trained
    store_url = engine.spec.url
    env = _env(tmp_path, MLWF_STORE_FAULTS=SLOW_PUBLISH)
    screen = run_in_terminal(_training(store_url, "--seed", "6"), columns=120, env=env,
                             interrupt_when=_publishing(store_url), presses=2)
    line = _assert_interrupted_cleanly(screen)
    run_id = max(_records(store_url, "ml-training"))
    assert _status_everywhere(store_url, "ml-training", run_id, capsys) == "interrupted"
    # The manifest still names the old model, whole.
    manifest = _manifest(store_url)
    assert manifest["sha256"] == first["model_digest"]
    obj = Path(store_url) / "tless" / manifest["object"]
    assert hashlib.sha256(obj.read_bytes()).hexdigest() == manifest["sha256"]
    report = _finish_as_printed(_resume_command(line, run_id), _env(tmp_path), "ml-training", run_id)
    assert _manifest(store_url)["sha256"] == report["model_digest"] != first["model_digest"]


# --------------------------------------------------------------------------- ml-inference
def test_ctrl_c_mid_inference_then_the_printed_command_finishes_it(trained, tmp_path, capsys):
    engine, _ = trained
    store_url = engine.spec.url
    env = _env(tmp_path, MLWF_FAULTS="predict:1:hang:1")
    screen = run_in_terminal([MLWF, "run", "ml-inference", "ml-inference/model", BATCH_PREFIX, "3",
                              "--store", store_url], columns=80, env=env,
                             interrupt_when=lambda _: _done(store_url, "ml-inference", "predict"))
    line = _assert_interrupted_cleanly(screen)
    [run_id] = _records(store_url, "ml-inference")
    assert _status_everywhere(store_url, "ml-inference", run_id, capsys) == "interrupted"
    report = _finish_as_printed(_resume_command(line, run_id), _env(tmp_path), "ml-inference", run_id)
    assert report["num_predicted"] == 120 and report["stages"]["predict"]["reused"] >= 1


# --------------------------------------------------------------------------- mlwf bench
def _bench(store_url: str, out: Path, *extra: str) -> list[str]:
    return [MLWF, "bench", "ml-training", TRAIN_PREFIX, "2", "4", *FAST_FLAGS, "--repeats", "1", "--no-plots",
            "--out", str(out), "--store", store_url, *extra]


def test_ctrl_c_in_a_warm_bench_run_names_the_run_and_the_command_that_finishes_it(store_url, tmp_path, capsys):
    env = _env(tmp_path, MLWF_FAULTS="train:1:hang:1")
    screen = run_in_terminal(_bench(store_url, tmp_path / "bench"), columns=80, env=env,
                             interrupt_when=lambda _: _done(store_url, "ml-training", "train"))
    line = _assert_interrupted_cleanly(screen)
    [run_id] = _records(store_url, "ml-training")
    assert line.startswith(f"mlwf: interrupted mlwf bench during run {run_id}; no CSV was written; "), line
    assert not (tmp_path / "bench" / "summary.csv").exists()
    assert _status_everywhere(store_url, "ml-training", run_id, capsys) == "interrupted"
    command = _resume_command(line, run_id)
    assert command == (f"mlwf run ml-training {TRAIN_PREFIX} 2 4 --store {store_url} {' '.join(FAST_FLAGS)} "
                       f"--resume {run_id}")
    _finish_as_printed(command, _env(tmp_path), "ml-training", run_id)


def test_ctrl_c_in_a_cold_bench_run_reaches_that_process_too(store_url, tmp_path, capsys):
    # The warm-up and the warm run come first; the third run is the fresh 'mlwf run' process.
    screen = run_in_terminal(_bench(store_url, tmp_path / "bench", "--cold"), columns=120, env=_env(tmp_path),
                             interrupt_when=lambda _: len(_records(store_url, "ml-training")) == 3)
    line = _assert_interrupted_cleanly(screen, above=("local · store · warm: median ",))
    records = _records(store_url, "ml-training")
    run_id = max(records)
    assert [r["status"] for _, r in sorted(records.items())] == ["succeeded", "succeeded", "interrupted"]
    assert line.startswith(f"mlwf: interrupted mlwf bench during run {run_id}; "), line
    _finish_as_printed(_resume_command(line, run_id), _env(tmp_path), "ml-training", run_id)


# --------------------------------------------------------------------------- --resume latest
def test_resume_latest_finishes_the_newest_interrupted_run_with_these_arguments(store_url, tmp_path, capsys):
    where = ["--store", store_url]
    run = ["run", "ml-training", TRAIN_PREFIX, "2", "4", *FAST_FLAGS, "--no-publish", *where]
    assert main([*run, "--resume", "latest"]) == 2
    assert capsys.readouterr().err == (
        f"mlwf: error: --resume latest: no interrupted or abandoned ml-training run in bucket 'tless' of "
        f"{store_url}, so nothing to resume: run without --resume to start a new one ('mlwf runs ls' lists the "
        "runs)\n")
    screen = run_in_terminal([MLWF, *run], columns=120, env=_env(tmp_path, MLWF_FAULTS="pca:0:hang:1"),
                             interrupt_when=lambda _: _done(store_url, "ml-training", "partition"))
    _assert_interrupted_cleanly(screen)
    [run_id] = _records(store_url, "ml-training")
    # Other arguments: not that run.
    assert main(["run", "ml-training", TRAIN_PREFIX, "2", "8", *FAST_FLAGS, "--no-publish", *where,
                 "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert f"the newest one, {run_id}, was started with num_train=4" in err and err.count("\n") == 1
    assert main([*run, "--resume", "latest", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_id"] == run_id
    assert _records(store_url, "ml-training")[run_id]["status"] == "succeeded"


def test_ctrl_c_while_mlwf_run_reads_its_command_line_says_nothing_was_written(monkeypatch, capsys):
    """Ctrl-C before 'mlwf run' reaches its own handler (the command line read, the stage code imported):
    the same line as a Ctrl-C before the run started, not a bare 'interrupted'."""
    import mlwf.cli

    def pressed(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlwf.cli, "build_parser", pressed)
    assert mlwf.cli.main(["run", "ml-training", "x", "2", "4"]) == 130
    assert capsys.readouterr().err.strip() == ("mlwf: interrupted before the run started: nothing was written; "
                                               "run the same command to start it")
    assert mlwf.cli.main(["runs", "ls"]) == 130
    assert capsys.readouterr().err.strip() == "mlwf: interrupted"
