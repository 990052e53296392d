"""``mlwf deploy kserve``: the KServe ``InferenceService`` that serves a published model.

Writes into ``OUT`` (default ``deploy/kserve``):

* ``00-namespace.yaml``: the Namespace;
* ``10-inferenceservice.yaml``: a ``serving.kserve.io/v1beta1``
  ``InferenceService`` whose predictor is a custom container
  (``kserve-container``) running ``mlwf model serve MODEL_PREFIX --store s3://``
  from the mlwf image: the Open Inference Protocol (v2) on port 8080. It reads
  the S3 credentials from the Secret ``mlwf-secrets`` (``secretKeyRef``, the
  same Secret and keys as ``mlwf deploy knative``), gets the endpoint and
  bucket as plain values, probes ``/v2/health/ready`` and ``/v2/health/live``,
  checks the published manifest every ``--watch`` seconds and serves a newly
  published model once it has passed its checks, runs as a non-root user and
  never sets ``PORT`` (Knative sets it in Serverless mode; the server falls
  back to 8080 in RawDeployment mode);
* ``templates/secret.yaml``: the Secret to fill in (kept out of ``OUT`` itself
  so ``kubectl apply -f OUT`` never overwrites a real secret with placeholders).
"""

from __future__ import annotations

import re
from typing import Any

from mlwf.errors import UsageError

PORT = 8080
DEFAULT_OUT = "deploy/kserve"
DEFAULT_PREFIX = "ml-inference/model"
DEFAULT_NAME = "mlwf"
DEFAULT_WATCH = 30
REQUEST_TIMEOUT_S = 60
#: One pod: one inference thread on one CPU, a few requests queued per pod before the autoscaler adds pods.
CPU = "1"
MEMORY = "1Gi"
SCALE_TARGET = 4


def render(*, image: str, namespace: str, s3_host: str, s3_port: int, bucket: str = "tless",
           model_prefix: str = DEFAULT_PREFIX, name: str = DEFAULT_NAME, min_scale: int = 1,
           max_scale: int = 4, watch: int = DEFAULT_WATCH) -> dict[str, list[dict[str, Any]]]:
    """The manifests as ``{relative file name: [documents]}``.

    Parameters
    ----------
    image : the mlwf image (the repository's Dockerfile with the ``serve`` extra).
    namespace, s3_host, s3_port, bucket : as for ``mlwf deploy knative``.
    model_prefix : the published model to serve.
    name : the InferenceService's name, which is also the model's name in
        ``/v2/models/NAME/infer``.
    min_scale, max_scale : pods (``minReplicas``/``maxReplicas``; 0 scales to zero).
    watch : seconds between checks for a newly published model (0: never).

    Raises
    ------
    UsageError
        For a value a cluster (or mlwf) would not accept, naming the flag.
    """
    from mlwf.deploy import POD_HOST, SECRET_NAME, check_target, memory_budget, namespace_document

    check_target(image=image, namespace=namespace, s3_host=s3_host, s3_port=s3_port, bucket=bucket,
                 min_scale=min_scale)
    # An InferenceService name becomes a DNS label in its URL, with room for KServe's suffixes.
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,43}[a-z0-9])?", name or ""):
        raise UsageError(f"--name {name!r}: use lowercase letters, digits and '-', starting with a letter, "
                         "at most 45 characters (it names the InferenceService and the model in its URL)")
    prefix = (model_prefix or "").strip("/")
    if not prefix or any(c.isspace() for c in prefix) or any(part in ("", ".", "..") for part in prefix.split("/")):
        raise UsageError(f"--model-prefix {model_prefix!r} is not a model prefix, e.g. ml-inference/model")
    if max_scale < max(min_scale, 1):
        raise UsageError(f"--max-scale {max_scale} must be at least 1 and at least --min-scale {min_scale}")
    if not 0 <= watch <= 86400:
        raise UsageError(f"--watch must be 0 (off) to 86400 seconds, got {watch}")

    def secret(env_name: str, key: str) -> dict[str, Any]:
        return {"name": env_name, "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": key}}}

    env = [secret("S3_USER", "s3-user"), secret("S3_PASSWORD", "s3-password"),
           {"name": "S3_HOST", "value": s3_host}, {"name": "S3_PORT", "value": str(s3_port)},
           {"name": "MLWF_BUCKET", "value": bucket}, memory_budget(MEMORY)]
    args = ["model", "serve", prefix, "--store", "s3://", "--name", name, "--threads", "1", *POD_HOST]
    if watch:
        args += ["--watch", str(watch)]
    labels = {"app.kubernetes.io/name": "mlwf", "app.kubernetes.io/component": "model-server"}
    service = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"predictor": {
            "minReplicas": min_scale,
            "maxReplicas": max_scale,
            "scaleMetric": "concurrency",
            "scaleTarget": SCALE_TARGET,
            "timeout": REQUEST_TIMEOUT_S,
            "containers": [{
                # KServe recognises the predictor's container by this name.
                "name": "kserve-container",
                "image": image,
                "command": ["mlwf"],
                "args": args,
                "ports": [{"name": "http1", "containerPort": PORT, "protocol": "TCP"}],
                "env": env,
                "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": PORT}, "periodSeconds": 2},
                "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": PORT}, "periodSeconds": 10},
                "resources": {"requests": {"cpu": CPU, "memory": MEMORY}, "limits": {"memory": MEMORY}},
                "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
        }},
    }
    secret_template = {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": SECRET_NAME, "namespace": namespace, "labels": {"app.kubernetes.io/name": "mlwf"}},
        "stringData": {"s3-user": "CHANGE-ME", "s3-password": "CHANGE-ME"}}
    return {"00-namespace.yaml": [namespace_document(namespace)],
            "10-inferenceservice.yaml": [service],
            "templates/secret.yaml": [secret_template]}
