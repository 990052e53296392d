"""Throughput: warm runs, model loads, store reads and image decoding, against the code before a change, same run.

Usage (from the repository root, with mlwf installed; run it under ``nice`` on a shared machine):

    python benchmarks/throughput.py [--before COMMIT] [--measures infer_10k,train_2k,...] [--repeats 10]
        [--rounds 1] [--fashion DIR] [--out benchmarks/results/throughput]

Measures (``--measures``, default all but ``train_60k``):

* ``train_60k``: ml-training on all 60,000 Fashion-MNIST training images, `4 16`;
* ``infer_10k``: ml-inference of the 10,000 test images, 16 functions, with a
  60k `4 16` model (images/s);
* ``train_2k``, ``infer_1k``: the default path (2k `2 8`; 1k images, 16
  functions, with a 2k model);
* ``load_model``: ``mlwf.model.from_bytes`` of the 2k and the 60k model;
* ``get_many``: reading the 2,000 training images from the local store;
* ``decode``: ``mlwf.images.decode_many`` on 4,000 generated 28×28 images
  (scikit-learn's bundled digits, upscaled, half with noise) as 8-bit gray
  PNG, RGB PNG and baseline JPEG, resized to 64 and to 28: CPU µs per image;
  both sides must give the same pixels.

The models the inference measures and the loads use are trained once, by this
tree, and published under their own prefixes, so both sides classify with
the same bytes. Each side is one warm process (``--rounds`` fresh pairs):
the ``src`` of ``--before`` (extracted with ``git archive``, first on
``PYTHONPATH``) and this tree; without ``--before`` only this tree. Each
opens one ``mlwf.Engine`` (the local backend, one worker per core) and runs
every measure once untimed; then the two take turns run by run, ``--repeats``
timed runs of each measure a side, which side goes first alternating (ABBA),
so that the other jobs of a shared machine hit both alike. CPU is the time a
side's process and everything below it (fork server, workers) used during a
run: on a loaded machine it moves much less than wall time. Figures are
medians over every timed run of a side, with min–max; the after/before ratio
is of the medians; ``train_*`` also compare model digests, ``decode`` the
pixels (the same on both sides). The load average is recorded after every
run. Writes ``throughput.json`` into ``--out`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (TEST10K, TEST1K, TRAIN, TRAIN60K, arguments, before_argument, command, load_average, machine,
                    prepare, short_commit, side_env, source_of, tree_cpu_seconds, write)

MEASURES = ("train_60k", "infer_10k", "train_2k", "infer_1k", "load_model", "get_many", "decode")
DEFAULT = tuple(m for m in MEASURES if m != "train_60k")
MODEL_60K = "ml-inference/model-throughput-60k"
MODEL_2K = "ml-inference/model-throughput-2k"
IMAGES = {"infer_10k": 10000, "infer_1k": 1000}
DECODE_KINDS = ("gray PNG", "RGB PNG", "JPEG")


# --------------------------------------------------------------------------- in the child process (one side)
def generated_images(kind: str, n: int = 4000) -> list[bytes]:
    """``n`` 28×28 images of scikit-learn's digits, upscaled, half with noise, encoded as ``kind``."""
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


