"""Tests for mlwf.datasets: digits and IDX files to class-folder PNGs."""

from __future__ import annotations

import gzip
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from mlwf.datasets import KNOWN_CLASS_NAMES, check_class_names, read_class_names, read_idx, write_digits, write_idx
from mlwf.errors import DataError

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    """Serialise ``arr`` as an IDX file (header + raw bytes)."""
    header = bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr).tobytes()


def write_idx_file(path: Path, arr: np.ndarray, *, gz: bool = False, type_code: int = 0x08) -> Path:
    data = idx_bytes(arr, type_code)
    # mtime=0 keeps the gzip bytes deterministic; not needed, but tidy.
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def make_pair(tmp_path: Path, count: int = 30, rows: int = 28, cols: int = 28,
              *, gz: bool = False, seed: int = 0, classes: int = 10):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, rows, cols), dtype=np.uint8)
    labels = rng.integers(0, classes, size=count, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    ip = write_idx_file(tmp_path / f"images-idx3-ubyte{suffix}", images, gz=gz)
    lp = write_idx_file(tmp_path / f"labels-idx1-ubyte{suffix}", labels, gz=gz)
    return ip, lp, images, labels


def pngs(out: Path) -> list[Path]:
    return sorted(out.rglob("*.png"))


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.mode == "L"
        return np.asarray(im).copy()


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in pngs(out)}


def assert_one_line_naming(exc: pytest.ExceptionInfo, *names) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, msg
    return msg


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.images, d.target


# --------------------------------------------------------------------------
# write_digits
# --------------------------------------------------------------------------


def test_digits_all_count_layout_and_progress(tmp_path, digits):
    _, target = digits
    out = tmp_path / "digits"
    calls = []
    written = write_digits(out, progress=lambda done, total: calls.append((done, total)))

    assert written == 1797
    files = pngs(out)
    assert len(files) == 1797
    assert sorted(p.name for p in out.iterdir()) == [str(i) for i in range(10)]
    for p in files:
        assert re.fullmatch(r"\d{5}\.png", p.name), p.name
        assert p.parent.parent == out
        index = int(p.stem)
        assert p.parent.name == str(int(target[index]))
    assert sorted(int(p.stem) for p in files) == list(range(1797))

    # progress: bounded number of calls, monotonic, ends at (total, total)
    assert 1 <= len(calls) <= 101
    assert all(total == 1797 for _, total in calls)
    dones = [d for d, _ in calls]
    assert dones == sorted(dones)
    assert calls[-1] == (1797, 1797)


def test_digits_pixels_round_trip(tmp_path, digits):
    images, target = digits
    out = tmp_path / "d"
    assert write_digits(out, n=40) == 40
    for i in range(40):
        path = out / str(int(target[i])) / f"{i:05d}.png"
        got = read_png(path)
        expected = np.array(
            [[round(float(v) * 255 / 16) for v in row] for row in images[i]],
            dtype=np.uint8,
        )
        assert got.shape == (8, 8)
        np.testing.assert_array_equal(got, expected)
    # value 16 maps to 255 and 0 to 0 somewhere in the set
    all_px = np.concatenate([read_png(p).ravel() for p in pngs(out)])
    assert all_px.min() == 0 and all_px.max() == 255


def test_digits_n_respected(tmp_path, digits):
    _, target = digits
    out = tmp_path / "d"
    assert write_digits(out, n=25) == 25
    files = pngs(out)
    assert sorted(int(p.stem) for p in files) == list(range(25))
    for p in files:
        assert p.parent.name == str(int(target[int(p.stem)]))


def test_digits_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_digits(a, n=60)
    write_digits(b, n=60)
    ta, tb = tree_bytes(a), tree_bytes(b)
    assert len(ta) == 60
    assert ta == tb
    # writing again over the same folder gives the same bytes too
    write_digits(a, n=60)
    assert tree_bytes(a) == tb
    # no metadata chunks (time, text) in the files
    for data in ta.values():
        assert b"tIME" not in data and b"tEXt" not in data and b"iTXt" not in data


