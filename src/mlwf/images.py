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

import io
import re
import struct
import time
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pyspng
from PIL import Image

from mlwf import budget
from mlwf.budget import BudgetExceeded

#: The image formats mlwf decodes (anything else is refused as such).
ACCEPTED_FORMATS = ("PNG", "JPEG")
_ACCEPTED = "PNG and JPEG"
#: Decoding refuses images with more pixels than this (whatever the memory budget).
MAX_PIXELS = 64_000_000
#: A JPEG with more scans than this is refused from its markers (ordinary progressive JPEGs have about 10):
#: each scan is a pass over the whole image, so repeated scans are CPU without end.
MAX_JPEG_SCANS = 100
#: ... and one whose scans × pixels is more than this (about a second of CPU for the cheapest scans).
MAX_JPEG_SCAN_PIXELS = 2_000_000_000
#: A JPEG with more marker segments than this is refused (each is parsed in Python, by mlwf and by Pillow).
MAX_JPEG_SEGMENTS = 2_000
#: The CPU one image's decode by Pillow may take, plus so much per pixel: past it the decode is refused.
DECODE_CPU_SECONDS = 1.0
DECODE_CPU_PER_PIXEL = 30e-9
#: Images of fewer pixels decode without that watch (reading a thread's CPU clock costs microseconds):
#: the limits above bound their work to well under its second (a JPEG's 100 scans of 1 Mpx: 0.1 s).
_WATCHED_PIXELS = 1 << 20


class ImageDecodeError(ValueError):
    """An object mlwf does not decode as an image: not PNG or JPEG, malformed, or truncated."""


class ImageTooLarge(ImageDecodeError):
    """An image whose decoding would cost more than a limit allows (pixels, memory, JPEG scans, CPU)."""


class ImageHeader(NamedTuple):
    """What an encoded image declares (:func:`inspect`), enough to know the cost of decoding it.

    Attributes
    ----------
    format : ``"PNG"`` or ``"JPEG"``.
    width, height : its size in pixels.
    mode : the Pillow mode it decodes to (``"L"``, ``"RGB"``, ``"RGBA"``, ``"P"``, ``"I;16"``, ``"CMYK"``, ...).
    bits : a PNG's bits per pixel (its depth × channels); 0 for JPEG.
    interlaced : a PNG's Adam7 interlacing.
    coefficients : bytes of a JPEG's whole-image coefficient buffer (libjpeg keeps one for a
        progressive or multi-scan JPEG); 0 otherwise.
    scans : a JPEG's scans; 0 for PNG.
    """

    format: str
    width: int
    height: int
    mode: str
    bits: int = 0
    interlaced: bool = False
    coefficients: int = 0
    scans: int = 0

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height} {self.format}"


# --------------------------------------------------------------------------- headers
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: (colour type, bit depth) → the mode Pillow decodes to, and the channels of a pixel.
_PNG_MODES = {(0, 1): ("1", 1), (0, 2): ("L", 1), (0, 4): ("L", 1), (0, 8): ("L", 1), (0, 16): ("I;16", 1),
              (2, 8): ("RGB", 3), (2, 16): ("RGB", 3),
              (3, 1): ("P", 1), (3, 2): ("P", 1), (3, 4): ("P", 1), (3, 8): ("P", 1),
              (4, 8): ("LA", 2), (4, 16): ("RGBA", 2), (6, 8): ("RGBA", 4), (6, 16): ("RGBA", 4)}
