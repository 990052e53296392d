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

from mlwf.datasets.classnames import KNOWN_CLASS_NAMES, check_class_names, read_class_names
from mlwf.datasets.idx import CHUNK, MAX_DEFLATE_RATIO, read_idx
from mlwf.datasets.writers import write_digits, write_idx

__all__ = ["CHUNK", "KNOWN_CLASS_NAMES", "MAX_DEFLATE_RATIO", "check_class_names", "read_class_names", "read_idx",
           "write_digits", "write_idx"]
