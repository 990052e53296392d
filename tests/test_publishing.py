"""Publishing and rolling back a model: compare-and-swap on the manifest, nothing lost, nothing forged."""

from __future__ import annotations

import json
import threading

import pytest

import mlwf.model
from mlwf import codec
from mlwf.cli import main
from mlwf.errors import ModelError, UsageError
from mlwf.storage import open_store
from mlwf.storage.local import LocalStore
from tests.test_model import _tree_meta

PREFIX = "ml-inference/model"


def model_bytes(i: int) -> bytes:
    """A small valid model; each ``i`` gives other bytes."""
    import numpy as np

    meta = _tree_meta(threshold=np.array([0.001 * (i + 1), 0.5, 0, 0, 0]))
    return mlwf.model.from_bytes(codec.encode(meta)).to_bytes()


@pytest.fixture(params=["local", "s3"])
def make_store(request, tmp_path):
    """A factory of store objects on one bucket (each publisher gets its own, as separate processes would)."""
    if request.param == "local":
        url, bucket = str(tmp_path / "store"), "tless"
        LocalStore(url, bucket).create_bucket()
    else:
        url, bucket = "s3://", request.getfixturevalue("s3_env")
    opened = []

    def make():
        opened.append(open_store(url, bucket))
        return opened[-1]

    make.argv = ["--store", url, "--bucket", bucket]
    yield make
    for s in opened:
        s.close()


def everything_published(manifest: dict) -> list[str]:
    return [manifest["sha256"]] + [h["sha256"] for h in manifest["history"]]


def snapshot(store) -> dict[str, bytes]:
    keys = [o.key for o in store.list()]
    return dict(zip(keys, store.get_many(keys)))


