"""The Knative backend: :mod:`~mlwf.backends.knative.backend` (driver side: signed CloudEvents over HTTP),
:mod:`~mlwf.backends.knative.events` (the wire format and its signatures),
:mod:`~mlwf.backends.knative.server` (``mlwf serve``: the function server) and
:mod:`~mlwf.backends.knative.deploy` (``mlwf deploy knative``)."""

from mlwf.backends.knative.backend import BACKEND, KnativeBackend, KnativeConfig, parse_endpoints

__all__ = ["BACKEND", "KnativeBackend", "KnativeConfig", "parse_endpoints"]
