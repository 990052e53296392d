"""IDX files (MNIST's format) read without believing them: headers checked, gzip inflated in bounded pieces.

:func:`read_idx` reads one file whole; :class:`IdxFile` streams the items a
writer asks for (:func:`mlwf.datasets.write_idx`), checking every byte.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from mlwf import budget
from mlwf.errors import DataError
from mlwf.files import open_regular

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
#: Most bytes an IDX file is inflated by at a time (and read by, raw).
CHUNK = 1 << 20
#: Most bytes deflate makes of one compressed byte (a 258-byte match in 2 bits): a gzip file of
#: ``size`` bytes holds at most ``MAX_DEFLATE_RATIO * size``, known before inflating any of it.
MAX_DEFLATE_RATIO = 1032


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
    with IdxFile(path) as idx, budget.MEMORY.reserve(idx.nbytes, f"IDX file {idx.path} ({idx.shape_text()})"):
        return idx.read_items(0, idx.dims[0])


class IdxFile:
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

    def __enter__(self) -> IdxFile:
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
