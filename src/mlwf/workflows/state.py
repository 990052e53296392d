"""How much state the workflows' stages hand each other: ``--state light`` (keys) or ``heavy`` (pixels).

Issue 27's study measures what moving state between functions costs, and
with ``light`` state (the reference's shape: each PCA, score and predict call
is handed image *keys* and fetches and decodes its images itself) transfer is
about 3 % of a run. ``heavy`` moves the data instead, as Faasm's and RMMap's
versions of this workflow do:

* ml-training's partition fetches and decodes every image and hands each PCA
  call its images' pixels, each score call its held-out share's pixels; each
  PCA call hands every one of its train calls the FULL feature matrix of its
  partition (one output, read by each), and the driver tells each train call
  the row range it fits (:func:`row_ranges`);
* ml-inference's partition decodes and hands each predict call its pixels
  (the model's image size is needed for that, so ``load`` runs first).

**Where the data moves, not what is computed.** Partition calls the same
:func:`mlwf.images.decode_many`, with the same arguments, on the same key
lists as the PCA, score and predict calls do under ``light``, so the same
images are refused for the same reasons; each share carries its keys, labels
and the refusals (``refused``: ``[position, reason]`` pairs, in order) so
the consumer reports skipped images exactly as before. The pixels travel as
``float32`` in [0, 1], the size issue 27 gives the edges (2k images at 64×64
≈ 32 MB per edge set), because that loses nothing: :func:`mlwf.images.unit_scale`
divides each gray level by 255 in float32, and :func:`mlwf.model.project`
widens float32 pixels to float64 exactly as it widens gray levels through its
table of the same values; PCA is fitted on a copy of the same float32 values
it is fitted on under ``light``. Each train call's rows are the ones
``np.array_split`` gives its slice under ``light``, so it fits the same rows:
same seed and data, same model bytes, accuracy and predictions in both
variants (``tests/test_state_heavy.py``).

**Limits.** A heavy partition holds every decoded image at once (and a copy
of each share while it is encoded), so before fetching anything it checks
that the float32 pixels fit :data:`MAX_PARTITION_PIXEL_BYTES`; the per-PCA
limit (:data:`mlwf.workflows.training.MAX_PIXEL_BYTES_PER_PCA`) holds in
both variants. Nothing here knows a backend, a store or a transfer mode.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from mlwf.errors import DataError, UsageError

#: The variants, the default first.
STATES = ("light", "heavy")
#: Most decoded pixels (float32) one heavy partition call may hold, checked before it fetches anything.
MAX_PARTITION_PIXEL_BYTES = 4 << 30


def check_state(state: Any) -> str:
    """``state`` if it is one of :data:`STATES`, else :class:`UsageError`."""
    if state not in STATES:
        raise UsageError(f"--state must be {' or '.join(STATES)}, got {state!r}")
    return state


def is_heavy(share: dict) -> bool:
    """Whether a share (an assignment or held-out share) carries its decoded pixels."""
    return "pixels" in share


def check_partition_size(n_images: int, image_size: int, where: str) -> None:
    """Refuse, before any work, a heavy partition that would hold more than :data:`MAX_PARTITION_PIXEL_BYTES`."""
    need = n_images * image_size**2 * 4
    if need > MAX_PARTITION_PIXEL_BYTES:
        raise DataError(f"--state heavy: the partition would hold the decoded pixels of all {n_images:,} images "
                        f"under {where!r} at {image_size}×{image_size} ({need / 2**30:.1f} GiB, more than the "
                        f"{MAX_PARTITION_PIXEL_BYTES >> 30} GiB allowed): use --state light (each function then "
                        "decodes its own images), fewer images or a smaller --image-size")


def decode_shares(fetch, shares: list[dict], image_size: int) -> dict[str, int]:
    """Fetch and decode each share's ``keys`` as its consumer would, adding ``pixels`` and ``refused``.

    Returns what the partition's info says about it: images decoded and skipped.
    """
    from mlwf.images import decode_many, unit_scale

    decoded = skipped = 0
    for share in shares:
        keys = share["keys"]
        levels, refused = decode_many(fetch(keys), image_size, levels=True) if keys else \
            (np.zeros((0, image_size**2), np.uint8), {})
        share["pixels"] = unit_scale(levels)
        share["refused"] = [[i, str(reason)] for i, reason in refused.items()]
        decoded += len(levels)
        skipped += len(refused)
    return {"decoded": decoded, "decode_skipped": skipped}


def received(share: dict) -> tuple[np.ndarray, dict[int, str]]:
    """The pixels and refusals (position → reason, in order) a heavy share carries."""
    pixels = np.asarray(share["pixels"])
    if pixels.dtype != np.float32 or pixels.ndim != 2:
        raise DataError(f"a heavy share's pixels must be float32 rows, got {pixels.dtype} of shape {pixels.shape}")
    return pixels, {int(i): str(reason) for i, reason in share["refused"]}


def row_ranges(n_rows: int, n_slices: int) -> list[list[int]]:
    """``[start, stop]`` of each slice of ``n_rows`` rows: the rows ``np.array_split`` deals each slice."""
    bounds = np.cumsum([0] + [len(s) for s in np.array_split(np.arange(n_rows), n_slices)]).tolist()
    return [[a, b] for a, b in itertools.pairwise(bounds)]
