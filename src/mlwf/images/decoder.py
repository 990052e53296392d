"""One inspected image decoded to its gray levels: libspng for 8-bit gray PNGs, else Pillow, bounded.

Metadata chunks only decoders would inflate are dropped unread, a PNG whose
data ends before its last row is refused (never padded black), and what the
headers cannot bound runs under a CPU allowance (:data:`DECODE_CPU_SECONDS`
plus :data:`DECODE_CPU_PER_PIXEL` per pixel); see :mod:`mlwf.images`.

Why two decoders: the data sets' images are 8-bit gray PNGs, and libspng
(pyspng) decoding them, with Pillow's resize done in strips
(:mod:`mlwf.images.resize`), brought a Fashion-MNIST image at 64×64 from 62.3
to 28.3 µs of CPU (×0.45, median of 7, 2026-11-28,
``benchmarks/results/throughput/2026-11-28-decode-per-image.json``;
``benchmarks/throughput.py --measures decode`` checks a change), the same
pixels as Pillow alone for all 60,000 images and for every kind of image in
``tests/test_images.py``.
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pyspng
from PIL import Image

from mlwf.images.headers import ImageDecodeError, ImageHeader, ImageTooLarge

#: The CPU one image's decode by Pillow may take, plus so much per pixel: past it the decode is refused.
DECODE_CPU_SECONDS = 1.0
DECODE_CPU_PER_PIXEL = 30e-9
#: Images of fewer pixels decode without that watch (reading a thread's CPU clock costs microseconds):
#: the limits above bound their work to well under its second (a JPEG's 100 scans of 1 Mpx: 0.1 s).
_WATCHED_PIXELS = 1 << 20


# --------------------------------------------------------------------------- decoding one image
#: PNG chunks a decoder inflates (compressed text, ICC profiles: up to 64 MiB per image in Pillow or
#: libspng) and mlwf's pixels do not depend on: dropped before decoding.
_INFLATED_TYPES = (b"zTXt", b"iTXt", b"iCCP")
#: The completeness check inflates a PNG's image data in pieces of this many bytes, never all of it at once.
_INFLATE_PIECE = 256 << 10


_CHUNK_HEAD = struct.Struct(">I4s")


def _png_chunks(data: bytes, header: ImageHeader) -> tuple[bytes, list[memoryview]]:
    """The PNG without the chunks in :data:`_INFLATED_TYPES`, and its image data (IDAT) chunks.

    Raises ImageDecodeError for a PNG that ends before its IEND chunk or has no image data.
    """
    view = memoryview(data)
    pos, n, kept_from = 8, len(data), 0
    kept: list[memoryview] = []
    idat: list[memoryview] = []
    head = _CHUNK_HEAD.unpack_from
    while True:
        if pos + 12 > n:
            raise ImageDecodeError(f"a truncated {header}: it ends before its last chunk (IEND)")
        length, kind = head(data, pos)
        end = pos + 12 + length
        if end > n:
            raise ImageDecodeError(f"a truncated {header}: its {kind.decode('latin-1')!r} chunk runs past its end")
        if kind == b"IDAT":
            idat.append(view[pos + 8 : end - 4])
        elif kind == b"IEND":
            break
        elif kind in _INFLATED_TYPES:
            kept.append(view[kept_from:pos])
            kept_from = end
        pos = end
    if not idat:
        raise ImageDecodeError(f"a {header} without image data (no IDAT chunk)")
    if kept:
        kept.append(view[kept_from:])
        data = b"".join(kept)
    return data, idat


def _png_data_bytes(header: ImageHeader) -> int:
    """The bytes a PNG's image data inflates to: each row (of each interlace pass) with its filter byte."""
    width, height, bits = header.width, header.height, header.bits
    if not header.interlaced:
        return height * (1 + (width * bits + 7) // 8)
    total = 0
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            total += rows * (1 + (columns * bits + 7) // 8)
    return total


def _require_complete(idat: list[memoryview], header: ImageHeader) -> None:
    """Refuse a PNG whose image data inflates to fewer bytes than its rows need (Pillow would decode the
    missing rows black). Inflates in bounded pieces and stops at the declared size: never more."""
    expected = _png_data_bytes(header)
    inflater = zlib.decompressobj()
    got = 0
    try:
        for part in idat:
            while part and got < expected:
                got += len(inflater.decompress(part, min(expected - got, _INFLATE_PIECE)))
                part = inflater.unconsumed_tail
            if got >= expected or inflater.eof:
                break
    except zlib.error as e:
        raise ImageDecodeError(f"a damaged {header}: its image data is not valid zlib data ({e})") from None
    if got < expected:
        raise ImageDecodeError(f"a truncated {header}: its image data holds {got:,} of the {expected:,} bytes its "
                               f"{header.height} rows need")


#: What :func:`_mark_last_row` writes, by Pillow mode (values a real image's row rarely starts and ends with).
_LAST_ROW_MARK = {"L": 0x5A, "P": 0x5A, "I;16": 0x5AA5, "RGB": (0x5A, 0xA5, 0x3C), "LA": (0x5A, 0xA5),
                  "RGBA": (0x5A, 0xA5, 0x3C, 0xC3)}


def _mark_last_row(image: Image.Image) -> tuple:
    """Write a mark over the last row of ``image`` before Pillow decodes into it; returns the mark as read back.

    Pillow's PNG decoder stops where the zlib stream ends, even before the
    last row (it leaves the rest as allocated: black). It writes every row
    it decodes whole, in order, so a non-interlaced PNG was decoded to its
    end exactly when its last row no longer holds the mark; only if the
    row's first and last pixels still do (a truncated PNG, or by rare chance
    a real row) is the image data inflated again to count it
    (:func:`_require_complete`). That costs a complete PNG a microsecond,
    where inflating every one again took a fifth to a third more than
    Pillow's whole decode.
    """
    image.load_prepare()
    width, height = image.size
    image.im.paste(_LAST_ROW_MARK[image.mode], (0, height - 1, width, height))
    return _last_row_ends(image)


def _last_row_ends(image: Image.Image) -> tuple:
    width, height = image.size
    return image.im.getpixel((0, height - 1)), image.im.getpixel((width - 1, height - 1))


class _CpuAllowance:
    """The image's bytes as Pillow's decoder reads them, refused once the decode has used its CPU.

    Pillow's decoders read as they go (a PNG chunk, 64 KiB of a JPEG at a
    time), so the check runs throughout the decode, on this thread's CPU
    clock (other requests' threads do not count). Attached for the load
    only: opening reads the headers :func:`~mlwf.images.headers.inspect` has bounded already,
    in many small reads.
    """

    __slots__ = ("_file", "_until", "_header", "_seconds")

    def __init__(self, file: io.BytesIO, header: ImageHeader):
        self._file = file
        self._header = header
        self._seconds = DECODE_CPU_SECONDS + header.pixels * DECODE_CPU_PER_PIXEL
        self._until = time.thread_time() + self._seconds

    def read(self, n: int = -1) -> bytes:
        if time.thread_time() > self._until:
            raise ImageTooLarge(f"decoding a {self._header} took more than {self._seconds:.1f} s of CPU, mlwf's "
                                f"limit for its size: re-encode it as baseline JPEG or PNG")
        return self._file.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


def to_gray(image: Image.Image) -> Image.Image:
    """8-bit grayscale; transparent pixels are composited on black so they do not turn into noise."""
    if image.mode == "L":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        bg = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(bg, image)
    return image.convert("L")


def gray_levels(data: bytes, header: ImageHeader) -> np.ndarray:
    """Decode an inspected image (its work reserved) to its gray levels, ``uint8[height, width]``.

    An 8-bit grayscale PNG (a dataset's usual image) is decoded by libspng
    (pyspng): the same levels as Pillow, lossless, at a third of the cost of
    a Pillow image per file. Anything else, or a PNG libspng refuses, goes
    through Pillow, which decides.
    """
    if header.mode == "L" and header.bits == 8:
        plain = data
        # libspng reads the chunks before the image data, no further: with IDAT right after IHDR (as
        # Pillow writes a dataset's PNGs) there is nothing to drop; else only if a type is in the bytes.
        if not data.startswith(b"IDAT", 37) and (b"TXt" in data or b"iCCP" in data):
            plain = _png_chunks(data, header)[0]
        try:
            levels = pyspng.load(plain)
        except Exception:  # noqa: BLE001  (whatever libspng refuses, Pillow judges)
            pass
        else:
            if levels.dtype == np.uint8 and levels.shape == (header.height, header.width):
                return levels
    idat = None
    if header.format == "PNG":
        data, idat = _png_chunks(data, header)
        if header.interlaced or header.mode not in _LAST_ROW_MARK:
            _require_complete(idat, header)
            idat = None
    try:
        # Image.MAX_IMAGE_PIXELS (89 M) is above MAX_PIXELS: Pillow's bomb warning cannot fire here.
        file = io.BytesIO(data)
        with Image.open(file, formats=(header.format,)) as image:
            if image.size != (header.width, header.height):
                raise ImageDecodeError(f"a damaged {header}: Pillow reads it as {image.size[0]}x{image.size[1]}")
            mark = _mark_last_row(image) if idat is not None else None
            if header.pixels >= _WATCHED_PIXELS:
                image.fp = _CpuAllowance(file, header)  # the same position: Pillow's PNG reader holds `file` too
            image.load()
            if mark is not None and _last_row_ends(image) == mark:
                _require_complete(idat, header)
            return np.asarray(to_gray(image))
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001  (Pillow raises many kinds for a damaged file)
        raise ImageDecodeError(f"a damaged {header}: {' '.join(str(e).split()) or type(e).__name__}") from None

def to_pixels(image: Image.Image, size: int) -> np.ndarray:
    """Grayscale, resize and flatten one Pillow image to ``float32[size*size]`` in [0, 1]."""
    image = to_gray(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32).reshape(-1) / np.float32(255.0)


def unit_scale(levels: np.ndarray) -> np.ndarray:
    """Gray levels (uint8, 0..255) as ``float32`` in [0, 1]: exactly the values :func:`to_pixels` gives."""
    return np.divide(levels, np.float32(255.0), dtype=np.float32)
