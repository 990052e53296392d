"""Image decoding: the batched, libspng-backed path gives exactly Pillow's pixels, image by image.

Training and inference both decode with :func:`mlwf.images.decode_many`; a
model's bytes and every prediction depend on it giving, for each image, what
Pillow's grayscale conversion and bilinear resize give (``to_pixels``).
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mlwf import budget, images
from mlwf.images import decoder, headers, resize
from mlwf.budget import BudgetExceeded
from mlwf.model.predict import project
from tests import crafted_images as craft


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


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


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
    assert bad == {}
    expected = np.stack([pillow_pixels(b, size) for b in blobs])
    assert pixels.dtype == np.float32 and pixels.shape == (len(blobs), size * size)
    np.testing.assert_array_equal(pixels, expected)
    levels, bad = images.decode_many(blobs, size, levels=True)
    assert levels.dtype == np.uint8 and bad == {}
    np.testing.assert_array_equal(images.unit_scale(levels), expected)
    for b, row in zip(blobs, expected):
        np.testing.assert_array_equal(images.decode(b, size), row)


def test_decode_many_keeps_order_and_names_the_undecodable(digits_dir):
    files = sorted((digits_dir / "batch").rglob("*.png"))[:40]
    good = [f.read_bytes() for f in files]
    truncated = good[0][: len(good[0]) // 2]
    garbage = headers._PNG_MAGIC + b"x" * 64
    bad_idat = bytearray(good[1])
    start = bad_idat.index(b"IDAT") + 4
    bad_idat[start : start + 8] = b"\xff" * 8  # the compressed stream itself, not only its checksum
    blobs = [good[0], truncated, *good[1:10], garbage, bytes(bad_idat), b"", *good[10:]]
    pixels, bad = images.decode_many(blobs, 16)
    assert list(bad) == [1, 11, 12, 13]
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
    with pytest.raises(images.ImageTooLarge, match="10000x10000 PNG has more pixels than any image"):
        images.inspect(crafted)
    pixels, bad = images.decode_many([crafted], 8)
    assert list(bad) == [0] and isinstance(bad[0], images.ImageTooLarge) and pixels.shape == (0, 64)
    with pytest.raises(images.ImageTooLarge, match="64,000,000 at most"):
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
            resize.resize_levels(stack, size, out)
            expected = [np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR)).ravel()
                        for a in stack]
            np.testing.assert_array_equal(out, np.stack(expected), err_msg=f"{h}x{w} → {size}")


def test_a_png_carrying_compressed_text_bombs_decodes_without_inflating_them():
    """zTXt, iTXt and iCCP chunks are dropped unread (mlwf's pixels do not depend on them): libspng and
    Pillow would inflate up to 64 MiB of them per image."""
    bomb = craft.deflate_bomb(128)
    for mode in ("L", "RGB"):
        png = encode(noise(np.random.default_rng(6), (28, 28), mode))
        crafted = png[:33] + png_chunk(b"zTXt", b"Comment\0\0" + bomb) + png_chunk(b"iCCP", b"icc\0\0" + bomb) \
            + png_chunk(b"iTXt", b"XML\0\1\0\0\0" + bomb) + png[33:]
        assert len(crafted) < 1 << 20
        pixels, bad = images.decode_many([png, crafted], 28)
        assert bad == {} and np.array_equal(pixels[0], pixels[1]), mode


# --------------------------------------------------------------------------- bounded before the work
def test_decode_many_keeps_order_when_it_resizes_as_it_goes(monkeypatch):
    """Small images wait to be resized together by shape, large ones are resized at once: rows stay in
    the order of the blobs, the pixels Pillow's."""
    monkeypatch.setattr(images, "_WAITING_MAX", 3000)  # flush every few small images
    rng = np.random.default_rng(7)
    shapes = [(28, 28), (30, 20), (28, 28), (300, 260), (20, 30), (28, 28), (1, 1), (400, 400), (30, 20)] * 3
    blobs = [encode(noise(rng, shape, "L" if i % 3 else "RGB")) for i, shape in enumerate(shapes)]
    blobs.insert(5, b"junk")
    pixels, refused = images.decode_many(blobs, 16)
    assert list(refused) == [5]
    np.testing.assert_array_equal(pixels, np.stack([pillow_pixels(b, 16) for i, b in enumerate(blobs) if i != 5]))


def test_any_buffer_decodes_as_its_bytes():
    """A store client may hand back its own buffer type (obstore's Bytes has no bytes methods)."""
    blobs = mixed_images(np.random.default_rng(11))
    pixels, refused = images.decode_many([memoryview(b) if i % 2 else bytearray(b) for i, b in enumerate(blobs)], 20)
    assert refused == {}
    np.testing.assert_array_equal(pixels, images.decode_many(blobs, 20)[0])


def test_as_pixels_keeps_the_order_of_mixed_inputs():
    rng = np.random.default_rng(8)
    arrays = rng.integers(0, 256, size=(4, 30, 30), dtype=np.uint8)
    mixed = [encode(Image.fromarray(arrays[0])), Image.fromarray(arrays[1]), encode(Image.fromarray(arrays[2])),
             Image.fromarray(arrays[3])]
    np.testing.assert_array_equal(images.as_pixels(mixed, 12), images.as_pixels(arrays, 12))
    with pytest.raises(ValueError, match="image 2 cannot be decoded: a GIF file"):
        images.as_pixels([mixed[0], mixed[1], craft.other_formats()["GIF"]], 12)


@pytest.mark.parametrize("name", ["GIF", "BMP", "TIFF", "WebP"])
def test_only_png_and_jpeg_are_decoded_and_other_formats_are_named(name):
    data = craft.other_formats()[name]
    with pytest.raises(images.ImageDecodeError, match=f"a {name} file: mlwf decodes PNG and JPEG images only"):
        images.inspect(data)
    assert "PNG" in images.ACCEPTED_FORMATS and "JPEG" in images.ACCEPTED_FORMATS


def test_the_memory_of_a_decode_is_taken_from_the_budget_before_it_is_done():
    tall = craft.zero_png(1, 64_000_000)
    header = images.inspect(tall)
    # Pillow's resize would allocate 2 × 1,000,000 + 1 coefficients per output row.
    assert images.work_bytes(header, 64) > 1 << 30
    pixels, refused = images.decode_many([tall, craft.zero_png(64_000_000, 1)], 64)
    assert len(pixels) == 0 and all(isinstance(e, images.ImageTooLarge) for e in refused.values())
    assert "decoding a 1x64000000 PNG needs 2.1 GiB of memory, over this process's limit of 512 MiB " \
           "(--max-memory / MLWF_MAX_MEMORY): send a smaller input, or raise the limit" == str(refused[0])
    assert budget.MEMORY.used == 0


def test_a_budget_held_by_other_work_is_a_retryable_refusal_not_a_skip():
    png = craft.zero_png(3000, 3000)  # about 27 MB of work
    with budget.MEMORY.reserve(budget.MEMORY.limit - (8 << 20), "another request"):
        with pytest.raises(BudgetExceeded) as e:
            images.decode_many([encode(Image.new("L", (28, 28))), png], 28)
    assert e.value.busy and e.value.retryable and "retry shortly" in str(e.value)
    assert budget.MEMORY.used == 0
    assert images.decode_many([png], 28)[1] == {}


@pytest.mark.parametrize("color, depth, interlace", [(0, 8, 0), (0, 16, 0), (2, 8, 0), (6, 8, 1), (3, 8, 0), (0, 1, 1)])
def test_a_png_with_fewer_rows_than_its_header_declares_is_refused_not_padded(color, depth, interlace):
    """Inside a valid zlib stream: libspng refuses it; Pillow would decode the missing rows black."""
    short = craft.zero_png(40, 30, color=color, depth=depth, rows=12, interlace=interlace)
    with pytest.raises(images.ImageDecodeError, match="a truncated 40x30 PNG: its image data holds"):
        images.decode(short, 16)
    complete = craft.zero_png(40, 30, color=color, depth=depth, interlace=interlace)
    np.testing.assert_array_equal(images.decode(complete, 16), pillow_pixels(complete, 16))


@pytest.mark.parametrize("mode", ["P", "I;16", "RGB", "LA", "RGBA"])
def test_a_complete_png_whose_last_row_holds_the_decoders_mark_is_counted_and_decoded(mode, monkeypatch):
    """The mark written over the last row before Pillow decodes (decoder._mark_last_row) may be a real
    row's pixels: then the image data is counted again, and the image decoded."""
    image = Image.new(mode, (30, 20))
    image.im.paste(decoder._LAST_ROW_MARK[mode], (0, 0, 30, 20))  # every row is the mark, as written
    if mode == "P":
        image.putpalette(bytes(range(256)) * 3)
    png = encode(image)
    counted = []
    monkeypatch.setattr(decoder, "_require_complete", lambda idat, header: counted.append(header))
    header = images.inspect(png)
    assert header.mode == mode
    assert decoder.gray_levels(png, header).shape == (20, 30) and counted == [header]
    np.testing.assert_array_equal(images.decode(png, 16), pillow_pixels(png, 16))


def test_a_jpeg_is_walked_marker_by_marker_before_it_is_decoded():
    progressive = encode(noise(np.random.default_rng(9), (64, 64), "RGB"), "JPEG", progressive=True)
    header = images.inspect(progressive)
    assert (header.format, header.width, header.height, header.mode) == ("JPEG", 64, 64, "RGB")
    assert header.scans == len(craft.jpeg_scans(progressive)) > 1 and header.coefficients > 0
    with pytest.raises(images.ImageTooLarge, match="more than 100 scans"):
        images.inspect(craft.repeated_scans_jpeg(64, repeats=200))
    with pytest.raises(images.ImageTooLarge, match="scan-pixels of decoding"):
        images.inspect(craft.jpeg_claiming(8000, 8000)[:2] + craft.jpeg_claiming(8000, 8000)[2:]
                       .replace(b"\xff\xd9", b"") + _scans(progressive, 30) + b"\xff\xd9")
    with pytest.raises(images.ImageTooLarge, match="marker segments"):
        images.inspect(progressive[:2] + b"\xff\xfe\x00\x02" * 3000 + progressive[2:])
    with pytest.raises(images.ImageDecodeError, match="truncated JPEG"):
        images.inspect(progressive[:-2])
    dnl = bytearray(progressive)
    sof = dnl.index(b"\xff\xc2")
    dnl[sof + 5 : sof + 7] = b"\0\0"  # height 0: given by a DNL marker after the first scan
    with pytest.raises(images.ImageDecodeError, match="DNL"):
        images.inspect(bytes(dnl))
    lossless = bytearray(progressive)
    lossless[sof + 1] = 0xC3
    with pytest.raises(images.ImageDecodeError, match="a lossless JPEG"):
        images.inspect(bytes(lossless))


def test_a_jpeg_walked_from_the_header_it_shares_with_the_last_one_still_counts_its_scans():
    """JPEGs sharing the bytes up to their first scan are walked from there (headers._last_jpeg_head):
    the scans after it are counted all the same."""
    progressive = encode(Image.new("RGB", (64, 64)), "JPEG", quality=90, progressive=True)
    repeated = craft.repeated_scans_jpeg(64, repeats=200)
    first_scan = craft.jpeg_scans(progressive)[0][0]
    assert repeated[:first_scan] == progressive[:first_scan]
    assert images.inspect(progressive).scans == len(craft.jpeg_scans(progressive))
    with pytest.raises(images.ImageTooLarge, match="more than 100 scans"):
        images.inspect(repeated)
    assert images.inspect(progressive[:-2] + b"\xff\xd9").scans == len(craft.jpeg_scans(progressive))
    with pytest.raises(images.ImageDecodeError, match="truncated JPEG"):
        images.inspect(progressive[: len(progressive) // 2])


def _scans(jpeg: bytes, n: int) -> bytes:
    """``n`` copies of the last scan of ``jpeg``."""
    start, end = craft.jpeg_scans(jpeg)[-1]
    return jpeg[start:end] * n


def test_a_decode_past_its_cpu_allowance_is_refused(monkeypatch):
    jpeg = encode(noise(np.random.default_rng(10), (64, 64), "RGB"), "JPEG", progressive=True)
    monkeypatch.setattr(decoder, "DECODE_CPU_SECONDS", -1.0)
    monkeypatch.setattr(decoder, "_WATCHED_PIXELS", 0)
    pixels, refused = images.decode_many([jpeg], 16)
    assert isinstance(refused[0], images.ImageTooLarge) and "of CPU" in str(refused[0])


WORK_PROBE = """
import json
from PIL import Image
from mlwf import images
from tests import crafted_images as craft

CASES = {
    "gray 1x1000000": lambda: craft.zero_png(1, 1_000_000),
    "gray 1000000x1": lambda: craft.zero_png(1_000_000, 1),
    "RGBA 1500x1500": lambda: craft.zero_png(1500, 1500, color=6),
    "16-bit gray 2000x2000": lambda: craft.zero_png(2000, 2000, depth=16),
    "palette 2000x2000": lambda: craft.zero_png(2000, 2000, color=3),
    "RGB 2000x2000 interlaced": lambda: craft.zero_png(2000, 2000, color=2, interlace=1),
    "1-bit 3000x3000": lambda: craft.zero_png(3000, 3000, depth=1),
    "baseline JPEG 2000x1500": lambda: craft.encode(Image.new("RGB", (2000, 1500)), "JPEG"),
    "gray JPEG 2000x2000": lambda: craft.encode(Image.new("L", (2000, 2000)), "JPEG"),
    "progressive JPEG 1500x1500": lambda: craft.encode(Image.new("RGB", (1500, 1500)), "JPEG", progressive=True),
    "CMYK JPEG 1200x1200": lambda: craft.encode(Image.new("CMYK", (1200, 1200)), "JPEG"),
}

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(field))

images.decode_many([craft.encode(Image.new("L", (28, 28)))], 64)  # Pillow's and NumPy's first-call costs
out = {}
for name, make in CASES.items():
    data = make()
    estimate = images.work_bytes(images.inspect(data), 64)
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM from here
    pixels, refused = images.decode_many([data], 64)
    out[name] = {"estimate": estimate, "peak": status("VmHWM:") - before, "refused": [str(e) for e in refused.values()]}
print(json.dumps(out))
"""


def test_the_work_reserved_for_a_decode_bounds_the_memory_it_takes():
    """Measured (VmHWM) in a process of its own whose allocator gives every large block back when it is
    freed (so one case's freed memory does not hide the next one's), for each kind of intermediate the
    estimate counts."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLWF_")}
    result = subprocess.run([sys.executable, "-c", WORK_PROBE], capture_output=True, text=True, timeout=120,
                            env={**env, "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert result.returncode == 0, result.stderr
    for name, case in json.loads(result.stdout).items():
        assert not case["refused"], (name, case)
        assert 4 << 20 < case["peak"] <= case["estimate"], f"{name}: took {case['peak'] >> 20} MiB, estimated " \
                                                           f"{case['estimate'] >> 20} MiB"
