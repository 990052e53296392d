"""Image decoding shared by training, inference and the model's ``predict``.

Every image, whatever its format, size or colour mode, becomes the same thing:
8-bit grayscale (Pillow's ITU-R 601-2 luma conversion), resized to
``size × size`` with bilinear filtering, scaled to [0, 1] and flattened. One
function does it so that training and inference can never drift apart.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Decoding refuses images larger than this many pixels (decompression bombs).
MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """An object that is not a decodable image."""


def to_pixels(image: Image.Image, size: int) -> np.ndarray:
    """Grayscale, resize and flatten one Pillow image to ``float32[size*size]`` in [0, 1]."""
    if image.mode != "L":
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Composite on black so transparent pixels do not turn into noise.
            image = image.convert("RGBA")
            bg = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(bg, image)
        image = image.convert("L")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32).reshape(-1) / np.float32(255.0)


def decode(data: bytes, size: int) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, ...) to ``float32[size*size]``.

    Raises
    ------
    ImageDecodeError
        If the bytes are not a complete, decodable image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageDecodeError(f"image of {im.width}x{im.height} pixels is too large")
                im.load()
                return to_pixels(im, size)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(str(e) or type(e).__name__) from None


def decode_many(blobs: Sequence[bytes], size: int) -> tuple[np.ndarray, list[int]]:
    """Decode many images; skip the undecodable ones.

    Returns
    -------
    pixels : float32 array of shape (n_ok, size*size)
    bad : list of int
        Positions in ``blobs`` that could not be decoded.
    """
    out = np.empty((len(blobs), size * size), dtype=np.float32)
    bad: list[int] = []
    n = 0
    for i, data in enumerate(blobs):
        try:
            out[n] = decode(data, size)
            n += 1
        except ImageDecodeError:
            bad.append(i)
    return out[:n], bad


def as_pixels(images, size: int) -> np.ndarray:
    """Turn what a library user holds into ``float32[n, size*size]``.

    Accepts encoded image bytes, Pillow images, file paths, or a NumPy array of
    shape ``(n, h, w)`` (or ``(h, w)`` for one image) with values in 0..255
    (integers) or 0..1 (floats).

    Raises
    ------
    ValueError
        For an undecodable image or an array of the wrong shape.
    """
    if isinstance(images, np.ndarray):
        arr = images
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise ValueError(f"expected an array of shape (n, height, width), got {images.shape}")
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.clip(np.rint(arr * 255.0), 0, 255)
        arr = arr.astype(np.uint8)
        return np.stack([to_pixels(Image.fromarray(a), size) for a in arr]) if len(arr) else \
            np.empty((0, size * size), np.float32)
    rows = []
    for i, item in enumerate(images):
        if isinstance(item, Image.Image):
            rows.append(to_pixels(item, size))
            continue
        if isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        else:
            with open(item, "rb") as f:
                data = f.read()
        try:
            rows.append(decode(data, size))
        except ImageDecodeError as e:
            raise ValueError(f"image {i} cannot be decoded: {e}") from None
    return np.stack(rows) if rows else np.empty((0, size * size), np.float32)