@pytest.mark.parametrize("bad_n", [0, -3, 2.5, "10", True, 1798])
def test_digits_bad_n(tmp_path, bad_n):
    out = tmp_path / "d"
    with pytest.raises(DataError) as exc:
        write_digits(out, n=bad_n)
    msg = assert_one_line_naming(exc, "digits")
    assert "n" in msg
    if bad_n == 1798:
        assert "1797" in msg
    assert not out.exists()


def test_digits_out_is_file(tmp_path):
    out = tmp_path / "afile"
    out.write_text("x")
    with pytest.raises(DataError) as exc:
        write_digits(out, n=3)
    assert_one_line_naming(exc, out)
    assert out.read_text() == "x"


# --------------------------------------------------------------------------
# read_idx
# --------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("shape", [(7,), (5, 4, 3), (2, 3, 4, 5)])
def test_read_idx_round_trip(tmp_path, gz, shape):
    arr = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    path = write_idx_file(tmp_path / "f.idx", arr, gz=gz)
    got = read_idx(path)
    assert got.dtype == np.uint8
    assert got.shape == shape
    np.testing.assert_array_equal(got, arr)


def test_read_idx_detects_gzip_by_content_not_extension(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw_named_gz = tmp_path / "raw.gz"
    raw_named_gz.write_bytes(idx_bytes(arr))
    gz_named_raw = tmp_path / "gz-idx3-ubyte"
    gz_named_raw.write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(raw_named_gz), arr)
    np.testing.assert_array_equal(read_idx(str(gz_named_raw)), arr)


def test_read_idx_missing(tmp_path):
    path = tmp_path / "nope-idx3-ubyte.gz"
    with pytest.raises(DataError) as exc:
        read_idx(path)
    assert "does not exist" in assert_one_line_naming(exc, path)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("content", [b"", b"\x00", b"PK\x03\x04hello", b"\x01\x00\x08\x01\x00\x00\x00\x01x"])
def test_read_idx_bad_magic(tmp_path, gz, content):
    path = tmp_path / "bad.idx"
    path.write_bytes(gzip.compress(content) if gz else content)
    with pytest.raises(DataError) as exc:
        read_idx(path)
    assert "not an IDX file" in assert_one_line_naming(exc, path)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("type_code", [0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x42])
def test_read_idx_wrong_type(tmp_path, gz, type_code):
    arr = np.zeros((2, 2), dtype=np.uint8)
    path = write_idx_file(tmp_path / "t.idx", arr, gz=gz, type_code=type_code)
    with pytest.raises(DataError) as exc:
        read_idx(path)
    msg = assert_one_line_naming(exc, path)
    assert f"0x{type_code:02x}" in msg
    assert "0x08" in msg


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("delta", [-1, -50, +1])
def test_read_idx_length_mismatch(tmp_path, gz, delta):
    arr = np.zeros((4, 5, 5), dtype=np.uint8)
    data = idx_bytes(arr)
    data = data[:delta] if delta < 0 else data + b"\x00" * delta
    path = tmp_path / "short.idx"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError) as exc:
        read_idx(path)
    msg = assert_one_line_naming(exc, path)
    assert "100" in msg  # declared data length
    if delta < 0:
        assert "truncated" in msg


def test_read_idx_truncated_header(tmp_path):
    # claims 3 dims but only one dim follows
    path = tmp_path / "hdr.idx"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">I", 5))
    with pytest.raises(DataError) as exc:
        read_idx(path)
    assert "truncated" in assert_one_line_naming(exc, path)


def test_read_idx_truncated_gzip_stream(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    data = gzip.compress(idx_bytes(arr))
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as exc:
        read_idx(path)
    assert_one_line_naming(exc, path)


def test_read_idx_raw_huge_header_does_not_allocate(tmp_path):
    # header declares 4G x 4G x 4G bytes; must fail on size, not try to read it
    path = tmp_path / "huge.idx"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1) + b"\x00" * 10)
    with pytest.raises(DataError) as exc:
        read_idx(path)
    assert_one_line_naming(exc, path)


