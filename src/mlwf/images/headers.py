"""What an encoded image declares, read from its headers alone, and what decoding it costs.

:func:`inspect` reads a PNG's IHDR or walks every JPEG marker (frame, scans,
end of image) and refuses what no decode may cost (:data:`MAX_PIXELS`,
:data:`MAX_JPEG_SCANS`, :data:`MAX_JPEG_SCAN_PIXELS`, :data:`MAX_JPEG_SEGMENTS`);
:func:`work_bytes` is the most a decode and resize of it holds at once, taken
from the memory budget before anything is allocated (see :mod:`mlwf.images`).
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

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
#: Bytes per pixel of the way to gray (:func:`~mlwf.images.decoder.to_gray`): none from L; with alpha
#: (or a palette, which may carry transparency), RGBA, a black RGBA background, their composite and L;
#: else L and room for Pillow's own intermediates (CMYK goes through RGB).
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
