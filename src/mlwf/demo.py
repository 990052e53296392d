"""``mlwf demo``: the whole story on a fresh install, on scikit-learn's bundled digits.

Writes the digits as PNG class folders, uploads the first 1,497 as the training
set and the last 300 as a batch to classify, trains (2 PCA, 8 forests),
publishes the model, and classifies the batch with 4 predict functions.

Everything the demo writes lives under its own prefix, ``mlwf-demo/`` (its
images and its model), and under the two runs' own output folders: it never
replaces a model published elsewhere, such as ``ml-inference/model``.
"""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path
from typing import Any

DEMO_PREFIX = "mlwf-demo"
TRAIN_PREFIX = f"{DEMO_PREFIX}/digits-train"
BATCH_PREFIX = f"{DEMO_PREFIX}/digits-batch"
MODEL_PREFIX = f"{DEMO_PREFIX}/model"
NUM_DIGITS = 1797
BATCH = 300


def run_demo(store: str | None = None, bucket: str | None = None, workers: int | None = None,
             quiet: bool = False) -> dict[str, Any]:
    """Run the demo and return both reports; prints a summary unless ``quiet``.

    Parameters
    ----------
    store, bucket : where to run (default: the configured store and bucket).
    workers : worker processes (default: one per core).
    quiet : print nothing (``mlwf demo --json``).

    Returns
    -------
    dict with the ``training`` and ``inference`` run reports.
    """
    from rich.markup import escape

    from mlwf import bulk, datasets
    from mlwf.engine.driver import Engine
    from mlwf.terminal import StageBars, print_report, stdout_console

    def say(text: str, whole: bool = False) -> None:
        # ``whole``: a command or key to copy, one logical line that a narrow terminal wraps softly.
        if not quiet:
            stdout_console().print(text, soft_wrap=whole)

    with tempfile.TemporaryDirectory(prefix="mlwf-demo-") as tmp:
        images = Path(tmp) / "digits"
        datasets.write_digits(images)
        train_dir, batch_dir = Path(tmp) / "train", Path(tmp) / "batch"
        # Split by index: images 0..1496 train, 1497..1796 are the unseen batch.
        for png in images.rglob("*.png"):
            target = (batch_dir if int(png.stem) >= NUM_DIGITS - BATCH else train_dir) / png.parent.name
            target.mkdir(parents=True, exist_ok=True)
            png.rename(target / png.name)
        with StageBars(enabled=not quiet) as progress, \
                Engine(store, bucket, workers=workers, progress=progress) as engine:
            say(f"[bold]mlwf demo[/bold]: store {escape(engine.spec.url)}, bucket {escape(engine.spec.bucket)}, "
                f"everything under {DEMO_PREFIX}/")
            # The demo owns its two folders: refresh them even if another version wrote other bytes.
            up1 = bulk.upload_dir(engine.store, train_dir, TRAIN_PREFIX, create_bucket=True, overwrite=True)
            up2 = bulk.upload_dir(engine.store, batch_dir, BATCH_PREFIX, create_bucket=True, overwrite=True)
            say(f"uploaded {up1['files']} training images to {TRAIN_PREFIX}/ and "
                f"{up2['files']} unseen images to {BATCH_PREFIX}/")
            say(f"\n[bold]1. mlwf run ml-training {TRAIN_PREFIX} 2 8 --model-prefix {MODEL_PREFIX}[/bold]",
                whole=True)
            training = engine.run_training(TRAIN_PREFIX, 2, 8, model_prefix=MODEL_PREFIX)
            if not quiet:
                print_report(training)  # ends the progress display first
            say(f"\n[bold]2. mlwf run ml-inference {MODEL_PREFIX} {BATCH_PREFIX} 4[/bold]", whole=True)
            inference = engine.run_inference(MODEL_PREFIX, BATCH_PREFIX, 4)
            if not quiet:
                print_report(inference)
    say(f"\nThe model classified {inference['num_predicted']} digits it never saw with "
        f"[bold]{100 * inference['accuracy']:.1f} %[/bold] accuracy "
        f"(validation accuracy during training: {100 * training['validation_accuracy']:.1f} %).")
    say(f"Predictions (bucket {escape(engine.spec.bucket)}): {escape(inference['results_key'])}", whole=True)
    where = "".join(f" --{flag} {shlex.quote(value)}" for flag, value in (("store", store), ("bucket", bucket))
                    if value is not None)
    say(f"The whole run: mlwf runs show {inference['run_id']}{escape(where)}", whole=True)
    return {"training": training, "inference": inference}