def test_eight_concurrent_publishers_lose_no_history_entry(make_store):
    store = make_store()
    mlwf.model.publish(store, PREFIX, model_bytes(0), run_id="first")
    models = [model_bytes(i) for i in range(1, 9)]
    stores = [make_store() for _ in models]
    start = threading.Barrier(len(models))
    errors = []

    def publish(i):
        try:
            start.wait()
            mlwf.model.publish(stores[i], PREFIX, models[i], run_id=f"run-{i}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    manifest = mlwf.model.read_manifest(store.get, PREFIX)
    published = everything_published(manifest)
    assert len(published) == len(set(published)) == 9
    assert set(published) == {codec.digest(m) for m in [model_bytes(0), *models]}
    assert manifest["history"][-1]["run_id"] == "first"
    assert mlwf.model.load(PREFIX, store=store).digest == manifest["sha256"]


class _LostAnswer:
    """A store whose first conditional replace lands but reports False (an S3 retry after a lost answer).

    With ``overtaken``, another publisher also lands on top before the answer comes back.
    """

    def __init__(self, store, overtaken: bytes | None = None):
        self._store, self._overtaken = store, overtaken
        self.calls = 0

    def put_if_tag(self, key, data, tag):
        self.calls += 1
        written = self._store.put_if_tag(key, data, tag)
        if self.calls == 1:
            assert written
            if self._overtaken is not None:
                mlwf.model.publish(self._store, PREFIX, self._overtaken, run_id="overtaker")
            return False
        return written

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_a_write_reported_lost_that_landed_is_not_published_twice(make_store):
    store = make_store()
    mlwf.model.publish(store, PREFIX, model_bytes(0), run_id="first")
    flaky = _LostAnswer(store)
    manifest = mlwf.model.publish(flaky, PREFIX, model_bytes(1), run_id="second")
    assert flaky.calls == 1
    assert mlwf.model.read_manifest(store.get, PREFIX) == manifest
    assert everything_published(manifest) == [codec.digest(model_bytes(1)), codec.digest(model_bytes(0))]


def test_a_write_reported_lost_and_then_overtaken_is_kept_in_the_history_once(make_store):
    store = make_store()
    mlwf.model.publish(store, PREFIX, model_bytes(0), run_id="first")
    flaky = _LostAnswer(store, overtaken=model_bytes(2))
    mlwf.model.publish(flaky, PREFIX, model_bytes(1), run_id="second")
    manifest = mlwf.model.read_manifest(store.get, PREFIX)
    assert everything_published(manifest) == [codec.digest(model_bytes(i)) for i in (2, 1, 0)]
    assert manifest["run_id"] == "overtaker"


def test_rollback_is_compare_and_swap_too(make_store):
    store = make_store()
    for i in range(3):
        mlwf.model.publish(store, PREFIX, model_bytes(i), run_id=f"r{i}")
    flaky = _LostAnswer(store)
    manifest = mlwf.model.rollback(flaky, PREFIX)
    assert flaky.calls == 1 and manifest["sha256"] == codec.digest(model_bytes(1))
    assert everything_published(mlwf.model.read_manifest(store.get, PREFIX)) == \
        [codec.digest(model_bytes(i)) for i in (1, 2, 0)]


def _forge(store, change) -> None:
    manifest = json.loads(store.get(f"{PREFIX}/MODEL.json"))
    change(manifest)
    store.put(f"{PREFIX}/MODEL.json", json.dumps(manifest).encode())


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(history="not a list"), "history is not a list"),
    (lambda m: m.update(history=["x"]), "history entry 1 is not an object"),
    (lambda m: m.update(history=[{}]), "history entry 1 has no valid sha256"),
    (lambda m: m["history"][0].update(sha256="0" * 63), "history entry 1 has no valid sha256"),
    (lambda m: m["history"][0].update(sha256=["a"]), "history entry 1 has no valid sha256"),
    (lambda m: m["history"][0].update(object="../x.mlwf"), "history entry 1 names an object other than"),
    (lambda m: m["history"][0].update(object="data/0/a.png"), "history entry 1 names an object other than"),
    (lambda m: m.update(object=m["object"].replace("versions", "elsewhere")), "current model names an object"),
    (lambda m: m.update(format="other"), "not an mlwf model manifest"),
    (lambda m: m.update(run_id="\x1b]0;terminal title\x07"), "current model has a run_id that is not plain text"),
    (lambda m: m["history"][0].update(published_at=["2026"]), "history entry 1 has a published_at that is not"),
    (lambda m: m.update(size="big"), "current model has a size that is not a byte count"),
])
def test_a_malformed_or_forged_manifest_is_refused_in_one_line_and_changes_nothing(make_store, capsys, change,
                                                                                  match):
    store = make_store()
    store.put("data/0/a.png", b"not a model")
    for i in range(2):
        mlwf.model.publish(store, PREFIX, model_bytes(i), run_id=f"r{i}")
    _forge(store, change)
    before = snapshot(store)
    for argv in (["model", "rollback"], ["model", "show"]):
        assert main([*argv, *make_store.argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err and "Traceback" not in err
    assert snapshot(store) == before


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b"{", b'"x" ' * 300_000, b"null"])
def test_a_manifest_that_is_not_one_is_refused_in_one_line(make_store, capsys, raw):
    store = make_store()
    store.put(f"{PREFIX}/MODEL.json", raw)
    for argv in (["model", "rollback"], ["model", "show"]):
        assert main([*argv, *make_store.argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is corrupt" in err and len(err) < 300
    assert store.get(f"{PREFIX}/MODEL.json") == raw


def test_rollback_to_a_missing_or_changed_earlier_object_is_refused(make_store, capsys):
    store = make_store()
    for i in range(2):
        mlwf.model.publish(store, PREFIX, model_bytes(i), run_id=f"r{i}")
    earlier = f"{PREFIX}/versions/{codec.digest(model_bytes(0))}.mlwf"
    store.put(earlier, model_bytes(5))
    before = snapshot(store)
    assert main(["model", "rollback", *make_store.argv]) == 2
    assert "does not match its checksum" in capsys.readouterr().err
    store.delete(earlier)
    assert main(["model", "rollback", *make_store.argv]) == 2
    assert "is gone" in capsys.readouterr().err
    assert snapshot(store) == {k: v for k, v in before.items() if k != earlier}


def test_publishing_over_a_corrupt_manifest_replaces_it(make_store):
    store = make_store()
    store.put(f"{PREFIX}/MODEL.json", b"{corrupt")
    manifest = mlwf.model.publish(store, PREFIX, model_bytes(0), run_id="r")
    assert mlwf.model.load(PREFIX, store=store).digest == manifest["sha256"] and manifest["history"] == []


def test_publishing_repairs_a_damaged_object_at_its_content_address(make_store):
    store = make_store()
    data = model_bytes(0)
    store.put(f"{PREFIX}/versions/{codec.digest(data)}.mlwf", b"damaged")
    mlwf.model.publish(store, PREFIX, data, run_id="r")
    assert mlwf.model.load(PREFIX, store=store).digest == codec.digest(data)


@pytest.mark.parametrize("prefix", ["", " ", "/", "//"])
def test_a_blank_model_prefix_is_refused(make_store, capsys, prefix):
    store = make_store()
    with pytest.raises(UsageError, match="names no folder"):
        mlwf.model.publish(store, prefix, model_bytes(0), run_id="r")
    with pytest.raises(UsageError, match="names no folder"):
        mlwf.model.rollback(store, prefix)
    with pytest.raises((UsageError, ModelError)):
        mlwf.model.load(prefix, store=store)
    for argv in (["model", "show", prefix], ["model", "rollback", prefix]):
        assert main([*argv, *make_store.argv]) == 2
        assert "names no folder" in capsys.readouterr().err
    assert store.list() == []