def child(store_url: str, side: str, measures: list[str]) -> None:
    """One side, in this fresh process: warm every measure once, then run one measure per line read from stdin.

    Prints one JSON line when warm (``{"mlwf": path}``), then one per command:
    ``{name: {"wall_ms"|"us_per_image": …, …}}`` for each figure the measure gives.
    """
    import hashlib

    import mlwf
    import mlwf.images
    import mlwf.model
    from mlwf.engine.driver import Engine
    from mlwf.storage import StoreSpec

    own = {"train_60k": f"{MODEL_60K}-{side}", "train_2k": f"{MODEL_2K}-{side}"}
    workflows = {
        "train_60k": lambda e: e.run_training(TRAIN60K, 4, 16, model_prefix=own["train_60k"]),
        "infer_10k": lambda e: e.run_inference(MODEL_60K, TEST10K, 16),
        "train_2k": lambda e: e.run_training(TRAIN, 2, 8, model_prefix=own["train_2k"]),
        "infer_1k": lambda e: e.run_inference(MODEL_2K, TEST1K, 16),
    }
    store = StoreSpec(store_url, "tless").open()
    engine = Engine(store_url, "tless") if set(workflows) & set(measures) else None

    def workflow(name: str) -> dict:
        cpu = tree_cpu_seconds()
        t = time.perf_counter()
        report = workflows[name](engine)
        wall = (time.perf_counter() - t) * 1e3
        return {name: {"wall_ms": wall, "cpu_ms": (tree_cpu_seconds() - cpu) * 1e3, "stage_ms": report["stage_ms"],
                       "digest": report.get("model_digest"),
                       "accuracy": report.get("validation_accuracy", report.get("accuracy"))}}

    def timed(fn) -> dict:
        t = time.perf_counter()
        fn()
        return {"wall_ms": (time.perf_counter() - t) * 1e3}

    models = {}
    if "load_model" in measures:
        models = {label: store.get(json.loads(store.get(prefix + "/MODEL.json"))["object"])
                  for label, prefix in (("2k", MODEL_2K), ("60k", MODEL_60K))}
    keys = [o.key for o in store.list(TRAIN + "/")] if "get_many" in measures else []
    images = {kind: generated_images(kind) for kind in DECODE_KINDS} if "decode" in measures else {}
    pixels: dict[str, str] = {}

    def decode() -> dict:
        out = {}
        for kind, blobs in images.items():
            for size in (64, 28):
                cpu = time.process_time()
                got = mlwf.images.decode_many(blobs, size, levels=True)[0]
                out[f"decode {kind} → {size}"] = {"us_per_image": (time.process_time() - cpu) / len(blobs) * 1e6}
                pixels[f"decode {kind} → {size}"] = hashlib.sha256(got.tobytes()).hexdigest()
        return out

    run = {name: (lambda n=name: workflow(n)) for name in workflows}
    run["load_model"] = lambda: {f"load_model_{label}": timed(lambda d=data: mlwf.model.from_bytes(d))
                                 for label, data in models.items()}
    run["get_many"] = lambda: {"get_many_2k_images": timed(lambda: store.get_many(keys))}
    run["decode"] = decode
    for name in measures:
        run[name]()  # warm-up, not counted
    print(json.dumps({"mlwf": mlwf.__file__, "pixels": pixels}), flush=True)
    try:
        for line in sys.stdin:
            name = line.strip()
            if not name:
                break
            print(json.dumps(run[name]()), flush=True)
    finally:
        if engine is not None:
            engine.close()


# --------------------------------------------------------------------------- the driver of the rounds
def publish_models(store_url: str, measures: list[str]) -> None:
    """The 60k and 2k models both sides classify with and load, trained once by this tree (kept in the store)."""
    from mlwf.engine.driver import Engine
    from mlwf.storage import StoreSpec

    store = StoreSpec(store_url, "tless").open()
    need = []
    if {"infer_10k", "load_model"} & set(measures):
        need.append((MODEL_60K, TRAIN60K, 4, 16))
    if {"infer_1k", "load_model"} & set(measures):
        need.append((MODEL_2K, TRAIN, 2, 8))
    need = [n for n in need if not store.exists(n[0] + "/MODEL.json")]
    if need:
        with Engine(store_url, "tless") as engine:
            for prefix, data, p, t in need:
                print(f"training the {data} `{p} {t}` model once, into {prefix} …", file=sys.stderr, flush=True)
                engine.run_training(data, p, t, model_prefix=prefix)


