"""Image decoding: the batched, libspng-backed path gives exactly Pillow's pixels, image by image.

Training and inference both decode with :func:`mlwf.images.decode_many`; a
model's bytes and every prediction depend on it giving, for each image, what
Pillow's grayscale conversion and bilinear resize give (``to_pixels``).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mlwf import images
from mlwf.model.predict import project


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def pillow_pixels(data: bytes, size: int) -> np.ndarray:
    """The reference: Pillow alone, one image at a time."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return images.to_pixels(im, size)


def noise(rng, shape, mode: str) -> Image.Image:
    bands = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, size=(*shape, bands) if bands > 1 else shape, dtype=np.uint8)
    return Image.fromarray(arr, mode)


def mixed_images(rng) -> list[bytes]:
    """Every kind of image a dataset may hold, in several sizes, square or not."""
    out = []
    for shape in ((28, 28), (28, 28), (64, 64), (100, 70), (9, 130), (1, 1), (28, 28), (300, 260), (300, 260)):
        out.append(encode(noise(rng, shape, "L")))
    out.append(encode(noise(rng, (28, 28), "L"), optimize=True))
    out.append(encode(noise(rng, (33, 28), "L"), compress_level=0))
    gray = noise(rng, (28, 28), "L")
    out.append(encode(gray, transparency=7))  # grayscale with a tRNS chunk
    out.append(encode(gray, interlace=1) if "interlace" in Image.SAVE else encode(gray))
    out.append(encode(noise(rng, (28, 28), "RGB")))
    out.append(encode(noise(rng, (28, 28), "RGBA")))
    out.append(encode(noise(rng, (28, 28), "LA")))
    out.append(encode(noise(rng, (40, 30), "RGB").convert("P")))
    out.append(encode(Image.fromarray(rng.integers(0, 65536, size=(28, 28), dtype=np.uint16))))  # 16-bit gray
    out.append(encode(noise(rng, (28, 28), "L").convert("1")))
    out.append(encode(noise(rng, (28, 28), "RGB"), "JPEG", quality=90))
    out.append(encode(noise(rng, (28, 28), "L"), "JPEG"))
    return out


def with_gamma(png: bytes) -> bytes:
    """The PNG with a gAMA chunk (gamma 1/2.2) after IHDR: a decoder must not apply it (Pillow does not)."""
    body = struct.pack(">I", 45455)
    chunk = struct.pack(">I", 4) + b"gAMA" + body + struct.pack(">I", zlib.crc32(b"gAMA" + body))
    return png[:33] + chunk + png[33:]


@pytest.mark.parametrize("size", [64, 28, 20, 8])
def test_decode_many_gives_pillows_pixels_for_every_kind_of_image(size):
    blobs = mixed_images(np.random.default_rng(size))
    blobs.append(with_gamma(blobs[0]))
    pixels, bad = images.decode_many(blobs, size)
    assert bad == []
    expected = np.stack([pillow_pixels(b, size) for b in blobs])
    assert pixels.dtype == np.float32 and pixels.shape == (len(blobs), size * size)
    np.testing.assert_array_equal(pixels, expected)
    levels, bad = images.decode_many(blobs, size, levels=True)
    assert levels.dtype == np.uint8 and bad == []
    np.testing.assert_array_equal(images.unit_scale(levels), expected)
    for b, row in zip(blobs, expected):
        np.testing.assert_array_equal(images.decode(b, size), row)


