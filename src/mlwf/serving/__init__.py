"""The trained model outside mlwf: ONNX export, input preparation, an Open Inference Protocol server.

* :mod:`mlwf.serving.onnx`: the whole ensemble as one ONNX graph;
* :mod:`mlwf.serving.prepare`: images to the float32 pixels that graph (and
  the server) take, decoded exactly as the workflows decode;
* :mod:`mlwf.serving.oip`: ``mlwf model serve``, the Open Inference Protocol
  (v2) REST server, with :mod:`~mlwf.serving.protocol` (request and response
  tensors) and :mod:`~mlwf.serving.slot` (the model served, swapped whole);
* :mod:`mlwf.serving.kserve`: ``mlwf deploy kserve``, the KServe
  ``InferenceService`` that runs that server.

Their command lines are in :mod:`mlwf.cli.model` and :mod:`mlwf.cli.serve`.

These modules use only the model's public surface (:func:`mlwf.model.load`,
:class:`mlwf.model.Model` and its fields); the optional libraries they need
(``pip install 'mlwf[onnx,serve]'``) are imported when they are used.
"""