class Side:
    """A warm process of one side, answering one measure at a time."""

    def __init__(self, store_url: str, src: Path | None, side: str, measures: list[str]):
        self.side = side
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", side, "--store", store_url, "--measures",
                                      ",".join(measures)], env=side_env(src), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        ready = self._read()
        expected = str(src) if src is not None else str(Path(__file__).resolve().parents[1] / "src")
        if not ready["mlwf"].startswith(expected):
            self.close()
            sys.exit(f"throughput: the {side} side imported {ready['mlwf']}, not {expected}")
        self.pixels = ready["pixels"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            sys.exit(f"throughput: the {self.side} side ended with {self.proc.returncode}")
        return json.loads(line)

    def run(self, measure: str) -> dict:
        self.proc.stdin.write(measure + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def med(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "n": len(values)}


def summarise(runs: dict[str, dict[str, list[dict]]], sides: list[str], pixels: dict[str, dict]) -> dict:
    summary: dict = {}
    for measure in runs[sides[0]]:
        row: dict = {}
        for side in sides:
            r = runs[side][measure]
            key = "us_per_image" if "us_per_image" in r[0] else "wall_ms"
            row[side] = med([x[key] for x in r])
            row["unit"] = "µs per image (CPU)" if key == "us_per_image" else "ms"
            if "cpu_ms" in r[0]:
                row[side]["cpu_ms"] = med([x["cpu_ms"] for x in r])
                row[side]["stage_ms"] = {s: round(statistics.median(x["stage_ms"][s] for x in r), 1)
                                         for s in r[0]["stage_ms"]}
                row[side]["digests"] = sorted({x["digest"] for x in r if x["digest"]})
                row[side]["accuracy"] = r[-1]["accuracy"]
            base = measure.split(" ")[0]
            if base in IMAGES:
                row[side]["images_per_s"] = round(IMAGES[base] / row[side]["median"] * 1e3)
        if len(sides) == 2:
            row["after_over_before"] = round(row["after"]["median"] / row["before"]["median"], 3)
            if "digests" in row["after"] and measure.startswith("train"):
                row["same_model_bytes"] = row["before"]["digests"] == row["after"]["digests"]
            if measure in pixels.get("after", {}):
                row["same_pixels"] = pixels["before"][measure] == pixels["after"][measure]
        summary[measure] = row
    return summary


def table(result: dict) -> str:
    sides = result["sides"]
    head = "| measure | " + " | ".join("before `" + result["before"] + "`" if s == "before" else "after" for s in sides)
    lines = [head + (" | after/before | same bytes |" if len(sides) == 2 else " |"),
             "|---|" + "---|" * len(sides) + ("---|---|" if len(sides) == 2 else "")]
    for measure, row in result["summary"].items():
        cells = []
        for side in sides:
            s = row[side]
            unit = " µs" if row["unit"].startswith("µs") else " ms"
            cell = f"{s['median']:,.1f}{unit} ({s['min']:,.1f}–{s['max']:,.1f})"
            if "images_per_s" in s:
                cell += f", {s['images_per_s']:,} images/s"
            cells.append(cell)
        line = f"| {measure} | " + " | ".join(cells) + " |"
        if len(sides) == 2:
            same = row.get("same_model_bytes", row.get("same_pixels"))
            line += f" {row['after_over_before']:.3f} | {'' if same is None else ('yes' if same else 'NO')} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    p = arguments(__doc__, "throughput", repeats=10)
    before_argument(p)
    p.add_argument("--rounds", type=int, default=1, help="pairs of fresh processes, one per side (default 1)")
    p.add_argument("--measures", default=",".join(DEFAULT), help=f"of {', '.join(MEASURES)} (default: all but "
                                                                  "train_60k)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    a = p.parse_args()
    measures = [m for m in a.measures.split(",") if m]
    if not measures or set(measures) - set(MEASURES):
        sys.exit(f"throughput: --measures takes {', '.join(MEASURES)}")
    if a.child:
        return child(a.store, a.child, measures)
    started = time.time()
    load_start = load_average()
    extra = [(TRAIN60K, "train", 60000, 0)] if {"train_60k", "infer_10k", "load_model"} & set(measures) else []
    store_url = prepare(a.fashion, a.data, extra)
    publish_models(store_url, measures)
    sides = ["before", "after"] if a.before else ["after"]
    runs: dict[str, dict[str, list]] = {side: {} for side in sides}
    pixels: dict[str, dict] = {}
    loads = []

    def one_round(r: int, before_src: Path | None) -> None:
        procs: dict[str, Side] = {}
        try:
            for side in sides:
                procs[side] = Side(store_url, before_src if side == "before" else None, side, measures)
                pixels[side] = procs[side].pixels
            for i in range(a.repeats):
                for j, measure in enumerate(measures):
                    # ABBA…: which side goes first alternates run by run, so drift hits both alike.
                    order = sides if (r + i + j) % 2 == 0 else sides[::-1]
                    for side in order:
                        for name, figures in procs[side].run(measure).items():
                            runs[side].setdefault(name, []).append(figures)
                loads.append(load_average())
                print(f"round {r + 1} of {a.rounds}, run {i + 1} of {a.repeats} (load {loads[-1][0]})",
                      file=sys.stderr, flush=True)
        finally:
            for proc in procs.values():
                proc.close()

    if a.before:
        with source_of(a.before) as before_src:
            for r in range(a.rounds):
                one_round(r, before_src)
    else:
        for r in range(a.rounds):
            one_round(r, None)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
              "command": command(), "before": short_commit(a.before) if a.before else None, "sides": sides,
              "rounds": a.rounds, "repeats": a.repeats, "minutes": round((time.time() - started) / 60, 1),
              "load_average": {"start": load_start, "per_run": loads},
              "summary": summarise(runs, sides, pixels), "runs": runs}
    write(a.out, "throughput.json", result)
    one_min = [load_start[0], *(x[0] for x in loads)]
    print(f"{result['date']}; {a.rounds} × {a.repeats} runs per side; load average (1 min) "
          f"{min(one_min):.1f}–{max(one_min):.1f}")
    print(table(result))


if __name__ == "__main__":
    main()
