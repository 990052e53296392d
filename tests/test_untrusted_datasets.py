"""IDX files and the other paths `mlwf dataset` reads are untrusted: each is what it claims or is refused.

Every file here is made by the test. A refusal is one line naming the file and
what is wrong, a non-zero exit, and nothing written to the output folder; a
gzip file is never inflated past what its header declares, so a few MB that
inflate to gigabytes cost a few MB of memory.
"""

from __future__ import annotations

import errno
import gzip
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from mlwf import budget
from mlwf.cli import main
from mlwf.datasets import read_class_names, read_idx, write_idx
from mlwf.errors import DataError
from tests.test_datasets import idx_bytes, make_pair, tree_bytes, write_idx_file

_MIB = 1 << 20


def idx_header(dims, type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def gzip_bomb(path: Path, head: bytes, zeros_mib: int, *, recorded: int | None = None) -> Path:
    """``head`` then ``zeros_mib`` MiB of zeros, gzipped (about 1 KB per MiB), made in well under a second.

    Each MiB is compressed after a full flush, which resets the compressor, so
    every MiB compresses to the same bytes: one is made and repeated. The
    trailer records ``recorded`` as the size (default: the true size, modulo
    4 GiB); its CRC is not computed, as a reader that checks the size before
    inflating never gets that far.
    """
    deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    start = deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    mib = deflate.compress(bytes(_MIB)) + deflate.flush(zlib.Z_FULL_FLUSH)
    end = deflate.flush(zlib.Z_FINISH)[:-8]
    size = len(head) + zeros_mib * _MIB if recorded is None else recorded
    path.write_bytes(start + mib * zeros_mib + end + struct.pack("<II", 0, size % (1 << 32)))
    return path


def run_mlwf(args: list, *, timeout: float = 30) -> tuple[int, str, float, int]:
    """``mlwf args`` in its own process: exit status, stderr, seconds, and that process's peak RSS in bytes.

    Its address space is capped at 2 GiB, so a reader that inflates a bomb in
    full fails there instead of taking the machine's memory. The peak is the
    process's own ``VmHWM``, read by it as it ends: ``ru_maxrss`` from
    ``wait4`` would not do, since Linux carries the parent's peak into a
    child's across fork and exec (this test process is large late in a session).
    """
    measured = ("import os, resource, sys\n"
                "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
                "from mlwf.cli import main\n"
                "try:\n"
                "    code = main(sys.argv[2:])\n"
                "finally:\n"
                "    peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
                "    open(sys.argv[1], 'w').write(peak)\n"
                "sys.exit(code)\n")
    with tempfile.NamedTemporaryFile("r", suffix=".peak") as peak_file:
        started = time.monotonic()
        try:
            done = subprocess.run([sys.executable, "-c", measured, peak_file.name, *map(str, args)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return -9, f"killed: still running after {timeout} s", time.monotonic() - started, 0
        seconds = time.monotonic() - started
        peak_kib = int(peak_file.read() or 0)
    return done.returncode, done.stderr, seconds, peak_kib * 1024


def assert_refused(code: int, err: str, *names) -> None:
    assert code == 2, err
    assert err.startswith("mlwf: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert str(name) in err, err


# --------------------------------------------------------------------------- gzip bombs
_BOMB_MIB = 3 * 1024  # 3 GiB of zeros in a 3 MB file


@pytest.mark.parametrize("head, recorded, match", [
    # The file: a bogus header, refused before anything behind it is inflated.
    pytest.param(b"\x12\x34\x56\x78" * 4, None, "is not an IDX file (bad magic number 12 34 56 78", id="bogus magic"),
    pytest.param(idx_header((1000, 28, 28), 0x0D), None, "has type code 0x0d (float)", id="another dtype"),
    # A plausible header: the trailer's size is not the header's.
    pytest.param(idx_header((1000, 28, 28)), None, "its gzip trailer records", id="honest trailer"),
    # The trailer forged to match the header: refused at the first byte past the declared data.
    pytest.param(idx_header((1000, 28, 28)), 16 + 1000 * 28 * 28, "is longer than its header says",
                 id="forged trailer"),
    # A header declaring more than any 3 MB gzip file can hold.
    pytest.param(idx_header((2**32 - 1, 28, 28)), None, "more than a gzip file of", id="huge header"),
])
def test_a_gzip_bomb_is_refused_quickly_with_bounded_memory(tmp_path, head, recorded, match):
    bomb = gzip_bomb(tmp_path / "images.gz", head, _BOMB_MIB, recorded=recorded)
    assert bomb.stat().st_size < 4 * _MIB
    labels = write_idx_file(tmp_path / "labels", np.zeros(1000, np.uint8))
    out = tmp_path / "out"
    code, err, seconds, peak = run_mlwf(["dataset", "idx", bomb, labels, out])
    assert_refused(code, err, bomb, match)
    assert seconds < 10 and peak < 256 * _MIB, (seconds, peak)
    assert not out.exists()


# --------------------------------------------------------------------------- what is not a file
@pytest.mark.parametrize("which", ["images", "labels", "names-file"])
def test_a_fifo_is_refused_at_once_without_waiting_for_a_writer(tmp_path, which):
    images, labels, _, _ = make_pair(tmp_path, count=4, rows=2, cols=2, classes=2)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    paths = {"images": images, "labels": labels, "names-file": names, which: fifo}
    code, err, seconds, _ = run_mlwf(["dataset", "idx", paths["images"], paths["labels"], tmp_path / "out",
                                      "--names-file", paths["names-file"]], timeout=20)
    assert_refused(code, err, fifo, "is a named pipe (FIFO), not a regular file")
    assert seconds < 10 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("special, kind", [("/dev/zero", "a character device"), ("/dev/null", "a character device"),
                                           ("dir", "a directory")])
@pytest.mark.parametrize("which", ["images", "labels", "names"])
def test_devices_and_directories_are_refused_naming_what_they_are(tmp_path, special, kind, which):
    images, labels, _, _ = make_pair(tmp_path, count=4, rows=2, cols=2, classes=2)
    path = Path(special)
    if special == "dir":
        path = tmp_path / "a-folder"
        path.mkdir()
    with pytest.raises(DataError) as info:
        if which == "names":
            read_class_names(path)
        else:
            write_idx(path if which == "images" else images, path if which == "labels" else labels, tmp_path / "out")
    message = str(info.value)
    assert f"{path} is {kind}, not a regular file" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_a_link_to_a_regular_file_is_read(tmp_path):
    images, labels, _, _ = make_pair(tmp_path, count=4, rows=2, cols=2, classes=2)
    (tmp_path / "linked").symlink_to(images)
    assert write_idx(tmp_path / "linked", labels, tmp_path / "out") == 4


# --------------------------------------------------------------------------- more or less than declared
def test_more_data_than_the_header_declares_is_refused_in_every_form(tmp_path):
    data = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    one = gzip.compress(data, mtime=0)
    half = gzip.compress(data[:20], mtime=0) + gzip.compress(data[20:], mtime=0)
    size = struct.pack("<I", len(data))  # what the first member's trailer records
    trailer = "its gzip trailer records"  # the last 4 bytes are not the size: refused before inflating
    cases = {
        "zero padding": (one + bytes(8), trailer),
        "an empty second member": (one + gzip.compress(b"", mtime=0), trailer),
        "the data in a second member": (half, trailer),
        # The last 4 bytes made to look like the first member's size: refused where the first member ends.
        "bytes ending in its size": (one + b"trailing" + size, "holds bytes after its gzip stream"),
        "a second copy": (one + one, "holds a second gzip member"),
        "the data in a second member, its trailer forged": (half[:-4] + size, "holds a second gzip member"),
        "raw": (data + b"\x00", "is longer than its header says"),
    }
    for case, (content, match) in cases.items():
        path = tmp_path / case
        path.write_bytes(content)
        with pytest.raises(DataError, match=match) as info:
            read_idx(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value), case


def test_a_header_declaring_more_than_the_data_holds_is_refused(tmp_path):
    content = idx_bytes(np.zeros((10, 4, 4), np.uint8))
    short = bytearray(gzip.compress(idx_header((11, 4, 4)) + content[16:], mtime=0))
    cases = {
        "raw": (idx_header((11, 4, 4)) + content[16:], r"truncated: header declares 11x4x4 = 176 data bytes "
                                                       r"but the file holds 160"),
        "gzip": (bytes(short), "does not hold what its header declares: 11x4x4 = 176 data bytes"),
        # The trailer forged to agree with the header: zlib finds the stream's own size check wrong.
        "gzip, forged trailer": (bytes(short[:-4]) + struct.pack("<I", 16 + 176),
                                 "is a corrupt gzip file .*incorrect length check"),
        "gzip, more than it can hold": (gzip.compress(idx_header((2**20, 2**12)), mtime=0),
                                        "more than a gzip file of"),
    }
    for case, (content, match) in cases.items():
        path = tmp_path / case
        path.write_bytes(content)
        with pytest.raises(DataError, match=match) as info:
            read_idx(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value), case


def test_images_over_the_memory_budget_are_refused_before_they_are_read(tmp_path):
    images = gzip_bomb(tmp_path / "images.gz", idx_header((30 * 1024, 32, 32)), 30)  # honest: 30 MiB of images
    labels = write_idx_file(tmp_path / "labels", np.zeros(30 * 1024, np.uint8))
    out = tmp_path / "out"
    code, err, _, _ = run_mlwf(["dataset", "idx", images, labels, out, "--max-memory", "16MiB"])
    assert_refused(code, err, images, "of memory, over this process's limit of 16 MiB (--max-memory / MLWF_MAX_MEMORY)",
                   "--n and --offset")
    assert not out.exists()


def test_the_budget_flag_is_checked_and_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(budget.MEMORY, "limit", budget.MEMORY.limit)  # put back after the command sets it
    images, labels, _, _ = make_pair(tmp_path, count=4, rows=2, cols=2, classes=2)
    assert main(["dataset", "idx", str(images), str(labels), str(tmp_path / "out"), "--max-memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert "--max-memory 'lots' is not a size" in err and err.count("\n") == 1
    assert main(["dataset", "idx", str(images), str(labels), str(tmp_path / "out"), "--max-memory", "16MiB"]) == 0
    assert budget.MEMORY.limit == 16 << 20 and budget.MEMORY.used == 0


# --------------------------------------------------------------------------- nothing half-written
def _failing_save(after: int, error: BaseException):
    from PIL import Image

    real = Image.Image.save
    calls = []

    def save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) > after:
            raise error
        return real(self, fp, *args, **kwargs)

    return save


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failure_midway_leaves_the_output_folder_as_it_was(tmp_path, monkeypatch, error):
    from PIL import Image

    images, labels, _, _ = make_pair(tmp_path, count=20, rows=4, cols=4, classes=3)
    fresh, existing = tmp_path / "fresh" / "deeper", tmp_path / "existing"
    write_idx(images, labels, existing, n=5)
    before = tree_bytes(existing)
    monkeypatch.setattr(Image.Image, "save", _failing_save(12, error))
    listing = sorted(p.relative_to(existing) for p in existing.rglob("*"))
    for out in (fresh, existing):
        with pytest.raises(DataError if isinstance(error, OSError) else KeyboardInterrupt) as info:
            write_idx(images, labels, out, offset=3, overwrite=True)  # 0..2 go only once 3..19 are written
        if isinstance(error, OSError):
            assert "No space left on device" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "fresh").exists()
    assert tree_bytes(existing) == before and sorted(p.relative_to(existing) for p in existing.rglob("*")) == listing


def test_a_written_folder_holds_only_the_images(tmp_path):
    images, labels, _, _ = make_pair(tmp_path, count=20, rows=4, cols=4, classes=3)
    out = tmp_path / "out"
    write_idx(images, labels, out, n=8)
    assert write_idx(images, labels, out) == 20  # into class folders that exist: file by file
    files = [p for p in out.rglob("*") if not p.is_dir()]
    assert len(files) == 20 and all(p.suffix == ".png" and p.parent.parent == out for p in files)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
