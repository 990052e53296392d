"""What the command groups share: the parser class, the flag groups, the mappings from flags to settings."""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import re
import sys
from typing import Any

from mlwf.backends import TRANSFERS
from mlwf.errors import UsageError

BUCKET_HELP = "bucket (default: $MLWF_BUCKET, else 'tless')"
_MAX_STAGE_CPUS = 4096
_MAX_STAGE_MB = 1 << 30  # 1 PiB: a bound that keeps the number finite, not a sizing rule
#: Exit status after Ctrl-C (128 + SIGINT, as a shell reports a process ended by it).
INTERRUPTED_EXIT = 130

#: What each positional argument is, by its name in the usage line: the help of a positional
#: added without one (every command's positionals are explained in its --help).
POSITIONAL_HELP = {
    "OUT": "folder to write the images to, as class folders OUT/<class>/<index>.png",
    "IMAGES": "IDX file of images (such as train-images-idx3-ubyte.gz; gzipped or not)",
    "LABELS": "IDX file of their labels (such as train-labels-idx1-ubyte.gz; gzipped or not)",
    "MODEL_PREFIX": "where the model is published in the store (ml-training publishes to ml-inference/model "
                    "unless told --model-prefix)",
}
_INVALID_CHOICE = re.compile(r"argument (?P<name>.+?): invalid choice: (?P<value>'.*') \(choose from (?P<choices>.*)\)$")
_REQUIRED = re.compile(r"the following arguments are required: (?P<names>.*)$")


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors a person can act on: one line, in the words of the command line
    (a command, a flag, a value), with a "did you mean" for a mistyped command, flag or choice,
    and the help of the command the words were given to."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The innermost parser a parse reached (a subcommand's defaults override its parent's):
        # the command whose flags an unknown flag is compared with, and whose help to point to.
        self.set_defaults(_parser=self)

    def add_argument(self, *args, **kwargs):
        """As argparse's; a positional given no help gets the one :data:`POSITIONAL_HELP` has for its name."""
        if args and not args[0].startswith("-") and kwargs.get("help") is None:
            kwargs["help"] = POSITIONAL_HELP.get(kwargs.get("metavar") or args[0].upper())
        return super().add_argument(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):  # noqa: D102 - argparse's, with the errors below
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            getattr(parsed, "_parser", self).unrecognized(extras)
        return parsed

    def unrecognized(self, extras: list[str]):
        """Refuse words this command does not take, naming the nearest flag it has."""
        flag = next((word for word in extras if word.startswith("-") and word != "-"), None)
        if flag is None:
            words = " ".join(extras)
            self.fail(f"'{self.prog}' takes no argument{'s' if len(extras) > 1 else ''} {words!r} "
                      "(quote a value with spaces; flags start with --)")
        name = flag.partition("=")[0]
        flags = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        self.fail(f"unknown flag {name} for '{self.prog}'{_did_you_mean(name, flags)}")

    def fail(self, message: str):
        """A usage error: ``message`` and where to read more."""
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def error(self, message: str):  # noqa: D401 - argparse's hook
        commands = {action.dest: action for action in self._actions if isinstance(action, argparse._SubParsersAction)}
        invalid = _INVALID_CHOICE.match(message)
        if invalid:
            value = ast.literal_eval(invalid["value"])
            try:
                choices = [str(c) for c in ast.literal_eval(f"[{invalid['choices']}]")]
            except (ValueError, SyntaxError):
                choices = []
            if invalid["name"] in commands:
                suggestion = _did_you_mean(value, choices, f"{self.prog} ")
                self.fail(f"unknown command '{self.prog} {value}'"
                          + (suggestion or f": choose one of {_either(choices)}"))
            self.fail(f"{invalid['name']} {value!r} is not one of {_either(choices)}"
                      f"{_did_you_mean(value, choices)}")
        required = _REQUIRED.match(message)
        if required:
            names = required["names"].split(", ")
            missing = [n for n in names if n in commands]
            if missing:
                choices = list(commands[missing[0]].choices)
                self.fail(f"'{self.prog}' needs a command: {_either(choices)}")
        self.fail(message)


