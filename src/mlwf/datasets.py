"""Turn datasets into image folders in the class-folder layout.

Every writer in this module produces ``OUT/<label>/<index>.png``: one
grayscale 8-bit PNG (Pillow mode ``"L"``) per image, in a folder named after
the image's label: its class name when names are given (:func:`write_idx`'s
``class_names``, e.g. :data:`KNOWN_CLASS_NAMES`), else the label as a decimal
integer (``"0"`` .. ``"9"``). ``<index>`` is the
image's position in its source set, zero-padded to 5 digits (more digits when
the source holds 100,000 images or more), so a file name never changes with
``n`` or ``offset``.

Output is deterministic: the same inputs give byte-identical files. PNGs are
encoded by Pillow with fixed options and carry no timestamp or metadata
chunk. Existing files in ``OUT`` are left alone except those with the same
names as ours, which are overwritten.

Sources:

* :func:`write_digits` -- scikit-learn's bundled 8x8 digits (no download).
* :func:`write_idx` -- an MNIST-format IDX pair (images + labels), raw or
  gzipped, e.g. MNIST or Fashion-MNIST. :func:`read_idx` reads one IDX file.

Every problem with the input or the output folder raises
:class:`mlwf.errors.DataError` with a one-line message: what is wrong, where,
and what to do.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from mlwf.errors import DataError

__all__ = ["KNOWN_CLASS_NAMES", "check_class_names", "read_class_names", "read_idx", "write_digits", "write_idx"]

ProgressFn = Callable[[int, int], None]

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UBYTE = 0x08
_IDX_TYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "short",
    0x0C: "int",
    0x0D: "float",
    0x0E: "double",
}
_MAX_PROGRESS_CALLS = 100
_DIGITS_SOURCE = "scikit-learn digits (sklearn.datasets.load_digits)"

#: Class names of the standard MNIST-format datasets, by label, as folder names
#: (Fashion-MNIST's "T-shirt/top" and "Ankle boot" made safe for a path).
KNOWN_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion-mnist": ("t-shirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                      "bag", "ankle-boot"),
}
_MAX_NAME_BYTES = 255  # a folder name, on every common file system
_MAX_NAMES_FILE = 256 * 1024  # 256 labels (IDX labels are bytes) of 255 bytes each, with room to spare

# Fixed encoder options: the bytes of a PNG depend only on its pixels.
_PNG_OPTIONS = {"format": "PNG", "optimize": False, "compress_level": 6}


# --------------------------------------------------------------------------
# IDX reading
# --------------------------------------------------------------------------


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an MNIST-format IDX file into a uint8 array.

    The file may be raw or gzip-compressed; compression is detected from the
    first two bytes (``1f 8b``), not from the file name. The header is two
    zero bytes, a type code (only ``0x08``, unsigned byte, is supported), the
    number of dimensions, then each dimension as a big-endian uint32. The data
    that follows must be exactly the product of the dimensions in bytes.

    Parameters
    ----------
    path : str or os.PathLike
        Path of the IDX file (e.g. ``train-images-idx3-ubyte.gz``).

    Returns
    -------
    data : numpy.ndarray of dtype uint8
        Array whose shape is the dimensions given in the header, e.g.
        ``(60000, 28, 28)`` for MNIST training images or ``(60000,)`` for
        its labels.

    Raises
    ------
    DataError
        If the file does not exist or cannot be read, is not an IDX file (bad
        magic, header too short, corrupt gzip stream), has a type code other
        than ``0x08``, or holds more or fewer data bytes than its header
        declares.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(2) == _GZIP_MAGIC:
                f.seek(0)
                with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                    raw = gz.read()
                return _parse_idx(memoryview(raw), path)
            f.seek(0)
            return _read_raw_idx(f, path)
    except FileNotFoundError:
        raise DataError(
            f"IDX file {path} does not exist; check the path "
            "(MNIST-format files are named like train-images-idx3-ubyte.gz)"
        ) from None
    except IsADirectoryError:
        raise DataError(
            f"IDX path {path} is a directory, not a file; "
            "pass the path of an IDX file"
        ) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(
            f"IDX file {path} is a corrupt or truncated gzip file ({exc}); "
            "download it again"
        ) from None
    except OSError as exc:
        raise DataError(
            f"cannot read IDX file {path}: {exc.strerror or exc}; "
            "check that the file is readable"
        ) from None


def _parse_header(head: bytes, path: Path) -> int:
    """Check the 4-byte magic (00 00 08 ndim) and return ``ndim``."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DataError(
            f"{path} is not an IDX file (bad magic number "
            f"{head[:4].hex(' ') or 'empty file'}, expected 00 00 08 <ndim>); "
            "pass an MNIST-format IDX file, raw or gzipped"
        )
    type_code, ndim = head[2], head[3]
    if type_code != _IDX_UBYTE:
        name = _IDX_TYPE_NAMES.get(type_code, "unknown type")
        raise DataError(
            f"IDX file {path} has type code 0x{type_code:02x} ({name}); only "
            "0x08 (unsigned byte) is supported, use an 8-bit IDX file"
        )
    if ndim == 0:
        raise DataError(
            f"IDX file {path} declares 0 dimensions; "
            "pass an IDX file of images (3 dims) or labels (1 dim)"
        )
    return ndim


