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
import pyspng
from PIL import Image, UnidentifiedImageError

#: Decoding refuses images larger than this many pixels (decompression bombs).
MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """An object that is not a decodable image."""


def _gray(image: Image.Image) -> Image.Image:
    """8-bit grayscale; transparent pixels are composited on black so they do not turn into noise."""
    if image.mode == "L":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        bg = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(bg, image)
    return image.convert("L")


def to_pixels(image: Image.Image, size: int) -> np.ndarray:
    """Grayscale, resize and flatten one Pillow image to ``float32[size*size]`` in [0, 1]."""
    image = _gray(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32).reshape(-1) / np.float32(255.0)


def unit_scale(levels: np.ndarray) -> np.ndarray:
    """Gray levels (uint8, 0..255) as ``float32`` in [0, 1]: exactly the values :func:`to_pixels` gives."""
    return np.divide(levels, np.float32(255.0), dtype=np.float32)


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plain_gray_png(data: bytes) -> bool:
    """Whether ``data`` announces an 8-bit grayscale PNG of an allowed size (its IHDR chunk)."""
    if len(data) < 33 or data[:8] != _PNG_MAGIC or data[12:16] != b"IHDR":
        return False
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return data[24] == 8 and data[25] == 0 and 0 < width * height <= MAX_PIXELS


def _open_gray(data: bytes) -> np.ndarray:
    """Decode encoded image bytes to their 8-bit grayscale levels, ``uint8[height, width]``.

    An 8-bit grayscale PNG (a dataset's usual image) is decoded by libspng
    (pyspng): the same levels as Pillow, lossless, at a third of the cost of a
    Pillow image per file. Anything else, or a PNG libspng refuses, goes
    through Pillow, which decides.
    """
    if _plain_gray_png(data):
        try:
            levels = pyspng.load(data)
        except Exception:  # noqa: BLE001  (whatever libspng refuses, Pillow judges)
            pass
        else:
            if levels.dtype == np.uint8 and levels.ndim == 2:
                return levels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageDecodeError(f"image of {im.width}x{im.height} pixels is too large")
                im.load()
                return np.asarray(_gray(im))
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(str(e) or type(e).__name__) from None


def decode(data: bytes, size: int) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, ...) to ``float32[size*size]``.

    Raises
    ------
    ImageDecodeError
        If the bytes are not a complete, decodable image.
    """
    return to_pixels(Image.fromarray(_open_gray(data)), size)


#: Images resized together by :func:`_resize_levels`: their strips stay in the CPU's cache.
_RESIZE_BATCH = 256
_BILINEAR = Image.Resampling.BILINEAR
#: Images larger than this (pixels) are resized one by one: the per-image cost is then Pillow's work.
_BATCH_MAX_PIXELS = 1 << 16
#: (height, width, size) → the order of Pillow's two passes ("hv" or "vh"), or None: see :func:`_pass_order`.
_PASS_ORDER: dict[tuple[int, int, int], str | None] = {}
#: Shapes remembered at most (a server decoding images of every shape keeps a bounded table).
_PASS_ORDERS_KEPT = 1024


def _rows(levels: np.ndarray, size: int) -> np.ndarray:
    """Pillow's row pass on images ``uint8[m, h, w]`` → ``[m, h, size]``, all of them as one tall strip."""
    m, h, w = levels.shape
    if w == size:
        return levels
    tall = Image.fromarray(np.ascontiguousarray(levels).reshape(m * h, w)).resize((size, m * h), _BILINEAR)
    return np.asarray(tall).reshape(m, h, size)


def _columns(levels: np.ndarray, size: int) -> np.ndarray:
    """Pillow's column pass on images ``uint8[m, h, w]`` → ``[m, size, w]``, all of them as one wide strip."""
    m, h, w = levels.shape
    if h == size:
        return levels
    wide = np.ascontiguousarray(levels.transpose(1, 0, 2)).reshape(h, m * w)
    wide = Image.fromarray(wide).resize((m * w, size), _BILINEAR)
    return np.asarray(wide).reshape(size, m, w).transpose(1, 0, 2)