def _did_you_mean(word: str, candidates: list[str], prefix: str = "") -> str:
    """``": did you mean 'X'?"`` for the candidate nearest ``word``, or "" if none is near."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f": did you mean '{prefix}{close[0]}'?" if close else ""


def _either(choices: list[str]) -> str:
    return ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else "".join(choices)


def common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    """--store, --bucket, --json, --debug."""
    p.add_argument("--store", help="store: a directory, file://DIR or s3:// (default: $MLWF_STORE, "
                                   "else ~/.local/share/mlwf/store)")
    p.add_argument("--bucket", help=BUCKET_HELP)
    if json_flag:
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def engine_options(p: argparse.ArgumentParser) -> None:
    """How a run runs: backend, transfer, retries, timeouts, and each backend's own flags."""
    p.add_argument("--backend", default="local", help="where stages run: local (default), ray or knative")
    p.add_argument("--transfer", default="store", choices=TRANSFERS,
                   help="how state moves between stages: through the object store (default, as in the reference), "
                        "directly from call to call (direct: local, ray), inline in each call and reply "
                        "(payload: local, knative), or written once into shared memory that the next calls map "
                        "(shm: local)")
    p.add_argument("--workers", type=int, help="worker processes for the local backend (default: one per core)")
    p.add_argument("--retries", type=int, default=2, help="extra attempts for a failed call (default 2)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a call may run before it is retried (default 600)")
    p.add_argument("--resume", metavar="RUN_ID",
                   help="finish an interrupted run (the same command line, plus --resume and its run id, or "
                        "'latest': the newest interrupted run of this workflow with these arguments): reuse its "
                        "calls whose outputs verify, rerun the rest; a run that succeeded is left as it is")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray instance for the run)")
    p.add_argument("--no-ray-pool", dest="ray_pool", action="store_false",
                   help="ray backend: run every call as a Ray task even if the cluster has an mlwf worker pool")
    p.add_argument("--shared-store", action="store_true",
                   help="ray backend: the directory store is mounted at the same path on every node")
    p.add_argument("--stage-cpus", action="append", default=[], metavar="STAGE=N",
                   help="ray backend: CPUs per call of STAGE (default 1; repeatable)")
    p.add_argument("--stage-memory", action="append", default=[], metavar="STAGE=MB",
                   help="ray backend: memory per call of STAGE in MB (repeatable)")
    p.add_argument("--endpoint", action="append", default=[], metavar="URL|STAGE=URL",
                   help="knative backend: the function service URL, or STAGE=URL per stage (repeatable)")
    p.add_argument("--trace", metavar="FILE",
                   help="write the run as a Chrome/Perfetto trace (JSON) to FILE; draw it with 'mlwf trace plot'")


#: The training settings as flags: (flag, TrainingConfig field, type, help). The one mapping between the
#: two, for ``mlwf run``, ``mlwf bench`` and the cold ``mlwf run`` command lines bench writes. ``{}`` in a
#: help is the setting's default (:data:`mlwf.presets.DEFAULTS`).
TRAINING_FLAGS = (
    ("--seed", "seed", int, "run seed (default {}): same seed and data, same model bytes"),
    ("--image-size", "image_size", int, "images are resized to N×N (default {})"),
    ("--components", "n_components", int, "PCA components (default {})"),
    ("--trees", "n_trees", int, "trees per forest (default {})"),
    ("--max-depth", "max_depth", int, "tree depth (default {})"),
    ("--min-samples-split", "min_samples_split", int, "fewest samples a node needs to be split (default {})"),
    ("--holdout", "holdout", float, "fraction held out for validation (default {})"),
    ("--forest", "forest", str, "random forests (random, the default, as the reference) or extra trees (extra: "
                                "faster to fit)"),
    ("--train-rows", "train_rows", str, "each training function learns from its own slice of its PCA "
                                        "function's images (slice, the default, as the reference) or from all "
                                        "of them (partition)"),
)