def _dims(buf: bytes, ndim: int, path: Path) -> tuple[int, ...]:
    if len(buf) < 4 * ndim:
        raise DataError(
            f"IDX file {path} is truncated inside its header "
            f"({ndim} dimensions declared); download it again"
        )
    return struct.unpack(f">{ndim}I", buf[: 4 * ndim])


def _length_error(path: Path, dims: tuple[int, ...], expected: int, got: int) -> DataError:
    shape = "x".join(str(d) for d in dims) + " = " if len(dims) > 1 else ""
    what = "truncated" if got < expected else "longer than its header says"
    return DataError(
        f"IDX file {path} is {what}: header declares {shape}{expected} "
        f"data bytes but the file holds {got}; download it again"
    )


def _parse_idx(buf: memoryview, path: Path) -> np.ndarray:
    """Parse a complete (decompressed) IDX file held in memory."""
    ndim = _parse_header(bytes(buf[:4]), path)
    dims = _dims(bytes(buf[4 : 4 + 4 * ndim]), ndim, path)
    start = 4 + 4 * ndim
    expected = math.prod(dims)
    got = len(buf) - start
    if got != expected:
        raise _length_error(path, dims, expected, got)
    return np.frombuffer(buf, dtype=np.uint8, offset=start).reshape(dims)


def _read_raw_idx(f, path: Path) -> np.ndarray:
    """Parse an uncompressed IDX file, reading only the bytes it declares."""
    ndim = _parse_header(f.read(4), path)
    dims = _dims(f.read(4 * ndim), ndim, path)
    start = 4 + 4 * ndim
    expected = math.prod(dims)
    got = os.fstat(f.fileno()).st_size - start
    if got != expected:
        # Checked before reading so a corrupt header cannot trigger a huge read.
        raise _length_error(path, dims, expected, got)
    data = f.read(expected)
    if len(data) != expected:  # file shrank while we read it
        raise _length_error(path, dims, expected, len(data))
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------


def write_digits(
    out: str | os.PathLike[str],
    n: int | None = None,
    *,
    progress: ProgressFn | None = None,
) -> int:
    """Write scikit-learn's bundled digits as ``OUT/<label>/<index>.png``.

    Uses :func:`sklearn.datasets.load_digits` (bundled with scikit-learn, no
    download): 1,797 images of 8x8 pixels with values 0..16, scaled to
    0..255 as ``round(v * 255 / 16)``. ``<index>`` is the image's index in
    the source set, zero-padded to 5 digits (e.g. ``OUT/3/00042.png``).

    Parameters
    ----------
    out : str or os.PathLike
        Output folder. Created if missing; existing files other than the ones
        written here are left alone, same-named files are overwritten.
    n : int or None, default=None
        Write only the first ``n`` images. ``None`` writes all 1,797.
    progress : callable or None, default=None
        Called as ``progress(done, total)`` while writing, at most about 100
        times, and always once with ``done == total`` at the end.

    Returns
    -------
    written : int
        Number of images written.

    Raises
    ------
    DataError
        If ``n`` is not a positive int or exceeds 1,797, or ``out`` exists
        and is not a directory, or a file cannot be written.
    """
    from sklearn.datasets import load_digits

    out = Path(out)
    n = _check_n(n, _DIGITS_SOURCE)
    _check_out(out)
    digits = load_digits()
    count = len(digits.images)
    stop = _stop(0, n, count, _DIGITS_SOURCE)
    pixels = np.rint(digits.images[:stop] * (255.0 / 16.0))
    images = np.clip(pixels, 0, 255).astype(np.uint8)
    labels = np.asarray(digits.target[:stop])
    return _write_images(out, images, labels, 0, _index_width(count), progress)


