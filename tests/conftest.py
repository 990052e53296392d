"""Shared fixtures: a local store holding real PNG datasets, and engines on it.

Everything a test needs is generated here (scikit-learn's bundled digits); no
test reads ../shared or downloads anything.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlwf import bulk, datasets
from mlwf.engine.driver import Engine
from mlwf.settings import BLAS_THREAD_VARIABLES
from mlwf.storage import StoreSpec
from mlwf.workflows.training import TrainingConfig

pytest_plugins = ["tests.s3server", "tests.raycluster"]

TRAIN_PREFIX = "ml-training/digits"
BATCH_PREFIX = "ml-inference/digits-batch"
#: Small settings so a whole training run takes a fraction of a second.
FAST = TrainingConfig(image_size=16, n_components=6, n_trees=12, max_depth=8, holdout=0.2, seed=0)


def _watched_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("MLWF_") or k in BLAS_THREAD_VARIABLES}


@pytest.fixture(autouse=True)
def _environment_left_as_found():
    """A test that changes mlwf's variables or the BLAS thread counts for the tests after it fails here
    (monkeypatch's changes are undone before this looks). The variables are put back either way."""
    before = _watched_environment()
    yield
    after = _watched_environment()
    if after != before:
        for name in set(before) | set(after):
            if name in before:
                os.environ[name] = before[name]
            else:
                os.environ.pop(name, None)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        pytest.fail(f"the test left these variables changed in the test process: {', '.join(changed)}")


@pytest.fixture
def in_process_serve(monkeypatch):
    """For a test that runs ``mlwf serve`` in the test process: it pins BLAS to one thread for its own
    process (where unset), here for this test only."""
    for name in BLAS_THREAD_VARIABLES:
        monkeypatch.setenv(name, os.environ.get(name, "1"))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The first 600 digits as PNG class folders; the next 120 in a batch folder."""
    root = tmp_path_factory.mktemp("digits")
    datasets.write_digits(root / "all", n=720)
    train, batch = root / "train", root / "batch"
    for png in sorted((root / "all").rglob("*.png")):
        target = (batch if int(png.stem) >= 600 else train) / png.parent.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, target / png.name)
    return root


@pytest.fixture
def store_url(tmp_path, digits_dir) -> str:
    """A fresh local store with the digits uploaded under TRAIN_PREFIX and BATCH_PREFIX."""
    url = str(tmp_path / "store")
    store = StoreSpec(url, "tless").open()
    bulk.upload_dir(store, digits_dir / "train", TRAIN_PREFIX, create_bucket=True)
    bulk.upload_dir(store, digits_dir / "batch", BATCH_PREFIX)
    return url


@pytest.fixture
def engine(store_url):
    with Engine(store_url, "tless") as e:
        yield e


@pytest.fixture
def trained(engine):
    """An engine whose store has a model published at ml-inference/model."""
    report = engine.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
    return engine, report


@dataclass(frozen=True)
class LocalReference:
    """What the local backend makes of the digits with FAST: training (``2 4``, published at
    ml-inference/model of its own store), then inference of the batch (``4``) with that model."""

    trained: dict
    inferred: dict
    rows: list  # the inference's results CSV, as rows


@pytest.fixture(scope="session")
def local_reference(tmp_path_factory, digits_dir) -> LocalReference:
    """The reference other backends' and stores' runs must match, made once per session on a store of its own
    (each test used to make the same two runs again on its own store)."""
    url = str(tmp_path_factory.mktemp("reference") / "store")
    store = StoreSpec(url, "tless").open()
    bulk.upload_dir(store, digits_dir / "train", TRAIN_PREFIX, create_bucket=True)
    bulk.upload_dir(store, digits_dir / "batch", BATCH_PREFIX)
    with Engine(url, "tless") as local:
        trained = local.run_training(TRAIN_PREFIX, 2, 4, config=FAST)
        inferred = local.run_inference("ml-inference/model", BATCH_PREFIX, 4)
        rows = list(csv.reader(io.StringIO(local.store.get(inferred["results_key"]).decode())))
    return LocalReference(trained, inferred, rows)


@pytest.fixture(scope="session")
def local_training(local_reference) -> dict:
    """The report of :func:`local_reference`'s training run."""
    return local_reference.trained


@pytest.fixture(scope="session")
def local_model_digest(local_reference) -> str:
    """The digest of :func:`local_reference`'s model."""
    return local_reference.trained["model_digest"]


#: Test modules that start Ray (an instance in the test process, a cluster, or a run on it): under
#: pytest-xdist they share one worker, so two Ray instances never compete for the 2 cores at once.
_RAY_MODULES = {"test_ray", "test_ray_cluster", "test_processes", "test_third_workflow"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup`` (the default addopts) each module's tests run on one worker, in order, so a
    module's fixtures (a venv, servers, a Ray cluster) are made once; the Ray modules share one worker."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else item.nodeid
        item.add_marker(pytest.mark.xdist_group("ray" if module in _RAY_MODULES else module))