# --------------------------------------------------------------------------
# write_idx
# --------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_write_idx_all_pixel_exact(tmp_path, gz):
    ip, lp, images, labels = make_pair(tmp_path, gz=gz)
    out = tmp_path / "out"
    calls = []
    written = write_idx(ip, lp, out, progress=lambda d, t: calls.append((d, t)))
    assert written == 30
    files = pngs(out)
    assert len(files) == 30
    assert {p.parent.name for p in files} == {str(int(v)) for v in labels}
    for p in files:
        assert re.fullmatch(r"\d{5}\.png", p.name), p.name
    for i in range(30):
        path = out / str(int(labels[i])) / f"{i:05d}.png"
        got = read_png(path)
        assert got.shape == (28, 28)
        np.testing.assert_array_equal(got, images[i])
    assert calls[-1] == (30, 30)


@pytest.mark.parametrize("gz", [False, True])
def test_write_idx_offset_and_n(tmp_path, gz):
    ip, lp, images, labels = make_pair(tmp_path, gz=gz)
    out = tmp_path / "out"
    assert write_idx(ip, lp, out, n=5, offset=7) == 5
    files = pngs(out)
    assert sorted(p.name for p in files) == [f"{i:05d}.png" for i in range(7, 12)]
    for i in range(7, 12):
        np.testing.assert_array_equal(read_png(out / str(int(labels[i])) / f"{i:05d}.png"), images[i])


def test_write_idx_offset_without_n_writes_rest(tmp_path):
    ip, lp, images, labels = make_pair(tmp_path)
    out = tmp_path / "out"
    assert write_idx(ip, lp, out, offset=25) == 5
    assert sorted(int(p.stem) for p in pngs(out)) == [25, 26, 27, 28, 29]
    # n exactly equal to what's available is fine
    out2 = tmp_path / "out2"
    assert write_idx(ip, lp, out2, n=5, offset=25) == 5
    assert tree_bytes(out) == tree_bytes(out2)


def test_write_idx_n_first(tmp_path):
    ip, lp, _, _ = make_pair(tmp_path)
    out = tmp_path / "out"
    assert write_idx(ip, lp, out, n=3) == 3
    assert sorted(p.name for p in pngs(out)) == ["00000.png", "00001.png", "00002.png"]


def test_write_idx_deterministic_and_gzip_same_as_raw(tmp_path):
    raw_dir, gz_dir = tmp_path / "raw", tmp_path / "gz"
    raw_dir.mkdir()
    gz_dir.mkdir()
    ip, lp, _, _ = make_pair(raw_dir, gz=False, seed=5)
    gip, glp, _, _ = make_pair(gz_dir, gz=True, seed=5)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_idx(ip, lp, a)
    write_idx(ip, lp, b)
    write_idx(gip, glp, c)
    ta = tree_bytes(a)
    assert len(ta) == 30
    assert ta == tree_bytes(b) == tree_bytes(c)


def test_write_idx_wide_index_for_100000_images(tmp_path):
    count = 100_000
    images = (np.arange(count) % 256).astype(np.uint8).reshape(count, 1, 1)
    labels = (np.arange(count) % 3).astype(np.uint8)
    ip = write_idx_file(tmp_path / "big-images", images)
    lp = write_idx_file(tmp_path / "big-labels", labels)
    out = tmp_path / "out"
    assert write_idx(ip, lp, out, n=2, offset=count - 2) == 2
    names = sorted(p.relative_to(out).as_posix() for p in pngs(out))
    assert names == ["0/099999.png", "2/099998.png"]
    assert read_png(out / "0" / "099999.png")[0, 0] == 99_999 % 256