def write_idx(
    images_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    n: int | None = None,
    offset: int = 0,
    *,
    class_names=None,
    progress: ProgressFn | None = None,
) -> int:
    """Write an MNIST-format IDX image/label pair as ``OUT/<label>/<index>.png``.

    Works for MNIST, Fashion-MNIST and any other 8-bit IDX pair. Both files
    may be raw or gzipped (see :func:`read_idx`). Images ``offset`` ..
    ``offset + n - 1`` are written; ``<index>`` is the image's position in
    the IDX file, zero-padded to 5 digits, or to the number of digits of the
    image count when the file holds 100,000 images or more.

    Parameters
    ----------
    images_path : str or os.PathLike
        IDX file of images with 3 dimensions (count, rows, cols).
    labels_path : str or os.PathLike
        IDX file of labels with 1 dimension (count), same count as images.
    out : str or os.PathLike
        Output folder. Created if missing; existing files other than the ones
        written here are left alone, same-named files are overwritten.
    n : int or None, default=None
        Number of images to write. ``None`` writes all images from
        ``offset`` to the end. Never clipped: asking for more than are
        available is an error.
    offset : int, default=0
        Index of the first image to write.
    class_names : sequence of str or None, default=None
        The folder name of each label (label 0 first), e.g.
        ``KNOWN_CLASS_NAMES["fashion-mnist"]``; checked with
        :func:`check_class_names`. ``None`` names folders by the label's number.
    progress : callable or None, default=None
        Called as ``progress(done, total)`` while writing, at most about 100
        times, and always once with ``done == total`` at the end.

    Returns
    -------
    written : int
        Number of images written.

    Raises
    ------
    DataError
        If a class name is not usable, or a label has no name;
        if a file is missing, unreadable, not an 8-bit IDX file or truncated
        (see :func:`read_idx`); the images file is not 3-dimensional or the
        labels file not 1-dimensional; the counts differ; ``n`` is not a
        positive int or larger than the images available after ``offset``;
        ``offset`` is not an int in ``[0, count)``; ``out`` exists and is not
        a directory, or a file cannot be written.
    """
    images_path, labels_path, out = Path(images_path), Path(labels_path), Path(out)
    n = _check_n(n, images_path)
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
        raise DataError(
            f"offset must be an int, got {offset!r} ({type(offset).__name__}) "
            f"for {images_path}; pass a whole number >= 0"
        )
    offset = int(offset)
    if class_names is not None:
        class_names = check_class_names(class_names)
    _check_out(out)

    images = read_idx(images_path)
    if images.ndim != 3:
        raise DataError(
            f"IDX images file {images_path} has {images.ndim} dimension(s) "
            f"{images.shape}, expected 3 (count, rows, cols); "
            "pass the images file (idx3) first and the labels file (idx1) second"
        )
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise DataError(
            f"IDX images file {images_path} has empty images of "
            f"{images.shape[1]}x{images.shape[2]} pixels; pass a valid images file"
        )
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise DataError(
            f"IDX labels file {labels_path} has {labels.ndim} dimension(s) "
            f"{labels.shape}, expected 1 (count); "
            "pass the labels file (idx1) second"
        )
    count = images.shape[0]
    if labels.shape[0] != count:
        raise DataError(
            f"IDX files do not match: {images_path} holds {count} images but "
            f"{labels_path} holds {labels.shape[0]} labels; "
            "pass the labels file that belongs to these images"
        )
    if count == 0:
        raise DataError(
            f"IDX images file {images_path} holds no images; pass a non-empty file"
        )
    if not 0 <= offset < count:
        raise DataError(
            f"offset {offset} is out of range for {images_path}, which holds "
            f"{count} images; pass an offset from 0 to {count - 1}"
        )
    stop = _stop(offset, n, count, images_path)
    if class_names is not None:
        top = int(labels[offset:stop].max())
        if top >= len(class_names):
            first = offset + int(np.argmax(labels[offset:stop] >= len(class_names)))
            raise DataError(
                f"label {int(labels[first])} of image {first} in {labels_path} has no class name: "
                f"{len(class_names)} names were given (labels 0 to {len(class_names) - 1}); "
                "give a name for every label"
            )
    return _write_images(
        out, images[offset:stop], labels[offset:stop], offset,
        _index_width(count), progress, class_names,
    )


# --------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------


