"""What bounding image decoding costs ordinary images, and what hostile images cost, before and after.

Usage (from the repository root, with mlwf installed)::

    python benchmarks/image_limits.py [--before COMMIT] [--repeats 15] [--out benchmarks/results/image_limits.json]

1. Throughput: ``mlwf.images.decode_many`` on 4,000 generated 28×28 images
   (scikit-learn's bundled digits, upscaled, half with noise added) of three
   kinds: 8-bit gray PNG (libspng's path, a dataset's usual image), RGB PNG
   and baseline JPEG (Pillow's path), resized to 64 and to 28. The module of
   ``--before`` (``git show COMMIT:src/mlwf/images.py``, which imports
   nothing of mlwf) and the working tree's, alternating in one process; CPU
   per image, median and best of ``--repeats``; both must give the same
   pixels.
2. Hostile files (``tests/crafted_images.py``, as sent by
   ``tests/test_image_bombs.py``): each decoded once by each side in a
   process of its own, capped at 120 s of CPU; CPU seconds, peak resident
   memory above the process's (VmHWM), and what happened.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BEFORE = "6af1af2"  # main with the budget module, before images were bounded (issue 24)

_CHILD = r"""
import importlib.util, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
resource.setrlimit(resource.RLIMIT_CPU, (120, 120))
from tests import test_image_bombs as bombs
spec = importlib.util.spec_from_file_location("decoder", sys.argv[2])
decoder = importlib.util.module_from_spec(spec); spec.loader.exec_module(decoder)
data = bombs.SKIPPED[sys.argv[3]][0]
decoder.decode_many([bombs.craft.encode(bombs.craft.noise((28, 28), "L"))], 64)
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(field))
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
cpu = time.process_time()
pixels, refused = decoder.decode_many([data], 64)
reason = str(refused[0]) if isinstance(refused, dict) and refused else ("refused" if refused else "decoded")
print(json.dumps({"cpu_s": round(time.process_time() - cpu, 3), "peak_mib": round((status("VmHWM:") - before) / 2**20, 1),
                  "result": reason}))
"""


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _images(kind: str, n: int = 4000) -> list[bytes]:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits().images
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = Image.fromarray(np.rint(digits[i % len(digits)] * 255 / 16).astype(np.uint8))
        image = image.resize((28, 28), Image.Resampling.BILINEAR)
        if i >= len(digits):
            noisy = np.asarray(image).astype(int) + rng.integers(-8, 9, (28, 28))
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        if kind == "gray PNG":
            image.save(buf, format="PNG", optimize=False, compress_level=6)
        elif kind == "RGB PNG":
            image.convert("RGB").save(buf, format="PNG", compress_level=6)
        else:
            image.convert("RGB").save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def throughput(before, after, repeats: int) -> list[dict]:
    rows = []
    for kind in ("gray PNG", "RGB PNG", "JPEG"):
        blobs = _images(kind)
        for size in (64, 28):
            same = before.decode_many(blobs, size, levels=True)[0].tobytes() == \
                after.decode_many(blobs, size, levels=True)[0].tobytes()
            times: dict[str, list[float]] = {"before": [], "after": []}
            for _ in range(repeats):
                for side, module in (("before", before), ("after", after)):
                    cpu = time.process_time()
                    module.decode_many(blobs, size, levels=True)
                    times[side].append((time.process_time() - cpu) / len(blobs) * 1e6)
            row = {"kind": kind, "size": size, "same_pixels": same,
                   **{f"{side}_us": {"median": round(statistics.median(t), 2), "best": round(min(t), 2)}
                      for side, t in times.items()}}
            row["ratio_median"] = round(row["after_us"]["median"] / row["before_us"]["median"], 3)
            rows.append(row)
            print(f"{kind:9s} → {size:2d}: {row['before_us']['median']:6.1f} µs → {row['after_us']['median']:6.1f} µs "
                  f"per image (×{row['ratio_median']:.3f}, same pixels: {same})")
    return rows


def hostile(before_path: Path, after_path: Path) -> dict:
    from tests import test_image_bombs as bombs

    out = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLWF_")}
    for name in bombs.SKIPPED:
        out[name] = {}
        for side, path in (("before", before_path), ("after", after_path)):
            done = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), str(path), name], capture_output=True,
                                  text=True, env=env, timeout=300)
            out[name][side] = json.loads(done.stdout) if done.returncode == 0 else \
                {"result": f"process ended with {done.returncode} (CPU limit: 120 s)"}
        print(f"{name}: {out[name]['before']} → {out[name]['after']}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default=BEFORE)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/image_limits.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before_path = Path(tmp) / "images_before.py"
        before_path.write_text(subprocess.run(["git", "show", f"{args.before}:src/mlwf/images.py"], cwd=ROOT,
                                              check=True, capture_output=True, text=True).stdout)
        after_path = ROOT / "src/mlwf/images.py"
        result = {
            "before": args.before, "repeats": args.repeats,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_1min": os.getloadavg()[0],
            "throughput": throughput(_module(before_path, "images_before"), _module(after_path, "images_after"),
                                     args.repeats),
            "hostile": hostile(before_path, after_path),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
