"""Where mlwf's servers listen: this machine only unless told; containers and pods say 0.0.0.0 themselves."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from mlwf import codec
from tests.procfs import descendants, is_loopback, listening_sockets
from tests.s3server import free_port
from tests.serverprocess import ServerProcess
from tests.test_model import _tree_meta

REPO = Path(__file__).resolve().parent.parent


def _listening(server: ServerProcess) -> list[tuple[str, int, int]]:
    return [s for s in listening_sockets(descendants(server.proc.pid)) if s[1] == server.port]


@pytest.mark.parametrize("command", ["serve", "model serve"])
def test_both_servers_listen_on_loopback_unless_told(tmp_path, command):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLWF_")}
    if command == "serve":
        argv = ["serve", "--store", str(tmp_path / "store"), "--insecure-no-auth", "--port", str(port)]
        ready = "/readyz"
    else:
        model = tmp_path / "model.mlwf"
        model.write_bytes(codec.encode(_tree_meta()))
        argv = ["model", "serve", str(model), "--port", str(port)]
        ready = "/v2/health/ready"
    server = ServerProcess([sys.executable, "-m", "mlwf.cli", *argv], env, tmp_path / "log", port,
                           ready_path=ready, name=f"mlwf {command}")
    try:
        server.wait_ready()
        sockets = _listening(server)
        assert sockets and all(is_loopback(address) for address, _, _ in sockets), sockets
    finally:
        server.stop()
    help_text = os.popen(f"{sys.executable} -m mlwf.cli {command} --help").read()
    assert "default 127.0.0.1" in " ".join(help_text.split())


def test_containers_listen_on_every_interface_by_saying_so():
    """The image's command and every rendered manifest give --host 0.0.0.0 (a pod is reached on its own
    address), and a memory budget that fits the container's limit."""
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'CMD ["mlwf", "serve", "--host", "0.0.0.0"]' in dockerfile
    servers = 0
    for path in sorted((REPO / "deploy").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            spec = doc.get("spec", {})
            pod = spec.get("template", {}).get("spec") or spec.get("predictor")
            for container in (pod or {}).get("containers", []):
                args = container.get("args", [])
                if args[:1] == ["serve"] or args[:2] == ["model", "serve"]:
                    servers += 1
                    at = args.index("--host")
                    assert args[at + 1] == "0.0.0.0", (path, args)
                    budget = {e["name"]: e.get("value") for e in container["env"]}["MLWF_MAX_MEMORY"]
                    limit = container["resources"]["limits"]["memory"]
                    units = {"Mi": 1 << 20, "Gi": 1 << 30}
                    assert int(budget.removesuffix("MiB")) << 20 <= int(limit[:-2]) * units[limit[-2:]] // 2, \
                        (path, budget, limit)
    assert servers >= 10  # every stage's Service, the dead-letter sink, the InferenceService