def check_class_names(names, source: str = "class names") -> list[str]:
    """Check that ``names`` can name class folders; return them as a list.

    A class name becomes a folder name and the prefix of store keys, and the
    label training learns: it must be non-empty, free of ``/``, ``\\`` and
    control characters, not ``.``/``..`` nor start with ``.`` (hidden files
    are not uploaded), at most 255 bytes in UTF-8, and unique even ignoring
    case (a case-insensitive file system would merge two folders).

    Parameters
    ----------
    names : sequence of str
        The name of label 0, label 1, ...
    source : str
        Where the names came from, for the error message.

    Returns
    -------
    names : list of str

    Raises
    ------
    DataError
        Naming the first bad name, its position, and what to change.
    """
    names = list(names)
    if not names:
        raise DataError(f"{source} lists no class names; give one name per label, label 0 first")
    seen: dict[str, int] = {}
    for label, name in enumerate(names):
        where = f"{source}: the name of label {label} ({name!r})"
        if not isinstance(name, str) or not name:
            raise DataError(f"{where} is empty; give every label a name")
        if "/" in name or "\\" in name:
            raise DataError(f"{where} holds a path separator; class names become folder names, "
                            "use another character (e.g. t-shirt-top for T-shirt/top)")
        if name.startswith("."):
            raise DataError(f"{where} starts with '.'; such folders are hidden and not uploaded, rename it")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise DataError(f"{where} holds a control character; use printable characters")
        if len(name.encode("utf-8")) > _MAX_NAME_BYTES:
            raise DataError(f"{where} is longer than {_MAX_NAME_BYTES} bytes; shorten it")
        folded = name.casefold()
        if folded in seen:
            raise DataError(f"{where} repeats the name of label {seen[folded]} ({names[seen[folded]]!r}, "
                            "compared ignoring case); give every label its own name")
        seen[folded] = label
    return names


def read_class_names(path: str | os.PathLike[str]) -> list[str]:
    """Read class names from a text file: one name per line, label 0 first.

    Surrounding whitespace is dropped; the names are checked with
    :func:`check_class_names` (so a blank line is an error).

    Raises
    ------
    DataError
        If the file cannot be read, is not UTF-8 text, or a name is not usable.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_NAMES_FILE + 1)  # bounded: the path may be a device or a huge file
        if len(raw) > _MAX_NAMES_FILE:
            raise DataError(f"class names file {path} is larger than {_MAX_NAMES_FILE // 1024} KiB; "
                            "give a text file with one short name per label")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"class names file {path} does not exist; give a text file with one name per "
                        "line, or --names " + "|".join(KNOWN_CLASS_NAMES)) from None
    except IsADirectoryError:
        raise DataError(f"class names path {path} is a directory; give a text file") from None
    except UnicodeDecodeError:
        raise DataError(f"class names file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read class names file {path}: {exc.strerror or exc}") from None
    lines = text.split("\n")
    if lines and lines[-1].strip() == "":
        lines.pop()  # the newline that ends the last line
    return check_class_names([line.strip() for line in lines], f"class names file {path}")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _check_n(n, source) -> int | None:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise DataError(
            f"n must be an int or None, got {n!r} ({type(n).__name__}) for "
            f"{source}; pass a whole number > 0, or None for all images"
        )
    if n <= 0:
        raise DataError(
            f"n must be > 0, got {n} for {source}; "
            "pass a positive number of images, or None for all images"
        )
    return int(n)


def _stop(offset: int, n: int | None, count: int, source) -> int:
    available = count - offset
    if n is None:
        return count
    if n > available:
        after = f" after offset {offset}" if offset else ""
        raise DataError(
            f"n={n} is more than the {available} images available{after} in "
            f"{source}; pass n <= {available}, or None for all of them"
        )
    return offset + n


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(
            f"output folder {out} exists and is not a directory; "
            "remove it or choose another output folder"
        )


def _index_width(count: int) -> int:
    return max(5, len(str(count)))


def _write_images(
    out: Path,
    images: np.ndarray,
    labels: np.ndarray,
    first_index: int,
    width: int,
    progress: ProgressFn | None,
    class_names: list[str] | None = None,
) -> int:
    """Write ``images[i]`` as ``out/<name of labels[i]>/<first_index + i>.png``."""
    total = len(images)
    step = max(1, math.ceil(total / _MAX_PROGRESS_CALLS))
    if class_names is None:
        label_names = [str(int(v)) for v in labels]
    else:
        label_names = [class_names[int(v)] for v in labels]
    folders: dict[str, Path] = {}
    target = out
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in sorted(set(label_names)):
            target = out / name
            target.mkdir(exist_ok=True)
            folders[name] = target
    except OSError as exc:
        raise _write_error(target, out, exc) from None
    for i in range(total):
        target = folders[label_names[i]] / f"{first_index + i:0{width}d}.png"
        image = Image.fromarray(np.ascontiguousarray(images[i]), mode="L")
        try:
            image.save(target, **_PNG_OPTIONS)
        except OSError as exc:
            raise _write_error(target, out, exc) from None
        done = i + 1
        if progress is not None and (done % step == 0 or done == total):
            progress(done, total)
    return total


def _write_error(target: Path, out: Path, exc: OSError) -> DataError:
    return DataError(
        f"cannot write {target}: {exc.strerror or exc}; "
        f"check that the output folder {out} is writable and has free space"
    )
