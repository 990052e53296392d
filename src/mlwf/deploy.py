"""``mlwf deploy knative``: render the Kubernetes manifests that run the stages on Knative Serving.

Writes into ``OUT`` (default ``deploy/knative``):

* ``00-namespace.yaml``: the Namespace;
* ``20-services.yaml``: Knative ``serving.knative.dev/v1`` Services running
  ``mlwf serve --store s3:// --bucket BUCKET`` (a service acts on that store
  only, and refuses calls naming any other): one per stage (``--per-stage``, the default; each with the
  concurrency, scale bounds and resources its stage needs) or one for every
  stage (``--single``). Each reads ``MLWF_FUNCTION_SECRET`` and the S3
  credentials from the Secret ``mlwf-secrets`` (``secretKeyRef``), gets the
  S3 endpoint as plain values, probes ``/readyz`` and ``/healthz``, runs as a
  non-root user, and never sets ``PORT`` (Knative reserves it and sets it);
* ``templates/secret.yaml``: the Secret to fill in (kept out of ``OUT`` itself
  so ``kubectl apply -f OUT`` never overwrites a real secret with placeholders);
* ``run/ml-training.yaml``, ``run/ml-inference.yaml``: Jobs that run a
  workflow's driver inside the cluster against those Services (``kubectl
  create -f``), the counterpart of the seed's ``curl_cmd.sh``;
* ``endpoints.txt``: the ``--endpoint`` flags for ``mlwf run --backend knative``.

With ``choreography=True`` (``--choreography``, default folder
``deploy/knative-choreography``) the workflow runs with no driver: the same
Services plus ``mlwf-dead-letter``, ``30-eventing.yaml`` (a Broker, a
SinkBinding that gives every Service ``K_SINK``, a Trigger per stage and per
start event, with delivery retries and the dead-letter sink; see
:mod:`mlwf.choreography.manifests`), and ``run/<workflow>.yaml`` Jobs that
start a run with one event (``mlwf invoke ... --wait``) instead of driving it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlwf.engine.events import PLACEHOLDER_SECRET, known_stages
from mlwf.errors import UsageError

SECRET_NAME = "mlwf-secrets"
CONTAINER_PORT = 8080
REQUEST_TIMEOUT_S = 300


@dataclass(frozen=True)
class Profile:
    """How a stage's Service scales: calls per pod, pod bounds, and what one pod gets."""

    concurrency: int
    max_scale: int
    cpu: str
    memory: str
    processes: bool = False  # run the pod's concurrent calls in worker processes (CPU-bound, > 1 per pod)


#: CPU-bound stages get one call per pod (the serverless function model);
#: listing and model loading are I/O and can share a pod.
PROFILES: dict[tuple[str, str], Profile] = {
    ("ml-training", "partition"): Profile(4, 2, "500m", "512Mi"),
    ("ml-training", "pca"): Profile(1, 16, "1", "1Gi"),
    ("ml-training", "train"): Profile(1, 32, "1", "1Gi"),
    ("ml-training", "validation"): Profile(1, 4, "1", "1Gi"),
    ("ml-inference", "partition"): Profile(4, 2, "500m", "512Mi"),
    ("ml-inference", "load"): Profile(4, 2, "500m", "1Gi"),
    ("ml-inference", "predict"): Profile(1, 32, "1", "1Gi"),
}
SINGLE = Profile(2, 32, "2", "2Gi", processes=True)
#: The dead-letter sink of the choreographed mode: it only marks runs failed.
DEAD_LETTER = Profile(4, 2, "250m", "512Mi")
_SHORT = {"ml-training": "training", "ml-inference": "inference"}
#: What the in-cluster driver Jobs run (the seed's datasets; edit to taste).
RUN_ARGS = {"ml-training": ["ml-training/mnist-images-2k", "2", "8"],
            "ml-inference": ["ml-inference/model", "ml-inference/images-inference-1k", "16"]}


def service_name(workflow: str | None = None, stage: str | None = None) -> str:
    return "mlwf" if workflow is None else f"mlwf-{_SHORT[workflow]}-{stage}"


