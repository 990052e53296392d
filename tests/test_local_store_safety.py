"""The local store follows no links, confines every operation to its bucket folder and respects the umask."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from mlwf.cli import main
from mlwf.errors import NotFoundError, StoreError
from mlwf.storage import open_store
from mlwf.storage.local import LocalStore

SECRET = b"SECRET-CONTENT-never-to-be-echoed"


@pytest.fixture
def layout(tmp_path):
    """A store with one object, and a folder outside it holding a secret file."""
    root = tmp_path / "store"
    store = LocalStore(root, "tless")
    store.create_bucket()
    store.put("data/a.txt", b"inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    return store, root / "tless", outside


def _outside_files(outside) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(outside.iterdir())}


def test_a_link_to_a_file_outside_is_refused_on_read_without_echoing_it(layout):
    store, bucket, outside = layout
    os.symlink(outside / "secret.txt", bucket / "data" / "link.txt")
    with pytest.raises(StoreError) as info:
        store.get("data/link.txt")
    assert not isinstance(info.value, NotFoundError)
    assert "symbolic link" in str(info.value) and SECRET.decode() not in str(info.value)
    for call in (lambda: store.get_many(["data/a.txt", "data/link.txt"]), lambda: store.get_tagged("data/link.txt"),
                 lambda: store.put_if_tag("data/link.txt", b"x", "tag")):
        with pytest.raises(StoreError, match="symbolic link"):
            call()
    assert not store.exists("data/link.txt")
    assert [o.key for o in store.list()] == store.list_keys() == ["data/a.txt"]
    assert _outside_files(outside) == {"secret.txt": SECRET}


def test_writing_over_a_link_replaces_the_link_and_never_writes_through_it(layout):
    store, bucket, outside = layout
    os.symlink(outside / "secret.txt", bucket / "data" / "link.txt")
    store.put("data/link.txt", b"new object")
    assert not os.path.islink(bucket / "data" / "link.txt")
    assert store.get("data/link.txt") == b"new object"
    os.symlink(outside / "secret.txt", bucket / "data" / "link2.txt")
    with pytest.raises(StoreError, match="symbolic link"):
        store.put_if_absent("data/link2.txt", b"x")
    store.delete("data/link2.txt")  # removes the link entry only
    assert not os.path.lexists(bucket / "data" / "link2.txt")
    assert _outside_files(outside) == {"secret.txt": SECRET}


def test_a_link_to_a_folder_outside_is_neither_listed_read_written_nor_deleted_through(layout):
    store, bucket, outside = layout
    os.symlink(outside, bucket / "linked")
    assert [o.key for o in store.list()] == store.list_keys() == ["data/a.txt"]
    assert store.list("linked/") == [] and store.list("linked") == []
    assert store.list_keys("linked/") == [] and store.list_keys("linked") == []
    for call in (lambda: store.get("linked/secret.txt"), lambda: store.put("linked/new.txt", b"evil"),
                 lambda: store.put_if_absent("linked/new.txt", b"evil"), lambda: store.delete("linked/secret.txt"),
                 lambda: store.get_many(["linked/secret.txt"])):
        with pytest.raises(StoreError, match="symbolic link") as info:
            call()
        assert SECRET.decode() not in str(info.value)
    assert not store.exists("linked/secret.txt")
    assert _outside_files(outside) == {"secret.txt": SECRET}


def test_a_folder_swapped_for_a_link_after_first_use_redirects_nothing(layout):
    store, bucket, outside = layout
    store.put("runs/r1/a.bin", b"first")
    assert store.get("runs/r1/a.bin") == b"first"
    os.rename(bucket / "runs" / "r1", bucket / "moved")
    os.symlink(outside, bucket / "runs" / "r1")
    with pytest.raises(StoreError, match="symbolic link"):
        store.put("runs/r1/b.bin", b"redirected?")
    with pytest.raises(StoreError, match="symbolic link"):
        store.get("runs/r1/secret.txt")
    # The same with a deeper key whose top folder is swapped.
    os.unlink(bucket / "runs" / "r1")
    os.rename(bucket / "runs", bucket / "runs-moved")
    os.symlink(outside, bucket / "runs")
    with pytest.raises(StoreError, match="symbolic link"):
        store.put("runs/r1/c.bin", b"redirected?")
    assert _outside_files(outside) == {"secret.txt": SECRET}
    assert [o.key for o in store.list()] == ["data/a.txt", "moved/a.bin"]


def test_swapping_a_folder_for_a_link_while_writing_never_writes_outside(layout):
    store, bucket, outside = layout
    stop = threading.Event()

    def swap():
        n = 0
        while not stop.is_set():
            try:
                os.rename(bucket / "race", bucket / f"race-old-{n}")
                n += 1
            except OSError:
                pass
            try:
                os.symlink(outside, bucket / "race")
            except OSError:
                pass
            try:
                os.unlink(bucket / "race")  # the link; a real folder stays until the next rename
            except OSError:
                pass

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        for i in range(300):
            try:
                store.put(f"race/{i}.bin", b"x")
            except StoreError:
                pass
    finally:
        stop.set()
        swapper.join()
    assert _outside_files(outside) == {"secret.txt": SECRET}


def test_a_fifo_in_the_store_is_refused_at_once(layout):
    store, bucket, _ = layout
    os.mkfifo(bucket / "data" / "pipe")
    with pytest.raises(StoreError, match="not a regular file"):
        store.get("data/pipe")  # would block forever if opened for a plain read
    assert [o.key for o in store.list()] == store.list_keys() == ["data/a.txt"]


def test_a_linked_manifest_is_refused_in_one_line_that_does_not_echo_it(layout, capsys):
    store, bucket, outside = layout
    (outside / "MODEL.json").write_bytes(b'{"format": "SECRET-CONTENT-never-to-be-echoed"}')
    (bucket / "ml-inference" / "model").mkdir(parents=True)
    os.symlink(outside / "MODEL.json", bucket / "ml-inference" / "model" / "MODEL.json")
    for argv in (["model", "show"], ["model", "rollback"],
                 ["run", "ml-inference", "ml-inference/model", "data", "1"]):
        assert main([*argv, "--store", str(store.root)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "symbolic link" in err and "SECRET" not in err


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_objects_and_folders_are_created_with_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        store = LocalStore(tmp_path / "store", "tless")
        store.create_bucket()
        store.put("a/put.bin", b"1")
        store.put_many([("a/many.bin", b"2")])
        assert store.put_if_absent("b/absent.bin", b"3")
        store.put("c/cas.bin", b"4")
        _, tag = store.get_tagged("c/cas.bin")
        assert store.put_if_tag("c/cas.bin", b"5", tag)
    finally:
        os.umask(old)
    bucket = tmp_path / "store" / "tless"
    for name in ("a/put.bin", "a/many.bin", "b/absent.bin", "c/cas.bin"):
        assert stat.S_IMODE(os.stat(bucket / name).st_mode) == 0o666 & ~umask, name
    for name in ("a", "b", "c"):
        assert stat.S_IMODE(os.stat(bucket / name).st_mode) == 0o777 & ~umask, name


def test_no_temporary_file_is_left_behind(layout):
    store, bucket, _ = layout
    store.put("t/x", b"1")
    store.put_if_absent("t/x", b"2")
    store.put_if_absent("t/y", b"3")
    assert sorted(os.listdir(bucket / "t")) == ["x", "y"]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_an_over_long_key_segment_is_refused_up_front_in_one_line(kind, tmp_path, request, capsys):
    if kind == "local":
        url, bucket = str(tmp_path / "store"), "tless"
        LocalStore(url, bucket).create_bucket()
    else:
        url, bucket = "s3://", request.getfixturevalue("s3_env")
    store = open_store(url, bucket)
    long_key = "data/" + "n" * 256 + ".png"
    for call in (lambda: store.put(long_key, b"x"), lambda: store.get(long_key), lambda: store.list(long_key)):
        with pytest.raises(StoreError, match="longer than 255 bytes"):
            call()
    assert main(["s3", "clear-dir", "--prefix", long_key, "--store", url, "--bucket", bucket]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "longer than 255 bytes" in err and len(err) < 400
    assert store.list() == []


@pytest.mark.parametrize("bucket", ["a_b", "192.168.1.1", "xn--abc", "data-s3alias", "Tless", "ab", "a..b",
                                    "x" * 64, "-tless", "sthree-x", "amzn-s3-demo-x", "x--ol-s3"])
def test_bucket_names_s3_rejects_are_refused_in_one_line(bucket, capsys, s3_env):
    assert main(["s3", "ls", "--store", "s3://", f"--bucket={bucket}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused S3 bucket name" in err


def test_a_local_bucket_name_with_control_characters_is_refused(tmp_path):
    with pytest.raises(StoreError, match="refused bucket name"):
        LocalStore(tmp_path, "t\nless")