def training_arguments(p: argparse.ArgumentParser) -> None:
    """ml-training's arguments and settings (mlwf run and mlwf bench)."""
    from mlwf.presets import DEFAULT_MODEL_PREFIX, DEFAULTS, PRESETS

    p.add_argument("data_prefix", metavar="DATA_PREFIX",
                   help="where the labelled images are in the store, as class folders DATA_PREFIX/<class>/<image> "
                        "(put them there with 'mlwf s3 upload-dir')")
    p.add_argument("num_pca", metavar="NUM_PCA", type=int,
                   help="PCA functions: the training images are dealt among them, each fits its own projection")
    p.add_argument("num_train", metavar="NUM_TRAIN", type=int,
                   help="training functions, each fitting one forest of the model (at least NUM_PCA)")
    flags = {name: flag for flag, name, _, _ in TRAINING_FLAGS}
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="a set of the settings below (flags given as well override it): "
                        + "; ".join(f"{preset} = " + " ".join(f"{flags[k]} {v}" for k, v in values.items())
                                    for preset, values in PRESETS.items()))
    # Defaults are None here: a flag given on the command line overrides the --preset's value.
    for flag, name, kind, help_text in TRAINING_FLAGS:
        p.add_argument(flag, dest=name, type=kind, default=None, help=help_text.format(DEFAULTS.get(name)),
                       metavar=flag[2:].upper().replace("-", "_"))
    p.add_argument("--model-prefix", default=DEFAULT_MODEL_PREFIX,
                   help=f"where the model is published (default {DEFAULT_MODEL_PREFIX})")
    p.add_argument("--no-publish", action="store_true", help="train and validate, but publish nothing")


def state_argument(p: argparse.ArgumentParser) -> None:
    """``--state light|heavy`` (mlwf run and invoke, both workflows): how much state the stages hand on."""
    from mlwf.workflows.state import STATES

    p.add_argument("--state", default=STATES[0], choices=STATES,
                   help="what the stages hand each other: image keys, each function fetching and decoding its "
                        "own (light, the default, as the reference), or the decoded pixels and whole feature "
                        "matrices (heavy: the state-transfer study's variant; the same model and predictions)")


def allow_unvalidated_argument(p: argparse.ArgumentParser) -> None:
    """``--allow-unvalidated`` (mlwf run and invoke ml-training)."""
    p.add_argument("--allow-unvalidated", action="store_true",
                   help="publish even if validated on fewer than 2 decodable held-out images of some class "
                        "(or none at all)")


def inference_arguments(p: argparse.ArgumentParser) -> None:
    """ml-inference's arguments (mlwf run, invoke and bench)."""
    p.add_argument("model_prefix", metavar="MODEL_PREFIX",
                   help="where ml-training published the model in the store (its default: ml-inference/model)")
    p.add_argument("data_prefix", metavar="DATA_PREFIX",
                   help="where the images to classify are in the store (in class folders, their accuracy is "
                        "measured too)")
    p.add_argument("num_funcs", metavar="NUM_FUNCS", type=int,
                   help="predict functions the images are dealt among")


def training_config(args):
    """The :class:`~mlwf.workflows.training.TrainingConfig` the training flags in ``args`` say."""
    from mlwf.presets import PRESETS
    from mlwf.workflows.training import TrainingConfig

    values = dict(PRESETS[args.preset]) if args.preset else {}
    values.update({name: getattr(args, name) for _, name, _, _ in TRAINING_FLAGS if getattr(args, name) is not None})
    return TrainingConfig(**values)


def training_flags(config, *, changed_only: bool = False) -> list[str]:
    """``config`` as training flags (those that differ from the defaults, with ``changed_only``)."""
    from mlwf.workflows.training import TrainingConfig

    default = TrainingConfig()
    argv: list[str] = []
    for flag, name, _, _ in TRAINING_FLAGS:
        value = getattr(config, name)
        if not changed_only or value != getattr(default, name):
            argv += [flag, str(value)]
    return argv


def backend_config(args):
    """The backend's config from the run flags (the mapping :func:`mlwf.backends.config_from_flags` owns)."""
    from mlwf.backends import config_from_flags

    resources = stage_resources(args)  # checked whatever the backend, so a bad value never passes silently
    return config_from_flags(args.backend, workflow=args.workflow, workers=args.workers,
                             ray_address=args.ray_address, shared_store=args.shared_store,
                             stage_resources=resources, endpoints=args.endpoint, ray_pool=args.ray_pool)


