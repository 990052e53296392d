"""A warm worker keeps the memory its calls free, so its next call does not fault it in again.

glibc serves every allocation over 32 MiB with a fresh ``mmap`` and unmaps it
when it is freed. A PCA call allocates several such arrays (12,000 images at
64×64: 49 MB of gray levels, 197 MB as float32, as much again for the
variance), so each call faults its memory in anew, page by page, zeroed by the
kernel. On a virtual machine whose host takes back the memory a guest frees
(free page reporting, ballooning: Firecracker, the micro-VM of serverless
platforms, and this project's test machine) that fault is far dearer: measured
here, the first PCA calls of a warm 60k run spent 0.42 s of system time each,
the calls right after them, which found the pages just freed still mapped,
0.02 s.

:func:`keep_freed_memory` makes a worker allocate from its heap instead of
``mmap`` and return freed memory to the kernel only beyond ``keep_bytes``: its
resident size stays near the largest call's peak plus at most that much, and
the next call reuses the pages. Only glibc has these settings; elsewhere it
does nothing.

Warm 60k ``4 16``, 2 rounds × 3 runs a side (2026-11-28,
``benchmarks/results/throughput/2026-11-28-kept-memory.json``): wall 9,604 →
8,851 ms (×0.92), the workers' system CPU 1.63 → 0.43 s a run, minor faults
92,379 → 2,754, the largest worker 214 → 407 MB. That memory is the price: a
worker stays near its largest call's peak between calls. The Ray pool and
``mlwf serve``'s threads do not keep it: they share their machines with other
jobs.
"""

from __future__ import annotations

import ctypes
import sys

#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: Freed memory a worker keeps by default (at the top of its heap) for its next call.
KEEP_BYTES = 1 << 30
#: Largest value ``mallopt`` takes (a C int).
MAX_KEEP_BYTES = (1 << 31) - 1


def keep_freed_memory(keep_bytes: int = KEEP_BYTES) -> bool:
    """In this process, allocate large arrays from the heap and keep up to ``keep_bytes`` of freed memory.

    Returns whether the allocator took the settings (False off Linux, or on a C
    library without glibc's ``mallopt``, such as musl, whose ``mallopt`` refuses
    everything). ``keep_bytes`` 0 leaves the allocator as it is.
    """
    if not keep_bytes or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Trim first: should the second setting be refused, the heap still gives memory back.
    if not mallopt(_M_TRIM_THRESHOLD, min(keep_bytes, MAX_KEEP_BYTES)):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0))
