"""The KubeRay manifests (deploy/kuberay/) hold what a cluster needs to run mlwf.

No Kubernetes here: the manifests are parsed and checked against KubeRay's own
rules for these resources (its validation of RayCluster and RayJob specs) and
against mlwf itself (the entrypoints parse as mlwf commands, the preloaded
modules exist, the image installs the Ray the cluster declares).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "deploy" / "kuberay"


def _one(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d is not None]
    assert len(docs) == 1, name
    return docs[0]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _one("raycluster.yaml")


@pytest.fixture(scope="module")
def secret() -> dict:
    return _one("templates/secret.yaml")


def _ray_containers(cluster: dict) -> list[tuple[str, dict]]:
    spec = cluster["spec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]) for name, group in groups]


def test_the_cluster_is_a_ray_v1_raycluster_with_token_auth_from_our_secret(cluster, secret):
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["namespace"] == secret["metadata"]["namespace"] == "mlwf"
    auth = cluster["spec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"] == secret["metadata"]["name"]
    # KubeRay reads the token from this key; token mode needs Ray 2.52 or later.
    assert "auth_token" in secret["stringData"] and secret["kind"] == "Secret"
    assert _version(cluster["spec"]["rayVersion"]) >= (2, 52)


def test_the_image_installs_exactly_the_ray_the_cluster_declares_with_its_dashboard(cluster):
    text = (KUBERAY / "Dockerfile").read_text()
    [pinned] = re.findall(r"^ARG RAY_VERSION=(\S+)$", text, re.M)
    assert pinned == cluster["spec"]["rayVersion"]
    assert '".[ray]"' in text and '"ray[default]==${RAY_VERSION}"' in text and "[test]" not in text
    # mlwf's own lower bound on Ray must allow the pinned version.
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    [bound] = [re.match(r"ray>=(\S+)", d.split(";")[0].strip()).group(1) for d in deps if d.startswith("ray>=")]
    assert _version(pinned) >= _version(bound)
    # The same Python as the Knative image; KubeRay gives the command, so none here; never root.
    top = (REPO / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", text, re.M) == re.findall(r"^FROM (\S+)", top, re.M)
    assert not re.search(r"^(CMD|ENTRYPOINT)\b", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")


def test_every_node_runs_the_same_image_with_s3_settings_and_credentials_from_the_secret(cluster, secret):
    images, envs = set(), []
    for name, pod in _ray_containers(cluster):
        container = pod["containers"][0]
        images.add(container["image"])
        env = {e["name"]: e for e in container["env"]}
        envs.append({k: v.get("value") for k, v in env.items()})
        for variable, key in (("S3_USER", "s3-user"), ("S3_PASSWORD", "s3-password")):
            assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": key}
            assert "value" not in env[variable] and key in secret["stringData"]
        assert env["S3_HOST"]["value"] and env["S3_PORT"]["value"].isdigit()
        # authOptions injects RAY_AUTH_MODE and RAY_AUTH_TOKEN; a second, hand-written copy would shadow it.
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(env), name
        assert container["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        # Ray's object store lives in /dev/shm, which is 64 MiB in a pod unless a memory volume backs it.
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        # Guaranteed QoS: what Ray is told a node has is what the node gets.
        assert container["resources"]["requests"] == container["resources"]["limits"]
    assert len(images) == 1
    assert all(e == envs[0] for e in envs), "head and workers must see the same settings"


def test_the_preloaded_modules_exist_and_the_head_takes_no_stage_calls(cluster):
    for _, pod in _ray_containers(cluster):
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        modules = env["RAY_preload_python_modules"].split(",")
        assert modules and all(importlib.util.find_spec(m) is not None for m in modules), modules
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    ports = {p["name"]: p["containerPort"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]
             ["containers"][0]["ports"]}
    assert ports["gcs"] == 6379 and ports["dashboard"] == 8265  # RayJob submits through the dashboard
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        cpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
        assert str(cpus).isdigit() and int(cpus) >= 1  # whole CPUs: one stage call each


@pytest.mark.parametrize("name, workflow", [("rayjob-ml-training.yaml", "ml-training"),
                                            ("rayjob-ml-inference.yaml", "ml-inference")])
def test_each_rayjob_runs_mlwf_on_the_cluster_as_kuberay_allows(cluster, name, workflow):
    from mlwf.cli import build_parser

    job = _one(name)
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    # On the running cluster, selected by name; KubeRay's rules for that mode:
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in spec and not spec.get("suspend")
    assert spec.get("submissionMode", "K8sJobMode") != "SidecarMode"
    assert spec.get("backoffLimit", 0) == 0
    assert "ttlSecondsAfterFinished" not in spec or spec.get("shutdownAfterJobFinishes")
    # The entrypoint is an mlwf command that joins this cluster (Ray sets RAY_ADDRESS for a job's driver).
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "mlwf"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.workflow, args.backend) == ("run", workflow, "ray")
    assert args.store == "s3://" and args.ray_address is None and args.json


@pytest.mark.parametrize("name, command", [("rayjob-pool-start.yaml", "start"), ("rayjob-pool-stop.yaml", "stop")])
def test_the_pool_rayjobs_start_and_stop_mlwfs_worker_pool_on_the_cluster(cluster, name, command, monkeypatch):
    from mlwf.cli import build_parser
    from mlwf.cli.raypool import _address
    from mlwf.settings import Settings

    job = _one(name)
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in spec and not spec.get("suspend") and spec.get("backoffLimit", 0) == 0
    # Deleting the cluster after the job would take the pool with it.
    assert not spec.get("shutdownAfterJobFinishes")
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "mlwf"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.ray_command, args.pool_command) == ("ray", "pool", command)
    assert args.ray_address is None and args.json
    # The cluster comes from RAY_ADDRESS, which Ray sets for a job's driver to the head's GCS address.
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert _address(Settings.resolve(ray_address=args.ray_address), command) == "10.0.0.5:6379"
