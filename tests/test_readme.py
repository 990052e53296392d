"""The README and the docs' examples, followed as a new user follows them.

The README's Quick start, its own-data steps and its Python example, the
measuring example of docs/performance.md and the serving examples of
docs/serving.md run exactly as those pages write them today (the code blocks
are read from the files, so the pages cannot drift from what works), in a copy
of the checkout, with a fresh virtual environment and a fresh HOME. The own-data steps
need the IDX files the README tells the user to download: small ones with the
same names are made here from scikit-learn's digits.

The Quick start installs the project (about 20 s); it runs once per session
and the later steps use the environment it made, as the user would.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.readme

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
FASHION_NAMES = ["t-shirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle-boot"]


def section(heading: str, page: Path = README) -> str:
    """The text of the section of ``page`` whose ``## `` heading starts with ``heading``."""
    text = page.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"{page.name} has no section '## {heading}'"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.S | re.M)


def _clean_env(home: Path) -> dict[str, str]:
    """A new user's environment: a fresh HOME, no virtual environment active, no mlwf or test settings.

    pip keeps its configuration (this machine's package index and wheel
    locations) and the cache of the user running the tests, so the fresh HOME
    does not download every wheel again.
    """
    ours = Path(sys.prefix) / "bin"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLWF_", "S3_", "AWS_", "PYTEST", "PYTHON", "VIRTUAL_ENV", "RAY_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != ours)
    env.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    env["HOME"] = str(home)
    return env


