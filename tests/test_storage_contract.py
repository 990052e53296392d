"""The Store contract, run against the local store and the S3 store (moto server)."""

from __future__ import annotations

import os
import random
import uuid

import pytest

from mlwf.errors import NotFoundError, StoreError
from mlwf.storage import ObjectInfo, open_store
from mlwf.storage.local import LocalStore


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    """A factory ``make(bucket=None)`` for stores of one kind; ``None`` means the test's ready bucket."""
    if request.param == "local":
        root = tmp_path / "store"
        root.mkdir()
        LocalStore(root, "tless").create_bucket()

        def make(bucket: str | None = None):
            return open_store(str(root), bucket or "tless")

        make.kind = "local"
        make.root = root
        return make
    bucket = request.getfixturevalue("s3_env")

    def make(bucket_name: str | None = None):
        return open_store("s3://", bucket_name or bucket)

    make.kind = "s3"
    make.root = None
    return make


@pytest.fixture
def store(backend):
    s = backend()
    yield s
    s.close()


def unique_bucket() -> str:
    return f"fresh-{uuid.uuid4().hex[:12]}"


def tree(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files)


def test_put_get_round_trip(store):
    store.put("imgs/a.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    assert store.get("imgs/a.png") == b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    store.put("imgs/a.png", b"new")  # overwrite
    assert store.get("imgs/a.png") == b"new"
    store.put("empty", b"")
    assert store.get("empty") == b""
    assert store.list() == [ObjectInfo("empty", 0), ObjectInfo("imgs/a.png", 3)]


def test_list_is_by_string_prefix(store):
    for key in ["a/b/c", "a/bc", "a/c", "a/b/d/e", "ab", "b/x"]:
        store.put(key, key.encode())

    def keys(prefix):
        listed = [o.key for o in store.list(prefix)]
        assert store.list_keys(prefix) == listed  # the same keys, with or without sizes
        return listed

    assert keys("a/b") == ["a/b/c", "a/b/d/e", "a/bc"]
    assert keys("a/b/") == ["a/b/c", "a/b/d/e"]
    assert keys("a") == ["a/b/c", "a/b/d/e", "a/bc", "a/c", "ab"]
    assert keys("a/bc") == ["a/bc"]
    assert keys("a/b/d") == ["a/b/d/e"]
    assert keys("zzz") == [] and keys("a/x") == []
    assert keys("") == ["a/b/c", "a/b/d/e", "a/bc", "a/c", "ab", "b/x"]
    assert {o.key: o.size for o in store.list("a/")} == {"a/b/c": 5, "a/bc": 4, "a/c": 3, "a/b/d/e": 7}


def test_listing_is_sorted_by_key(store):
    keys = [f"s/{name}" for name in ["B", "a", "a0", "a-1", "a.1", "a_1", "Z9", "10", "9", "é", "z"]]
    keys += [f"s/n/{i}" for i in range(30)]
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    store.put_many((k, k.encode()) for k in shuffled)
    assert [o.key for o in store.list("s/")] == sorted(keys) == store.list_keys("s/")


def test_get_many_keeps_order(store):
    keys = [f"many/{i:03d}.png" for i in range(150)]
    store.put_many((k, f"data {k}".encode()) for k in keys)
    order = keys[:]
    random.Random(2).shuffle(order)
    order += order[:5]  # duplicates too
    assert store.get_many(order) == [f"data {k}".encode() for k in order]
    assert store.get_many([]) == []
    assert store.get_many(order[:1]) == [f"data {order[0]}".encode()]


def test_get_many_missing_key(store):
    store.put("m/1", b"1")
    with pytest.raises(NotFoundError, match="m/2"):
        store.get_many(["m/1", "m/2", "m/1"])


def test_delete_is_idempotent(store):
    store.put("d/x", b"1")
    store.put("d/y", b"2")
    assert store.exists("d/x")
    store.delete("d/x")
    store.delete("d/x")
    store.delete("never/there")
    assert not store.exists("d/x")
    assert [o.key for o in store.list()] == ["d/y"]
    assert store.delete_many(["d/y", "d/y", "nope"]) == 3
    assert store.delete_many(iter([])) == 0
    assert store.list() == []


def test_delete_many_large(store):
    keys = [f"dm/{i}" for i in range(1100)]
    store.put_many((k, b"x") for k in keys)
    assert len(store.list("dm/")) == 1100
    assert store.delete_many(k for k in keys) == 1100
    assert store.list("dm/") == []


def test_exists(store):
    assert not store.exists("e/x")
    store.put("e/x", b"1")
    assert store.exists("e/x")
    assert not store.exists("e")  # a 'folder' is not an object
    assert store.bucket_exists()


def test_missing_key(store):
    with pytest.raises(NotFoundError) as info:
        store.get("no/such/key.png")
    assert "no/such/key.png" in str(info.value)
    assert store.bucket in str(info.value)


def test_missing_bucket(backend):
    bucket = unique_bucket()
    store = backend(bucket)
    assert not store.bucket_exists()
    for call in (lambda: store.list(), lambda: store.get("k"), store.require_bucket):
        with pytest.raises(NotFoundError) as info:
            call()
        message = str(info.value)
        assert bucket in message and "--bucket" in message
        if backend.kind == "s3":
            assert "--create-bucket" in message
    assert not store.exists("k")


def test_keys_with_spaces_and_non_ascii(store):
    keys = [
        "dir/ünï cödé 1.png",
        "with space.png",
        "日本語/ファイル名.png",
        "emoji/🙂 x.png",
        "sym/a+b=c,d;e@f!(1).png",
        "odd/100%/#[x]~y?.png",
    ]
    for key in keys:
        store.put(key, key.encode("utf-8"))
    assert [o.key for o in store.list()] == sorted(keys)
    assert [o.key for o in store.list("dir/ü")] == ["dir/ünï cödé 1.png"]
    assert store.get_many(keys) == [k.encode("utf-8") for k in keys]
    for key in keys:
        assert store.get(key) == key.encode("utf-8")
        assert store.exists(key)
    store.delete("dir/ünï cödé 1.png")
    assert not store.exists("dir/ünï cödé 1.png")


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/../../x", "./a", "a/./b", "", "a\\b", "a\x00b", "x" * 1025,
                                 "..", "a/..", "a/" + "b" * 256, "a\nb", "a/b/"])
