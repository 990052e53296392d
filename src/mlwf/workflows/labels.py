"""What both workflows say about the images they are given: a key's class (its folder), the order of
classes, and why images were skipped (reasons named per key, merged across calls, kept bounded)."""

from __future__ import annotations


def label_of(key: str, prefix: str) -> str | None:
    """The class folder of ``key`` under ``prefix`` (``prefix/<label>/…``), or None."""
    rel = key[len(prefix):]
    label, sep, rest = rel.partition("/")
    return label if sep and label and rest else None


#: Skipped objects named with their reason in a call's info and a run's report (``skipped_reasons``);
#: ``skipped`` counts them all.
SKIPPED_REASONS_KEPT = 1_000


def skipped_reasons(keys: list[str], refused: dict) -> dict[str, str]:
    """Key → why it was skipped, for the images :func:`mlwf.images.decode_many` refused (at most
    :data:`SKIPPED_REASONS_KEPT`, in order)."""
    return {keys[i]: str(reason) for i, reason in list(refused.items())[:SKIPPED_REASONS_KEPT]}


def merged_reasons(parts) -> dict[str, str]:
    """The ``skipped_reasons`` of several calls as one, in key order (at most :data:`SKIPPED_REASONS_KEPT`)."""
    merged = {key: reason for part in parts for key, reason in part.items()}
    return {key: merged[key] for key in sorted(merged)[:SKIPPED_REASONS_KEPT]}


def first_reason(keys: list[str], refused: dict) -> str:
    """``, e.g. KEY: REASON`` for the first refused image, for a message ('' if none)."""
    first = next(iter(refused), None)
    return "" if first is None else f", e.g. {keys[first]}: {refused[first]}"


def sort_classes(names) -> list[str]:
    """Class names in a stable order: numerically if all are integers, else by text."""
    names = set(names)
    # isdecimal, not isdigit: int() refuses digits such as '²', and '--5' is no integer.
    if all(n.removeprefix("-").isdecimal() for n in names):
        return sorted(names, key=int)
    return sorted(names)