#: Formats recognised by their first bytes, only to name them in the refusal.
_OTHER_FORMATS = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"),
                  (b"\0\0\0\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"\xff\x0a", "JPEG XL"),
                  (b"\0\0\0\x0cJXL ", "JPEG XL"), (b"%PDF", "PDF"), (b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"))


def _format_name(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp":
        return "HEIF/AVIF"
    return next((name for magic, name in _OTHER_FORMATS if data.startswith(magic)), None)


def inspect(data: bytes) -> ImageHeader:
    """Read what an encoded image declares, from its headers alone, and refuse what mlwf will not decode.

    Costs microseconds: PNG's header chunk is at a fixed place; a JPEG's
    markers are walked to its end (to count its scans and find its end).

    Parameters
    ----------
    data : the encoded image (the whole file).

    Returns
    -------
    ImageHeader

    Raises
    ------
    ImageTooLarge
        More than :data:`MAX_PIXELS` pixels, or a JPEG over :data:`MAX_JPEG_SCANS`,
        :data:`MAX_JPEG_SCAN_PIXELS` or :data:`MAX_JPEG_SEGMENTS`.
    ImageDecodeError
        Not PNG or JPEG (its format is named when recognised), a malformed
        header, or a JPEG that ends before its end-of-image marker.
    """
    if type(data) is not bytes:  # a memoryview, bytearray, or a store client's own buffer type
        data = bytes(data)
    if data[:8] == _PNG_MAGIC:
        return _png_header(data)
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_header(data)
    if not data:
        raise ImageDecodeError("an empty object, not an image")
    named = _format_name(data)
    what = f"a {named} file" if named else "not a PNG or JPEG file"
    raise ImageDecodeError(f"{what}: mlwf decodes {_ACCEPTED} images only; convert it to PNG")


def _png_header(data: bytes) -> ImageHeader:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageDecodeError("a PNG without its header chunk (IHDR) first: damaged or truncated")
    width, height, depth, color, _, _, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    mode = _PNG_MODES.get((color, depth))
    if mode is None or interlace > 1 or not width or not height:
        raise ImageDecodeError(f"a PNG whose header is not valid PNG ({width}x{height}, colour type {color}, "
                               f"bit depth {depth}, interlace {interlace})")
    _check_pixels(width, height, "PNG")
    return ImageHeader("PNG", width, height, mode[0], depth * mode[1], interlace == 1)


#: The next marker after a scan's entropy-coded data (0xFF followed by neither a stuffed 0x00,
#: a restart marker, nor another 0xFF fill byte).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOF_OTHER = {0xC3: "lossless", 0xC5: "hierarchical", 0xC6: "hierarchical", 0xC7: "hierarchical",
              0xC9: "arithmetic-coded", 0xCA: "arithmetic-coded", 0xCB: "arithmetic-coded",
              0xCD: "arithmetic-coded", 0xCE: "arithmetic-coded", 0xCF: "arithmetic-coded"}
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}


_MARKER_HEAD = struct.Struct(">HH")


#: The bytes of the last JPEG walked up to its first scan, and what they said (frame, progressive, the
#: first scan's position, segments so far). A dataset's JPEGs from one encoder mostly share those
#: bytes (tables, frame), so the next one is walked from its first scan: the walk's Python loop
#: then runs once per scan instead of once per marker (a third of a 28 x 28 JPEG's header cost).
_last_jpeg_head: tuple[bytes, tuple[int, int, int, int], bool, int, int] | None = None
#: ... unless its header is longer than this (large EXIF or ICC segments): then it is walked each time.
_JPEG_HEAD_KEPT = 16 << 10


def _jpeg_header(data: bytes) -> ImageHeader:
    """Walk every marker of a JPEG: its frame (size, components, sampling), its scans, its end."""
    global _last_jpeg_head
    n = len(data)
    pos, segments, scans = 2, 0, 0
    frame: tuple[int, int, int, int] | None = None  # width, height, components, coefficient bytes
    progressive = False
    known = _last_jpeg_head
    from_known = known is not None and data.startswith(known[0])
    if from_known:
        _, frame, progressive, pos, segments = known
    head = _MARKER_HEAD.unpack_from
    while True:
        if pos + 4 > n:  # room for no more than an end-of-image marker
            if data[pos : pos + 2] == b"\xff\xd9":
                break
            raise ImageDecodeError("a truncated JPEG: it ends before its end-of-image marker")
        word, length = head(data, pos)
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise ImageTooLarge(f"a JPEG with more than {MAX_JPEG_SEGMENTS:,} marker segments, over mlwf's limit: "
                                "re-encode it")
        if word == 0xFFDA:  # start of scan, then its entropy-coded data up to the next marker
            if frame is None:
                raise ImageDecodeError("a damaged JPEG: a scan before its frame header")
            scans += 1
            if scans == 1 and not from_known and pos + 2 + length <= _JPEG_HEAD_KEPT:
                _last_jpeg_head = (bytes(data[: pos + 2 + length]), frame, progressive, pos, segments - 1)
            if scans > MAX_JPEG_SCANS:
                raise ImageTooLarge(f"a {frame[0]}x{frame[1]} JPEG with more than {MAX_JPEG_SCANS} scans, over "
                                    "mlwf's limit (each scan is a pass over the image): re-encode it as baseline "
                                    "JPEG or PNG")
            found = _NEXT_MARKER.search(data, pos + 2 + length)
            if found is None:
                raise ImageDecodeError("a truncated JPEG: it ends inside a scan, before its end-of-image marker")
            pos = found.start()
            continue
        if word == 0xFFD9:  # end of image
            break
        if word < 0xFFC0 or 0xFFD0 <= word <= 0xFFD8 or word == 0xFFFF:  # no length: not a segment
            if word == 0xFFFF or 0xFFD0 <= word <= 0xFFD7 or word == 0xFF01:  # a fill byte; RSTn, TEM
                pos += 1 if word == 0xFFFF else 2
                continue
            raise ImageDecodeError(f"a damaged JPEG: no marker segment at byte {pos}")
        end = pos + 2 + length
        if length < 2 or end > n:
            raise ImageDecodeError("a truncated JPEG: a marker segment runs past its end")
        if word <= 0xFFCF and word not in (0xFFC4, 0xFFC8, 0xFFCC):  # a frame header (SOFn)
            if frame is not None:
                raise ImageDecodeError("a damaged JPEG: it has two frame headers")
            if word & 0xFF in _SOF_OTHER:
                raise ImageDecodeError(f"a {_SOF_OTHER[word & 0xFF]} JPEG: mlwf decodes baseline and progressive "
                                       "JPEG (Huffman-coded); re-encode it")
            progressive = word == 0xFFC2
            frame = _jpeg_frame(data, pos + 4, end)
        pos = end
    if frame is None or not scans:
        raise ImageDecodeError("a damaged JPEG: it has no frame header or no scan")
    width, height, components, coefficients = frame
    if scans * width * height > MAX_JPEG_SCAN_PIXELS:
        raise ImageTooLarge(f"a {width}x{height} JPEG with {scans} scans is {scans * width * height:,} scan-pixels "
                            f"of decoding, over mlwf's limit of {MAX_JPEG_SCAN_PIXELS:,}: re-encode it as "
                            "baseline JPEG or PNG, or make it smaller")
    # libjpeg keeps every coefficient of the image for a progressive or multi-scan JPEG, else a strip.
    whole = coefficients if progressive or scans > 1 else 0
    return ImageHeader("JPEG", width, height, _JPEG_MODES[components], coefficients=whole, scans=scans)


def _jpeg_frame(data: bytes, start: int, end: int) -> tuple[int, int, int, int]:
    """A frame header's width, height, components and the bytes of its coefficients (64 × 2 per block)."""
    if end - start < 6:
        raise ImageDecodeError("a damaged JPEG: its frame header is too short")
    precision, height, width, components = struct.unpack_from(">BHHB", data, start)
    if precision != 8:
        raise ImageDecodeError(f"a {precision}-bit JPEG: mlwf decodes 8-bit JPEG; re-encode it")
    if components not in _JPEG_MODES or end - start != 6 + 3 * components:
        raise ImageDecodeError(f"a JPEG with {components} colour components: mlwf decodes gray, colour or CMYK JPEG")
    if not width or not height:
        raise ImageDecodeError("a JPEG whose frame header leaves its height to a later marker (DNL): re-encode it")
    _check_pixels(width, height, "JPEG")
    factors = data[start + 7 : end : 3]  # each component's sampling factors, horizontal << 4 | vertical
    horizontal, vertical = [f >> 4 for f in factors], [f & 15 for f in factors]
    if min(horizontal) < 1 or max(horizontal) > 4 or min(vertical) < 1 or max(vertical) > 4:
        raise ImageDecodeError("a damaged JPEG: a sampling factor outside 1..4")
    mcus = -(-width // (8 * max(horizontal))) * -(-height // (8 * max(vertical)))
    blocks = mcus * sum(h * v for h, v in zip(horizontal, vertical))  # each MCU holds h × v blocks of each
    return width, height, components, blocks * 128


def _check_pixels(width: int, height: int, fmt: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"a {width}x{height} {fmt} has more pixels than any image mlwf decodes "
                            f"({MAX_PIXELS:,} at most): send a smaller image")


# --------------------------------------------------------------------------- the cost of a decode
#: Bytes per pixel Pillow stores an image of each mode in.
_STORED = {"1": 1, "L": 1, "P": 1, "I;16": 2, "RGB": 4, "LA": 4, "RGBA": 4, "CMYK": 4}
#: Bytes per pixel of the way to gray (:func:`_gray`): none from L; with alpha (or a palette, which may
#: carry transparency), RGBA, a black RGBA background, their composite and L; else L and room for
#: Pillow's own intermediates (CMYK goes through RGB).
_TO_GRAY = {"L": 0, "LA": 13, "RGBA": 13, "P": 13, "1": 2, "I;16": 2, "RGB": 3, "CMYK": 5}
#: More copies of the gray levels: the bytes Pillow hands NumPy, Pillow's image of them for the resize,
#: and one for what the measurements in tests/test_images.py found beyond that (a gray JPEG: 2.8 bytes
#: per pixel in all).
_COPIES = 3
#: Decoder state whatever the size: zlib's window and the pieces the completeness check inflates,
#: libjpeg's tables.
_FIXED = 512 << 10


def work_bytes(header: ImageHeader, size: int) -> int:
    """The most bytes decoding ``header``'s image and resizing it to ``size × size`` holds at once (an upper bound).

    The decoded image in Pillow's mode, each conversion on the way to gray,
    the decoder's own buffers (a PNG's two rows; a progressive JPEG's
    coefficients), and Pillow's bilinear resize: its filter coefficients
    (``2 × ceil(in / out) + 1`` taps per output pixel when shrinking, a double
    and an int32 each, counted as 16 bytes: about 32 bytes per source pixel
    along a degenerate axis; Pillow took 1.5 GiB for 1 × 64,000,000) and the
    intermediate image of its first pass (Pillow makes first the pass whose
    intermediate is smaller). Checked against measured peaks in
    ``tests/test_images.py``.
    """
    width, height = header.width, header.height
    per_pixel = _STORED[header.mode] + _TO_GRAY[header.mode] + _COPIES
    if header.format == "PNG":
        decoder = 2 * (width * header.bits // 8 + 1)
    else:
        decoder = header.coefficients + 64 * width * 4
    return width * height * per_pixel + decoder + _resize_bytes(width, height, size) + _FIXED


def _resize_bytes(width: int, height: int, size: int) -> int:
    if width == size and height == size:
        return 0
    taps = (2 * -(-width // size) + 1 if width > size else 3) + (2 * -(-height // size) + 1 if height > size else 3)
    return 16 * size * taps + 16 * size + size * min(width, height) + size * size


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
    only: opening reads the headers :func:`inspect` has bounded already,
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


def _gray(image: Image.Image) -> Image.Image:
    """8-bit grayscale; transparent pixels are composited on black so they do not turn into noise."""
    if image.mode == "L":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        bg = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(bg, image)
    return image.convert("L")


def _levels(data: bytes, header: ImageHeader) -> np.ndarray:
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
            return np.asarray(_gray(image))
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001  (Pillow raises many kinds for a damaged file)
        raise ImageDecodeError(f"a damaged {header}: {' '.join(str(e).split()) or type(e).__name__}") from None


def _resized(levels: np.ndarray, size: int) -> np.ndarray:
    """One image's gray levels resized to ``uint8[size * size]`` (Pillow's bilinear resize)."""
    if levels.shape != (size, size):
        levels = np.asarray(Image.fromarray(levels).resize((size, size), _BILINEAR))
    return levels.reshape(-1)


def to_pixels(image: Image.Image, size: int) -> np.ndarray:
    """Grayscale, resize and flatten one Pillow image to ``float32[size*size]`` in [0, 1]."""
    image = _gray(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32).reshape(-1) / np.float32(255.0)


def unit_scale(levels: np.ndarray) -> np.ndarray:
    """Gray levels (uint8, 0..255) as ``float32`` in [0, 1]: exactly the values :func:`to_pixels` gives."""
    return np.divide(levels, np.float32(255.0), dtype=np.float32)


# --------------------------------------------------------------------------- resizing many images
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


#: An image whose decode holds at most this much is "small": decoded within the slack a whole batch
#: reserves once, and resized with the others of its shape. Larger ones reserve their own work and
#: are resized at once, so only their ``size × size`` pixels are kept.
_SMALL_WORK = 4 << 20
#: Small images' gray levels kept, waiting to be resized together, before they are resized.
_WAITING_MAX = 4 << 20
#: A batch's reservation grows in steps of this much (one lock per step, not per image).
_GROW_STEP = 1 << 20


class _Resizer:
    """Decoded images on their way into ``out`` (one row each, in order): large ones resized at once,
    small ones when :data:`_WAITING_MAX` bytes of them wait, grouped by shape."""

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
                _resize_levels(np.stack([levels for _, levels in group]), self.size, self.out[rows[0] : rows[-1] + 1])
            else:
                resized = np.empty((len(rows), self.size * self.size), dtype=np.uint8)
                _resize_levels(np.stack([levels for _, levels in group]), self.size, resized)
                self.out[rows] = resized
        self.waiting.clear()
        self.waiting_bytes = 0


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
    resizer = _Resizer(out, size)
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
                    resizer.wait(_levels(data, header))
                    if resizer.waiting_bytes > _WAITING_MAX:
                        resizer.flush()
                else:
                    # Alone in the budget this call holds: a refusal then says whether the image is over the limit.
                    resizer.flush()
                    batch.release()
                    with budget.MEMORY.reserve(work, f"decoding a {header}"):
                        resizer.put(_resized(_levels(data, header), size))
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
        _resize_levels(arr, size, out)
        return unit_scale(out)
    items = list(images)
    encoded: list[bytes] = []
    out = np.empty((len(items), size * size), dtype=np.uint8)
    resizer = _Resizer(out, size)
    for position, item in enumerate(items):
        if isinstance(item, Image.Image):
            resizer.wait(np.asarray(_gray(item)))
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