def test_refused_keys(backend, tmp_path, key):
    store = backend()
    before = tree(tmp_path)
    for call in (
        lambda: store.put(key, b"evil"),
        lambda: store.get(key),
        lambda: store.delete(key),
        lambda: store.exists(key),
        lambda: store.get_many([key]),
        lambda: store.put_many([(key, b"evil")]),
        lambda: store.delete_many([key]),
    ):
        with pytest.raises(StoreError):
            call()
    assert tree(tmp_path) == before
    assert not (tmp_path.parent / "x").exists()
    assert store.list() == []


def test_the_quick_check_of_plain_keys_accepts_only_keys_the_full_check_accepts():
    from mlwf.storage import base

    rng = random.Random(7)
    alphabet = "ab-_./\\\x00é"
    accepted = 0
    for _ in range(20_000):
        key = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        if base._PLAIN_KEY.fullmatch(key):
            accepted += 1
            assert base._key_problem(key) is None, key
    assert accepted > 1000  # the quick path is taken, and it is checked against the full one
    for key in ("a" * 255, "a/" + "b" * 255, "/".join(["c" * 200] * 5)[:1024]):
        assert base._PLAIN_KEY.fullmatch(key) and base._key_problem(key) is None
    for key in ("a" * 256, "..", ".x", "a/.", "a//b", "a/", "é"):
        assert not base._PLAIN_KEY.fullmatch(key)


@pytest.mark.parametrize("prefix", ["../", "/abs", "a//"])
def test_refused_prefixes(store, prefix):
    with pytest.raises(StoreError):
        store.list(prefix)


def test_create_bucket(backend):
    store = backend(unique_bucket())
    assert not store.bucket_exists()
    store.create_bucket()
    assert store.bucket_exists()
    store.create_bucket()  # again: fine
    store.put("k", b"v")
    assert store.get("k") == b"v"
    assert store.list() == [ObjectInfo("k", 1)]


def test_repr_and_url(store):
    assert store.bucket in repr(store)
    assert store.location in repr(store)


def test_objects_put_by_boto3_are_readable(s3_server, s3_env):
    client = s3_server.boto3_client()
    keys = ["b3/plain.png", "b3/ünï cödé 1.png", "b3/deep/er/x"]
    for key in keys:
        client.put_object(Bucket=s3_env, Key=key, Body=key.encode())
    store = open_store("s3://", s3_env)
    assert [o.key for o in store.list("b3/")] == sorted(keys)
    assert store.get_many(keys) == [k.encode() for k in keys]
    # and the other way round
    store.put("ours/ü x", b"ours")
    assert client.get_object(Bucket=s3_env, Key="ours/ü x")["Body"].read() == b"ours"


