"""The Knative Eventing resources of the choreographed mode (``mlwf deploy knative --choreography``).

One Broker and one Trigger per stage, filtered on the event type
(``dev.mlwf.<workflow>.<stage>``), rather than the reference's Channel and
Subscription per edge: an mlwf event names its stage in its type, so one
sink serves every service (the Broker, injected as ``K_SINK`` by one
SinkBinding), a new stage is one more Trigger, and no service needs to know
which channel feeds which. The joins are decided in the store, not by the
wiring, so nothing is lost by the Broker's fan-out.

* ``Broker`` ``mlwf``;
* ``SinkBinding`` ``mlwf-sink``: ``K_SINK`` = the Broker, in every function
  Service (selected by label), so each emits its successors' events there;
* a ``Trigger`` per stage, and one per workflow for its start event
  (``dev.mlwf.<workflow>.start`` → the service of its first stage), each with
  delivery retries (exponential backoff) and the dead-letter sink: the
  ``mlwf-dead-letter`` Service, at ``/dead-letter``, which ends the run of an
  undeliverable event ``failed``;
* Jobs ``run/<workflow>.yaml`` that POST one start event to the Broker and
  follow the run (``mlwf invoke ... --wait``): the reference's ``curl_cmd.sh``.
"""

from __future__ import annotations

from typing import Any

from mlwf.deploy import job

BROKER = "mlwf"
DEAD_LETTER_SERVICE = "mlwf-dead-letter"
#: Redeliveries of an event by the Broker (the reference: retry 10 on pca-to-rf).
DELIVERY_RETRY = 10
DELIVERY_BACKOFF = "PT0.2S"


def broker_url(namespace: str) -> str:
    """The Broker's ingress address inside the cluster."""
    return f"http://broker-ingress.knative-eventing.svc.cluster.local/{namespace}/{BROKER}"


def _delivery() -> dict[str, Any]:
    return {"retry": DELIVERY_RETRY, "backoffPolicy": "exponential", "backoffDelay": DELIVERY_BACKOFF,
            "deadLetterSink": {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                                       "name": DEAD_LETTER_SERVICE}, "uri": "/dead-letter"}}


def _trigger(namespace: str, name: str, event_type: str, service: str) -> dict[str, Any]:
    return {"apiVersion": "eventing.knative.dev/v1", "kind": "Trigger",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "mlwf"}},
            "spec": {"broker": BROKER, "filter": {"attributes": {"type": event_type}},
                     "subscriber": {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                                            "name": service}},
                     "delivery": _delivery()}}


def eventing(namespace: str, stages: dict[str, list[str]], service_for) -> list[dict[str, Any]]:
    """The Broker, the SinkBinding and the Triggers.

    ``stages``: each workflow's stages in order; ``service_for(workflow,
    stage)``: the Service that runs it.
    """
    from mlwf.backends.knative.events import event_type

    docs: list[dict[str, Any]] = [
        {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker",
         "metadata": {"name": BROKER, "namespace": namespace, "labels": {"app.kubernetes.io/name": "mlwf"}},
         "spec": {"delivery": _delivery()}},
        {"apiVersion": "sources.knative.dev/v1", "kind": "SinkBinding",
         "metadata": {"name": "mlwf-sink", "namespace": namespace, "labels": {"app.kubernetes.io/name": "mlwf"}},
         "spec": {"subject": {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                              "selector": {"matchLabels": {"app.kubernetes.io/name": "mlwf",
                                                           "app.kubernetes.io/component": "function"}}},
                  "sink": {"ref": {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "name": BROKER}}}},
    ]
    for workflow, names in stages.items():
        short = workflow.removeprefix("ml-")
        docs.append(_trigger(namespace, f"mlwf-{short}-start", event_type(workflow, "start"),
                             service_for(workflow, names[0])))
        for stage in names:
            docs.append(_trigger(namespace, f"mlwf-{short}-{stage}", event_type(workflow, stage),
                                 service_for(workflow, stage)))
    return docs


def invoke_job(image: str, namespace: str, env: list, workflow: str, bucket: str, args: list[str]) -> dict[str, Any]:
    """A Job that starts a run with one event to the Broker and follows it to the end."""
    command = ["invoke", workflow, *args, "--endpoint", broker_url(namespace), "--store", "s3://", "--bucket", bucket,
               "--wait", "--json"]
    return job(image, namespace, env, generate_name=f"mlwf-invoke-{workflow}-", component="invoke", args=command)
