"""Images to the input of an exported model: ``float32[N, image_size²]``.

The exported ONNX graph (and the model server) take pixels exactly as the
workflows decode them (:mod:`mlwf.images`): each image is converted to 8-bit
grayscale with Pillow (``convert("L")``, ITU-R 601-2 luma; an image with an
alpha channel or a transparent palette is first composited on opaque black),
resized to ``image_size × image_size`` with ``Image.Resampling.BILINEAR`` if
it is not that size already, divided by 255 as float32, and flattened row by
row. ``image_size`` is in the ONNX metadata (``image_size``).

Without mlwf installed, docs/serving.md's section on ONNX shows the same steps in
plain NumPy and Pillow (and the tests check them against this module).
"""

from __future__ import annotations

import json
import os

import numpy as np

from mlwf.images import as_pixels


def prepare(images, image_size: int) -> np.ndarray:
    """The exported model's input for ``images``.

    Parameters
    ----------
    images : sequence of encoded image bytes, file paths or Pillow images, or
        an array of shape ``(n, height, width)`` (``uint8`` 0..255, or floats in 0..1).
    image_size : int
        The model's image size (``Model.image_size``, or the ONNX metadata's ``image_size``).

    Returns
    -------
    numpy.ndarray of float32, shape ``(n, image_size**2)``, C-contiguous.

    Raises
    ------
    ValueError
        If an image cannot be decoded or the array has the wrong shape.
    """
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return np.ascontiguousarray(as_pixels(images, int(image_size)), dtype=np.float32)


def onnx_metadata(path: str | os.PathLike) -> dict:
    """The mlwf metadata of an exported ONNX file: ``classes`` (list), ``image_size`` (int), ``model_digest``.

    Raises
    ------
    ValueError
        If the file is not an ONNX model exported by mlwf.
    """
    import onnx

    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError... for a file that is not a model
        raise ValueError(f"{os.fspath(path)} is not an ONNX model ({type(e).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        return {"classes": json.loads(props["classes"]), "image_size": int(props["image_size"]),
                "model_digest": props["model_digest"]}
    except (KeyError, ValueError):
        raise ValueError(f"{os.fspath(path)} is an ONNX model, but not one exported by mlwf "
                         "(no classes/image_size/model_digest metadata)") from None
