"""The model being served: read once, checked, and swapped for a newly published one (``--watch``)."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np


log = logging.getLogger("mlwf.model.serve")


# --------------------------------------------------------------------------- the model being served
@dataclass(frozen=True)
class Served:
    """One loaded, checked model and what the protocol says about it. Never changed once built."""

    model: Any
    version: str
    classes: tuple[str, ...]
    image_size: int


class ModelSlot:
    """The model a server answers with: loaded once, replaced whole on reload.

    ``source`` is what :func:`mlwf.model.load` takes: a model prefix in the
    store (``store``/``bucket``), or a ``.mlwf`` file.
    """

    def __init__(self, source: str, *, store=None, bucket: str | None = None):
        self.source = source
        self._store_arg = store
        self._bucket = bucket
        self._store = None
        # Decided once, as mlwf.model.load decides: a file that disappears later is a failed reload, not a prefix.
        self._file = store is None and os.path.isfile(source)
        if store is None:
            from mlwf.errors import ModelError
            from mlwf.files import special_file

            what = special_file(source)
            if what is not None:
                raise ModelError(f"model file {source} is {what}, not a regular file; give a .mlwf file or a "
                                 "model prefix")
        self._lock = threading.Lock()  # one reload at a time
        self.current: Served | None = None

    def _is_file(self) -> bool:
        return self._file

    def describe(self) -> str:
        if self._is_file():
            return f"file {self.source}"
        store = self._open_store()
        return f"{self.source!r} in bucket {store.bucket!r} of {store.location}"

    def _open_store(self):
        if self._store is None:
            from mlwf.settings import Settings
            from mlwf.storage import Store, StoreSpec

            store = self._store_arg
            if not isinstance(store, Store):
                settings = Settings.resolve(store=store, bucket=self._bucket)
                store = StoreSpec.from_settings(settings).open(settings)
            self._store = store
        return self._store

    def _published_digest(self) -> str | None:
        """The digest the store's manifest names now (None for a file source: read it to know)."""
        if self._is_file():
            return None
        import mlwf.model

        store = self._open_store()
        return mlwf.model.read_manifest(store.get, self.source, where=f"bucket {store.bucket!r} of {store.location}"
                                        ).get("sha256")

    def reload(self) -> tuple[Served, bool]:
        """Load the model at the source if it is not the one being served; check it; swap it in.

        Returns the model now served and whether it changed.

        Raises
        ------
        ModelError, StoreError
            If there is no model, or it cannot be trusted; the current model stays.
        """
        import mlwf.model

        with self._lock:
            current = self.current
            published = self._published_digest()
            if current is not None and published is not None and published == current.version:
                return current, False
            if self._is_file():
                model = mlwf.model.load(self.source)
            else:
                model = mlwf.model.load(self.source, store=self._open_store())
            if current is not None and model.digest == current.version:
                return current, False
            # A first prediction here, not in the first request: it must work, and it fills the model's caches.
            proba = model.proba_from_pixels(np.zeros((1, model.image_size**2), np.float32))
            if proba.shape != (1, len(model.classes)) or not np.all(np.isfinite(proba)):
                raise mlwf.model.ModelError(f"the model from {self.source} gives no probabilities; not serving it")
            served = Served(model, model.digest, tuple(model.classes), int(model.image_size))
            self.current = served
            return served, True
