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
  create -f``), the counterpart of the reference's ``curl_cmd.sh``;
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

from typing import Any

from mlwf import workflows
from mlwf.backends.knative.events import PLACEHOLDER_SECRET
from mlwf.workflows.definition import Profile
from mlwf.deploy import POD_HOST, SECRET_NAME, check_target, job, memory_budget, namespace_document

CONTAINER_PORT = 8080
REQUEST_TIMEOUT_S = 300


#: The one Service of ``--single``: every stage, calls in worker processes. A stage's own Service
#: scales by the profile its workflow's definition gives it (:class:`~mlwf.workflows.definition.Profile`).
SINGLE = Profile(2, 32, "2", "2Gi", processes=True)
#: The dead-letter sink of the choreographed mode: it only marks runs failed.
DEAD_LETTER = Profile(4, 2, "250m", "512Mi")


def service_name(workflow: str | None = None, stage: str | None = None) -> str:
    """``mlwf`` (every stage) or ``mlwf-<workflow without "ml-">-<stage>``, e.g. ``mlwf-training-pca``."""
    return "mlwf" if workflow is None else f"mlwf-{workflow.removeprefix('ml-')}-{stage}"


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
            *POD_HOST, "--workers" if profile.processes else "--threads", str(profile.concurrency)]
    env = [*env, memory_budget(profile.memory, profile.concurrency if profile.processes else 1)]
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
    # The reference's datasets, from the workflow's definition; edit to taste.
    args = ["run", workflow, *workflows.get(workflow).example, "--backend", "knative", "--store", "s3://",
            "--bucket", bucket]
    for e in endpoints:
        args += ["--endpoint", e]
    return job(image, namespace, env, generate_name=f"mlwf-{workflow}-", component="driver", args=args + ["--json"])


def render(*, image: str, namespace: str, s3_host: str, s3_port: int, bucket: str = "tless",
           per_stage: bool = True, min_scale: int = 0, workflow_modules: tuple[str, ...] = (),
           choreography: bool = False) -> dict[str, list[dict[str, Any]] | str]:
    """The manifests as ``{relative file name: [documents]}`` (``endpoints.txt``: text), for the
    built-in workflows and those ``workflow_modules`` define.

    ``choreography``: the driverless mode (Broker, Triggers, SinkBinding, start Jobs; see
    :mod:`mlwf.choreography.manifests`).
    """
    check_target(image=image, namespace=namespace, s3_host=s3_host, s3_port=s3_port, bucket=bucket,
                 min_scale=min_scale)
    env = _env(s3_host, s3_port, bucket)
    files: dict[str, Any] = {"00-namespace.yaml": [namespace_document(namespace)]}
    deployed = [workflows.get(name) for name in workflows.names(workflow_modules)]
    services, endpoints = [], {w.name: [] for w in deployed}
    if per_stage:
        for workflow in deployed:
            for stage in workflow.stages:
                services.append(_service(image, namespace, env, stage.profile, min_scale, bucket,
                                         workflow.name, stage.name))
                url = f"http://{service_name(workflow.name, stage.name)}.{namespace}.svc.cluster.local"
                endpoints[workflow.name].append(f"{workflow.name}/{stage.name}={url}")
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
            namespace, {w.name: list(w.stage_names) for w in deployed},
            (lambda w, s: service_name(w, s)) if per_stage else (lambda w, s: service_name()))
        for workflow in deployed:
            if workflow.example:  # a start Job for each workflow with the reference's arguments to run
                files[f"run/{workflow.name}.yaml"] = [manifests.invoke_job(image, namespace, env, workflow.name,
                                                                           bucket, list(workflow.example))]
        return files
    for workflow in deployed:
        if workflow.example:  # a driver Job for each workflow with the reference's arguments to run
            files[f"run/{workflow.name}.yaml"] = [_job(image, namespace, env, workflow.name, bucket,
                                                       endpoints[workflow.name])]
    lines = ["# --endpoint flags for 'mlwf run WORKFLOW ... --backend knative' inside the cluster",
             "# (from outside, use the URLs 'kubectl -n NS get ksvc' prints instead)"]
    for workflow, eps in endpoints.items():
        lines.append(f"{workflow}: " + " ".join(f"--endpoint {e}" for e in eps))
    files["endpoints.txt"] = "\n".join(lines) + "\n"
    return files