def test_decode_many_keeps_order_and_names_the_undecodable(digits_dir):
    files = sorted((digits_dir / "batch").rglob("*.png"))[:40]
    good = [f.read_bytes() for f in files]
    truncated = good[0][: len(good[0]) // 2]
    garbage = images._PNG_MAGIC + b"x" * 64
    bad_idat = bytearray(good[1])
    start = bad_idat.index(b"IDAT") + 4
    bad_idat[start : start + 8] = b"\xff" * 8  # the compressed stream itself, not only its checksum
    blobs = [good[0], truncated, *good[1:10], garbage, bytes(bad_idat), b"", *good[10:]]
    pixels, bad = images.decode_many(blobs, 16)
    assert bad == [1, 11, 12, 13]
    kept = [b for i, b in enumerate(blobs) if i not in bad]
    np.testing.assert_array_equal(pixels, np.stack([pillow_pixels(b, 16) for b in kept]))
    for b in (truncated, garbage, bytes(bad_idat), b""):
        with pytest.raises(images.ImageDecodeError):
            images.decode(b, 16)


def test_a_png_announcing_too_many_pixels_is_refused_before_it_is_decoded():
    png = encode(Image.new("L", (8, 8)))
    # IHDR claiming 10,000 × 10,000 pixels (more than MAX_PIXELS), with a valid checksum.
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 10_000, 10_000, 8, 0, 0, 0, 0)
    crafted = png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]
    assert not images._plain_gray_png(crafted)
    pixels, bad = images.decode_many([crafted], 8)
    assert bad == [0] and pixels.shape == (0, 64)
    with pytest.raises(images.ImageDecodeError, match="too large|exceeds|bomb|decompression"):
        images.decode(crafted, 8)


def test_as_pixels_gives_the_same_pixels_from_bytes_pillow_images_and_arrays():
    rng = np.random.default_rng(3)
    arrays = rng.integers(0, 256, size=(5, 30, 30), dtype=np.uint8)
    blobs = [encode(Image.fromarray(a)) for a in arrays]
    expected = np.stack([pillow_pixels(b, 12) for b in blobs])
    np.testing.assert_array_equal(images.as_pixels(blobs, 12), expected)
    np.testing.assert_array_equal(images.as_pixels([Image.fromarray(a) for a in arrays], 12), expected)
    np.testing.assert_array_equal(images.as_pixels(arrays, 12), expected)
    np.testing.assert_array_equal(images.as_pixels(arrays / 255.0, 12), expected)


def test_projecting_gray_levels_equals_projecting_their_float_pixels():
    rng = np.random.default_rng(4)
    levels = rng.integers(0, 256, size=(700, 64), dtype=np.uint8)
    mean, components = rng.random(64), rng.normal(size=(5, 64))
    np.testing.assert_array_equal(project(levels, mean, components),
                                  project(images.unit_scale(levels), mean, components))


def test_batched_resizing_equals_pillow_on_every_shape_both_ways():
    """Pillow makes its two passes in either order depending on the shape; the batch must follow it."""
    rng = np.random.default_rng(5)
    shapes = [(40, 30), (30, 40), (130, 9), (9, 130), (1, 200), (64, 64), (28, 28)]
    shapes += [tuple(int(v) for v in rng.integers(1, 140, size=2)) for _ in range(30)]
    for h, w in shapes:
        stack = rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)
        for size in (28, 64, 5):
            out = np.empty((3, size * size), dtype=np.uint8)
            images._resize_levels(stack, size, out)
            expected = [np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR)).ravel()
                        for a in stack]
            np.testing.assert_array_equal(out, np.stack(expected), err_msg=f"{h}x{w} → {size}")


def test_a_gray_png_carrying_a_compressed_text_bomb_is_skipped_as_pillow_skips_it():
    """libspng stops inflating at its chunk limits and Pillow at MAX_TEXT_CHUNK: the image is undecodable."""
    png = encode(Image.new("L", (28, 28)))
    squeeze = zlib.compressobj(9)
    bomb = b"".join(squeeze.compress(bytes(1 << 24)) for _ in range(8)) + squeeze.flush()  # 128 MiB of zeros
    body = b"Comment\0\0" + bomb
    crafted = png[:33] + struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body)) \
        + png[33:]
    assert len(crafted) < 1 << 20 and images._plain_gray_png(crafted)
    pixels, bad = images.decode_many([png, crafted, png], 28)
    assert bad == [1] and len(pixels) == 2
