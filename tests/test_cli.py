"""The ``mlwf`` command as a user runs it: reports, errors, the s3 and dataset commands."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlwf.cli import main
from tests.conftest import BATCH_PREFIX, TRAIN_PREFIX

FAST_FLAGS = ["--image-size", "16", "--components", "6", "--trees", "12", "--max-depth", "8"]
TRAINING_KEYS = {"workflow", "run_id", "backend", "num_images", "e2e_ms", "stage_ms", "validation_accuracy",
                 "model_prefix", "model_digest"}
INFERENCE_KEYS = {"workflow", "run_id", "backend", "num_images", "e2e_ms", "stage_ms", "accuracy",
                  "results_key", "model_digest"}


def _where(store_url, bucket="tless"):
    return ["--store", store_url, "--bucket", bucket]


def _json_out(capsys, argv) -> dict:
    """Run ``mlwf argv``; it must succeed and print exactly one JSON object on stdout."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.endswith("\n") and out.count("\n") == 1, out
    return json.loads(out)


def _one_error_line(capsys, argv) -> str:
    """Run ``mlwf argv``; it must fail with one ``mlwf: error:`` line on stderr and no traceback."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlwf: error: "), err
    return lines[0]


# --------------------------------------------------------------------------- run
def test_training_then_inference_print_one_json_report_each(capsys, store_url):
    train = _json_out(capsys, ["run", "ml-training", TRAIN_PREFIX, "2", "4", "--json", *_where(store_url),
                               *FAST_FLAGS])
    assert TRAINING_KEYS <= set(train)
    assert train["workflow"] == "ml-training" and train["backend"] == "local" and train["num_images"] == 600
    assert set(train["stage_ms"]) == {"partition", "pca", "train", "score", "validation"}
    assert train["validation_accuracy"] > 0.8 and train["model_prefix"] == "ml-inference/model"

    infer = _json_out(capsys, ["run", "ml-inference", "ml-inference/model", BATCH_PREFIX, "3", "--json",
                               *_where(store_url)])
    assert INFERENCE_KEYS <= set(infer)
    assert infer["workflow"] == "ml-inference" and infer["num_images"] == 120
    assert set(infer["stage_ms"]) == {"partition", "load", "predict"}
    assert infer["model_digest"] == train["model_digest"]
    assert infer["accuracy"] > 0.7
    csv_path = Path(store_url) / "tless" / infer["results_key"]
    assert csv_path.read_text().splitlines()[0] == "key,prediction,probability,label"

    # Without --json the same run prints a readable summary instead.
    assert main(["run", "ml-inference", "ml-inference/model", BATCH_PREFIX, "2", *_where(store_url)]) == 0
    out = capsys.readouterr().out
    assert "ml-inference run" in out and "accuracy" in out and " %" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_training_options_reach_the_model(capsys, store_url, tmp_path):
    report = _json_out(capsys, ["run", "ml-training", TRAIN_PREFIX, "1", "2", "--json", *_where(store_url),
                                *FAST_FLAGS, "--model-prefix", "models/small", "--seed", "3"])
    assert report["model_prefix"] == "models/small"
    import mlwf.model

    model = mlwf.model.load("models/small", store=store_url, bucket="tless")
    assert model.digest == report["model_digest"]
    assert model.image_size == 16 and model.projections[0]["components"].shape == (6, 256)
    assert sum(len(m["roots"]) for m in model.members) == 24 and model.config["seed"] == 3
    assert not (Path(store_url) / "tless" / "ml-inference" / "model").exists()


def test_model_show_json_gives_the_trained_digest(capsys, trained, store_url):
    _, report = trained
    info = _json_out(capsys, ["model", "show", "--json", *_where(store_url)])
    assert info["digest"] == report["model_digest"]
    assert info["prefix"] == "ml-inference/model" and info["run_id"] == report["run_id"]
    assert info["classes"] == report["classes"] and info["num_members"] == 4 and info["num_trees"] == 48
    assert info["metrics"]["validation_accuracy"] == report["validation_accuracy"]
    assert main(["model", "show", *_where(store_url)]) == 0
    out = capsys.readouterr().out
    assert "model at ml-inference/model" in out and report["run_id"] in out
    assert report["model_digest"] in out  # whole: the values a user copies are never cut


# --------------------------------------------------------------------------- runs show
def test_runs_show_gives_parameters_figures_accuracy_and_where_the_outputs_are(capsys, trained, store_url):
    engine, training = trained
    inference = engine.run_inference("ml-inference/model", BATCH_PREFIX, 3)

    info = _json_out(capsys, ["runs", "show", inference["run_id"], "--json", *_where(store_url)])
    assert info["run_id"] == inference["run_id"] and info["workflow"] == "ml-inference"
    assert info["status"] == "succeeded" and info["error"] is None
    assert info["params"] == {"model_prefix": "ml-inference/model", "data_prefix": BATCH_PREFIX, "num_funcs": 3}
    assert info["progress"] == {"partition": "1/1", "load": "1/1", "predict": "3/3"}
    report = info["report"]
    assert report["accuracy"] == inference["accuracy"] and report["model_digest"] == training["model_digest"]
    assert set(report["stages"]) == {"partition", "load", "predict"} and report["stages"]["predict"]["calls"] == 3
    confusion = report["confusion"]
    assert sum(map(sum, confusion["matrix"])) == 120 and len(confusion["labels"]) == len(confusion["matrix"])
    outputs = info["outputs"]
    assert outputs["predictions"] == inference["results_key"] and outputs["model"] == "ml-inference/model"
    for name in ("predictions", "summary", "run record"):
        assert engine.store.get(outputs[name])  # every key it names is there to read

    assert main(["runs", "show", inference["run_id"], *_where(store_url)]) == 0
    out = capsys.readouterr().out
    for text in (f"ml-inference run {inference['run_id']}", "succeeded", "num_funcs=3", "predict 3/3",
                 inference["results_key"], training["model_digest"], "confusion matrix", "  predict "):
        assert text in out, (text, out)

    info = _json_out(capsys, ["runs", "show", training["run_id"], "--json", *_where(store_url)])
    assert info["workflow"] == "ml-training" and info["params"]["num_pca"] == 2
    assert info["report"]["validation_accuracy"] == training["validation_accuracy"]
    assert info["outputs"]["published model"] == "ml-inference/model"
    assert main(["runs", "show", training["run_id"], *_where(store_url)]) == 0
    out = capsys.readouterr().out
    assert "validation 1/1" in out and "confusion matrix" in out and training["model_digest"] in out


def test_runs_show_of_a_failed_run_gives_its_error(capsys, store_url, monkeypatch):
    monkeypatch.setenv("MLWF_FAULTS", "pca:0:raise:9")
    assert main(["run", "ml-training", TRAIN_PREFIX, "2", "4", "--retries", "0", *_where(store_url),
                 *FAST_FLAGS]) != 0
    capsys.readouterr()
    [run_id] = os.listdir(Path(store_url) / "tless" / "ml-training" / "outputs")
    info = _json_out(capsys, ["runs", "show", run_id, "--json", *_where(store_url)])
    assert info["status"] == "failed" and "pca" in info["error"] and info["report"] is None
    assert info["progress"]["train"] == "0/4"
    assert main(["runs", "show", run_id, *_where(store_url)]) == 0
    assert "failed: " in capsys.readouterr().out


@pytest.mark.parametrize("run_id", ["20261126T121500.123456Z-3f9a1c", "", " ", "..", "../x", "a/b", "x" * 300])
def test_runs_show_of_an_unknown_id_is_one_error_line(capsys, trained, store_url, run_id):
    line = _one_error_line(capsys, ["runs", "show", run_id, *_where(store_url)])
    assert "unknown run id" in line and "mlwf runs ls" in line


def test_runs_show_of_a_foreign_record_is_one_error_line(capsys, store_url):
    run_id = "20261126T121500.123456Z-3f9a1c"
    folder = Path(store_url) / "tless" / "ml-training" / "outputs" / run_id
    folder.mkdir(parents=True)
    (folder / "run.json").write_text("[1, 2]")
    line = _one_error_line(capsys, ["runs", "show", run_id, *_where(store_url)])
    assert "not a run record" in line


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, match", [
    (["run", "ml-training", TRAIN_PREFIX, "x", "4"], "NUM_PCA: invalid int value: 'x'"),
    (["run", "ml-training", TRAIN_PREFIX, "0", "4"], "NUM_PCA must be a positive integer, got 0"),
    (["run", "ml-training", TRAIN_PREFIX, "-1", "4"], "NUM_PCA must be a positive integer, got -1"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "four"], "NUM_TRAIN: invalid int value: 'four'"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--holdout", "1.5"], r"holdout must be a fraction in \[0, 1\)"),
    (["run", "ml-training", TRAIN_PREFIX, "2", "4", "--image-size", "2"], "image-size must be an integer"),
    (["run", "ml-training", "ml-training/nothing", "2", "4"], "no objects under prefix 'ml-training/nothing/'"),
    (["run", "ml-learning", TRAIN_PREFIX, "2", "4"],
     r"unknown command 'mlwf run ml-learning': did you mean 'mlwf run ml-training'\?"),
    (["run", "ml-inference", "ml-inference/model", BATCH_PREFIX, "2"], "run ml-training first"),
    (["run", "ml-inference", "ml-inference/model", BATCH_PREFIX, "0"], "NUM_FUNCS must be a positive integer"),
    (["run", "ml-inference", "ml-inference/model", BATCH_PREFIX, "two"], "NUM_FUNCS: invalid int value"),
    (["model", "show"], "run ml-training first"),
    (["frobnicate"], "unknown command 'mlwf frobnicate': choose one of run, "),
])
def test_bad_input_is_one_error_line(capsys, store_url, argv, match):
    line = _one_error_line(capsys, [*argv, *_where(store_url)])
    assert re.search(match, line), line


def test_store_that_is_a_file_is_one_error_line(capsys, tmp_path):
    not_a_dir = tmp_path / "store.txt"
    not_a_dir.write_text("hello")
    line = _one_error_line(capsys, ["run", "ml-training", TRAIN_PREFIX, "2", "4", *_where(str(not_a_dir))])
    assert "is not a directory" in line
    line = _one_error_line(capsys, ["s3", "ls", *_where(str(not_a_dir))])
    assert "is not a directory" in line


def test_missing_bucket_is_one_error_line(capsys, store_url):
    line = _one_error_line(capsys, ["run", "ml-training", TRAIN_PREFIX, "2", "4", *_where(store_url, "nope")])
    assert "bucket 'nope' does not exist" in line
    line = _one_error_line(capsys, ["s3", "ls", *_where(store_url, "nope")])
    assert "'nope'" in line


def test_bad_input_leaves_the_published_model_alone(capsys, trained, store_url):
    _, report = trained
    _one_error_line(capsys, ["run", "ml-training", TRAIN_PREFIX, "0", "4", *_where(store_url)])
    _one_error_line(capsys, ["run", "ml-training", "ml-training/nothing", "2", "4", *_where(store_url)])
    info = _json_out(capsys, ["model", "show", "--json", *_where(store_url)])
    assert info["digest"] == report["model_digest"] and info["history"] == []


# --------------------------------------------------------------------------- s3
def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def host_dir(tmp_path) -> Path:
    root = tmp_path / "host"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 3)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(root / "sub" / "deeper" / "c.png")
    (root / ".hidden").write_bytes(b"ignored")
    return root


def test_s3_commands_on_a_local_store(capsys, tmp_path, host_dir):
    where = _where(str(tmp_path / "store"), "b")
    up = _json_out(capsys, ["s3", "upload-dir", "--host-path", str(host_dir), "--s3-path", "data/set",
                            "--create-bucket", "--json", *where])
    assert up["files"] == 3 and up["uploaded"] == 3 and up["skipped"] == 0
    assert up["bytes"] == sum(len(v) for k, v in _tree(host_dir).items() if not k.startswith("."))
    again = _json_out(capsys, ["s3", "upload-dir", "--host-path", str(host_dir), "--s3-path", "data/set",
                               "--json", *where])
    assert again["uploaded"] == 0 and again["skipped"] == 3 and again["bytes"] == 0
    # A changed file is uploaded again when asked to overwrite, the others stay skipped.
    (host_dir / "a.txt").write_bytes(b"alpha, edited\n")
    changed = _json_out(capsys, ["s3", "upload-dir", "--host-path", str(host_dir), "--s3-path", "data/set",
                                 "--overwrite", "--json", *where])
    assert changed["uploaded"] == 1 and changed["replaced"] == 1 and changed["skipped"] == 2
    _json_out(capsys, ["s3", "upload-dir", "--host-path", str(host_dir / "sub"), "--s3-path", "keep", "--json",
                       *where])

    listing = _json_out(capsys, ["s3", "ls", "--json", *where])
    keys = [o["key"] for o in listing["objects"]]
    assert keys == sorted(keys) == ["data/set/a.txt", "data/set/sub/b.bin", "data/set/sub/deeper/c.png",
                                    "keep/b.bin", "keep/deeper/c.png"]
    assert listing["count"] == 5 and listing["bucket"] == "b"
    assert {o["key"]: o["size"] for o in listing["objects"]}["data/set/sub/b.bin"] == 768
    assert main(["s3", "ls", "--prefix", "data/", *where]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[-1] for line in out.splitlines()] == keys[:3]
    assert "3 objects" in err

    assert _json_out(capsys, ["s3", "download-dir", "--s3-path", "data/set", "--host-path",
                              str(tmp_path / "down"), "--json", *where])["objects"] == 3
    assert _tree(tmp_path / "down") == {k: v for k, v in _tree(host_dir).items() if not k.startswith(".")}

    assert _json_out(capsys, ["s3", "clear-dir", "--prefix", "data/set/sub", "--json", *where])["deleted"] == 2
    left = [o["key"] for o in _json_out(capsys, ["s3", "ls", "--json", *where])["objects"]]
    assert left == ["data/set/a.txt", "keep/b.bin", "keep/deeper/c.png"]

    assert _json_out(capsys, ["s3", "clear-bucket", "--json", *where])["deleted"] == 3
    assert _json_out(capsys, ["s3", "ls", "--json", *where])["count"] == 0


def test_s3_refusals_are_one_line(capsys, tmp_path, host_dir):
    where = _where(str(tmp_path / "store"), "b")
    (tmp_path / "empty").mkdir()
    assert "no files under" in _one_error_line(
        capsys, ["s3", "upload-dir", "--host-path", str(tmp_path / "empty"), "--s3-path", "x", "--create-bucket",
                 *where])
    assert "no such directory" in _one_error_line(
        capsys, ["s3", "upload-dir", "--host-path", str(tmp_path / "missing"), "--s3-path", "x", *where])
    assert "--s3-path" in _one_error_line(capsys, ["s3", "upload-dir", "--host-path", str(host_dir), *where])
    _json_out(capsys, ["s3", "upload-dir", "--host-path", str(host_dir), "--s3-path", "x", "--create-bucket",
                       "--json", *where])
    assert "nothing to download" in _one_error_line(
        capsys, ["s3", "download-dir", "--s3-path", "nothing", "--host-path", str(tmp_path / "d"), *where])
    assert "--prefix '/' names no folder" in _one_error_line(capsys, ["s3", "clear-dir", "--prefix", "/", *where])
    assert "refused prefix '../x'" in _one_error_line(capsys, ["s3", "clear-dir", "--prefix", "../x", *where])
    assert _json_out(capsys, ["s3", "ls", "--json", *where])["count"] == 3


# --------------------------------------------------------------------------- dataset
def test_dataset_digits_then_train_on_it(capsys, tmp_path):
    out = tmp_path / "digits50"
    written = _json_out(capsys, ["dataset", "digits", str(out), "--n", "50", "--json"])
    assert written == {"images": 50, "out": str(out.resolve())}
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 50 and {p.parent.name for p in pngs} == {str(i) for i in range(10)}
    where = _where(str(tmp_path / "store"))
    _json_out(capsys, ["s3", "upload-dir", "--host-path", str(out), "--s3-path", "ml-training/d50",
                       "--create-bucket", "--json", *where])
    # 50 images hold out about one per class: too few to publish without saying so.
    report = _json_out(capsys, ["run", "ml-training", "ml-training/d50", "1", "2", "--allow-unvalidated",
                                "--json", *where, *FAST_FLAGS])
    assert report["validated"] is False
    assert report["num_images"] == 50 and report["classes"] == [str(i) for i in range(10)]
    per_class = [sum(p.parent.name == str(c) for p in pngs) for c in range(10)]
    assert report["num_validation"] == sum(int(0.2 * n) for n in per_class)
    assert 0 <= report["validation_accuracy"] <= 1
    info = _json_out(capsys, ["model", "show", "--json", *where])
    assert info["digest"] == report["model_digest"]


# --------------------------------------------------------------------------- real processes
def _mlwf(*args, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLWF_")}
    return subprocess.run([*args], capture_output=True, text=True, env=env, timeout=120, **kw)


def test_console_script_bad_num_pca_exits_2_with_one_line(store_url):
    script = Path(sys.executable).parent / "mlwf"
    assert script.exists()
    proc = _mlwf(str(script), "run", "ml-training", TRAIN_PREFIX, "x", "4", *_where(store_url))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("mlwf: error: ")
    assert "NUM_PCA" in proc.stderr and "Traceback" not in proc.stderr


def test_module_entry_point_same_error_and_debug_shows_the_traceback(store_url):
    base = [sys.executable, "-m", "mlwf.cli", "model", "show", *_where(store_url)]
    plain = _mlwf(*base)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.count("\n") == 1 and plain.stderr.startswith("mlwf: error: ")
    assert "run ml-training first" in plain.stderr and "Traceback" not in plain.stderr

    debug = _mlwf(*base, "--debug")
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "mlwf.errors.ModelError" in debug.stderr and "run ml-training first" in debug.stderr


def test_console_script_json_run_is_machine_readable(tmp_path, digits_dir):
    where = _where(str(tmp_path / "store"))
    script = str(Path(sys.executable).parent / "mlwf")
    up = _mlwf(script, "s3", "upload-dir", "--host-path", str(digits_dir / "train"), "--s3-path", TRAIN_PREFIX,
               "--create-bucket", "--json", *where)
    assert up.returncode == 0 and json.loads(up.stdout)["uploaded"] == 600
    run = _mlwf(script, "run", "ml-training", TRAIN_PREFIX, "2", "2", "--json", *where, *FAST_FLAGS,
                "--trees", "4")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert TRAINING_KEYS <= set(report) and report["num_images"] == 600


# --------------------------------------------------------------------------- presets and forest settings
def test_the_default_settings_are_recorded_as_before_the_new_fields():
    from mlwf.workflows.training import TrainingConfig

    # A default model's config (and so its bytes) holds exactly the settings it held before
    # --forest and --train-rows existed; they are recorded once they differ from their default.
    assert set(TrainingConfig().recorded()) == {"image_size", "n_components", "n_trees", "max_depth",
                                                "min_samples_split", "holdout", "seed"}
    assert TrainingConfig(forest="extra").recorded()["forest"] == "extra"
    assert "train_rows" not in TrainingConfig(forest="extra").recorded()
    assert TrainingConfig(train_rows="partition").recorded()["train_rows"] == "partition"


def test_preset_accurate_is_its_flags_and_a_flag_given_with_it_wins(capsys, store_url):
    import mlwf.model
    from mlwf.presets import PRESETS
    from mlwf.storage import open_store

    # The preset on digits, with the image size, components and trees made small so the run is quick.
    report = _json_out(capsys, ["run", "ml-training", TRAIN_PREFIX, "2", "4", "--json", *_where(store_url),
                                "--preset", "accurate", "--image-size", "16", "--components", "6", "--trees", "8",
                                "--model-prefix", "ml-inference/accurate"])
    store = open_store(store_url, "tless")
    model = mlwf.model.load("ml-inference/accurate", store=store)
    config = model.config
    assert (config["image_size"], config["n_components"], config["n_trees"]) == (16, 6, 8)  # the flags
    for field in ("max_depth", "holdout", "forest", "train_rows"):  # the preset
        assert config[field] == PRESETS["accurate"][field], field
    assert report["validation_accuracy"] > 0.8 and 50 <= report["num_validation"] <= 60  # 10 % held out, not 20
    assert len(model.members) == 4 and model.summary()["num_trees"] == 4 * 8
    # Each PCA function handed on one part of all its rows (and its projection), not a slice per forest.
    parts = sorted(o.key.rsplit("/", 1)[1] for o in store.list(f"ml-training/outputs/{report['run_id']}/pca/")
                   if o.key.endswith(".bin"))
    assert parts == ["0-0.bin", "0-1.bin", "1-0.bin", "1-1.bin"]


def test_training_settings_out_of_their_choices_are_refused_in_one_line(capsys, store_url):
    from mlwf.errors import UsageError
    from mlwf.workflows.training import TrainingConfig

    for argv in (["--forest", "boosted"], ["--train-rows", "all"], ["--preset", "fast"]):
        code = main(["run", "ml-training", TRAIN_PREFIX, "2", "4", *_where(store_url), *argv])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and argv[1] in err, err
    with pytest.raises(UsageError, match="forest must be one of random, extra"):
        TrainingConfig(forest="boosted").check()


def test_bench_baseline_refuses_settings_it_cannot_follow(capsys, store_url, tmp_path):
    line = _one_error_line(capsys, ["bench", "ml-training", TRAIN_PREFIX, "2", "4", *_where(store_url),
                                    "--preset", "accurate", "--baseline", "--repeats", "1", "--out", str(tmp_path)])
    assert "--baseline trains random forests on slices" in line


@pytest.mark.parametrize("argv", [["--help"], ["--help", "run"], ["-h", "runs", "ls"]])
def test_the_top_level_help_lists_every_command_whatever_follows_it(argv, capsys):
    # The command line builds only the named command's group when a command comes first; a
    # help flag before it still shows all of them.
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    listed = re.search(r"\{([a-z0-9,]+)\}", capsys.readouterr().out).group(1).split(",")
    assert listed == ["run", "invoke", "dataset", "s3", "model", "runs", "ui", "serve", "deploy", "ray", "bench",
                      "trace", "demo"]


def test_a_command_in_first_place_builds_only_its_group():
    import mlwf.cli

    parser = mlwf.cli.build_parser(["runs", "ls"])
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert list(choices) == ["runs"]
    assert parser.parse_args(["runs", "ls"]).command == "runs"


# --------------------------------------------------------------------------- finding one's way
@pytest.mark.parametrize("argv, line", [
    (["rnu"], "unknown command 'mlwf rnu': did you mean 'mlwf run'? (see 'mlwf --help')"),
    (["runs", "lss"], "unknown command 'mlwf runs lss': did you mean 'mlwf runs ls'? (see 'mlwf runs --help')"),
    (["runs"], "'mlwf runs' needs a command: ls, show or gc (see 'mlwf runs --help')"),
    (["run", "ml-trainin", "d", "2", "8"],
     "unknown command 'mlwf run ml-trainin': did you mean 'mlwf run ml-training'? (see 'mlwf run --help')"),
    (["run", "ml-training", "d", "2", "8", "--bakend", "local"],
     "unknown flag --bakend for 'mlwf run ml-training': did you mean '--backend'? "
     "(see 'mlwf run ml-training --help')"),
    (["run", "ml-training", "d", "2", "8", "--bakend=local"],
     "unknown flag --bakend for 'mlwf run ml-training': did you mean '--backend'? "
     "(see 'mlwf run ml-training --help')"),
    (["runs", "ls", "--jsn"], "unknown flag --jsn for 'mlwf runs ls': did you mean '--json'? "
                              "(see 'mlwf runs ls --help')"),
    (["run", "ml-training", "d", "2", "8", "--transfer", "dirct"],
     "--transfer 'dirct' is not one of store, direct, payload or shm: did you mean 'direct'? (see 'mlwf run ml-training --help')"),
    (["runs", "show", "a", "b"], "'mlwf runs show' takes no argument 'b' (quote a value with spaces; flags start "
                                 "with --) (see 'mlwf runs show --help')"),
])
def test_usage_errors_use_the_words_of_the_command_line_and_suggest_the_nearest(capsys, argv, line):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"mlwf: error: {line}\n")


def _positionals(parser, prog=""):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _positionals(sub)
        elif not action.option_strings:
            yield parser.prog, action


def test_every_positional_argument_has_help_text():
    import mlwf.cli

    missing = [f"{prog} {action.metavar or action.dest}" for prog, action in _positionals(mlwf.cli.build_parser())
               if not action.help]
    assert missing == []
    shown = subprocess.run([sys.executable, "-m", "mlwf.cli", "run", "ml-training", "--help"], capture_output=True,
                           text=True, env={**os.environ, "COLUMNS": "100"}).stdout
    assert "  NUM_PCA               PCA functions" in shown and "  NUM_TRAIN             training functions" in shown


@pytest.mark.parametrize("argv, line", [
    (["run", "ml-training", "./data/train", "2", "8"],
     "DATA_PREFIX './data/train' is a folder on this machine, but the workflows read images from the store: "
     "upload it, then give 'ml-training/train' as DATA_PREFIX; to upload it: mlwf s3 upload-dir --host-path "
     "./data/train --s3-path ml-training/train --store {store}"),
    (["run", "ml-training", "/home/me/my data/", "2", "8"],
     "DATA_PREFIX '/home/me/my data/' is a folder on this machine, but the workflows read images from the store: "
     "upload it, then give 'ml-training/my data' as DATA_PREFIX; to upload it: mlwf s3 upload-dir --host-path "
     "'/home/me/my data/' --s3-path 'ml-training/my data' --store {store}"),
    (["run", "ml-inference", "ml-inference/model", "../batch", "4"],
     "DATA_PREFIX '../batch' is a folder on this machine, but the workflows read images from the store: upload it, "
     "then give 'ml-inference/batch' as DATA_PREFIX; to upload it: mlwf s3 upload-dir --host-path ../batch "
     "--s3-path ml-inference/batch --store {store}"),
    (["run", "ml-inference", "./model", "ml-inference/batch", "4"],
     "MODEL_PREFIX './model' is a path on this machine, but a model lives in the store: give the prefix ml-training "
     "published it at (default ml-inference/model; 'mlwf model show PREFIX' shows one)"),
    (["invoke", "ml-training", "./data/train", "2", "8", "--endpoint", "http://127.0.0.1:1"],
     "DATA_PREFIX './data/train' is a folder on this machine, but the workflows read images from the store: "
     "upload it, then give 'ml-training/train' as DATA_PREFIX; to upload it: mlwf s3 upload-dir --host-path "
     "./data/train --s3-path ml-training/train --store {store}"),
    (["bench", "ml-training", "~/data", "2", "8", "--out", "b"],
     "DATA_PREFIX '~/data' is a folder on this machine, but the workflows read images from the store: upload it, "
     "then give 'ml-training/data' as DATA_PREFIX; to upload it: mlwf s3 upload-dir --host-path {home}/data "
     "--s3-path ml-training/data --store {store}"),
])
def test_a_local_path_for_a_store_prefix_says_how_to_upload_it(capsys, store_url, argv, line):
    assert main([*argv, "--store", store_url]) == 2
    home = os.path.expanduser("~")
    assert capsys.readouterr().err == f"mlwf: error: {line.format(store=store_url, home=home)}\n"
