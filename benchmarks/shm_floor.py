"""Shared memory's floor: what one heavy edge costs in /dev/shm, and whether making state in it saves anything.

Usage (from the repository root):

    python benchmarks/shm_floor.py [--repeats 9] [--sizes 26,1000] [--out benchmarks/results/shm_floor]

Issue 27 asked ``--transfer shm``'s state transfer to be at most 1/5 of
``store``'s on the heavy variant; it reached 0.29× (training) and 0.57×
(inference). What is left on its biggest edge is the one ``write(2)`` of the
producer's float32 pixels into a new tmpfs file, and the consumers' mapping.
This suite measures those primitives alone, on arrays of the heavy variant's
sizes (26 MB: the 2k training run's partition → pca edge; 1,000 MB: about
what the same edge is at 60k images), each the median of ``--repeats``:

* ``copy``: a ``memcpy`` into memory already touched (the least a copy costs);
* ``write_new_segment``: what ``--transfer shm`` does, through
  :class:`mlwf.engine.shm.Segment` (a new tmpfs file, written with
  ``write(2)``, then renamed);
* ``write_existing_pages``: ``pwrite`` over a tmpfs file whose pages exist
  already (what a pool of reused segments would pay);
* ``born_private`` and ``born_in_shm``: the partition's last step,
  ``unit_scale`` (gray levels / 255 into float32), writing into new private
  memory, as the stage does now, or straight into a new mapped tmpfs file,
  as a stage that made its state in shared memory from the start would (the
  zero-copy design, Faasm's); ``born_in_shm - born_private`` is what that
  design adds to the stage where it removes ``write_new_segment``;
* ``map``: :func:`mlwf.engine.shm.open_view` of the segment (one consumer).

The allocator is set to give every buffer of 1 MiB or more back when freed
(as ``mlwf bench`` sets it), so "new private memory" is new pages each time.
Writes ``shm_floor.json`` into ``--out``.
"""

from __future__ import annotations

import mmap
import os
import statistics
import sys
import time

import numpy as np
from common import RESULTS, command, load_average, machine, now, write

from mlwf.bench.memory import return_large_buffers
from mlwf.engine import shm


def _median_ms(fn, repeats: int, setup=None, teardown=None) -> float:
    times = []
    for _ in range(repeats + 1):  # the first, untimed, warms what it can
        state = setup() if setup else None
        t = time.perf_counter()
        fn(state)
        times.append((time.perf_counter() - t) * 1e3)
        if teardown:
            teardown(state)
    return round(statistics.median(times[1:]), 2)


def measure(mb: int, repeats: int) -> dict:
    n = mb * 1_000_000 // 4
    levels = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    pixels = np.divide(levels, np.float32(255.0), dtype=np.float32)
    nbytes = pixels.nbytes
    owner, run = shm.owner(), "floor"
    touched = np.empty_like(pixels)
    touched[...] = pixels

    def copy(_):
        touched[...] = pixels

    def write_new(_):
        seg = shm.Segment(shm.segment_name(owner, run, "partition", 0, 0), nbytes)
        seg.write([pixels])
        seg.publish()

    def remove(_):
        shm.remove_run(owner, run)

    existing = os.path.join(shm.DIR, shm.segment_name(owner, run, "pool", 0, 0))

    def make_existing():
        fd = os.open(existing, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, pixels.data)
        return fd

    def pwrite(fd):
        view = memoryview(pixels).cast("B")
        while len(view):
            view = view[os.pwrite(fd, view, nbytes - len(view)):]

    def close(fd):
        os.close(fd)
        os.unlink(existing)

    def born_private(_):
        out = np.divide(levels, np.float32(255.0), dtype=np.float32)
        del out

    def new_mapping():
        path = os.path.join(shm.DIR, shm.segment_name(owner, run, "born", 0, 0))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        return fd, path

    def born_in_shm(state):
        fd, _ = state
        os.ftruncate(fd, nbytes)
        m = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
        out = np.frombuffer(m, dtype=np.float32)
        np.divide(levels, np.float32(255.0), out=out, dtype=np.float32)
        del out
        m.close()

    def drop_mapping(state):
        fd, path = state
        os.close(fd)
        os.unlink(path)

    def map_view(_):
        view = shm.open_view(shm.segment_name(owner, run, "partition", 0, 0), nbytes, owner_tag=owner,
                             run_id=run, what="the floor's segment")
        view.release()

    figures = {
        "copy": _median_ms(copy, repeats),
        "write_new_segment": _median_ms(write_new, repeats, teardown=remove),
        "write_existing_pages": _median_ms(pwrite, repeats, setup=make_existing, teardown=close),
        "born_private": _median_ms(born_private, repeats),
        "born_in_shm": _median_ms(born_in_shm, repeats, setup=new_mapping, teardown=drop_mapping),
    }
    write_new(None)
    figures["map"] = _median_ms(map_view, repeats)
    remove(None)
    figures["zero_copy_adds"] = round(figures["born_in_shm"] - figures["born_private"], 2)
    return {"mb": mb, "bytes": nbytes, "ms": figures,
            "ms_per_gb": {k: round(v * 1e9 / nbytes, 1) for k, v in figures.items()}}


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=9, help="timed repetitions of each step (default 9)")
    p.add_argument("--sizes", default="26,1000", help="array sizes in MB, comma-separated (default 26,1000)")
    p.add_argument("--out", type=__import__("pathlib").Path, default=RESULTS / "shm_floor",
                   help="folder for shm_floor.json (default benchmarks/results/shm_floor)")
    args = p.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        sys.exit(f"--sizes must be whole MB, comma-separated, got {args.sizes!r}")
    if args.repeats < 1 or any(s < 1 or s > 4000 for s in sizes):
        sys.exit("--repeats must be at least 1 and each size from 1 to 4000 MB")
    shm.check_available()
    return_large_buffers()
    results = []
    for mb in sizes:
        row = measure(mb, args.repeats)
        results.append(row)
        f = row["ms"]
        print(f"{mb:>5} MB  copy {f['copy']:8.2f}  new segment {f['write_new_segment']:8.2f}  "
              f"existing pages {f['write_existing_pages']:8.2f}  born private {f['born_private']:8.2f}  "
              f"born in shm {f['born_in_shm']:8.2f}  map {f['map']:6.2f} ms", flush=True)
    path = write(args.out, "shm_floor.json", {"command": command(), "date": now(), "machine": machine(),
                                              "load_average": load_average(), "repeats": args.repeats,
                                              "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
