"""What the manifest renderers share: target checks, the Namespace, the Secret's name, a Job, writing YAML.

``mlwf deploy knative`` (:mod:`mlwf.backends.knative.deploy`; its driverless
mode's Eventing resources and start Jobs: :mod:`mlwf.choreography.manifests`)
and ``mlwf deploy kserve`` (:mod:`mlwf.serving.kserve`) render with these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlwf.errors import UsageError

SECRET_NAME = "mlwf-secrets"
CONTAINER_PORT = 8080
#: A container listens on every interface of its pod (its runtime routes to it); said explicitly, since
#: both servers listen on 127.0.0.1 unless told.
POD_HOST = ["--host", "0.0.0.0"]
#: The smallest memory budget a rendered container's process is given (one large image decodes within it).
MIN_POD_BUDGET = 64 << 20
_QUANTITY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def memory_budget(limit: str, processes: int = 1) -> dict[str, str]:
    """The ``MLWF_MAX_MEMORY`` variable of a container whose memory limit is ``limit`` (a Kubernetes
    quantity such as ``2Gi``): half of it, shared out among its ``processes`` worker processes (each
    has a budget of its own), at least :data:`MIN_POD_BUDGET`. The other half is the process itself:
    Python, NumPy, the model, the stage's arrays."""
    value = int(limit[:-2]) * _QUANTITY[limit[-2:]]
    per_process = max(value // 2 // max(1, processes), MIN_POD_BUDGET)
    return {"name": "MLWF_MAX_MEMORY", "value": f"{per_process >> 20}MiB"}


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


def job(image: str, namespace: str, env: list, *, generate_name: str, component: str, args: list[str]) -> dict:
    """A Kubernetes Job running ``mlwf ARGS`` once (no retry), as a non-root user, kept an hour after it ends."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": generate_name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "mlwf", "app.kubernetes.io/component": component}},
        "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 3600, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": component, "image": image, "command": ["mlwf"], "args": args, "env": env,
                            "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                                "capabilities": {"drop": ["ALL"]}}}]}}},
    }


def write(files: dict[str, Any], out: str | Path, *, command: str = "mlwf deploy knative") -> list[Path]:
    """Write what a renderer returned under ``out``; returns the paths written.

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
