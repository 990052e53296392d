"""The trained ensemble: build it, turn it into bytes, load it back, predict, publish.

A model is a list of *members*. Each member is the PCA projection it was trained
on plus its random forest, exported to plain arrays (no scikit-learn objects).
Prediction projects the images with each member's trained projection, runs
every tree, and averages the class probabilities over all members, over the
full set of classes (a member that never saw a class gives it probability 0).

The file is an :mod:`mlwf.codec` payload: JSON metadata plus raw arrays.
Loading parses and checks it (format version, checksum, shapes, tree
structure) and never executes anything from it.

Library use::

    import mlwf.model
    model = mlwf.model.load("ml-inference/model")      # from the configured store
    model = mlwf.model.load("path/to/model.mlwf")      # or from a file
    model.predict(["img1.png", "img2.png"])            # -> array of class names

* :mod:`mlwf.model.predict`: :class:`Model` (predict, predict_proba, to_bytes) and :func:`project`;
* :mod:`mlwf.model.format`: from bytes, every check and limit (:func:`from_bytes`, :func:`build`);
* :mod:`mlwf.model.forest`: a fitted scikit-learn forest as arrays (:func:`export_forest`);
* :mod:`mlwf.model.registry`: publish, rollback, read what is published.
"""

from __future__ import annotations

import os

from mlwf.errors import ModelError
from mlwf.model.forest import export_forest
from mlwf.model.format import (FORMAT, FORMAT_VERSION, MAX_CLASS_NAME_BYTES, MAX_CLASSES, MAX_COMPONENTS,
                               MAX_HEADER_BYTES, MAX_HEADER_DEPTH, MAX_MEMBERS, MAX_NODES_PER_MEMBER, MAX_TREES,
                               build, class_name_problem, from_bytes)
from mlwf.model.predict import Model, project
from mlwf.model.registry import (HISTORY_LENGTH, MANIFEST, MANIFEST_FORMAT, MAX_MANIFEST_BYTES, manifest_key,
                                 publish, read_manifest, read_published, rollback)

__all__ = ["FORMAT", "FORMAT_VERSION", "HISTORY_LENGTH", "MANIFEST", "MANIFEST_FORMAT", "MAX_CLASSES",
           "MAX_CLASS_NAME_BYTES", "MAX_COMPONENTS", "MAX_HEADER_BYTES", "MAX_HEADER_DEPTH", "MAX_MANIFEST_BYTES",
           "MAX_MEMBERS", "MAX_NODES_PER_MEMBER", "MAX_TREES", "Model", "build", "class_name_problem",
           "export_forest", "from_bytes", "load", "manifest_key", "project", "publish", "read_manifest",
           "read_published", "rollback"]


def load(source: str | os.PathLike | bytes, *, store=None, bucket: str | None = None) -> Model:
    """Load a model from a file, from bytes, or from a model prefix in a store.

    Parameters
    ----------
    source : a path to a ``.mlwf`` file, the model's bytes, or a model prefix
        such as ``"ml-inference/model"``.
    store : a :class:`~mlwf.storage.Store` or a store URL/directory; by default
        ``MLWF_STORE`` or the default local store. Used only for prefixes.
    bucket : bucket name when ``store`` is a URL (default ``MLWF_BUCKET`` or ``tless``).

    Raises
    ------
    ModelError
        If there is no model there or it cannot be trusted (see :func:`from_bytes`).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return from_bytes(source)
    path = os.fspath(source)
    if store is None and os.path.isfile(path):
        from mlwf.files import open_regular

        with open_regular(path, "model file", "give a .mlwf file or a model prefix", ModelError) as f:
            return from_bytes(f.read(), source=path)
    if store is None:
        from mlwf.files import special_file

        what = special_file(path)
        if what is not None:  # a FIFO or a device would be read for ever, not taken for a prefix
            raise ModelError(f"model file {path} is {what}, not a regular file; give a .mlwf file or a model prefix")
    from mlwf.settings import Settings
    from mlwf.storage import Store, StoreSpec

    if not isinstance(store, Store):
        settings = Settings.resolve(store=store, bucket=bucket)
        store = StoreSpec.from_settings(settings).open(settings)
    data, manifest = read_published(store.get, path, where=f"bucket {store.bucket!r} of {store.location}")
    return from_bytes(data, source=manifest["object"])