def test_write_idx_labels_are_decimal_folder_names(tmp_path):
    images = np.zeros((3, 2, 2), dtype=np.uint8)
    labels = np.array([0, 12, 255], dtype=np.uint8)
    ip = write_idx_file(tmp_path / "i", images)
    lp = write_idx_file(tmp_path / "l", labels)
    out = tmp_path / "out"
    write_idx(ip, lp, out)
    assert sorted(p.relative_to(out).as_posix() for p in pngs(out)) == [
        "0/00000.png", "12/00001.png", "255/00002.png"]


def test_write_idx_progress_is_throttled(tmp_path):
    ip, lp, _, _ = make_pair(tmp_path, count=250, rows=2, cols=2)
    calls = []
    write_idx(ip, lp, tmp_path / "out", progress=lambda d, t: calls.append((d, t)))
    assert 1 <= len(calls) <= 101 < 250
    assert all(t == 250 for _, t in calls)
    assert [d for d, _ in calls] == sorted({d for d, _ in calls})
    assert calls[-1] == (250, 250)


def test_write_idx_replaces_another_data_set_only_when_told(tmp_path):
    out = tmp_path / "out"
    write_digits(out, n=10)  # another dataset's PNGs already there
    ip, lp, images, labels = make_pair(tmp_path, count=10)
    with pytest.raises(DataError, match="--overwrite"):
        write_idx(ip, lp, out)
    assert write_idx(ip, lp, out, overwrite=True) == 10
    assert len(pngs(out)) == 10
    for i in range(10):
        np.testing.assert_array_equal(read_png(out / str(int(labels[i])) / f"{i:05d}.png"), images[i])


# ---- bad input -----------------------------------------------------------


def test_write_idx_missing_images(tmp_path):
    _, lp, _, _ = make_pair(tmp_path)
    missing = tmp_path / "missing-images.gz"
    with pytest.raises(DataError) as exc:
        write_idx(missing, lp, tmp_path / "out")
    assert_one_line_naming(exc, missing)


def test_write_idx_missing_labels(tmp_path):
    ip, _, _, _ = make_pair(tmp_path)
    missing = tmp_path / "missing-labels.gz"
    with pytest.raises(DataError) as exc:
        write_idx(ip, missing, tmp_path / "out")
    assert_one_line_naming(exc, missing)


@pytest.mark.parametrize("which", ["images", "labels"])
def test_write_idx_bad_magic(tmp_path, which):
    ip, lp, _, _ = make_pair(tmp_path)
    bad = ip if which == "images" else lp
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DataError) as exc:
        write_idx(ip, lp, tmp_path / "out")
    assert "not an IDX file" in assert_one_line_naming(exc, bad)


@pytest.mark.parametrize("gz", [False, True])
def test_write_idx_unsupported_type(tmp_path, gz):
    _, lp, _, _ = make_pair(tmp_path)
    ip = write_idx_file(tmp_path / "float-images", np.zeros((30, 2, 2), np.uint8), gz=gz, type_code=0x0D)
    with pytest.raises(DataError) as exc:
        write_idx(ip, lp, tmp_path / "out")
    assert "0x0d" in assert_one_line_naming(exc, ip)


@pytest.mark.parametrize("gz", [False, True])
def test_write_idx_truncated_images(tmp_path, gz):
    _, lp, images, _ = make_pair(tmp_path)
    ip = tmp_path / "trunc-images"
    data = idx_bytes(images)[:-10]
    ip.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError) as exc:
        write_idx(ip, lp, tmp_path / "out")
    assert "truncated" in assert_one_line_naming(exc, ip)


def test_write_idx_images_not_3d(tmp_path):
    ip, lp, _, _ = make_pair(tmp_path)
    flat = write_idx_file(tmp_path / "flat-images", np.zeros((30, 784), np.uint8))
    with pytest.raises(DataError) as exc:
        write_idx(flat, lp, tmp_path / "out")
    assert "3" in assert_one_line_naming(exc, flat)
    # swapped arguments: labels file passed as images
    with pytest.raises(DataError) as exc:
        write_idx(lp, ip, tmp_path / "out")
    assert_one_line_naming(exc, lp)