def _pass_order(h: int, w: int, size: int) -> str | None:
    """In which order this Pillow makes its two passes when it resizes ``h × w`` to ``size × size``.

    Pillow resizes rows then columns, each pass rounded to 8 bits, but may
    choose the other order for some shapes. The order is read off Pillow
    itself once per shape, on a noise image where the two orders differ;
    None (resize each image alone) if neither order reproduces it.
    """
    key = (h, w, size)
    if key in _PASS_ORDER:
        return _PASS_ORDER[key]
    probe = np.random.default_rng(h * 65_537 + w).integers(0, 256, size=(1, h, w), dtype=np.uint8)
    whole = np.asarray(Image.fromarray(probe[0]).resize((size, size), _BILINEAR))
    rows_first = np.array_equal(_columns(_rows(probe, size), size)[0], whole)
    columns_first = np.array_equal(_rows(_columns(probe, size), size)[0], whole)
    order = "hv" if rows_first else "vh" if columns_first else None
    if len(_PASS_ORDER) < _PASS_ORDERS_KEPT:
        _PASS_ORDER[key] = order
    return order


def _resize_levels(levels: np.ndarray, size: int, out: np.ndarray) -> None:
    """Resize equally shaped gray images ``uint8[n, h, w]`` into ``out`` (``uint8[n, size*size]``).

    Pillow's bilinear resize is two passes, each rounded to 8 bits. A row pass
    never mixes rows and a column pass never mixes columns, so many images are
    resized as one tall strip (rows) and one wide strip (columns): the same
    arithmetic as resizing each image alone, in two calls instead of one per
    image (tested bit for bit against Pillow).
    """
    n, h, w = levels.shape
    # One image, or large ones: Pillow's own call per image costs nothing extra.
    order = None if n == 1 or h * w > _BATCH_MAX_PIXELS else "hv" if (h, w) == (size, size) else \
        _pass_order(h, w, size)
    for start in range(0, n, _RESIZE_BATCH):
        part = levels[start : start + _RESIZE_BATCH]
        m = len(part)
        if order == "hv":
            part = _columns(_rows(part, size), size)
        elif order == "vh":
            part = _rows(_columns(part, size), size)
        else:
            part = np.stack([np.asarray(Image.fromarray(a).resize((size, size), _BILINEAR)) for a in part])
        out[start : start + m] = part.reshape(m, size * size)


def decode_many(blobs: Sequence[bytes], size: int, *, levels: bool = False) -> tuple[np.ndarray, list[int]]:
    """Decode many images; skip the undecodable ones.

    The same pixels as :func:`decode` on each image, at about half the cost
    for many small images (they are resized together).

    Parameters
    ----------
    blobs : encoded images
    size : side of the square the images are resized to
    levels : if True, return the gray levels (``uint8``, 0..255) instead of
        ``float32`` in [0, 1]; :func:`unit_scale` turns them into the latter.

    Returns
    -------
    pixels : array of shape (n_ok, size*size)
    bad : list of int
        Positions in ``blobs`` that could not be decoded.
    """
    decoded: list[np.ndarray] = []
    bad: list[int] = []
    for i, data in enumerate(blobs):
        try:
            decoded.append(_open_gray(data))
        except ImageDecodeError:
            bad.append(i)
    out = _resize_all(decoded, size)
    return (out if levels else unit_scale(out)), bad


def _resize_all(images: list[np.ndarray], size: int) -> np.ndarray:
    """Gray images of any shapes, resized: ``uint8[len(images), size*size]`` in their order."""
    out = np.empty((len(images), size * size), dtype=np.uint8)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for rows in by_shape.values():
        if len(rows) == len(images):
            _resize_levels(np.stack(images), size, out)
        else:
            resized = np.empty((len(rows), size * size), dtype=np.uint8)
            _resize_levels(np.stack([images[i] for i in rows]), size, resized)
            out[rows] = resized
    return out


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
        out = np.empty((len(arr), size * size), dtype=np.uint8)
        _resize_levels(arr, size, out)
        return unit_scale(out)
    gray = []
    for i, item in enumerate(images):
        if isinstance(item, Image.Image):
            gray.append(np.asarray(_gray(item)))
            continue
        if isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        else:
            with open(item, "rb") as f:
                data = f.read()
        try:
            gray.append(_open_gray(data))
        except ImageDecodeError as e:
            raise ValueError(f"image {i} cannot be decoded: {e}") from None
    return unit_scale(_resize_all(gray, size))
