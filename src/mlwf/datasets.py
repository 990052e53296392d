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

Inputs are untrusted. Every path read must be a regular file (or a link to
one): a FIFO, a device or a directory is refused without being read. An IDX
file's header is checked against the bytes that can exist before its data is
read, a gzip file is inflated a chunk at a time and never past what its header
declares, and the images converted at once are first taken from the process's
memory budget (:mod:`mlwf.budget`). Nothing is written before every byte of
both files has been checked, and the PNGs land in ``OUT`` together at the end:
a failure midway leaves ``OUT`` as it was.

Every problem with the input or the output folder raises
:class:`mlwf.errors.DataError` with a one-line message: what is wrong, where,
and what to do (a budget refusal is :class:`mlwf.budget.BudgetExceeded`).
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from mlwf import budget
from mlwf.errors import DataError
from mlwf.files import open_regular

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
#: Most bytes an IDX file is inflated by at a time (and read by, raw).
CHUNK = 1 << 20
#: Most bytes deflate makes of one compressed byte (a 258-byte match in 2 bits): a gzip file of
#: ``size`` bytes holds at most ``MAX_DEFLATE_RATIO * size``, known before inflating any of it.
MAX_DEFLATE_RATIO = 1032
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

    Nothing the header declares is believed before it is checked against
    the bytes that can exist (a raw file's size; a gzip file's size times
    :data:`MAX_DEFLATE_RATIO`, and the size its trailer records) and against
    the process's memory budget (:data:`mlwf.budget.MEMORY`); a gzip file is
    inflated :data:`CHUNK` bytes at a time and refused at its first byte past
    what the header declares.

    Parameters
    ----------
    path : str or os.PathLike
        Path of the IDX file (e.g. ``train-images-idx3-ubyte.gz``): a
        regular file, or a link to one.

    Returns
    -------
    data : numpy.ndarray of dtype uint8
        Array whose shape is the dimensions given in the header, e.g.
        ``(60000, 28, 28)`` for MNIST training images or ``(60000,)`` for
        its labels.

    Raises
    ------
    DataError
        If the file does not exist, is not a regular file (a FIFO, a device,
        a directory) or cannot be read, is not an IDX file (bad magic, header
        too short, corrupt gzip stream), has a type code other than ``0x08``,
        or holds more or fewer data bytes than its header declares (trailing
        bytes and a second gzip member included).
    BudgetExceeded
        If the data declared is more than the memory budget allows
        (``MLWF_MAX_MEMORY``).
    """
    with _IdxFile(path) as idx, budget.MEMORY.reserve(idx.nbytes, f"IDX file {idx.path} ({idx.shape_text()})"):
        return idx.read_items(0, idx.dims[0])


class _IdxFile:
    """An IDX file opened for reading, raw or gzipped: its header, then its data a chunk at a time.

    Opening reads and checks the header (magic, type code, dimensions) and
    checks what it declares against the bytes that can exist, before any
    data is read: a raw file must hold exactly the declared data bytes; a
    gzip file can hold at most :data:`MAX_DEFLATE_RATIO` times its size, and
    its trailer's size (modulo 4 GiB) must be the header's. Reading then
    inflates at most :data:`CHUNK` bytes at a time, and :meth:`read_items`
    refuses the file at its first byte past the declared data (trailing
    bytes, a second gzip member).

    Parameters
    ----------
    path : str or os.PathLike
        The IDX file: a regular file, or a link to one.

    Raises
    ------
    DataError
        As :func:`read_idx`, for what the header and the file's size show.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._file = open_regular(self.path, "IDX file", "check the path "
                                   "(MNIST-format files are named like train-images-idx3-ubyte.gz)")
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            self.gzipped = self._raw(2) == _GZIP_MAGIC
            self._file.seek(0)
            self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if self.gzipped else None
            self._pending = b""  # compressed bytes read but not inflated yet
            self._done = 0  # data bytes read so far
            ndim = _parse_header(self._read(4), self.path)
            self.dims: tuple[int, ...] = _dims(self._read(4 * ndim), ndim, self.path)
            self.start = 4 + 4 * ndim
            #: Data bytes the header declares.
            self.nbytes = math.prod(self.dims)
            self._check_declared()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> _IdxFile:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def shape_text(self) -> str:
        """The dimensions as ``60000x28x28``."""
        return "x".join(str(d) for d in self.dims)

    def _check_declared(self) -> None:
        if not self.gzipped:
            if self.size - self.start != self.nbytes:
                # Checked before reading so a corrupt header cannot trigger a huge read.
                raise _length_error(self.path, self.dims, self.nbytes, self.size - self.start)
            return
        total = self.start + self.nbytes
        if total > MAX_DEFLATE_RATIO * self.size:
            raise DataError(
                f"IDX file {self.path} declares {self.shape_text()} = {self.nbytes:,} data bytes, more than a "
                f"gzip file of {self.size:,} bytes can hold ({MAX_DEFLATE_RATIO} times its size); "
                "download it again"
            )
        if self.size >= 18:  # the smallest gzip file; a shorter one fails as truncated when read
            at = self._file.tell()
            self._file.seek(self.size - 4)
            (recorded,) = struct.unpack("<I", self._raw(4).rjust(4, b"\0"))
            self._file.seek(at)
            if recorded != total % (1 << 32):
                raise DataError(
                    f"IDX file {self.path} does not hold what its header declares: {self.shape_text()} = "
                    f"{self.nbytes:,} data bytes ({total:,} with the header), but its gzip trailer records "
                    f"{recorded:,} bytes (modulo 4 GiB); it is truncated or corrupt, download it again"
                )

    def _raw(self, n: int) -> bytes:
        try:
            return self._file.read(n)
        except OSError as exc:
            raise DataError(f"cannot read IDX file {self.path}: {exc.strerror or exc}; "
                            "check that the file is readable") from None

    def _read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the file's content (inflated), fewer only where the content ends."""
        if not self.gzipped:
            return self._raw(n)
        parts, got = [], 0
        inflater = self._inflater
        try:
            while got < n and not inflater.eof:
                if not self._pending:
                    self._pending = self._raw(CHUNK)
                    if not self._pending:
                        raise DataError(f"IDX file {self.path} is a truncated gzip file (its stream ends before "
                                        "its end marker); download it again")
                part = inflater.decompress(self._pending, n - got)
                self._pending = inflater.unconsumed_tail
                parts.append(part)
                got += len(part)
        except zlib.error as exc:
            raise DataError(f"IDX file {self.path} is a corrupt gzip file ({exc}); download it again") from None
        return b"".join(parts)

    def _data(self, n: int):
        """The next ``n`` data bytes, in pieces of at most :data:`CHUNK` bytes."""
        while n > 0:
            piece = self._read(min(n, CHUNK))
            if not piece:
                self._check_one_stream()
                raise _length_error(self.path, self.dims, self.nbytes, self._done)
            self._done += len(piece)
            n -= len(piece)
            yield piece

    def read_items(self, first: int, stop: int) -> np.ndarray:
        """Items ``first`` .. ``stop - 1`` along the first dimension, shaped as the header says.

        The data before and after them is read (inflated) and dropped, and the
        file must end where its header says, so the items come from a file
        whose every byte was checked. Call it once.

        Raises
        ------
        DataError
            If the data ends early or goes on past what the header declares
            (bytes after the data, after the gzip stream, a second gzip member).
        """
        item = math.prod(self.dims[1:])
        out = np.empty((stop - first) * item, dtype=np.uint8)
        for _ in self._data(first * item):
            pass
        at = 0
        for piece in self._data(len(out)):
            out[at : at + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            at += len(piece)
        for _ in self._data(self.nbytes - stop * item):
            pass
        self._check_end()
        return out.reshape((stop - first, *self.dims[1:]))

    def _check_end(self) -> None:
        """Refuse anything after the declared data: more content, bytes after the gzip stream, a second member."""
        more = self._read(1)
        if more:
            raise DataError(
                f"IDX file {self.path} is longer than its header says: the header declares "
                f"{self.shape_text()} = {self.nbytes:,} data bytes and more follow; download it again"
            )
        self._check_one_stream()

    def _check_one_stream(self) -> None:
        """Refuse bytes after the gzip stream (a second member, padding, garbage): a file is one stream."""
        if self.gzipped and self._inflater.eof:
            after = self._inflater.unused_data + self._raw(2)
            if after:
                extra = "a second gzip member" if after.startswith(_GZIP_MAGIC) else "bytes"
                declared = f"the {self.nbytes:,} data bytes its header declares"
                where = f"past {declared}" if self._done == self.nbytes else \
                    f"which ends {self._done:,} bytes into {declared}"
                raise DataError(
                    f"IDX file {self.path} holds {extra} after its gzip stream, {where}; mlwf reads one gzip "
                    "stream: download the file again, or gunzip it and pass the raw file"
                )


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


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------


def write_digits(
    out: str | os.PathLike[str],
    n: int | None = None,
    *,
    overwrite: bool = False,
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
        Output folder. Created if missing. If it already holds anything this
        call does not write (other class folders, other images: another data
        set, or more of this one), it is refused unless ``overwrite``; the
        same files written again are replaced.
    overwrite : bool, default=False
        Replace what ``out`` holds with the images written here: class
        folders and images this call does not write are removed once every
        new image is written. Only class folders of files are removed; any
        other entry (a link, a nested folder) is refused, never deleted.
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
        If ``n`` is not a positive int or exceeds 1,797, ``out`` is blank,
        exists and is not a directory, holds other data (without
        ``overwrite``), or a file cannot be written.
    """
    from sklearn.datasets import load_digits

    out = _output_folder(out)
    n = _check_n(n, _DIGITS_SOURCE)
    _check_out(out)
    digits = load_digits()
    count = len(digits.images)
    stop = _stop(0, n, count, _DIGITS_SOURCE)
    pixels = np.rint(digits.images[:stop] * (255.0 / 16.0))
    images = np.clip(pixels, 0, 255).astype(np.uint8)
    labels = np.asarray(digits.target[:stop])
    return _write_images(out, images, labels, 0, _index_width(count), progress, overwrite=overwrite)


def write_idx(
    images_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    n: int | None = None,
    offset: int = 0,
    *,
    class_names=None,
    overwrite: bool = False,
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
        Output folder. Created if missing. If it already holds anything this
        call does not write (other class folders, other images: another data
        set, or more of this one), it is refused unless ``overwrite``; the
        same files written again are replaced.
    overwrite : bool, default=False
        Replace what ``out`` holds with the images written here: class
        folders and images this call does not write are removed once every
        new image is written. Only class folders of files are removed; any
        other entry (a link, a nested folder) is refused, never deleted.
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
        if a file is missing, not a regular file, unreadable, not an 8-bit
        IDX file, or holds more or less than its header declares (see
        :func:`read_idx`); the images file is not 3-dimensional or the
        labels file not 1-dimensional; the counts differ; ``n`` is not a
        positive int or larger than the images available after ``offset``;
        ``offset`` is not an int in ``[0, count)``; ``out`` is blank, exists
        and is not a directory, holds other data (without ``overwrite``), a
        file is in the way of a class folder, or a file cannot be written.
        Nothing is left in ``out`` then.
    BudgetExceeded
        If the ``n`` images (and labels) asked for take more memory than the
        budget allows (``MLWF_MAX_MEMORY``, ``--max-memory``): convert them
        in parts with ``n`` and ``offset``, or raise it.
    """
    images_path, labels_path, out = Path(images_path), Path(labels_path), _output_folder(out)
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

    with _IdxFile(images_path) as images, _IdxFile(labels_path) as labels:
        if len(images.dims) != 3:
            raise DataError(
                f"IDX images file {images_path} has {len(images.dims)} dimension(s) "
                f"{images.dims}, expected 3 (count, rows, cols); "
                "pass the images file (idx3) first and the labels file (idx1) second"
            )
        count, rows, cols = images.dims
        if rows == 0 or cols == 0:
            raise DataError(
                f"IDX images file {images_path} has empty images of "
                f"{rows}x{cols} pixels; pass a valid images file"
            )
        if len(labels.dims) != 1:
            raise DataError(
                f"IDX labels file {labels_path} has {len(labels.dims)} dimension(s) "
                f"{labels.dims}, expected 1 (count); "
                "pass the labels file (idx1) second"
            )
        if labels.dims[0] != count:
            raise DataError(
                f"IDX files do not match: {images_path} holds {count} images but "
                f"{labels_path} holds {labels.dims[0]} labels; "
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
        # Only the images asked for are held (the rest is read and dropped), taken from the budget first.
        held = (stop - offset) * (rows * cols + 1)
        with budget.MEMORY.reserve(held, f"images {offset} to {stop - 1} of {images_path} ({stop - offset} "
                                         f"of {rows}x{cols} pixels; convert fewer with --n and --offset)"):
            chosen_labels = labels.read_items(offset, stop)
            if class_names is not None:
                top = int(chosen_labels.max())
                if top >= len(class_names):
                    first = offset + int(np.argmax(chosen_labels >= len(class_names)))
                    raise DataError(
                        f"label {int(chosen_labels[first - offset])} of image {first} in {labels_path} has no "
                        f"class name: {len(class_names)} names were given (labels 0 to {len(class_names) - 1}); "
                        "give a name for every label"
                    )
            chosen_images = images.read_items(offset, stop)
            # Every byte of both files is checked before the first image is written.
            return _write_images(out, chosen_images, chosen_labels, offset, _index_width(count), progress,
                                 class_names, overwrite=overwrite)


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
        If the file does not exist, is not a regular file (a FIFO, a device,
        a directory; a link to a file is fine), cannot be read, is larger
        than 256 KiB, is not UTF-8 text, or a name is not usable.
    """
    path = Path(path)
    with open_regular(path, "class names file", "give a text file with one name per line, or --names "
                       + "|".join(KNOWN_CLASS_NAMES)) as f:
        try:
            raw = f.read(_MAX_NAMES_FILE + 1)  # bounded: the file may be huge
        except OSError as exc:
            raise DataError(f"cannot read class names file {path}: {exc.strerror or exc}") from None
    if len(raw) > _MAX_NAMES_FILE:
        raise DataError(f"class names file {path} is larger than {_MAX_NAMES_FILE // 1024} KiB; "
                        "give a text file with one short name per label")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"class names file {path} is not UTF-8 text; save it as UTF-8") from None
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


def _output_folder(out) -> Path:
    """``out`` as a path; a blank one is refused (``Path("")`` would be the current folder)."""
    if not str(out).strip():
        raise DataError(f"the output folder {str(out)!r} is blank; name the folder to write the class folders into")
    return Path(out)


def _other_entries(out: Path, files: dict[str, set[str]]) -> list[Path]:
    """What ``out`` holds that writing ``files`` (class name → PNG names) would not: whole folders or
    files at the top, images inside a class folder that is written. Hidden entries (``.…``, such as
    an interrupted call's staging folder) are not data: ``upload-dir`` leaves them out."""
    if not out.is_dir():
        return []
    others = []
    for entry in sorted(os.scandir(out), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        written = files.get(entry.name)
        if written is None or not entry.is_dir(follow_symlinks=False):
            others.append(Path(entry.path))
            continue
        others.extend(Path(inner.path) for inner in sorted(os.scandir(entry.path), key=lambda e: e.name)
                      if not inner.name.startswith(".") and inner.name not in written)
    return others


def _check_removable(path: Path, out: Path) -> None:
    """``--overwrite`` removes class folders of files and files in them, nothing else: refuse the rest."""
    in_class_folder = path.parent != out
    what = "a link" if path.is_symlink() else None
    if what is None and path.is_dir():
        inner = [e for e in os.scandir(path) if not e.is_file(follow_symlinks=False)]
        if in_class_folder:
            what = "a folder inside a class folder"
        elif inner:
            what = f"a folder that holds {inner[0].name!r}, which is not a file"
    elif what is None and not (in_class_folder and path.is_file()):
        what = "not a class folder" if not in_class_folder else "not a regular file"
    if what is not None:
        raise DataError(f"{path} is {what}: --overwrite removes only class folders of images in {out}; "
                        "move it away or choose another output folder")


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
    *,
    overwrite: bool = False,
) -> int:
    """Write ``images[i]`` as ``out/<name of labels[i]>/<first_index + i>.png``, all of them or none.

    An ``out`` that holds anything else (another data set's class folders,
    more images of this one) is refused before anything is written: training
    would learn both. With ``overwrite`` those entries are removed, after
    every new image is written.

    The PNGs are written into a hidden folder inside ``out`` (hidden, so
    ``mlwf s3 upload-dir`` leaves it out) and moved into place once every one
    is written: a failure midway (a full disk, an interrupt) leaves ``out``
    as it was, with no half-written PNG and no partial set; a folder this
    call created is removed again.
    """
    total = len(images)
    step = max(1, math.ceil(total / _MAX_PROGRESS_CALLS))
    if class_names is None:
        label_names = [str(int(v)) for v in labels]
    else:
        label_names = [class_names[int(v)] for v in labels]
    names = sorted(set(label_names))
    files: dict[str, set[str]] = {name: set() for name in names}
    for i, name in enumerate(label_names):
        files[name].add(f"{first_index + i:0{width}d}.png")
    for name in names:  # what is in the way is refused before anything is written
        if os.path.lexists(out / name) and not (out / name).is_dir():
            raise DataError(f"{out / name} is in the way: a file where the class folder {name!r} goes; "
                            "move it or choose another output folder")
    others = _other_entries(out, files)
    if others and not overwrite:
        shown = ", ".join(str(p.relative_to(out)) for p in others[:3]) + (", …" if len(others) > 3 else "")
        raise DataError(f"output folder {out} already holds {len(others)} entr{'y' if len(others) == 1 else 'ies'} "
                        f"this data set does not write ({shown}); training on the folder would mix them: "
                        "add --overwrite to replace what it holds, or choose an empty folder")
    for path in others:
        _check_removable(path, out)
    created = [folder for folder in (out, *out.parents) if not os.path.lexists(folder)]
    target = out
    staging = None
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".mlwf-writing-", dir=out))
            for name in names:
                target = staging / name
                target.mkdir()
            for i in range(total):
                target = staging / label_names[i] / f"{first_index + i:0{width}d}.png"
                Image.fromarray(np.ascontiguousarray(images[i]), mode="L").save(target, **_PNG_OPTIONS)
                done = i + 1
                if progress is not None and (done % step == 0 or done == total):
                    progress(done, total)
            for name in names:
                target = out / name
                if not os.path.lexists(target):
                    os.rename(staging / name, target)  # a new class folder: one rename
                    continue
                for png in sorted(os.listdir(staging / name)):
                    target = out / name / png
                    os.replace(staging / name / png, target)
            for path in others:  # only with overwrite: every new image is in place by now
                target = path
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        except OSError as exc:
            raise _write_error(target, out, exc) from None
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            staging = None
        for folder in created:  # deepest first; only while empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return total


def _write_error(target: Path, out: Path, exc: OSError) -> DataError:
    return DataError(
        f"cannot write {target}: {exc.strerror or exc}; "
        f"check that the output folder {out} is writable and has free space"
    )
