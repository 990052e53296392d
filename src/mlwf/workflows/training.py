"""ml-training: partition → PCA ×P → random forest ×T → validation.

The reference's shape without its defects: labels come from the class folders,
a held-out set measures accuracy, each member keeps the projection it was
trained on, and the model is published only once it is complete and validated.

Validation is split: *score* ×P classifies one share of the held-out images
each, *validation* only counts and builds the model; on 60k the validation
stage went from 2.6 s on one core to score 1.2 s + validation 0.25 s, on both
cores. PCA keeps the decoded gray levels and lets scikit-learn centre its
float copy in place (one 200 MB array fewer per call): with the projection in
blocks, the PCA stage on 60k went 5.0 → 3.4 s (2026-11-28). The forests' time
is scikit-learn's: about 1 ms of its Python per tree beside building it
(``clone``/``get_params`` through ``inspect.signature``,
``check_random_state``, target checks). ``sklearn.config_context(assume_finite=True,
skip_parameter_validation=True)`` around the fits was tried and gave nothing.

``--state heavy`` (:mod:`mlwf.workflows.state`, issue 27's study) keeps the
stages and their definition and changes what their data holds: partition
decodes and hands on pixels, each PCA call hands its whole feature matrix to
each of its train calls (``whole``), and the driver gives every train call its
row range. One definition for both variants keeps ``mlwf deploy knative`` and
the choreography as they are: a heavy run is only other arguments to the same
calls.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mlwf.errors import DataError, UsageError
from mlwf.model import MAX_CLASSES, MAX_COMPONENTS, class_name_problem
from mlwf.presets import DEFAULT_MODEL_PREFIX, DEFAULTS
from mlwf.workflows.base import Blob, StageOutput, derive_seed
from mlwf.workflows.definition import Input, Output, Profile, Stage, Workflow
from mlwf.workflows.labels import (
    first_reason,
    label_of,
    merged_reasons,
    skipped_reasons,
    sort_classes,
)
from mlwf.workflows.state import (
    check_partition_size,
    check_state,
    decode_shares,
    is_heavy,
    received,
    row_ranges,
)

WORKFLOW = "ml-training"
_EXAMPLES = 5
#: Fewest decodable held-out images of each class a model must be validated on to be
#: published (unless allow_unvalidated): with one, a class's accuracy rests on a single image.
MIN_VALIDATION_PER_CLASS = 2
#: Largest decoded pixel array one PCA function may be dealt (float32), checked before any work.
MAX_PIXEL_BYTES_PER_PCA = 4 << 30


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides the model's bytes (besides the images); by default the reference's
    settings (:data:`mlwf.presets.DEFAULTS`)."""

    image_size: int = DEFAULTS["image_size"]
    n_components: int = DEFAULTS["n_components"]
    n_trees: int = DEFAULTS["n_trees"]
    max_depth: int = DEFAULTS["max_depth"]
    min_samples_split: int = DEFAULTS["min_samples_split"]
    holdout: float = DEFAULTS["holdout"]
    seed: int = DEFAULTS["seed"]
    #: ``random``: scikit-learn's RandomForestClassifier (the reference's); ``extra``: its
    #: ExtraTreesClassifier (random thresholds: several times faster to fit).
    forest: str = "random"
    #: ``slice``: each training function learns from its own slice of its PCA function's
    #: images (the reference's shape); ``partition``: from all of them (forests differ by seed).
    train_rows: str = "slice"

    def check(self) -> TrainingConfig:
        """Raise :class:`UsageError` for values no run could use."""
        for name, low, high in (("image_size", 4, 1024), ("n_components", 1, MAX_COMPONENTS), ("n_trees", 1, 10_000),
                                ("max_depth", 1, 64), ("min_samples_split", 2, 1_000_000)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
                raise UsageError(f"{name.replace('_', '-')} must be an integer in [{low}, {high}], got {v!r}")
        if self.n_components > self.image_size**2:
            raise UsageError(f"n-components ({self.n_components}) cannot exceed image-size² ({self.image_size**2})")
        if not isinstance(self.holdout, (int, float)) or not 0.0 <= self.holdout < 1.0:
            raise UsageError(f"holdout must be a fraction in [0, 1), got {self.holdout!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"seed must be a non-negative integer, got {self.seed!r}")
        for name, choices in (("forest", FORESTS), ("train_rows", TRAIN_ROWS)):
            if getattr(self, name) not in choices:
                raise UsageError(f"{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                                 f"got {getattr(self, name)!r}")
        return self

    def recorded(self) -> dict[str, Any]:
        """The settings as recorded in the run and the model: the fields added after the first
        model format only when they differ from their default, so a default model's bytes stay
        what they were."""
        out = asdict(self)
        for name in _LATER_FIELDS:
            if out[name] == getattr(TrainingConfig, name):
                del out[name]
        return out


FORESTS = ("random", "extra")
TRAIN_ROWS = ("slice", "partition")
_LATER_FIELDS = ("forest", "train_rows")


def train_split(num_pca: int, num_train: int) -> list[int]:
    """How many training functions each PCA function feeds.

    ``num_train`` need not be a multiple of ``num_pca``: the first
    ``num_train % num_pca`` PCA functions feed one more (the reference divides
    and silently drops the remainder).
    """
    base, extra = divmod(num_train, num_pca)
    return [base + (1 if i < extra else 0) for i in range(num_pca)]


# --------------------------------------------------------------------------- stages
def partition(list_keys, fetch=None, *, prefix: str, num_pca: int, num_train: int, holdout: float, seed: int,
              n_components: int, image_size: int = 64, state: str = "light") -> StageOutput:
    """List the images, label them from their class folders, hold out a validation
    set and deal the rest to the PCA functions.

    Returns ``assignments``, one per PCA function (``keys``, ``labels``,
    ``num_train``, ``first_train``), and the ``holdout`` set in as many shares
    (``keys``, ``labels``); its info holds the class names and counts. With
    ``state="heavy"`` it also decodes every share's images, as the PCA and
    score calls would, and hands on their ``pixels`` and ``refused``
    (:mod:`mlwf.workflows.state`); its info then counts them (``decoded``,
    ``decode_skipped``).
    """
    folder = prefix.rstrip("/") + "/"
    objects = list_keys(folder)
    if not objects:
        raise DataError(f"no objects under prefix {folder!r}: upload images first "
                        f"('mlwf s3 upload-dir --host-path DIR --s3-path {prefix.rstrip('/')}')")
    keys, names, unlabelled = [], [], []
    for key in objects:
        label = label_of(key, folder)
        if label is None:
            unlabelled.append(key)
        else:
            keys.append(key)
            names.append(label)
    if not keys:
        raise DataError(f"no labelled images under {folder!r}: training needs class folders "
                        f"{folder}<label>/<image>")
    classes = sort_classes(names)
    if len(classes) < 2:
        raise DataError(f"only one class ({classes[0]!r}) under {folder!r}: training needs at least two "
                        "class folders")
    if len(classes) > MAX_CLASSES:
        raise DataError(f"{len(classes):,} class folders under {folder!r}: a model holds at most "
                        f"{MAX_CLASSES:,} classes; train on fewer classes")
    for c in classes:
        if class_name_problem(c):
            raise DataError(f"class folder {folder}{c!r}: a class name must be {class_name_problem(c)}; "
                            "rename the folder")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[n] for n in names], dtype=np.int32)

    # Stratified, seeded hold-out: the same keys are held out on every run.
    rng = np.random.default_rng(derive_seed(seed, "partition"))
    held = np.zeros(len(keys), dtype=bool)
    for c in range(len(classes)):
        members = np.flatnonzero(labels == c)
        n_hold = int(np.floor(holdout * len(members)))
        if n_hold:
            held[rng.permutation(members)[:n_hold]] = True
    train_idx = np.flatnonzero(~held)
    train_idx = train_idx[rng.permutation(len(train_idx))]  # mix classes across slices

    # Checked before anything sized by the function counts is built.
    n_train = len(train_idx)
    if n_train < num_train or n_train // num_pca < max(n_components, 1):
        need = max(num_train, num_pca * n_components)
        raise DataError(
            f"{n_train} training images under {folder!r} (after holding out {int(held.sum())}) are too few "
            f"for {num_pca} PCA functions of {n_components} components and {num_train} training functions: "
            f"need at least {need}; use fewer functions or more images")
    pixel_bytes = -(-n_train // num_pca) * image_size**2 * 4
    if pixel_bytes > MAX_PIXEL_BYTES_PER_PCA:
        raise DataError(
            f"each PCA function would hold {-(-n_train // num_pca):,} images of {image_size}×{image_size} "
            f"pixels ({pixel_bytes / 2**30:.1f} GiB, more than the {MAX_PIXEL_BYTES_PER_PCA >> 30} GiB allowed): "
            "use more PCA functions or a smaller --image-size")
    if state == "heavy":
        check_partition_size(len(keys), image_size, folder)
    split = train_split(num_pca, num_train)

    assignments: list[Any] = []
    first = 0
    for i in range(num_pca):
        mine = train_idx[i::num_pca]
        assignments.append({"keys": [keys[j] for j in mine], "labels": labels[mine],
                            "num_train": split[i], "first_train": first})
        first += split[i]
    hold_idx = np.flatnonzero(held)
    # One share per PCA function, each scored by its own function (see :func:`score`).
    holdout = [{"keys": [keys[j] for j in hold_idx[i::num_pca]], "labels": labels[hold_idx[i::num_pca]]}
               for i in range(num_pca)]
    info = {
        "classes": classes,
        "num_objects": len(objects),
        "num_images": len(keys),
        "num_train_images": n_train,
        "num_holdout": int(held.sum()),
        "class_counts": {c: int(n) for c, n in zip(classes, np.bincount(labels, minlength=len(classes)))},
        "holdout_per_class": np.bincount(labels[held], minlength=len(classes)).tolist(),
        "unlabelled": len(unlabelled),
        "unlabelled_examples": unlabelled[:_EXAMPLES],
        "train_per_pca": split,
    }
    if state == "heavy":
        info.update(state="heavy", **decode_shares(fetch, assignments + holdout, image_size))
    return StageOutput({"assignments": assignments, "holdout": holdout}, info)


def pca(assignment: dict, fetch, *, image_size: int, n_components: int, seed: int, index: int,
        whole: bool = False) -> StageOutput:
    """Decode this function's images, fit PCA on them, project, and slice the rows
    for its training functions.

    Objects mlwf does not decode are skipped, counted and named with the
    reason in the info (``skipped_reasons``). Returns ``slices``, one per
    training function (``features``, ``labels``), or with ``whole`` one slice
    of all rows for all of them, and the ``projection`` (``mean``, ``components``).
    An assignment of ``--state heavy`` carries its images decoded (float32
    pixels, :mod:`mlwf.workflows.state`): they are used as they are.
    """
    from sklearn.decomposition import PCA  # fitted in float32: 8x faster here than float64

    from mlwf.images import decode_many, unit_scale
    from mlwf.model import project

    keys = assignment["keys"]
    if is_heavy(assignment):
        levels, refused = received(assignment)
    else:
        levels, refused = decode_many(fetch(keys), image_size, levels=True)
    labels = np.delete(np.asarray(assignment["labels"]), np.fromiter(refused, np.intp, len(refused)))
    skipped = [keys[i] for i in refused]
    n_slices = int(assignment["num_train"])
    if len(levels) < max(n_components, n_slices):
        raise DataError(f"PCA function {index} has {len(levels)} decodable images of {len(keys)} "
                        f"({len(skipped)} skipped{first_reason(keys, refused)}): it needs at least "
                        f"{max(n_components, n_slices)}; use fewer functions or check the images")
    facts = []
    identical = not np.any(np.ptp(levels, axis=0) > 0)
    if identical:
        facts.append("its images are all identical, so its projection carries no information; check the data")
    # Identical images make scikit-learn divide by a zero total variance: expected, and said above.
    with np.errstate(divide="ignore" if identical else "warn", invalid="ignore" if identical else "warn"):
        # copy=False: PCA centres (and squares) these pixels in place instead of copying
        # them; the projection below starts again from the gray levels (or from the heavy
        # state's float32 pixels, which the fit gets a copy of: they are its input's read-only view).
        scaled = unit_scale(levels) if levels.dtype == np.uint8 else np.array(levels, dtype=np.float32)
        fitted = PCA(n_components=n_components, svd_solver="randomized", copy=False,
                     random_state=derive_seed(seed, "pca", index)).fit(scaled)
    mean = fitted.mean_.astype(np.float64)
    components = fitted.components_.astype(np.float64)
    features = project(levels, mean, components)
    slices = [{"features": features[rows], "labels": labels[rows].astype(np.int32)}
              for rows in np.array_split(np.arange(len(features)), 1 if whole else n_slices)]
    info = {"num_images": len(levels), "skipped": len(skipped), "skipped_examples": skipped[:_EXAMPLES],
            "skipped_reasons": skipped_reasons(keys, refused), "decoded_per_class": np.bincount(labels).tolist(),
            "warnings": facts}
    return StageOutput({"slices": slices, "projection": {"mean": mean, "components": components}}, info)


def train(data: dict, *, num_classes: int, n_trees: int, max_depth: int, min_samples_split: int,
          seed: int, index: int, projection: int, forest: str = "random",
          rows: list[int] | None = None) -> StageOutput:
    """Train one forest (random forest, or extra trees with ``forest="extra"``) on a slice
    and export it as a model member.

    ``rows``: ``[start, stop]`` of the slice to fit when ``data`` is the PCA call's whole
    feature matrix (``--state heavy``); else ``data`` is the slice itself.
    """
    from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier

    from mlwf.model import export_forest

    kind = ExtraTreesClassifier if forest == "extra" else RandomForestClassifier
    fitted = kind(n_estimators=n_trees, max_depth=max_depth, min_samples_split=min_samples_split,
                  random_state=derive_seed(seed, "train", index), n_jobs=1)
    features, labels = data["features"], data["labels"]
    if rows is not None:
        start, stop = rows
        features, labels = features[start:stop], labels[start:stop]
    fitted.fit(features, labels)
    member = export_forest(fitted, fitted.classes_.tolist(), num_classes)
    member["projection"] = projection
    return StageOutput({"member": member}, {"num_samples": len(labels),
                                            "num_nodes": int(len(member["left"]))})


def score(holdout: dict, members: list, projections: list, fetch, *, classes: list[str],
          image_size: int) -> StageOutput:
    """Classify one share of the held-out images with the whole ensemble.

    Returns ``scores``: the true class numbers ``truth`` and the predicted
    ``pred`` of the share's decodable images, and the ``skipped`` keys with
    why each was skipped (key → reason).
    """
    from mlwf.images import decode_many
    from mlwf.model import build

    keys = holdout["keys"]
    truth, pred, skipped = np.zeros(0, np.int32), np.zeros(0, np.int32), {}
    if keys:
        if is_heavy(holdout):  # decoded by partition (--state heavy)
            levels, refused = received(holdout)
        else:
            levels, refused = decode_many(fetch(keys), image_size, levels=True)
        skipped = {keys[i]: str(reason) for i, reason in refused.items()}
        truth = np.delete(np.asarray(holdout["labels"], dtype=np.int32), np.fromiter(refused, np.intp, len(refused)))
        if len(truth):
            model = build(classes, image_size, projections, members)
            pred = np.argmax(model.proba_from_pixels(levels), axis=1).astype(np.int32)
    return StageOutput({"scores": {"truth": truth, "pred": pred, "skipped": skipped}},
                       {"num_images": len(truth), "skipped": len(skipped)})


def validation(members: list, projections: list, scores: list, *, classes: list[str], image_size: int,
               config: dict) -> StageOutput:
    """Assemble the ensemble, measure it from the scores of the held-out images, and emit the model bytes.

    The bytes are parsed back and checked before they are emitted, so what is
    published is exactly what was validated.
    """
    from mlwf.model import build, from_bytes

    model = build(classes, image_size, projections, members, config)
    truth = np.concatenate([np.asarray(s["truth"], dtype=np.int64) for s in scores]) if scores else np.zeros(0, int)
    pred = np.concatenate([np.asarray(s["pred"], dtype=np.int64) for s in scores]) if scores else np.zeros(0, int)
    skipped = [k for s in scores for k in s["skipped"]]
    reasons = merged_reasons(s["skipped"] for s in scores)
    accuracy, confusion = None, None
    if len(truth):
        accuracy = float(np.mean(pred == truth))
        confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
        np.add.at(confusion, (truth, pred), 1)
    per_class = np.bincount(truth, minlength=len(classes)).tolist()
    model.metrics = {"validation_accuracy": accuracy, "num_validation": len(truth),
                     "validation_skipped": len(skipped), "validation_per_class": per_class}
    data = model.to_bytes()
    checked = from_bytes(data, source="new model")
    info = {"accuracy": accuracy, "num_validation": len(truth), "skipped": len(skipped),
            "per_class": per_class,
            "skipped_examples": skipped[:_EXAMPLES], "skipped_reasons": reasons, "digest": checked.digest,
            "confusion": confusion.tolist() if confusion is not None else None}
    return StageOutput({"model": Blob(data)}, info)


_HERE = "mlwf.workflows.training"
#: The definition every part of mlwf reads (see :mod:`mlwf.workflows.definition`). CPU-bound stages
#: get one call per pod (the serverless function model); listing can share a pod.
TRAINING = Workflow(
    name="ml-training",
    params=("data_prefix", "num_pca", "num_train"),
    drive=f"{_HERE}:drive",
    imports=("mlwf.model", "mlwf.images", "sklearn.decomposition", "sklearn.ensemble"),
    example=("ml-training/mnist-images-2k", "2", "8"),
    stages=(
        Stage("partition", f"{_HERE}:partition",
              outputs=(Output("assignments", many=True), Output("holdout", many=True)),
              profile=Profile(4, 2, "500m", "512Mi")),
        Stage("pca", f"{_HERE}:pca", calls="num_pca",
              inputs=(Input("assignment", "partition.assignments", each=True),),
              outputs=(Output("slices", many=True), Output("projection")), profile=Profile(1, 16, "1", "1Gi")),
        Stage("train", f"{_HERE}:train", calls="num_train", inputs=(Input("data", "pca.slices", each=True),),
              outputs=(Output("member"),), profile=Profile(1, 32, "1", "1Gi")),
        Stage("score", f"{_HERE}:score", calls="num_pca",
              inputs=(Input("holdout", "partition.holdout", each=True),
                      Input("members", "train.member", gather=True, cache=True),
                      Input("projections", "pca.projection", gather=True, cache=True)),
              outputs=(Output("scores"),), profile=Profile(1, 16, "1", "1Gi")),
        Stage("validation", f"{_HERE}:validation",
              inputs=(Input("members", "train.member", gather=True),
                      Input("projections", "pca.projection", gather=True),
                      Input("scores", "score.scores", gather=True)),
              outputs=(Output("model"),), profile=Profile(1, 4, "1", "1Gi")),
    ),
)


# --------------------------------------------------------------------------- driver
def drive(engine, data_prefix: str, num_pca: int, num_train: int, *, config: TrainingConfig | None = None,
          model_prefix: str = DEFAULT_MODEL_PREFIX, publish: bool = True, allow_unvalidated: bool = False,
          resume: str | None = None, state: str = "light") -> dict[str, Any]:
    """Run the training workflow on ``engine`` and publish the model.

    Classes are counted after decoding: a class folder without one decodable
    training image is refused, whatever the folder holds. A model is
    published only if it was validated on at least
    :data:`MIN_VALIDATION_PER_CLASS` decodable held-out images of every class
    (checked on the folder counts before any work, and again after decoding),
    unless ``allow_unvalidated`` is set; the report's ``validated`` says
    whether the rule was met.

    Returns the run's report (see :meth:`mlwf.engine.driver.Run.report`) with
    ``validation_accuracy``, ``model_prefix`` and ``model_digest``. With
    ``resume=RUN_ID`` the calls of that run whose outputs verify are reused.
    ``state="heavy"`` hands the stages pixels and whole feature matrices
    instead of keys and slices (:mod:`mlwf.workflows.state`): the same model.

    Raises
    ------
    UsageError, DataError, StoreError, StageError
        With one line saying what to fix; nothing is published then.
    """
    from mlwf.engine.interrupts import deferred
    from mlwf.model import MAX_MEMBERS, MAX_TREES, manifest_key
    from mlwf.model import publish as publish_model
    from mlwf.storage import check_prefix

    config = (config or TrainingConfig()).check()
    heavy = check_state(state) == "heavy"
    for name, v in (("NUM_PCA", num_pca), ("NUM_TRAIN", num_train)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{name} must be a positive integer, got {v!r}")
        if v > MAX_MEMBERS:
            raise UsageError(f"{name} must be at most {MAX_MEMBERS:,} (a model holds at most {MAX_MEMBERS:,} "
                             f"members), got {v:,}")
    if num_train < num_pca:
        raise UsageError(f"NUM_TRAIN ({num_train}) must be at least NUM_PCA ({num_pca}): "
                         "each PCA function feeds at least one training function")
    if num_train * config.n_trees > MAX_TREES:
        raise UsageError(f"{num_train} training functions of {config.n_trees} trees make "
                         f"{num_train * config.n_trees:,} trees, more than the {MAX_TREES:,} a model may hold: "
                         "use fewer training functions or --trees")
    check_prefix(data_prefix)
    manifest_key(model_prefix)
    if not data_prefix.strip().strip("/").strip():
        raise UsageError("DATA_PREFIX is empty: give the prefix of the images, e.g. ml-training/mnist-images-2k")
    engine.store.require_bucket()

    cfg = config.recorded()
    # The state is a parameter of heavy runs only: a light run's record (and so --resume of one
    # started before the variant existed) is what it was.
    params = {"data_prefix": data_prefix, "num_pca": num_pca, "num_train": num_train,
              "model_prefix": model_prefix, **cfg, **({"state": state} if heavy else {})}
    run = engine.start_run(WORKFLOW, params, resume=resume)
    enforce = publish and not allow_unvalidated
    try:
        [part] = run.run_calls(partition=[dict(prefix=data_prefix, num_pca=num_pca, num_train=num_train,
                                               holdout=config.holdout, seed=config.seed,
                                               n_components=config.n_components, image_size=config.image_size,
                                               **({"state": state} if heavy else {}))])["partition"]
        classes = part.info["classes"]
        if enforce:
            _require_validation(classes, part.info["holdout_per_class"], data_prefix, decoded=False)
        whole = config.train_rows == "partition"
        # Heavy: each PCA call hands on its whole feature matrix, each train call is told its rows.
        pcas = run.run_calls(pca=[dict(assignment=assignment, image_size=config.image_size,
                                       n_components=config.n_components, seed=config.seed, index=i,
                                       **({"whole": True} if whole or heavy else {}))
                                  for i, assignment in enumerate(part.outputs["assignments"])])["pca"]
        _require_decoded_classes(classes, pcas, data_prefix)
        train_calls = []
        for i, out in enumerate(pcas):
            # With whole partitions, a PCA function's training functions all read its one slice.
            n_slices = part.info["train_per_pca"][i]
            refs = out.outputs["slices"] * (n_slices if whole or heavy else 1)
            ranges = row_ranges(out.info["num_images"], n_slices) if heavy and not whole else [None] * len(refs)
            for ref, rows in zip(refs, ranges):
                train_calls.append(dict(data=ref, num_classes=len(classes), n_trees=config.n_trees,
                                        max_depth=config.max_depth, min_samples_split=config.min_samples_split,
                                        seed=config.seed, index=len(train_calls), projection=i,
                                        **({"forest": config.forest} if config.forest != "random" else {}),
                                        **({"rows": rows} if rows is not None else {})))
        trains = run.run_calls(train=train_calls)["train"]
        model_config = {**cfg, "num_pca": num_pca, "num_train": num_train,
                        "data_prefix": data_prefix, "trained_with": _versions()}
        members = [t.outputs["member"] for t in trains]
        projections = [p.outputs["projection"] for p in pcas]
        scores = run.run_calls(score=[dict(holdout=share, members=members, projections=projections, classes=classes,
                                           image_size=config.image_size)
                                      for share in part.outputs["holdout"]])["score"]
        [val] = run.run_calls(validation=[dict(members=members, projections=projections,
                                               scores=[s.outputs["scores"] for s in scores], classes=classes,
                                               image_size=config.image_size, config=model_config)])["validation"]
        model_ref = val.outputs["model"]
        validated = _validation_problem(classes, val.info["per_class"]) is None
        if enforce:
            _require_validation(classes, val.info["per_class"], data_prefix, decoded=True)
        skipped = sum(p.info["skipped"] for p in pcas) + val.info["skipped"]
        examples = [k for p in pcas for k in p.info["skipped_examples"]] + val.info["skipped_examples"]
        summary = {
            "num_images": part.info["num_images"],
            "num_train_images": part.info["num_train_images"] - sum(p.info["skipped"] for p in pcas),
            "num_validation": val.info["num_validation"],
            "classes": classes,
            "validation_accuracy": val.info["accuracy"],
            "validation_per_class": val.info["per_class"],
            "validated": validated,
            "confusion": val.info["confusion"],
            "skipped": skipped,
            "skipped_examples": examples[:_EXAMPLES],
            "skipped_reasons": merged_reasons([*(p.info["skipped_reasons"] for p in pcas),
                                               val.info["skipped_reasons"]]),
            "unlabelled": part.info["unlabelled"],
            "unlabelled_examples": part.info["unlabelled_examples"],
            "train_per_pca": part.info["train_per_pca"],
            "model_digest": model_ref.sha256,
            "model_bytes": model_ref.nbytes,
            "model_prefix": model_prefix if publish else None,
            "state": state,
        }
        model = run.read_bytes(model_ref) if publish else b""
        # Published and recorded as one step: a Ctrl-C meanwhile waits until both are done, so a run
        # whose model is out never says 'interrupted' (the publish alone is atomic either way).
        with deferred():
            if publish:
                t = time.perf_counter()
                publish_model(engine.store, model_prefix, model, run_id=run.run_id,
                              summary={"validation_accuracy": val.info["accuracy"], "validated": validated,
                                       "classes": classes, "num_train_images": summary["num_train_images"]})
                summary["publish_ms"] = round((time.perf_counter() - t) * 1e3, 3)
            report = run.report(**summary)
            run.finish(report)
    except BaseException as e:
        run.fail(e)
        raise
    return report


def _validation_problem(classes: list[str], per_class: list[int], what: str = "held-out images") -> str | None:
    """What keeps held-out counts ``per_class`` from meeting the validation rule, or None."""
    short = [(c, n) for c, n in zip(classes, per_class) if n < MIN_VALIDATION_PER_CLASS]
    if not short:
        return None
    counts = ", ".join(f"{c!r}: {n}" for c, n in short[:3]) + (", …" if len(short) > 3 else "")
    return f"{len(short)} of {len(classes)} classes have fewer than {MIN_VALIDATION_PER_CLASS} {what} ({counts})"


def _require_validation(classes: list[str], per_class: list[int], data_prefix: str, *, decoded: bool) -> None:
    problem = _validation_problem(classes, per_class, "decodable held-out images" if decoded else "held-out images")
    if problem:
        raise DataError(f"refusing to publish a model validated on too few images under {data_prefix!r}: "
                        f"{problem}; add images, raise --holdout, or pass --allow-unvalidated to publish it anyway")


def _require_decoded_classes(classes: list[str], pcas: list, data_prefix: str) -> None:
    """Count classes by the images that decoded, not by the folders: refuse a class with none."""
    decoded = np.zeros(len(classes), dtype=np.int64)
    for p in pcas:
        counts = p.info["decoded_per_class"]
        decoded[: len(counts)] += counts
    empty = [classes[i] for i in np.flatnonzero(decoded == 0)]
    if empty:
        examples = [k for p in pcas for k in p.info["skipped_examples"]][:2]
        raise DataError(f"class {'folders' if len(empty) > 1 else 'folder'} "
                        f"{', '.join(repr(c) for c in empty[:3])}{', …' if len(empty) > 3 else ''} under "
                        f"{data_prefix!r} hold no decodable training image "
                        f"({sum(p.info['skipped'] for p in pcas)} objects skipped, e.g. {', '.join(examples)}): "
                        "fix or remove them; a classifier needs images of every class")


def _versions() -> dict[str, str]:
    """The library versions the stages train with, read from the installed packages.

    The driver never imports scikit-learn (0.6 s): only the stage functions use it.
    """
    from importlib.metadata import version

    from mlwf import __version__

    return {"mlwf": __version__, "scikit-learn": version("scikit-learn"), "numpy": np.__version__}
