"""The writers: a data set's images as ``OUT/<label>/<index>.png``, all of them or none (see :mod:`mlwf.datasets`).

:func:`write_digits` (scikit-learn's bundled digits) and :func:`write_idx` (an
IDX pair) check their source whole, then write every PNG into a hidden folder
inside ``OUT`` and move them into place together.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from mlwf import budget
from mlwf.datasets.classnames import check_class_names
from mlwf.datasets.idx import IdxFile
from mlwf.errors import DataError

ProgressFn = Callable[[int, int], None]

_MAX_PROGRESS_CALLS = 100
_DIGITS_SOURCE = "scikit-learn digits (sklearn.datasets.load_digits)"

# Fixed encoder options: the bytes of a PNG depend only on its pixels.
_PNG_OPTIONS = {"format": "PNG", "optimize": False, "compress_level": 6}


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
    may be raw or gzipped (see :func:`~mlwf.datasets.idx.read_idx`). Images ``offset`` ..
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
        :func:`~mlwf.datasets.classnames.check_class_names`. ``None`` names folders by the label's number.
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
        :func:`~mlwf.datasets.idx.read_idx`); the images file is not 3-dimensional or the
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

    with IdxFile(images_path) as images, IdxFile(labels_path) as labels:
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