# --------------------------------------------------------------------------- conditional writes
def test_put_if_absent_creates_once(store):
    assert store.put_if_absent("markers/a", b"first") is True
    assert store.put_if_absent("markers/a", b"second") is False
    assert store.get("markers/a") == b"first"
    # The same bytes again count as written: a retried request whose first attempt landed.
    assert store.put_if_absent("markers/a", b"first") is True
    assert [o.key for o in store.list("markers/")] == ["markers/a"]


def test_put_if_absent_has_one_winner_among_concurrent_writers(backend):
    from concurrent.futures import ThreadPoolExecutor

    stores = [backend() for _ in range(8)]
    try:
        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(lambda i: stores[i].put_if_absent("join/done", f"writer {i}".encode()), range(8)))
        assert sum(won) == 1
        assert stores[0].get("join/done") == f"writer {won.index(True)}".encode()
    finally:
        for s in stores:
            s.close()


def test_put_if_tag_is_compare_and_swap(store):
    store.put("manifest", b"v1")
    data, tag = store.get_tagged("manifest")
    assert data == b"v1"
    store.put("manifest", b"v2")  # someone else wrote meanwhile
    assert store.put_if_tag("manifest", b"v1+mine", tag) is False
    assert store.get("manifest") == b"v2"
    data, tag = store.get_tagged("manifest")
    assert store.put_if_tag("manifest", b"v2+mine", tag) is True
    assert store.get("manifest") == b"v2+mine"
    store.delete("manifest")
    assert store.put_if_tag("manifest", b"v3", tag) is False
    assert not store.exists("manifest")
    with pytest.raises(NotFoundError):
        store.get_tagged("manifest")


def test_tagged_conditional_writes_chain_without_reading_back(store):
    """A claim's life (mlwf.choreography.records): created, then changed again and again by the tag each
    write returned, one store operation each; a stale tag changes nothing."""
    tag = store.put_if_absent_tagged("claims/c", b"held by a, nonce 1")
    assert tag and store.put_if_absent_tagged("claims/c", b"held by b, nonce 2") is None
    assert store.get_tagged("claims/c") == (b"held by a, nonce 1", tag)
    renewed = store.put_if_tag_tagged("claims/c", b"held by a, nonce 3", tag)
    assert renewed and renewed != tag and store.get_tagged("claims/c") == (b"held by a, nonce 3", renewed)
    assert store.put_if_tag_tagged("claims/c", b"taken by b, nonce 4", tag) is None  # stale: a renewed since
    assert store.get("claims/c") == b"held by a, nonce 3"
    assert store.put_if_tag_tagged("claims/c", b"done by a, nonce 5", renewed) == store.get_tagged("claims/c")[1]
    store.delete("claims/c")
    assert store.put_if_tag_tagged("claims/c", b"nonce 6", renewed) is None and not store.exists("claims/c")


def test_put_if_tag_loses_no_update_under_contention(backend):
    from concurrent.futures import ThreadPoolExecutor

    first = backend()
    first.put("counter", b"0")

    def add(times: int) -> None:
        s = backend()
        try:
            for _ in range(times):
                while True:
                    data, tag = s.get_tagged("counter")
                    if s.put_if_tag("counter", str(int(data) + 1).encode(), tag):
                        break
        finally:
            s.close()

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(add, [5] * 6))
    assert first.get("counter") == b"30"
    first.close()


def test_local_compare_and_swap_holds_across_processes(tmp_path):
    import multiprocessing as mp

    root = tmp_path / "store"
    LocalStore(root, "tless").create_bucket()
    LocalStore(root, "tless").put("counter", b"0")
    ctx = mp.get_context("forkserver")
    procs = [ctx.Process(target=_increment, args=(str(root), 10)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert LocalStore(root, "tless").get("counter") == b"40"
    # The lock lives outside the bucket: it is never listed as an object.
    assert [o.key for o in LocalStore(root, "tless").list()] == ["counter"]


def _increment(root: str, times: int) -> None:
    store = LocalStore(root, "tless")
    for _ in range(times):
        while True:
            data, tag = store.get_tagged("counter")
            if store.put_if_tag("counter", str(int(data) + 1).encode(), tag):
                break