def test_write_idx_labels_not_1d(tmp_path):
    ip, _, _, _ = make_pair(tmp_path)
    lp2 = write_idx_file(tmp_path / "2d-labels", np.zeros((30, 1), np.uint8))
    with pytest.raises(DataError) as exc:
        write_idx(ip, lp2, tmp_path / "out")
    assert "1" in assert_one_line_naming(exc, lp2)


def test_write_idx_count_mismatch(tmp_path):
    ip, _, _, _ = make_pair(tmp_path)
    lp = write_idx_file(tmp_path / "29-labels", np.zeros(29, np.uint8))
    with pytest.raises(DataError) as exc:
        write_idx(ip, lp, tmp_path / "out")
    msg = assert_one_line_naming(exc, ip, lp)
    assert "30" in msg and "29" in msg


@pytest.mark.parametrize("bad_n", [0, -1, 1.5, "3", True, np.float64(2.0)])
def test_write_idx_bad_n(tmp_path, bad_n):
    ip, lp, _, _ = make_pair(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataError) as exc:
        write_idx(ip, lp, out, n=bad_n)
    assert_one_line_naming(exc, ip)
    assert not out.exists()


@pytest.mark.parametrize("bad_offset", [-1, 30, 31, 1.0, "2", None])
def test_write_idx_bad_offset(tmp_path, bad_offset):
    ip, lp, _, _ = make_pair(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataError) as exc:
        write_idx(ip, lp, out, offset=bad_offset)
    msg = assert_one_line_naming(exc, ip)
    assert "offset" in msg
    if bad_offset in (30, 31):
        assert "30" in msg
    assert not out.exists()


@pytest.mark.parametrize(("n", "offset", "available"), [(31, 0, 30), (6, 25, 5), (2, 29, 1)])
def test_write_idx_n_larger_than_available(tmp_path, n, offset, available):
    ip, lp, _, _ = make_pair(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataError) as exc:
        write_idx(ip, lp, out, n=n, offset=offset)
    msg = assert_one_line_naming(exc, ip)
    assert f"{available} images available" in msg
    assert not out.exists()  # nothing written, no clipping


def test_write_idx_numpy_ints_accepted(tmp_path):
    ip, lp, _, _ = make_pair(tmp_path)
    out = tmp_path / "out"
    assert write_idx(ip, lp, out, n=np.int64(2), offset=np.uint8(3)) == 2
    assert sorted(p.name for p in pngs(out)) == ["00003.png", "00004.png"]


def test_write_idx_out_is_file(tmp_path):
    ip, lp, _, _ = make_pair(tmp_path)
    out = tmp_path / "out.png"
    out.write_bytes(b"not a folder")
    with pytest.raises(DataError) as exc:
        write_idx(ip, lp, out)
    assert_one_line_naming(exc, out)
    assert out.read_bytes() == b"not a folder"


def test_write_idx_label_folder_is_file(tmp_path):
    ip, lp, _, labels = make_pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    blocker = out / str(int(labels[0]))
    blocker.write_text("in the way")
    for overwrite in (False, True):  # a file is never removed to make room
        with pytest.raises(DataError) as exc:
            write_idx(ip, lp, out, overwrite=overwrite)
        assert_one_line_naming(exc, blocker)
    assert blocker.read_text() == "in the way"


def test_write_idx_empty_files(tmp_path):
    ip = write_idx_file(tmp_path / "e-images", np.zeros((0, 28, 28), np.uint8))
    lp = write_idx_file(tmp_path / "e-labels", np.zeros(0, np.uint8))
    with pytest.raises(DataError) as exc:
        write_idx(ip, lp, tmp_path / "out")
    assert "no images" in assert_one_line_naming(exc, ip)


# --------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------


