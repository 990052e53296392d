"""``mlwf deploy kserve``: the InferenceService a KServe cluster needs, as committed under deploy/kserve/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlwf import deploy
from mlwf.errors import UsageError
from mlwf.serving import kserve

REPO = Path(__file__).resolve().parent.parent
#: What deploy/kserve/ was rendered with.
COMMITTED = {"image": "registry.example.com/mlwf:0.1.0", "namespace": "mlwf",
             "s3_host": "minio.tless.svc.cluster.local", "s3_port": 9000, "bucket": "tless"}


def _render(tmp_path: Path, **changes) -> Path:
    out = tmp_path / "kserve"
    deploy.write(kserve.render(**{**COMMITTED, **changes}), out, command="mlwf deploy kserve")
    return out


def test_the_inference_service_runs_the_model_server_with_what_a_cluster_needs(tmp_path):
    out = _render(tmp_path)
    [service] = yaml.safe_load_all((out / "10-inferenceservice.yaml").read_text())
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    assert service["metadata"] == {"name": "mlwf", "namespace": "mlwf", "labels": {
        "app.kubernetes.io/name": "mlwf", "app.kubernetes.io/component": "model-server"}}
    predictor = service["spec"]["predictor"]
    assert predictor["minReplicas"] == 1 and predictor["maxReplicas"] >= predictor["minReplicas"]
    [container] = predictor["containers"]
    assert container["name"] == "kserve-container"  # how KServe finds the predictor's container
    assert container["image"] == "registry.example.com/mlwf:0.1.0"
    assert container["command"] == ["mlwf"]
    args = container["args"]
    assert args[:3] == ["model", "serve", "ml-inference/model"]
    assert args[args.index("--store") + 1] == "s3://" and args[args.index("--name") + 1] == "mlwf"
    assert args[args.index("--watch") + 1] == "30"
    assert "--port" not in args  # $PORT (Knative) or 8080
    assert args[args.index("--host") + 1] == "0.0.0.0"  # every interface of the pod, said explicitly
    env = {e["name"]: e for e in container["env"]}
    assert "PORT" not in env
    for name, key in (("S3_USER", "s3-user"), ("S3_PASSWORD", "s3-password")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "mlwf-secrets", "key": key}
        assert "value" not in env[name]
    assert env["S3_HOST"]["value"] == "minio.tless.svc.cluster.local" and env["S3_PORT"]["value"] == "9000"
    assert env["MLWF_BUCKET"]["value"] == "tless"
    assert [p["containerPort"] for p in container["ports"]] == [8080]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert container["resources"]["requests"]["cpu"] == "1"
    assert container["securityContext"]["runAsNonRoot"] is True
    [ns] = yaml.safe_load_all((out / "00-namespace.yaml").read_text())
    assert ns == {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mlwf"}}
    [secret] = yaml.safe_load_all((out / "templates/secret.yaml").read_text())
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "mlwf-secrets"
    assert set(secret["stringData"]) == {"s3-user", "s3-password"}
    assert "Rendered by 'mlwf deploy kserve'" in (out / "10-inferenceservice.yaml").read_text()


def test_options_reach_the_manifest(tmp_path):
    out = _render(tmp_path, model_prefix="/models/fashion/", name="fashion", min_scale=0, max_scale=8, watch=0)
    [service] = yaml.safe_load_all((out / "10-inferenceservice.yaml").read_text())
    predictor = service["spec"]["predictor"]
    args = predictor["containers"][0]["args"]
    assert args[2] == "models/fashion" and args[args.index("--name") + 1] == "fashion"
    assert "--watch" not in args
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (0, 8)
    assert service["metadata"]["name"] == "fashion"


@pytest.mark.parametrize("changes, flag", [
    ({"name": "Fashion"}, "--name"),
    ({"name": "9lives"}, "--name"),
    ({"name": "x" * 46}, "--name"),
    ({"model_prefix": ""}, "--model-prefix"),
    ({"model_prefix": "models/../secret"}, "--model-prefix"),
    ({"model_prefix": "my model"}, "--model-prefix"),
    ({"min_scale": 3, "max_scale": 2}, "--max-scale"),
    ({"max_scale": 0}, "--max-scale"),
    ({"watch": -1}, "--watch"),
    ({"namespace": "Bad_NS"}, "--namespace"),
    ({"image": "has space"}, "--image"),
    ({"s3_port": 0}, "--s3-port"),
])
def test_bad_settings_are_refused_naming_the_flag(changes, flag):
    with pytest.raises(UsageError, match=flag):
        kserve.render(**{**COMMITTED, **changes})


def test_the_committed_manifests_are_a_fresh_render(tmp_path):
    out = _render(tmp_path)
    committed = REPO / "deploy" / "kserve"
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(committed)) for p in committed.rglob("*") if p.is_file())
    for name in names:
        assert (committed / name).read_text() == (out / name).read_text(), name