def _labels(workflow: str | None, stage: str | None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "mlwf", "app.kubernetes.io/component": "function"}
    if workflow:
        labels |= {"mlwf.dev/workflow": workflow, "mlwf.dev/stage": stage or ""}
    return labels


def _env(s3_host: str, s3_port: int, bucket: str) -> list[dict[str, Any]]:
    def secret(name: str, key: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": key}}}

    return [secret("MLWF_FUNCTION_SECRET", "function-secret"), secret("S3_USER", "s3-user"),
            secret("S3_PASSWORD", "s3-password"), {"name": "S3_HOST", "value": s3_host},
            {"name": "S3_PORT", "value": str(s3_port)}, {"name": "MLWF_BUCKET", "value": bucket}]


def _service(image: str, namespace: str, env: list, profile: Profile, min_scale: int, bucket: str,
             workflow: str | None = None, stage: str | None = None, name: str | None = None) -> dict[str, Any]:
    args = ["serve", "--stages", f"{workflow}/{stage}" if workflow else "all", "--store", "s3://", "--bucket", bucket,
            "--workers" if profile.processes else "--threads", str(profile.concurrency)]
    labels = _labels(workflow, stage)
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": name or service_name(workflow, stage), "namespace": namespace, "labels": labels},
        "spec": {"template": {
            "metadata": {"labels": labels, "annotations": {
                "autoscaling.knative.dev/min-scale": str(min_scale),
                "autoscaling.knative.dev/max-scale": str(max(profile.max_scale, min_scale, 1))}},
            "spec": {
                "containerConcurrency": profile.concurrency,
                "timeoutSeconds": REQUEST_TIMEOUT_S,
                "containers": [{
                    "name": "mlwf",
                    "image": image,
                    "command": ["mlwf"],
                    "args": args,
                    # One port; Knative passes it to the container as $PORT (never set PORT here).
                    "ports": [{"name": "http1", "containerPort": CONTAINER_PORT}],
                    "env": env,
                    "readinessProbe": {"httpGet": {"path": "/readyz"}, "periodSeconds": 2},
                    "livenessProbe": {"httpGet": {"path": "/healthz"}, "periodSeconds": 10},
                    "resources": {"requests": {"cpu": profile.cpu, "memory": profile.memory},
                                  "limits": {"memory": profile.memory}},
                    "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                        "capabilities": {"drop": ["ALL"]}},
                }],
            },
        }},
    }


def _job(image: str, namespace: str, env: list, workflow: str, bucket: str, endpoints: list[str]) -> dict:
    args = ["run", workflow, *RUN_ARGS[workflow], "--backend", "knative", "--store", "s3://", "--bucket", bucket]
    for e in endpoints:
        args += ["--endpoint", e]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": f"mlwf-{workflow}-", "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "mlwf", "app.kubernetes.io/component": "driver"}},
        "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 3600, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "driver", "image": image, "command": ["mlwf"], "args": args + ["--json"],
                            "env": env,
                            "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                                "capabilities": {"drop": ["ALL"]}}}]}}},
    }


def check_target(*, image: str, namespace: str, s3_host: str, s3_port: int, bucket: str, min_scale: int) -> None:
    """Refuse an image, namespace, S3 endpoint, bucket or scale a cluster would not accept.

    Raises
    ------
    UsageError
        Naming the flag and what it should look like.
    """
    import re

    if not image or any(c.isspace() for c in image):
        raise UsageError(f"--image {image!r} is not an image reference, e.g. ghcr.io/you/mlwf:0.1.0")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", namespace or ""):
        raise UsageError(f"--namespace {namespace!r} is not a Kubernetes namespace name (lowercase letters, "
                         "digits and '-')")
    if not s3_host or "/" in s3_host.split("://", 1)[-1]:
        raise UsageError(f"--s3-host {s3_host!r}: give a host name or IP, e.g. minio.tless.svc.cluster.local")
    if not 0 < s3_port < 65536:
        raise UsageError(f"--s3-port {s3_port} is not a port number")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]", bucket or ""):
        raise UsageError(f"--bucket {bucket!r} is not an S3 bucket name")
    if min_scale < 0:
        raise UsageError(f"--min-scale must be 0 or more, got {min_scale}")


