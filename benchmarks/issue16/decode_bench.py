"""Issue 16: CPU per image of mlwf's decoding, one Pillow image at a time (before) against decode_many (now).

Usage (from the repository root, after ``python benchmarks/run.py`` prepared
benchmarks/data/store)::

    python benchmarks/issue16/decode_bench.py [--images 6000] [--repeats 7] [--size 64]

Reads ``--images`` Fashion-MNIST PNGs (every 10th of the 60k training set),
then times, alternating, the per-image path mlwf used before (Pillow opens,
loads, converts and resizes each image; :func:`mlwf.images.to_pixels`) and
:func:`mlwf.images.decode_many` (libspng for 8-bit grayscale PNGs, Pillow's
two resize passes over strips of 256 images). CPU time of this process
(one thread), best and median of ``--repeats``. Checks that both give the
same pixels for every image of the 60k set. Writes
benchmarks/results/issue16/decode.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mlwf import images

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "benchmarks/data/store/tless/ml-training/fashion-60k"


def per_image(blobs: list[bytes], size: int) -> np.ndarray:
    """The path before: one Pillow image at a time (as mlwf.images.decode was)."""
    out = np.empty((len(blobs), size * size), dtype=np.float32)
    for i, data in enumerate(blobs):
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            out[i] = images.to_pixels(im, size)
    return out


def cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    files = sorted(FOLDER.rglob("*.png"))
    if not files:
        raise SystemExit(f"no images under {FOLDER}: run python benchmarks/run.py first")
    every = [f.read_bytes() for f in files]
    same = all(np.array_equal(per_image(every[i:i + 4096], args.size),
                              images.decode_many(every[i:i + 4096], args.size)[0])
               for i in range(0, len(every), 4096))
    blobs = every[:: max(1, len(every) // args.images)][: args.images]
    before, after = [], []
    for _ in range(args.repeats):
        before.append(cpu(lambda: per_image(blobs, args.size)) / len(blobs) * 1e6)
        after.append(cpu(lambda: images.decode_many(blobs, args.size)) / len(blobs) * 1e6)
    result = {
        "images": len(blobs), "size": args.size, "repeats": args.repeats, "same_pixels_all": same,
        "checked_images": len(every), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_1min": os.getloadavg()[0],
        "before_us": {"median": statistics.median(before), "best": min(before)},
        "after_us": {"median": statistics.median(after), "best": min(after)},
    }
    result["ratio_median"] = result["after_us"]["median"] / result["before_us"]["median"]
    out = ROOT / "benchmarks/results/issue16/decode.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(blobs)} images, {args.size}×{args.size}: per image {result['before_us']['median']:.1f} µs → "
          f"decode_many {result['after_us']['median']:.1f} µs (×{result['ratio_median']:.2f}, CPU, median of "
          f"{args.repeats}); same pixels on all {len(every):,} images: {same}")


if __name__ == "__main__":
    main()
