"""A command whose optional libraries are missing names the extra that holds them, in one line.

Each command runs in a fresh interpreter where the extra's top-level modules
cannot be imported (as in an environment where only ``pip install .`` was
run): it must end with exit 2 and one line ``… pip install 'mlwf[EXTRA]'``,
never an internal error or a traceback.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

#: Hide these modules, then run the mlwf command line with the arguments that follow.
_RUNNER = r"""
import importlib.abc, sys
hidden = set(sys.argv[1].split(","))
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
from mlwf.cli import main
sys.exit(main(sys.argv[2:]))
"""

KNATIVE = "httpx,uvicorn,h11,starlette,cloudevents,yaml"
SERVE = "uvicorn,starlette"


@pytest.mark.parametrize("hidden, argv, extra", [
    ("ray", ["ray", "pool", "status", "--ray-address", "127.0.0.1:1"], "ray"),
    ("ray", ["run", "ml-training", "x/y", "1", "1", "--backend", "ray", "--store", "{store}"], "ray"),
    (KNATIVE, ["run", "ml-inference", "m/x", "x/y", "1", "--backend", "knative", "--endpoint", "http://127.0.0.1:1",
               "--store", "{store}"], "knative"),
    (KNATIVE, ["invoke", "ml-inference", "m/x", "x/y", "1", "--endpoint", "http://127.0.0.1:1",
               "--store", "{store}"], "knative"),
    (KNATIVE, ["serve", "--store", "{store}", "--port", "0", "--insecure-no-auth"], "knative"),
    (KNATIVE, ["deploy", "knative", "--image", "i:1", "--namespace", "mlwf", "--s3-host", "h", "--s3-port", "9000",
               "--out", "{tmp}/k"], "knative"),
    (SERVE, ["model", "serve", "{tmp}/model.mlwf", "--port", "0"], "serve"),
    (SERVE, ["ui", "--store", "{store}", "--port", "0"], "ui"),
    ("onnx,onnxruntime", ["model", "export", "{tmp}/model.mlwf", "--format", "onnx", "-o", "{tmp}/m.onnx"], "onnx"),
    ("matplotlib", ["trace", "plot", "{tmp}/trace.json", "--out", "{tmp}/t.png"], "bench"),
])
def test_a_command_without_its_extra_names_it(tmp_path, hidden, argv, extra):
    from mlwf import codec
    from tests.test_model import _tree_meta

    (tmp_path / "model.mlwf").write_bytes(codec.encode(_tree_meta()))
    (tmp_path / "trace.json").write_text('{"traceEvents": []}')
    argv = [a.format(store=tmp_path / "store", tmp=tmp_path) for a in argv]
    done = subprocess.run([sys.executable, "-c", _RUNNER, hidden, *argv], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"pip install 'mlwf[{extra}]'" in done.stderr and "internal error" not in done.stderr, done.stderr
