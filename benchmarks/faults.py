"""Faults: what fault tolerance costs when nothing fails, and what one killed worker costs.

Usage (from the repository root, with mlwf installed):

    python benchmarks/faults.py [--repeats 7] [--fashion DIR] [--out benchmarks/results/faults]

Training 2k `2 8` (default settings) on the benchmark store that
``common.prepare()`` builds. Overhead: warm runs with the per-call done records
(what --resume needs) against the same engine with them switched off,
alternated, medians. Recovery: runs on a fresh worker pool with
MLWF_FAULTS=train:3:exit:1 (call 3 of train kills its worker once) against
fresh-pool runs without a fault; both must give the same model digest.
Writes ``faults.json`` into ``--out`` and prints the table of the results page.
"""

from __future__ import annotations

import os
import statistics
import time

from common import TRAIN, arguments, command, load_average, machine, now, prepare, write


def main() -> None:
    a = arguments(__doc__, "faults", repeats=7).parse_args()
    load_at_start = load_average()
    from mlwf.engine.driver import Engine

    store = prepare(a.fashion, a.data)
    on, off = [], []
    with Engine(store, "tless") as engine:
        engine.run_training(TRAIN, 2, 8, publish=False)
        for _ in range(a.repeats):
            for flag, bucket in ((True, on), (False, off)):
                engine.checkpoints = flag
                t = time.perf_counter()
                engine.run_training(TRAIN, 2, 8, publish=False)
                bucket.append((time.perf_counter() - t) * 1e3)

    def fresh(faults: str | None) -> tuple[float, str]:
        if faults:
            os.environ["MLWF_FAULTS"] = faults
        try:
            with Engine(store, "tless") as engine:
                engine.backend.warm_up()
                t = time.perf_counter()
                report = engine.run_training(TRAIN, 2, 8, publish=False)
                return (time.perf_counter() - t) * 1e3, report["model_digest"]
        finally:
            os.environ.pop("MLWF_FAULTS", None)

    clean, killed, digests = [], [], set()
    for _ in range(max(3, a.repeats // 2)):
        ms, d = fresh(None)
        clean.append(ms)
        digests.add(d)
        ms, d = fresh("train:3:exit:1")
        killed.append(ms)
        digests.add(d)
    result = {
        "machine": machine(), "date": now(), "command": command(),
        "load_average": {"start": load_at_start, "end": load_average()},
        "with_records_ms": statistics.median(on), "without_records_ms": statistics.median(off),
        "overhead_pct": 100 * (statistics.median(on) / statistics.median(off) - 1),
        "fresh_pool_clean_ms": statistics.median(clean), "fresh_pool_one_killed_worker_ms": statistics.median(killed),
        "recovery_ms": statistics.median(killed) - statistics.median(clean),
        "same_digest": len(digests) == 1, "runs": {"on": on, "off": off, "clean": clean, "killed": killed},
    }
    write(a.out, "faults.json", result)
    print(f"| warm 2k `2 8` with done records | {result['with_records_ms']:.0f} ms |")
    print(f"| same, records off | {result['without_records_ms']:.0f} ms |")
    print(f"| overhead | {result['overhead_pct']:+.1f} % (target ≤ 5 %) |")
    print(f"| fresh pool, no fault | {result['fresh_pool_clean_ms']:.0f} ms |")
    print(f"| fresh pool, one worker killed in train[3] | {result['fresh_pool_one_killed_worker_ms']:.0f} ms |")
    print(f"| recovery cost | {result['recovery_ms']:.0f} ms; same model digest: {result['same_digest']} |")


if __name__ == "__main__":
    main()