def namespace_document(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}


def render(*, image: str, namespace: str, s3_host: str, s3_port: int, bucket: str = "tless",
           per_stage: bool = True, min_scale: int = 0,
           choreography: bool = False) -> dict[str, list[dict[str, Any]] | str]:
    """The manifests as ``{relative file name: [documents]}`` (``endpoints.txt``: text).

    ``choreography``: the driverless mode (Broker, Triggers, SinkBinding, start Jobs; see the module).
    """
    check_target(image=image, namespace=namespace, s3_host=s3_host, s3_port=s3_port, bucket=bucket,
                 min_scale=min_scale)
    env = _env(s3_host, s3_port, bucket)
    files: dict[str, Any] = {"00-namespace.yaml": [namespace_document(namespace)]}
    services, endpoints = [], {w: [] for w in known_stages()}
    if per_stage:
        for workflow, stages in known_stages().items():
            for stage in stages:
                services.append(_service(image, namespace, env, PROFILES[(workflow, stage)], min_scale, bucket,
                                         workflow, stage))
                url = f"http://{service_name(workflow, stage)}.{namespace}.svc.cluster.local"
                endpoints[workflow].append(f"{workflow}/{stage}={url}")
    else:
        services.append(_service(image, namespace, env, SINGLE, min_scale, bucket))
        url = f"http://{service_name()}.{namespace}.svc.cluster.local"
        endpoints = {w: [url] for w in endpoints}
    files["20-services.yaml"] = services
    files["templates/secret.yaml"] = [{
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": SECRET_NAME, "namespace": namespace, "labels": {"app.kubernetes.io/name": "mlwf"}},
        "stringData": {"function-secret": PLACEHOLDER_SECRET, "s3-user": "CHANGE-ME",
                       "s3-password": "CHANGE-ME"}}]
    if choreography:
        from mlwf.choreography import manifests

        # A SinkBinding acts in namespaces that opt in (Knative's inclusion mode) or do not opt out.
        files["00-namespace.yaml"][0]["metadata"]["labels"] = {"bindings.knative.dev/include": "true"}

        services.append(_service(image, namespace, env, DEAD_LETTER, min_scale, bucket,
                                 name=manifests.DEAD_LETTER_SERVICE))
        files["30-eventing.yaml"] = manifests.eventing(
            namespace, known_stages(), (lambda w, s: service_name(w, s)) if per_stage else (lambda w, s: service_name()))
        for workflow in known_stages():
            files[f"run/{workflow}.yaml"] = [manifests.invoke_job(image, namespace, env, workflow, bucket,
                                                                  RUN_ARGS[workflow])]
        return files
    for workflow in known_stages():
        files[f"run/{workflow}.yaml"] = [_job(image, namespace, env, workflow, bucket, endpoints[workflow])]
    lines = ["# --endpoint flags for 'mlwf run WORKFLOW ... --backend knative' inside the cluster",
             "# (from outside, use the URLs 'kubectl -n NS get ksvc' prints instead)"]
    for workflow, eps in endpoints.items():
        lines.append(f"{workflow}: " + " ".join(f"--endpoint {e}" for e in eps))
    files["endpoints.txt"] = "\n".join(lines) + "\n"
    return files


def write(files: dict[str, Any], out: str | Path, *, command: str = "mlwf deploy knative") -> list[Path]:
    """Write what :func:`render` returned under ``out``; returns the paths written.

    ``command`` is named in each YAML file's header as the way to regenerate it.
    """
    try:
        import yaml
    except ModuleNotFoundError:
        raise UsageError("mlwf deploy needs PyYAML: pip install 'mlwf[knative]'") from None
    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # plain YAML: no &anchors / *aliases for shared values
            return True

    header = f"# Rendered by '{command}'; re-run it rather than editing by hand.\n"
    written = []
    for name, content in files.items():
        path = Path(out) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            text = content
        else:
            text = header + yaml.dump_all(content, Dumper=Dumper, sort_keys=False, default_flow_style=False)
        path.write_text(text)
        written.append(path)
    return written