def test_write_idx_with_known_names_names_the_folders(tmp_path):
    ip, lp, images, labels = make_pair(tmp_path, count=40, rows=4, cols=4)
    out = tmp_path / "out"
    assert write_idx(ip, lp, out, class_names=KNOWN_CLASS_NAMES["fashion-mnist"]) == 40
    folders = {p.name for p in out.iterdir()}
    assert folders == {KNOWN_CLASS_NAMES["fashion-mnist"][int(v)] for v in labels}
    for i in range(40):
        path = out / KNOWN_CLASS_NAMES["fashion-mnist"][int(labels[i])] / f"{i:05d}.png"
        np.testing.assert_array_equal(read_png(path), images[i])


def test_known_names_are_usable_folder_names():
    for name, names in KNOWN_CLASS_NAMES.items():
        assert check_class_names(names, name) == list(names) and len(names) == 10


def test_dataset_idx_names_flags_reach_the_folders(tmp_path, capsys):
    from mlwf.cli import main

    ip, lp, _, labels = make_pair(tmp_path, count=12, rows=4, cols=4, classes=3)
    names = tmp_path / "names.txt"
    names.write_text("  cat \r\ndog\nbird\n", encoding="utf-8")  # stray spaces and CRLF are dropped
    assert main(["dataset", "idx", str(ip), str(lp), str(tmp_path / "a"), "--names-file", str(names)]) == 0
    assert {p.name for p in (tmp_path / "a").iterdir()} == {["cat", "dog", "bird"][int(v)] for v in labels}
    assert main(["dataset", "idx", str(ip), str(lp), str(tmp_path / "b"), "--names", "mnist"]) == 0
    assert {p.name for p in (tmp_path / "b").iterdir()} == {str(int(v)) for v in labels}
    capsys.readouterr()
    for argv in (["--names", "cifar"], ["--names", "mnist", "--names-file", str(names)]):
        assert main(["dataset", "idx", str(ip), str(lp), str(tmp_path / "c"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mlwf: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("text, match", [
    ("a\n\nb\n", r"label 1 \(''\) is empty"),
    ("", "lists no class names"),
    ("a\nb/c\n", "label 1 .* path separator"),
    ("a\nb\\c\n", "label 1 .* path separator"),
    ("a\n..\n", r"label 1 .* starts with '\.'"),
    (".hidden\nb\n", r"label 0 .* starts with '\.'"),
    ("a\nb\x07\n", "control character"),
    ("Coat\ncoat\n", r"label 1 \('coat'\) repeats the name of label 0 \('Coat'"),
    ("a\n" + "x" * 256 + "\n", "longer than 255 bytes"),
])
def test_bad_class_names_are_refused_and_nothing_is_written(tmp_path, text, match):
    ip, lp, _, _ = make_pair(tmp_path, count=6, rows=2, cols=2, classes=2)
    names = tmp_path / "names.txt"
    names.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=match) as info:
        write_idx(ip, lp, out, class_names=read_class_names(names))
    assert_one_line_naming(info, names)
    assert not out.exists()


def test_a_label_without_a_name_is_refused_before_writing(tmp_path):
    images = np.zeros((4, 2, 2), dtype=np.uint8)
    ip = write_idx_file(tmp_path / "i", images)
    lp = write_idx_file(tmp_path / "l", np.array([0, 1, 2, 1], dtype=np.uint8))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="label 2 of image 2 .* 2 names were given") as info:
        write_idx(ip, lp, out, class_names=["zero", "one"])
    assert_one_line_naming(info, lp)
    assert not out.exists()
    # Only the images asked for need names.
    assert write_idx(ip, lp, out, n=2, class_names=["zero", "one"]) == 2


@pytest.mark.parametrize("make, match", [
    (lambda p: p, "does not exist"),
    (lambda p: (p.mkdir(), p)[1], "is a directory"),
    (lambda p: (p.write_bytes(b"\xff\xfe\x00a"), p)[1], "not UTF-8"),
    (lambda p: (p.write_bytes(b"a\n" * 200_000), p)[1], "larger than 256 KiB"),
    (lambda p: Path("/dev/zero"), "is a character device, not a regular file"),
])
def test_unreadable_names_file_is_one_line(tmp_path, make, match):
    path = make(tmp_path / "names.txt")
    with pytest.raises(DataError, match=match) as info:
        read_class_names(path)
    assert_one_line_naming(info, path)


# --------------------------------------------------------------------------
# An output folder that already holds another data set
# --------------------------------------------------------------------------


def test_a_folder_holding_another_data_set_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "train"
    write_digits(out, n=50)  # class folders 0..9
    before = tree_bytes(out)
    images = np.arange(20 * 4 * 4, dtype=np.uint8).reshape(20, 4, 4)
    ip = write_idx_file(tmp_path / "i-idx3-ubyte", images)
    lp = write_idx_file(tmp_path / "l-idx1-ubyte", np.arange(20, dtype=np.uint8) % 10)
    with pytest.raises(DataError) as exc:
        write_idx(ip, lp, out, class_names=KNOWN_CLASS_NAMES["fashion-mnist"])
    msg = assert_one_line_naming(exc, out)
    assert "--overwrite" in msg and "already holds" in msg and "mix" in msg
    assert tree_bytes(out) == before
    assert [p.name for p in out.iterdir()] and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_more_images_of_the_same_set_are_refused_too_but_the_same_files_again_are_not(tmp_path):
    out = tmp_path / "d"
    write_digits(out, n=60)
    write_digits(out, n=60)  # the same files: replaced, not refused
    write_digits(out, n=80)  # a superset: nothing else in out
    with pytest.raises(DataError, match=r"already holds 20 entries"):
        write_digits(out, n=60)  # 60..79 would stay behind
    assert len(pngs(out)) == 80


def test_overwrite_replaces_what_the_folder_holds(tmp_path):
    out = tmp_path / "train"
    write_digits(out, n=50)
    (out / ".hidden-note").write_text("kept")  # hidden entries are not data: left alone
    images = np.arange(20 * 4 * 4, dtype=np.uint8).reshape(20, 4, 4)
    ip = write_idx_file(tmp_path / "i-idx3-ubyte", images)
    lp = write_idx_file(tmp_path / "l-idx1-ubyte", np.arange(20, dtype=np.uint8) % 10)
    assert write_idx(ip, lp, out, class_names=KNOWN_CLASS_NAMES["fashion-mnist"], overwrite=True) == 20
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        sorted(KNOWN_CLASS_NAMES["fashion-mnist"])
    assert len(pngs(out)) == 20
    assert (out / ".hidden-note").read_text() == "kept"


@pytest.mark.parametrize("kind", ["link", "nested"])
def test_overwrite_never_removes_what_is_not_a_class_folder_of_files(tmp_path, kind):
    out = tmp_path / "train"
    write_digits(out, n=30)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    if kind == "link":
        (out / "notes").symlink_to(precious)
    else:
        (out / "project").mkdir()
        (out / "project" / "src").mkdir()
    before = tree_bytes(out)
    with pytest.raises(DataError) as exc:
        write_digits(out, n=10, overwrite=True)
    assert "--overwrite removes only class folders" in assert_one_line_naming(exc, out)
    assert tree_bytes(out) == before
    assert (precious / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("blank", ["", " "])
def test_a_blank_output_folder_is_refused(tmp_path, blank, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="is blank"):
        write_digits(blank, n=5, overwrite=True)
    assert list(tmp_path.iterdir()) == []


def test_dataset_idx_command_says_to_add_overwrite(tmp_path):
    out = tmp_path / "train"
    write_digits(out, n=20)
    images = np.zeros((10, 4, 4), dtype=np.uint8)
    ip = write_idx_file(tmp_path / "i-idx3-ubyte", images)
    lp = write_idx_file(tmp_path / "l-idx1-ubyte", np.arange(10, dtype=np.uint8))
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "mlwf.cli", "dataset", "idx", str(ip), str(lp), str(out),
                           "--names", "fashion-mnist"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--overwrite" in lines[0], proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mlwf.cli", "dataset", "idx", str(ip), str(lp), str(out),
                           "--names", "fashion-mnist", "--overwrite"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(KNOWN_CLASS_NAMES["fashion-mnist"])
