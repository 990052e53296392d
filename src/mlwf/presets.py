"""The training settings by name: the defaults (the reference's), the ``--preset`` sets, and where a model is published.

Values are :class:`mlwf.workflows.training.TrainingConfig` fields; settings a
preset does not name keep their defaults (:data:`DEFAULTS`). Only plain values
here: the command line reads them before it imports anything heavy, and the
same-run baseline (:mod:`mlwf.bench.baseline`) without importing mlwf's
machinery.
"""

#: Where ml-training publishes and ml-inference reads a model unless told otherwise (the reference's prefix).
DEFAULT_MODEL_PREFIX = "ml-inference/model"

#: The reference's training settings: the defaults of ml-training (:class:`~mlwf.workflows.training.TrainingConfig`),
#: of its flags and of the same-run baseline. ``forest`` and ``train_rows`` (the reference's: ``random`` forests,
#: each on its ``slice``) are TrainingConfig's alone: the baseline knows no other.
DEFAULTS: dict = {"image_size": 64, "n_components": 10, "n_trees": 100, "max_depth": 10, "min_samples_split": 5,
                  "holdout": 0.2, "seed": 0}

#: ``accurate``: at least 85 % on Fashion-MNIST's 10,000 test images at 60k `4 16`,
#: the workflow's shape unchanged (what was tried, and what each gave: benchmarks/README.md).
PRESETS: dict[str, dict] = {
    "accurate": {"image_size": 28, "n_components": 60, "n_trees": 40, "max_depth": 40, "holdout": 0.1,
                 "forest": "extra", "train_rows": "partition"},
}
