"""Named sets of training settings (``mlwf run ml-training --preset NAME``), and where a model is published by default.

Values are :class:`mlwf.workflows.training.TrainingConfig` fields; settings not
named keep their defaults (the reference's). Only the standard library here:
the command line reads it before it imports anything heavy.
"""

#: Where ml-training publishes and ml-inference reads a model unless told otherwise (the reference's prefix).
DEFAULT_MODEL_PREFIX = "ml-inference/model"

#: ``accurate``: at least 85 % on Fashion-MNIST's 10,000 test images at 60k `4 16`,
#: the workflow's shape unchanged (what was tried, and what each gave: benchmarks/README.md).
PRESETS: dict[str, dict] = {
    "accurate": {"image_size": 28, "n_components": 60, "n_trees": 40, "max_depth": 40, "holdout": 0.1,
                 "forest": "extra", "train_rows": "partition"},
}
