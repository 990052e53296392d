"""Commands that delete or replace data never act on an empty or ambiguous target.

Each refusal is one error line, and the store (and the local folder) is
byte-for-byte what it was before.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlwf.cli import main
from mlwf.storage import open_store
from mlwf.storage.local import LocalStore

#: What a user's bucket holds: data, a published model, a run's record and intermediates.
CONTENT = {
    "data/set/a.png": b"a",
    "data/set/sub/b.png": b"b",
    "data/settings.txt": b"a neighbour of data/set by string prefix",
    "ml-inference/model/MODEL.json": b'{"format": "mlwf-model-manifest"}',
    "ml-inference/model/versions/0123.mlwf": b"model bytes",
    "ml-training/outputs/r1/run.json": b"{}",
    "ml-training/outputs/r1/pca/0-0.bin": b"pca",
}


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """``(store, argv)`` of a bucket holding CONTENT, on a local store or the moto S3 server."""
    if request.param == "local":
        url, bucket = str(tmp_path / "store"), "tless"
        LocalStore(url, bucket).create_bucket()
    else:
        url, bucket = "s3://", request.getfixturevalue("s3_env")
    store = open_store(url, bucket)
    store.put_many(CONTENT.items())
    yield store, ["--store", url, "--bucket", bucket]
    store.close()


def snapshot(store) -> dict[str, bytes]:
    keys = [o.key for o in store.list()]
    return dict(zip(keys, store.get_many(keys)))


def one_error_line(capsys, argv) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err, (code, out, err)
    assert err.count("\n") == 1 and err.startswith("mlwf: error: "), err
    return err


@pytest.mark.parametrize("prefix", ["", " ", "   ", "/", "//", " / ", "\t", "/ /"])
def test_clear_dir_refuses_a_blank_prefix_and_deletes_nothing(where, capsys, prefix):
    store, argv = where
    err = one_error_line(capsys, ["s3", "clear-dir", "--prefix", prefix, *argv])
    assert "clear-bucket" in err or "refused prefix" in err
    assert snapshot(store) == CONTENT


def test_clear_dir_deletes_one_folder_never_its_string_prefix_neighbours(where, capsys):
    store, argv = where
    assert main(["s3", "clear-dir", "--prefix", "data/set", "--json", *argv]) == 0
    assert '"deleted": 2' in capsys.readouterr().out
    assert snapshot(store) == {k: v for k, v in CONTENT.items() if not k.startswith("data/set/")}
    assert main(["s3", "clear-dir", "--prefix", "data/se/", *argv]) == 0  # names no folder that exists
    assert "data/settings.txt" in snapshot(store)


@pytest.mark.parametrize("flag", ["--bucket", "--store"])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_bucket_or_store_never_means_the_default_one(where, capsys, flag, value):
    store, argv = where
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    assert "is empty" in one_error_line(capsys, ["s3", "clear-bucket", *argv])
    assert snapshot(store) == CONTENT


def test_clear_bucket_empties_the_bucket(where, capsys):
    store, argv = where
    assert main(["s3", "clear-bucket", *argv]) == 0
    assert snapshot(store) == {}


@pytest.fixture
def host(tmp_path) -> Path:
    root = tmp_path / "host"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"a")
    (root / "sub" / "b.png").write_bytes(b"b")
    (root / "new.png").write_bytes(b"new")
    return root


@pytest.mark.parametrize("s3_path", ["", " ", "/", "//"])
def test_upload_dir_refuses_a_blank_target(where, capsys, host, s3_path):
    store, argv = where
    assert "--s3-path" in one_error_line(capsys, ["s3", "upload-dir", "--host-path", str(host),
                                                  "--s3-path", s3_path, *argv])
    assert snapshot(store) == CONTENT


def test_upload_dir_replaces_other_bytes_only_when_asked(where, capsys, host):
    store, argv = where
    (host / "a.png").write_bytes(b"changed a")
    cmd = ["s3", "upload-dir", "--host-path", str(host), "--s3-path", "data/set", *argv]
    err = one_error_line(capsys, cmd)
    assert "1 objects" in err and "data/set/a.png" in err and "--overwrite" in err
    assert snapshot(store) == CONTENT  # not even the new file was written
    assert main([*cmd, "--overwrite", "--json"]) == 0
    assert '"replaced": 1' in capsys.readouterr().out
    assert snapshot(store) == {**CONTENT, "data/set/a.png": b"changed a", "data/set/new.png": b"new"}


@pytest.mark.parametrize("s3_path, forged", [("ml-inference/model", "MODEL.json"),
                                              ("ml-inference", "model/MODEL.json"),
                                              ("ml-inference/model/versions", "0123.mlwf")])
def test_upload_dir_never_writes_into_a_published_model(where, capsys, host, s3_path, forged):
    store, argv = where
    (host / forged).parent.mkdir(parents=True, exist_ok=True)
    (host / forged).write_bytes(b'{"forged": true}')
    for extra in ([], ["--overwrite"]):
        err = one_error_line(capsys, ["s3", "upload-dir", "--host-path", str(host), "--s3-path", s3_path,
                                      *extra, *argv])
        assert "published model at 'ml-inference/model'" in err
    assert snapshot(store) == CONTENT


def local_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_download_dir_replaces_different_local_files_only_when_asked(where, capsys, tmp_path):
    store, argv = where
    down = tmp_path / "down"
    (down / "sub").mkdir(parents=True)
    (down / "a.png").write_bytes(b"a")              # the same bytes: left alone
    (down / "sub" / "b.png").write_bytes(b"mine")   # other bytes: only with --overwrite
    (down / "keep.txt").write_bytes(b"unrelated")
    cmd = ["s3", "download-dir", "--s3-path", "data/set", "--host-path", str(down), *argv]
    err = one_error_line(capsys, cmd)
    assert "1 files" in err and "b.png" in err and "--overwrite" in err
    assert local_tree(down) == {"a.png": b"a", "sub/b.png": b"mine", "keep.txt": b"unrelated"}
    assert main([*cmd, "--overwrite", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"written": 1' in out and '"unchanged": 1' in out
    assert local_tree(down) == {"a.png": b"a", "sub/b.png": b"b", "keep.txt": b"unrelated"}
    assert snapshot(store) == CONTENT


@pytest.mark.parametrize("host_path, s3_path", [("", "data/set"), (" ", "data/set"), ("down", ""), ("down", "/")])
def test_download_dir_refuses_a_blank_folder_or_prefix(where, capsys, tmp_path, monkeypatch, host_path, s3_path):
    store, argv = where
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    one_error_line(capsys, ["s3", "download-dir", "--s3-path", s3_path, "--host-path", host_path, *argv])
    assert sorted(tmp_path.rglob("*")) == before
    assert snapshot(store) == CONTENT


@pytest.mark.parametrize("key", ["evil/../../escaped.txt", "evil/x/../../../escaped.txt", "evil//abs.txt",
                                 "evil/back\\slash.txt"])
def test_download_dir_refuses_keys_another_client_wrote_that_would_leave_the_folder(s3_server, s3_env, capsys,
                                                                                   tmp_path, key):
    client = s3_server.boto3_client()
    client.put_object(Bucket=s3_env, Key="evil/fine.txt", Body=b"fine")
    client.put_object(Bucket=s3_env, Key=key, Body=b"escaped")
    down = tmp_path / "a" / "b" / "down"
    err = one_error_line(capsys, ["s3", "download-dir", "--s3-path", "evil", "--host-path", str(down),
                                  "--store", "s3://", "--bucket", s3_env])
    assert "nothing downloaded" in err or "rename or delete it" in err  # (the S3 client refuses '..' itself)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_download_dir_skips_folder_markers_and_refuses_a_name_used_as_file_and_folder(s3_server, s3_env, capsys,
                                                                                      tmp_path):
    client = s3_server.boto3_client()
    client.put_object(Bucket=s3_env, Key="d/sub/", Body=b"")  # what S3 consoles create for a folder
    client.put_object(Bucket=s3_env, Key="d/sub/x.txt", Body=b"x")
    where = ["--store", "s3://", "--bucket", s3_env]
    assert main(["s3", "download-dir", "--s3-path", "d", "--host-path", str(tmp_path / "one"), *where]) == 0
    assert local_tree(tmp_path / "one") == {"sub/x.txt": b"x"}
    client.put_object(Bucket=s3_env, Key="d/sub/x.txt/y", Body=b"y")
    capsys.readouterr()
    err = one_error_line(capsys, ["s3", "download-dir", "--s3-path", "d", "--host-path", str(tmp_path / "two"),
                                  *where])
    assert "both a file and a folder" in err and not (tmp_path / "two").exists()


def test_upload_dir_ignores_links_and_special_files_inside_the_folder(where, capsys, host, tmp_path):
    import os

    store, argv = where
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"never uploaded")
    os.symlink(secret, host / "link.png")
    os.symlink(tmp_path, host / "linked-folder")
    os.mkfifo(host / "pipe.png")  # reading it would block forever
    assert main(["s3", "upload-dir", "--host-path", str(host), "--s3-path", "up", "--json", *argv]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["uploaded"] == 3 and result["ignored"] == 3
    assert snapshot(store) == {**CONTENT, "up/a.png": b"a", "up/sub/b.png": b"b", "up/new.png": b"new"}


def test_download_dir_refuses_a_target_folder_holding_a_linked_folder(where, capsys, tmp_path):
    import os

    store, argv = where
    outside = tmp_path / "outside"
    outside.mkdir()
    down = tmp_path / "down"
    down.mkdir()
    os.symlink(outside, down / "sub")  # data/set/sub/b.png would land in outside/
    err = one_error_line(capsys, ["s3", "download-dir", "--s3-path", "data/set", "--host-path", str(down),
                                  "--overwrite", *argv])
    assert "symbolic links" in err and "nothing downloaded" in err
    assert list(outside.iterdir()) == [] and sorted(p.name for p in down.iterdir()) == ["sub"]