class User:
    """A checkout, a HOME and the shell a user types the README's blocks into."""

    def __init__(self, root: Path):
        self.checkout = root / "mlwf"
        self.home = root / "home"
        self.home.mkdir()
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        for name in filter(None, files.decode().split("\0")):
            source = ROOT / name
            if source.is_file():  # a file deleted in the working tree is not part of the checkout
                target = self.checkout / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        self.env = _clean_env(self.home)

    @property
    def store(self) -> Path:
        """The default local store's bucket, where the README's steps put everything."""
        return self.home / ".local" / "share" / "mlwf" / "store" / "tless"

    def bash(self, script: str, activate: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run ``script`` as typed into a shell in the checkout (after the Quick start's venv is active)."""
        prologue = "set -euo pipefail\n" + (". .venv/bin/activate\n" if activate else "")
        proc = subprocess.run(["bash", "-c", prologue + script], cwd=self.checkout, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{script}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_idx_files(folder: Path) -> None:
    """The four IDX files the README names: 2,000 training and 1,000 test images (28×28, from the digits)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(p).resize((28, 28), Image.BILINEAR)) for p in pixels])
    order = np.arange(2000) % len(images)
    _write_idx(folder / "train-images-idx3-ubyte.gz", images[order])
    _write_idx(folder / "train-labels-idx1-ubyte.gz", digits.target[order])
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", images[-1000:])
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", digits.target[-1000:])


@pytest.fixture(scope="session")
def user(tmp_path_factory) -> User:
    return User(tmp_path_factory.mktemp("readme"))


@pytest.fixture(scope="session")
def quick_start(user) -> subprocess.CompletedProcess:
    [block] = code_blocks(section("Quick start"), "bash")
    assert "pip install ." in block and "mlwf demo" in block
    return user.bash(block, activate=False)


@pytest.fixture(scope="session")
def own_data(user, quick_start) -> subprocess.CompletedProcess:
    write_idx_files(user.checkout)
    [block] = code_blocks(section("Your own data, step by step"), "bash")
    return user.bash(block)


def test_quick_start_installs_and_runs_the_demo(user, quick_start):
    out = quick_start.stdout
    for text in ("mlwf demo", "ml-training run ", "ml-inference run ", "digits it never saw", "mlwf runs show"):
        assert text in out, out
    assert "Traceback" not in quick_start.stderr
    manifest = json.loads((user.store / "mlwf-demo" / "model" / "MODEL.json").read_text())
    assert manifest["sha256"] in out
    # Only the demo's own prefix and its runs' outputs.
    assert sorted(p.name for p in user.store.iterdir()) == ["ml-inference", "ml-training", "mlwf-demo"]
    assert sorted(p.name for p in (user.store / "ml-inference").iterdir()) == ["outputs"]


def test_own_data_steps_run_as_written(user, own_data):
    train = user.checkout / "data" / "train"
    assert sorted(p.name for p in train.iterdir()) == sorted(FASHION_NAMES)
    assert sum(1 for _ in train.rglob("*.png")) == 2000
    assert sum(1 for _ in (user.checkout / "data" / "test").rglob("*.png")) == 1000
    assert (user.store / "ml-inference" / "model" / "MODEL.json").is_file()
    # Step 5 lists the runs newest first; `mlwf runs show` gives the inference run whole.
    lines = own_data.stdout.splitlines()
    is_run = re.compile(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}  ").match
    assert sum(1 for line in lines if is_run(line)) == 4, own_data.stdout  # the demo's two runs and these two
    assert "ml-inference" in lines, own_data.stdout  # runs listed under their workflow, newest first
    newest = next(line.split() for line in lines[lines.index("ml-inference"):] if is_run(line))
    assert newest[1] == "succeeded", own_data.stdout
    shown = json.loads(user.bash(f"mlwf runs show {newest[0]} --json").stdout)
    report = shown["report"]
    assert report["num_predicted"] == 1000 and report["accuracy"] > 0.6
    assert sorted(report["confusion"]["labels"]) == sorted(FASHION_NAMES)
    predictions = (user.store / shown["outputs"]["predictions"]).read_text().splitlines()
    assert predictions[0] == "key,prediction,probability,label" and len(predictions) == 1001


def test_python_example_runs_saved_as_a_file(user, own_data):
    [block] = code_blocks(section("Your own data, step by step"), "python")
    (user.checkout / "train.py").write_text(block)
    proc = user.bash("python train.py")
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("validation accuracy "), proc.stdout
    true = eval(lines[1].removeprefix("true:").strip())  # a printed list of str
    predicted = eval(lines[2].removeprefix("predicted:").strip())
    assert len(true) == len(predicted) == 5 and set(true) | set(predicted) <= set(FASHION_NAMES)
    assert len(lines) == 8  # and five rows of probabilities
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr


def test_measuring_example_runs_with_what_it_installs(user, own_data):
    [block] = code_blocks(section("Measuring", DOCS / "performance.md"), "bash")
    assert "--backend" not in block  # the extras for other backends are not installed here
    user.bash(block, timeout=900)
    results = user.checkout / "results"
    summary = (results / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 5  # local store/direct, warm/cold, and the baseline
    assert (user.checkout / "run.png").stat().st_size > 5000
    assert json.loads((user.checkout / "run.json").read_text())["traceEvents"]


# --------------------------------------------------------------------------- serving
SERVING = DOCS / "serving.md"


@pytest.fixture(scope="session")
def serving(user, own_data) -> subprocess.CompletedProcess:
    """docs/serving.md's first block: install the extras, export the model to ONNX."""
    install = code_blocks(SERVING.read_text(encoding="utf-8"), "bash")[0]
    assert "pip install 'mlwf[onnx,serve]'" in install and "mlwf model export" in install
    return user.bash(install, timeout=900)


def _served_model(user):
    import mlwf.model

    return mlwf.model.load("ml-inference/model", store=str(user.store.parent), bucket="tless")


def _with_port(block: str, port: int) -> str:
    """The README uses port 8000; another process on this machine may hold it, so the test picks a free one."""
    assert "8000" in block
    return block.replace("8000", str(port))


def test_onnx_example_runs_with_onnxruntime_numpy_and_pillow_only(user, serving):
    assert (user.checkout / "model.onnx").stat().st_size > 10_000
    example = code_blocks(SERVING.read_text(encoding="utf-8"), "python")[0]
    (user.checkout / "onnx_example.py").write_text(example)
    # mlwf stays installed in this environment, so make it impossible to import for the example.
    proc = user.bash("python -c \"import runpy, sys; sys.modules['mlwf'] = None; "
                     "runpy.run_path('onnx_example.py', run_name='__main__'); "
                     "assert not [m for m in sys.modules if m.startswith('mlwf.')]\"")
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert len(lines) == 5, proc.stdout
    model = _served_model(user)
    files = [str(user.checkout / f) for f, _, _ in lines]
    proba = model.predict_proba(files)
    for (_, name, p), row in zip(lines, proba):
        assert name == model.classes[int(np.argmax(row))]
        assert abs(float(p) - row.max()) <= 0.0005 + 1e-5  # printed to 3 decimals


def test_serve_example_answers_curl_and_the_python_client(user, serving):
    from tests.s3server import free_port

    serve_block = code_blocks(SERVING.read_text(encoding="utf-8"), "bash")[1]
    proc = user.bash(_with_port(serve_block, free_port()), timeout=120)
    ready, metadata, answer = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert ready == {"ready": True}
    model = _served_model(user)
    assert metadata["parameters"]["classes"] == model.classes
    first = user.checkout / user.bash("IMAGES=(data/test/*/*.png); echo ${IMAGES[0]}").stdout.strip()
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["label"]["data"] == model.predict([first]).tolist()
    assert answer["model_version"] == model.digest
    # The Python client, against the same command started by the test.
    port = free_port()
    user.bash("pip install --quiet 'tritonclient[http]'", timeout=600)
    server = subprocess.Popen(["bash", "-c", f". .venv/bin/activate && exec mlwf model serve ml-inference/model "
                                             f"--host 127.0.0.1 --port {port}"],
                              cwd=user.checkout, env=user.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        user.bash(f"curl -sf --retry 30 --retry-connrefused --retry-delay 1 localhost:{port}/v2/health/ready",
                  timeout=60)
        client_block = code_blocks(SERVING.read_text(encoding="utf-8"), "python")[1]
        (user.checkout / "client_example.py").write_text(_with_port(client_block, port))
        out = user.bash("python client_example.py").stdout
    finally:
        server.terminate()
        assert server.wait(30) == 0, server.stderr.read()
    files = [user.checkout / f for f in sorted(glob.glob("data/test/*/*.png", root_dir=user.checkout))[:64]]
    expected = model.predict(files)[:8].tolist()
    assert all(f"b'{name}'" in out for name in expected) and "(64, 10)" in out, out
