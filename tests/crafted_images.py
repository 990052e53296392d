"""Crafted image files for the tests of bounded decoding: made here, small on disk, nothing downloaded.

Each hostile file is a few kilobytes to 1.4 MB that declares far more work
than its size: PNGs whose zlib data inflates to hundreds of megabytes of
zero rows, a progressive JPEG repeating one scan, headers of other formats.
"""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
from PIL import Image

#: (colour type) → channels of a PNG pixel.
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def zlib_zeros(n: int) -> bytes:
    """A zlib stream of ``n`` zero bytes, fast: one deflated MiB repeated (each piece ends at a byte
    boundary and refers to nothing before it), a last piece, and the checksum of the whole."""
    block = 1 << 20
    whole, rest = divmod(n, block)
    first = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = first.compress(bytes(block)) + first.flush(zlib.Z_FULL_FLUSH)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = last.compress(bytes(rest)) + last.flush()
    adler, zeros = 1, bytes(block)
    for _ in range(whole):
        adler = zlib.adler32(zeros, adler)
    return b"\x78\xda" + piece * whole + tail + struct.pack(">I", zlib.adler32(bytes(rest), adler))


def zero_png(width: int, height: int, *, color: int = 0, depth: int = 8, rows: int | None = None,
             interlace: int = 0, extra: bytes = b"") -> bytes:
    """A PNG of zero pixels whose header says ``width × height``; its image data holds ``rows`` rows
    (default: all of them; fewer makes a PNG truncated inside a valid zlib stream). ``extra`` chunks
    go before the image data. Palette images get a 256-entry palette and a transparent entry."""
    bits = depth * _CHANNELS[color]
    rows = height if rows is None else rows
    if interlace:  # Adam7: the rows of seven passes, each a zero filter byte and zero pixels
        passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
        raw = sum(-(-(rows - y0) // dy) * (1 + (-(-(width - x0) // dx) * bits + 7) // 8)
                  for x0, y0, dx, dy in passes if width > x0 and rows > y0)
    else:
        raw = rows * (1 + (width * bits + 7) // 8)
    data = zlib_zeros(raw)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace)
    palette = png_chunk(b"PLTE", bytes(range(256)) * 3) + png_chunk(b"tRNS", b"\x00") if color == 3 else b""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + palette + png_chunk(b"IDAT", data)
            + png_chunk(b"IEND", b""))


def deflate_bomb(mib: int) -> bytes:
    """``mib`` MiB of zeros, deflated (about a thousandth of that)."""
    return zlib_zeros(mib << 20)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def noise(shape: tuple[int, int], mode: str, seed: int = 0) -> Image.Image:
    bands = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(*shape, bands) if bands > 1 else shape, dtype=np.uint8)
    return Image.fromarray(arr, mode)


_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def jpeg_scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan of a JPEG: its SOS segment and entropy-coded data."""
    scans, pos = [], 2
    while data[pos + 1] != 0xD9:
        length = struct.unpack_from(">H", data, pos + 2)[0]
        end = pos + 2 + length
        if data[pos + 1] == 0xDA:
            end = _NEXT_MARKER.search(data, end).start()
            scans.append((pos, end))
        pos = end
    return scans


def repeated_scans_jpeg(size: int = 2000, repeats: int = 100_000) -> bytes:
    """A progressive JPEG of ``size × size`` zero pixels with its cheapest scan (a few bytes, a pass over
    every block) repeated ``repeats`` times: libjpeg decodes each again (a warning, not an error)."""
    data = encode(Image.new("RGB", (size, size)), "JPEG", quality=90, progressive=True)
    start, end = min(jpeg_scans(data)[1:], key=lambda s: s[1] - s[0])
    return data[:end] + data[start:end] * repeats + data[end:]


def jpeg_claiming(width: int, height: int, *, progressive: bool = True) -> bytes:
    """A small JPEG whose frame header is patched to claim ``width × height`` (its data is for 16 × 16)."""
    data = bytearray(encode(noise((16, 16), "RGB"), "JPEG", progressive=progressive))
    sof = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def other_formats() -> dict[str, bytes]:
    """Files in formats mlwf does not decode (each Pillow would read): the GIF and BMP claim
    65535 × 65535 and 30000 × 30000 pixels in a few bytes."""
    small = noise((16, 16), "L")
    gif = bytearray(encode(small, "GIF"))
    struct.pack_into("<HH", gif, 6, 65535, 65535)  # the logical screen
    bmp = struct.pack("<2sIHHIIiiHHIIiiII", b"BM", 0, 0, 0, 54, 40, 30_000, 30_000, 1, 24, 0, 0, 0, 0, 0, 0)
    return {"GIF": bytes(gif), "BMP": bmp + bytes(64), "TIFF": encode(small, "TIFF", compression="tiff_deflate"),
            "WebP": encode(small, "WEBP", lossless=True)}
