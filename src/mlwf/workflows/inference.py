"""ml-inference: {partition ‖ load} → predict ×N, merged by the driver.

Unlike the reference, prediction applies each member's *trained* projection
(never a PCA fitted on the inference batch) and averages class probabilities.

Warm, 1k images take 1.08× the one-process baseline's time: 16 functions on
2 cores pay 16 dispatches, 16 result objects and a merge for about 125 ms of
work. At 10k images mlwf is faster (11,947 against 7,305 images/s;
2026-11-26, ``benchmarks/workflows.py``).
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from typing import Any

import numpy as np

from mlwf.errors import DataError, UsageError
from mlwf.workflows.base import Blob, StageOutput
from mlwf.workflows.definition import Input, Output, Profile, Stage, Workflow
from mlwf.workflows.labels import label_of, merged_reasons, skipped_reasons
from mlwf.workflows.state import (
    check_partition_size,
    check_state,
    decode_shares,
    is_heavy,
    received,
)

WORKFLOW = "ml-inference"
_EXAMPLES = 5
#: Most predict functions a run may ask for (fewer run when there are fewer images).
MAX_FUNCS = 100_000


# --------------------------------------------------------------------------- stages
def partition(list_keys, fetch=None, *, prefix: str, num_funcs: int, state: str = "light",
              image_size: int | None = None) -> StageOutput:
    """List the images under ``prefix`` in key order and deal them round-robin to
    at most ``num_funcs`` predict functions (never more functions than images).

    Returns ``assignments``, each with ``keys`` and ``labels`` (the class
    folder of each key, or ``None`` for keys directly under the prefix). With
    ``state="heavy"`` it also decodes each assignment's images at the model's
    ``image_size``, as the predict call would, and hands on their ``pixels``
    and ``refused`` (:mod:`mlwf.workflows.state`).
    """
    folder = prefix.rstrip("/") + "/"
    keys = list_keys(folder)
    if not keys:
        raise DataError(f"no images under prefix {folder!r}: upload them first "
                        f"('mlwf s3 upload-dir --host-path DIR --s3-path {prefix.rstrip('/')}')")
    if state == "heavy":
        check_partition_size(len(keys), image_size, folder)
    used = min(num_funcs, len(keys))
    labels = [label_of(k, folder) for k in keys]
    assignments = [{"keys": keys[i::used], "labels": labels[i::used]} for i in range(used)]
    info = {"num_images": len(keys), "num_funcs": used, "labelled": len(labels) - labels.count(None)}
    if state == "heavy":
        info.update(state="heavy", **decode_shares(fetch, assignments, image_size))
    return StageOutput({"assignments": assignments}, info)


def load(fetch, *, model_prefix: str) -> StageOutput:
    """Read the published model once, check it (format version, checksum, structure)
    and hand it on to the predict functions.

    Its ``model`` is the published version object itself (``stored_at`` its
    key): a run references the model, it does not store a copy of it.
    """
    from mlwf.model.format import checked_summary
    from mlwf.model.registry import read_published

    data, manifest = read_published(lambda key: fetch([key])[0], model_prefix,
                                    where=f"model prefix {model_prefix!r}")
    digest = manifest["sha256"]  # read_published checked the bytes against it
    model = checked_summary(data, digest=digest, source=manifest["object"])
    info = {"model_digest": digest, "classes": model["classes"], "image_size": model["image_size"],
            "model_run_id": manifest.get("run_id"), "model_object": manifest["object"],
            "validation_accuracy": model["metrics"].get("validation_accuracy")}
    return StageOutput({"model": Blob(data, stored_at=manifest["object"], sha256=digest)}, info)


def predict(assignment: dict, model, fetch) -> StageOutput:
    """Decode this function's images exactly as training did and classify them.

    Returns ``predictions``: ``keys``, ``labels``, predicted class numbers
    ``pred`` and their probabilities ``prob``; objects mlwf does not decode
    are skipped, counted (``skipped``) and named with the reason in the info
    (``skipped_reasons``, key → reason, at most :data:`~mlwf.workflows.labels.SKIPPED_REASONS_KEPT`).
    """
    from mlwf.images import decode_many

    keys = assignment["keys"]
    if is_heavy(assignment):  # decoded by partition (--state heavy)
        levels, refused = received(assignment)
    else:
        levels, refused = decode_many(fetch(keys), model.image_size, levels=True)
    ok = [i for i in range(len(keys)) if i not in refused]
    proba = model.proba_from_pixels(levels)
    pred = np.argmax(proba, axis=1).astype(np.int32)
    part = {"keys": [keys[i] for i in ok], "labels": [assignment["labels"][i] for i in ok],
            "pred": pred, "prob": proba[np.arange(len(pred)), pred].astype(np.float64)}
    return StageOutput({"predictions": part}, {"num_images": len(ok), "skipped": len(refused),
                                               "skipped_reasons": skipped_reasons(keys, refused)})


_HERE = "mlwf.workflows.inference"
#: The definition every part of mlwf reads (see :mod:`mlwf.workflows.definition`).
INFERENCE = Workflow(
    name="ml-inference",
    params=("model_prefix", "data_prefix", "num_funcs"),
    drive=f"{_HERE}:drive",
    imports=("mlwf.model", "mlwf.images"),
    example=("ml-inference/model", "ml-inference/images-inference-1k", "16"),
    stages=(
        Stage("partition", f"{_HERE}:partition", outputs=(Output("assignments", many=True),),
              profile=Profile(4, 2, "500m", "512Mi")),
        Stage("load", f"{_HERE}:load", outputs=(Output("model"),), profile=Profile(4, 2, "500m", "1Gi")),
        Stage("predict", f"{_HERE}:predict", calls="num_funcs",
              inputs=(Input("assignment", "partition.assignments", each=True),
                      Input("model", "load.model", decode="mlwf.model:from_bytes", cache=True)),
              outputs=(Output("predictions"),), profile=Profile(1, 32, "1", "1Gi")),
    ),
)


# --------------------------------------------------------------------------- driver
def drive(engine, model_prefix: str, data_prefix: str, num_funcs: int, *,
          resume: str | None = None, state: str = "light") -> dict[str, Any]:
    """Run the inference workflow and write its results.

    Writes ``ml-inference/outputs/<run-id>/predictions.csv`` (``key,prediction,
    probability,label``, one row per classified image in key order) and
    ``summary.json``; returns the report with ``accuracy`` (None when no image
    is labelled), ``results_key`` and ``model_digest``. ``state="heavy"``
    hands the predict calls decoded pixels instead of keys
    (:mod:`mlwf.workflows.state`): ``load`` then runs before ``partition``,
    which decodes at the image size of the model the predict calls get.
    """
    from mlwf.storage import check_prefix

    heavy = check_state(state) == "heavy"
    if not isinstance(num_funcs, int) or isinstance(num_funcs, bool) or num_funcs < 1:
        raise UsageError(f"NUM_FUNCS must be a positive integer, got {num_funcs!r}")
    if num_funcs > MAX_FUNCS:
        raise UsageError(f"NUM_FUNCS must be at most {MAX_FUNCS:,} (one function per image is the most that "
                         f"helps), got {num_funcs:,}")
    check_prefix(model_prefix)
    check_prefix(data_prefix)
    if not data_prefix.strip().strip("/").strip():
        raise UsageError("DATA_PREFIX is empty: give the prefix of the images, e.g. ml-inference/images-inference-1k")
    engine.store.require_bucket()
    from mlwf.model import read_manifest

    # Fail before starting any function when there is no model at all.
    read_manifest(engine.store.get, model_prefix, where=f"bucket {engine.spec.bucket!r} of {engine.spec.url}")
    run = engine.start_run(WORKFLOW, {"model_prefix": model_prefix, "data_prefix": data_prefix,
                                      "num_funcs": num_funcs, **({"state": state} if heavy else {})}, resume=resume)
    try:
        if heavy:
            [loaded] = run.run_calls(load=[{"model_prefix": model_prefix}])["load"]
            [part] = run.run_calls(partition=[{"prefix": data_prefix, "num_funcs": num_funcs, "state": state,
                                               "image_size": loaded.info["image_size"]}])["partition"]
        else:
            first = run.run_calls(partition=[dict(prefix=data_prefix, num_funcs=num_funcs)],
                                  load=[dict(model_prefix=model_prefix)])
            [part], [loaded] = first["partition"], first["load"]
        model_ref = loaded.outputs["model"]
        preds = run.run_calls(predict=[dict(assignment=ref, model=model_ref)
                                       for ref in part.outputs["assignments"]])["predict"]
        classes = loaded.info["classes"]
        rows = []
        for out in preds:
            p = run.read(out.outputs["predictions"])
            for key, label, c, prob in zip(p["keys"], p["labels"], p["pred"].tolist(), p["prob"].tolist()):
                rows.append((key, classes[c], prob, label))
        rows.sort(key=lambda r: r[0])
        skipped = sum(out.info["skipped"] for out in preds)
        reasons = merged_reasons(out.info["skipped_reasons"] for out in preds)
        if not rows:
            first = next(iter(reasons.items()), None)
            raise DataError(f"no decodable images under prefix {data_prefix.rstrip('/') + '/'!r}: all {skipped} "
                            "objects were skipped" + (f" (e.g. {first[0]}: {first[1]})" if first else "")
                            + "; upload PNG or JPEG images there")

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["key", "prediction", "probability", "label"])
        for key, name, prob, label in rows:
            writer.writerow([key, name, f"{prob:.6f}", "" if label is None else label])
        labelled = [(r[1], r[3]) for r in rows if r[3] is not None]
        accuracy, confusion, unknown = None, None, []
        if labelled:
            accuracy = sum(p == t for p, t in labelled) / len(labelled)
            index = {c: i for i, c in enumerate(classes)}
            unknown = sorted({t for _, t in labelled if t not in index})
            matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
            for (p, t), n in Counter(labelled).items():  # counted first: one NumPy write per cell
                if t in index:
                    matrix[index[t], index[p]] = n
            confusion = {"labels": classes, "matrix": matrix.tolist()}
        results_key = run.layout.result("predictions.csv")
        summary = {
            "model_prefix": model_prefix,
            "data_prefix": data_prefix,
            "model_digest": loaded.info["model_digest"],
            "num_images": part.info["num_images"],
            "num_predicted": len(rows),
            "num_funcs": part.info["num_funcs"],
            "num_funcs_requested": num_funcs,
            "num_labelled": len(labelled),
            "accuracy": accuracy,
            "confusion": confusion,
            "labels_not_in_model": unknown,
            "skipped": skipped,
            "skipped_examples": list(reasons)[:_EXAMPLES],
            "skipped_reasons": reasons,
            "results_key": results_key,
            "summary_key": run.layout.result("summary.json"),
            "state": state,
        }
        engine.store.put(results_key, buf.getvalue().encode())
        report = run.report(**summary)
        engine.store.put(summary["summary_key"], json.dumps(report, indent=2).encode())
    except BaseException as e:
        run.fail(e)
        raise
    run.finish(report)
    return report