def stage_resources(args) -> dict[str, dict[str, Any]]:
    """``--stage-cpus train=2 --stage-memory train=512`` as ``{"train": {"num_cpus": 2, "memory": 512 MiB}}``."""
    out: dict[str, dict[str, Any]] = {}
    for flag, items, key in (("--stage-cpus", args.stage_cpus, "num_cpus"),
                             ("--stage-memory", args.stage_memory, "memory")):
        for item in items:
            stage, sep, value = item.partition("=")
            try:
                number = float(value)
            except ValueError:
                number = -1.0
            high = _MAX_STAGE_CPUS if key == "num_cpus" else _MAX_STAGE_MB
            if not sep or not stage or not 0 < number <= high:  # also refuses nan and inf
                raise UsageError(f"{flag} {item!r}: expected STAGE={'N' if key == 'num_cpus' else 'MB'} "
                                 f"with a positive number up to {high:,}, e.g. train=2")
            out.setdefault(stage, {})[key] = number if key == "num_cpus" else int(number * 2**20)
    return out


def emit(args, report: dict[str, Any]) -> None:
    """A report as one JSON object (``--json``) or as text."""
    if args.json:
        print(json.dumps(report, sort_keys=False))
        return
    from mlwf.terminal import print_report

    print_report(report)


def open_store(args):
    """The store ``--store``/``--bucket`` (and the environment) name, opened; the workflows
    ``MLWF_WORKFLOW_MODULES`` names are known from here on (``mlwf runs`` lists their runs too)."""
    from mlwf import workflows
    from mlwf.settings import Settings
    from mlwf.storage import StoreSpec

    settings = Settings.resolve(store=args.store, bucket=args.bucket)
    workflows.use(settings.workflow_modules)
    return StoreSpec.from_settings(settings).open(settings)


def version() -> str:
    from mlwf import __version__

    return __version__


#: How a path of this machine starts; no key mlwf writes or reads starts so.
_LOCAL_PATH = re.compile(r"(/|\./|\.\./|~|\.$|\.\.$|[A-Za-z]:[\\/])")


def check_prefix_arguments(args) -> None:
    """Refuse, before anything starts, a folder of this machine given where a prefix in the store is
    expected (DATA_PREFIX, MODEL_PREFIX, --model-prefix), saying how to upload it."""
    import os
    import posixpath
    import shlex

    where = [word for flag, value in (("--store", args.store), ("--bucket", args.bucket)) if value
             for word in (flag, value)]
    workflow = getattr(args, "workflow", None) or getattr(args, "bench_workflow", None)
    for dest, name in (("data_prefix", "DATA_PREFIX"), ("model_prefix", "MODEL_PREFIX")):
        value = getattr(args, dest, None)
        if not isinstance(value, str) or not _LOCAL_PATH.match(value):
            continue
        if dest == "model_prefix":
            flag = "--model-prefix" if workflow == "ml-training" else name
            raise UsageError(f"{flag} {value!r} is a path on this machine, but a model lives in the store: give "
                             "the prefix ml-training published it at (default ml-inference/model; 'mlwf model show "
                             "PREFIX' shows one)")
        folder = os.path.expanduser(value)  # the shell would not expand it once quoted
        name_there = posixpath.basename(os.path.normpath(folder)) if folder not in ("/", "") else ""
        prefix = f"{'ml-training' if workflow == 'ml-training' else 'ml-inference'}/{name_there or 'images'}"
        upload = shlex.join(["mlwf", "s3", "upload-dir", "--host-path", folder, "--s3-path", prefix, *where])
        raise UsageError(f"{name} {value!r} is a folder on this machine, but the workflows read images from the "
                         f"store: upload it, then give {prefix!r} as {name}; to upload it: {upload}")


def resume_command(args, run_id: str) -> str:
    """The command line that resumes ``run_id``: the user's own (``args.argv``, else this process's
    arguments), its ``--resume`` (if any) replaced, quoted for a POSIX shell."""
    from mlwf.runs import resume_command as resume

    return resume(list(getattr(args, "argv", None) or sys.argv[1:]), run_id)
