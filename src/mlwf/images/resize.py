"""Pillow's bilinear resize of gray levels: one image, or many of one shape as strips (the same bytes).

:func:`resize_levels` resizes equally shaped images as one tall strip (the row
pass) and one wide strip (the column pass), in the order this Pillow makes its
passes; :class:`Resizer` gathers decoded images by shape on their way into
their rows.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------- resizing many images
#: Images resized together by :func:`resize_levels`: their strips stay in the CPU's cache.
RESIZE_BATCH = 256
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


def resize_levels(levels: np.ndarray, size: int, out: np.ndarray) -> None:
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
    for start in range(0, n, RESIZE_BATCH):
        part = levels[start : start + RESIZE_BATCH]
        m = len(part)
        if order == "hv":
            part = _columns(_rows(part, size), size)
        elif order == "vh":
            part = _rows(_columns(part, size), size)
        else:
            part = np.stack([np.asarray(Image.fromarray(a).resize((size, size), _BILINEAR)) for a in part])
        out[start : start + m] = part.reshape(m, size * size)

def resize_one(levels: np.ndarray, size: int) -> np.ndarray:
    """One image's gray levels resized to ``uint8[size * size]`` (Pillow's bilinear resize)."""
    if levels.shape != (size, size):
        levels = np.asarray(Image.fromarray(levels).resize((size, size), _BILINEAR))
    return levels.reshape(-1)


class Resizer:
    """Decoded images on their way into ``out`` (one row each, in order): large ones resized at once,
    small ones, grouped by shape, when the caller flushes them (:func:`mlwf.images.decode_many`: once
    ``_WAITING_MAX`` bytes of them wait)."""

    def __init__(self, out: np.ndarray, size: int):
        self.out, self.size = out, size
        self.rows = 0
        self.waiting: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        self.waiting_bytes = 0

    def wait(self, levels: np.ndarray) -> None:
        self.waiting.setdefault(levels.shape, []).append((self.rows, levels))
        self.waiting_bytes += levels.size
        self.rows += 1

    def put(self, pixels: np.ndarray) -> None:
        self.out[self.rows] = pixels
        self.rows += 1

    def flush(self) -> None:
        for group in self.waiting.values():
            rows = [row for row, _ in group]
            if rows[-1] - rows[0] == len(rows) - 1:  # consecutive rows (the usual case): resized in place
                resize_levels(np.stack([levels for _, levels in group]), self.size, self.out[rows[0] : rows[-1] + 1])
            else:
                resized = np.empty((len(rows), self.size * self.size), dtype=np.uint8)
                resize_levels(np.stack([levels for _, levels in group]), self.size, resized)
                self.out[rows] = resized
        self.waiting.clear()
        self.waiting_bytes = 0
