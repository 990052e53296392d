"""Image decoding shared by training, inference and the model server, bounded before the work is done.

Every image, whatever its size or colour mode, becomes the same thing: 8-bit
grayscale (Pillow's ITU-R 601-2 luma conversion; transparent pixels are
composited on black), resized to ``size × size`` with bilinear filtering,
scaled to [0, 1] and flattened. One module does it so that training,
inference and serving can never drift apart.

**Accepted formats: PNG and JPEG** (:data:`ACCEPTED_FORMATS`): PNG of any bit
depth and colour type, JPEG baseline, extended or progressive (Huffman-coded,
8 bits per sample). Anything else (GIF, BMP, TIFF, WebP, JPEG 2000, lossless
or arithmetic-coded JPEG, ...) is refused, never handed to Pillow to guess.

**Bounded before the work.** A 124 KB PNG may declare 1 × 64,000,000 pixels,
and resizing that shape makes Pillow allocate gigabytes of filter
coefficients; a 1.4 MB progressive JPEG may repeat its scans until decoding
takes minutes. So :func:`inspect` reads what an image declares from its
headers (PNG's IHDR; every JPEG marker: frame, scans, end of image) and
refuses what no decode may cost (:data:`MAX_PIXELS`, :data:`MAX_JPEG_SCANS`,
:data:`MAX_JPEG_SCAN_PIXELS`); the bytes the decode will hold at once (the
decoded image, each conversion to gray, the coefficient buffer of a
progressive JPEG, Pillow's resize with its filter coefficients) are then
taken from the process's memory budget (:data:`mlwf.budget.MEMORY`,
``MLWF_MAX_MEMORY`` / ``--max-memory``) before anything is allocated, and
given back after. What the headers cannot bound runs under a CPU allowance
(:data:`DECODE_CPU_SECONDS` plus :data:`DECODE_CPU_PER_PIXEL` per pixel),
checked as Pillow's decoder reads. Metadata that only decoders would inflate
(PNG's zTXt, iTXt and iCCP chunks: mlwf's pixels do not depend on them) is
dropped unread. An image whose data ends before the rows its header
declares is refused, never padded.

A refusal is an :class:`ImageDecodeError` (not an image mlwf decodes; a
server answers 400) or an :class:`ImageTooLarge` (over a limit; 413), one
line naming what and which limit. :func:`decode_many` skips refused images
and says why; a budget held by other work at the moment raises
:class:`mlwf.budget.BudgetExceeded` (``busy``: retry; 503).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from mlwf import budget
from mlwf.budget import BudgetExceeded
from mlwf.images.decoder import (DECODE_CPU_PER_PIXEL, DECODE_CPU_SECONDS, gray_levels, to_gray, to_pixels,
                                 unit_scale)
from mlwf.images.headers import (ACCEPTED_FORMATS, MAX_JPEG_SCAN_PIXELS, MAX_JPEG_SCANS, MAX_JPEG_SEGMENTS,
                                 MAX_PIXELS, ImageDecodeError, ImageHeader, ImageTooLarge, inspect, work_bytes)
from mlwf.images.resize import Resizer, resize_levels, resize_one

__all__ = ["ACCEPTED_FORMATS", "DECODE_CPU_PER_PIXEL", "DECODE_CPU_SECONDS", "MAX_JPEG_SCANS", "MAX_JPEG_SCAN_PIXELS",
           "MAX_JPEG_SEGMENTS", "MAX_PIXELS", "ImageDecodeError", "ImageHeader", "ImageTooLarge", "as_pixels",
           "decode", "decode_many", "inspect", "to_pixels", "unit_scale", "work_bytes"]

#: An image whose decode holds at most this much is "small": decoded within the slack a whole batch
#: reserves once, and resized with the others of its shape. Larger ones reserve their own work and
#: are resized at once, so only their ``size × size`` pixels are kept.
_SMALL_WORK = 4 << 20
#: Small images' gray levels kept, waiting to be resized together, before they are resized.
_WAITING_MAX = 4 << 20
#: A batch's reservation grows in steps of this much (one lock per step, not per image).
_GROW_STEP = 1 << 20


def decode_many(blobs: Sequence[bytes], size: int, *, levels: bool = False
                ) -> tuple[np.ndarray, dict[int, ImageDecodeError]]:
    """Decode many images; skip, with the reason, those mlwf does not decode.

    The same pixels as :func:`decode` on each image, at about half the cost
    for many small images (they are resized together). Each image's work is
    taken from the process's memory budget (:mod:`mlwf.budget`) before it is
    done (see the module docstring).

    Parameters
    ----------
    blobs : encoded images
    size : side of the square the images are resized to
    levels : if True, return the gray levels (``uint8``, 0..255) instead of
        ``float32`` in [0, 1]; :func:`unit_scale` turns them into the latter.

    Returns
    -------
    pixels : array of shape (n_ok, size*size)
    refused : dict of int to ImageDecodeError
        Position in ``blobs`` → why that image was skipped (an
        :class:`ImageTooLarge` when over a limit), in order.

    Raises
    ------
    BudgetExceeded
        With ``busy``: other work holds the memory budget now (retry).
    """
    out = np.empty((len(blobs), size * size), dtype=np.uint8)
    refused: dict[int, ImageDecodeError] = {}
    resizer = Resizer(out, size)
    # A dataset's PNGs mostly share one header (size, depth, colour type): read once, not once per image.
    last_png_header: tuple[bytes, ImageHeader, int] | None = None
    with budget.MEMORY.reserve(0, f"decoding {len(blobs)} images") as batch:
        for i, data in enumerate(blobs):
            if type(data) is not bytes:  # a memoryview, bytearray, or a store client's own buffer type
                data = bytes(data)
            try:
                if last_png_header is not None and data.startswith(last_png_header[0]):
                    _, header, work = last_png_header
                else:
                    header = inspect(data)
                    work = work_bytes(header, size)
                    if header.format == "PNG":
                        last_png_header = (bytes(data[:29]), header, work)
                if work <= _SMALL_WORK:
                    need = resizer.waiting_bytes + _SMALL_WORK
                    if need > batch.held:
                        batch.grow(-(-(need - batch.held) // _GROW_STEP) * _GROW_STEP)
                    resizer.wait(gray_levels(data, header))
                    if resizer.waiting_bytes > _WAITING_MAX:
                        resizer.flush()
                else:
                    # Alone in the budget this call holds: a refusal then says whether the image is over the limit.
                    resizer.flush()
                    batch.release()
                    with budget.MEMORY.reserve(work, f"decoding a {header}"):
                        resizer.put(resize_one(gray_levels(data, header), size))
            except BudgetExceeded as e:
                if e.busy:
                    raise
                refused[i] = ImageTooLarge(str(e))
            except ImageDecodeError as e:
                refused[i] = e
        resizer.flush()
    pixels = out[: resizer.rows]
    return (pixels if levels else unit_scale(pixels)), refused


def decode(data: bytes, size: int) -> np.ndarray:
    """Decode one encoded image (PNG or JPEG) to ``float32[size*size]``.

    Raises
    ------
    ImageDecodeError
        If the bytes are not a complete image mlwf decodes (:class:`ImageTooLarge`: over a limit).
    BudgetExceeded
        With ``busy``: other work holds the memory budget now (retry).
    """
    pixels, refused = decode_many([data], size)
    if refused:
        raise refused[0]
    return pixels[0]


def as_pixels(images, size: int) -> np.ndarray:
    """Turn what a library user holds into ``float32[n, size*size]``.

    Accepts encoded image bytes, Pillow images, file paths, or a NumPy array of
    shape ``(n, h, w)`` (or ``(h, w)`` for one image) with values in 0..255
    (integers) or 0..1 (floats).

    Raises
    ------
    ValueError
        For an image mlwf does not decode (an :class:`ImageDecodeError`, naming the
        image) or an array of the wrong shape.
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
        resize_levels(arr, size, out)
        return unit_scale(out)
    items = list(images)
    encoded: list[bytes] = []
    out = np.empty((len(items), size * size), dtype=np.uint8)
    resizer = Resizer(out, size)
    for position, item in enumerate(items):
        if isinstance(item, Image.Image):
            resizer.wait(np.asarray(to_gray(item)))
            continue
        if isinstance(item, (bytes, bytearray, memoryview)):
            encoded.append(bytes(item))
        else:
            from mlwf.errors import DataError
            from mlwf.files import open_regular

            limit = budget.MEMORY.limit  # a file read whole: never more than the process may hold
            try:  # a FIFO or a device would be read for ever
                with open_regular(item, f"image {position}", "give the path of an image file") as f:
                    encoded.append(f.read(limit + 1))
            except DataError as e:
                raise ValueError(str(e)) from None
            if len(encoded[-1]) > limit:
                raise ValueError(f"image {position} ({item}) is a file of more than {budget.human(limit)}, this "
                                 f"process's memory limit ({budget.FLAG} / {budget.VARIABLE})")
        resizer.rows += 1  # its row is filled below, from the encoded images
    resizer.flush()
    if encoded:
        pixels, refused = decode_many(encoded, size, levels=True)
        positions = [i for i, item in enumerate(items) if not isinstance(item, Image.Image)]
        if refused:
            first = min(refused)
            raise ValueError(f"image {positions[first]} cannot be decoded: {refused[first]}")
        out[positions] = pixels
    return unit_scale(out)
