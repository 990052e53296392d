"""Class names: the folder name of each label, checked before any folder is named after one."""

from __future__ import annotations

import os
from pathlib import Path

from mlwf.errors import DataError
from mlwf.files import open_regular

#: Class names of the standard MNIST-format datasets, by label, as folder names
#: (Fashion-MNIST's "T-shirt/top" and "Ankle boot" made safe for a path).
KNOWN_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion-mnist": ("t-shirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                      "bag", "ankle-boot"),
}
_MAX_NAME_BYTES = 255  # a folder name, on every common file system
_MAX_NAMES_FILE = 256 * 1024  # 256 labels (IDX labels are bytes) of 255 bytes each, with room to spare


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
