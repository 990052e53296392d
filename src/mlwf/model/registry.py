"""The versioned registry of published models: publish, rollback, and reading what is published.

A model prefix is a folder: ``<prefix>/versions/<sha256>.mlwf`` holds every
version (content-addressed) and ``<prefix>/MODEL.json``, the manifest, names
the current one and keeps the earlier ones in its ``history``. The manifest is
replaced by compare-and-swap, so readers see one whole model or another,
never a mix, and concurrent publishers each land in turn. That costs one
conditional read and write of ``MODEL.json`` per publish; republishing a
version reads its object once instead of writing it again.
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import re
import secrets
import time
from typing import Any

from mlwf import codec
from mlwf.errors import ModelError, NotFoundError, UsageError
from mlwf.model.format import CONTROL, is_int, from_bytes

MANIFEST = "MODEL.json"
MANIFEST_FORMAT = "mlwf-model-manifest"
HISTORY_LENGTH = 10
#: Largest manifest read; one with a full history is about 3 KB.
MAX_MANIFEST_BYTES = 1 << 20
#: Attempts of a compare-and-swap of the manifest before giving up (each after a short random pause).
_CAS_ATTEMPTS = 64
_SHA256 = re.compile(r"[0-9a-f]{64}")


def manifest_key(prefix: str) -> str:
    """The key of the manifest of the model at ``prefix``; refuses a blank prefix.

    Raises
    ------
    UsageError
        If ``prefix`` is empty or blank: a model lives in a folder of its own,
        never at the top of a bucket.
    StoreError
        If it is not a valid key prefix.
    """
    from mlwf.storage import check_prefix, join_key

    if not isinstance(prefix, str) or not prefix.strip().strip("/").strip():
        raise UsageError(f"model prefix {prefix!r} names no folder: give one such as 'ml-inference/model'")
    check_prefix(prefix)
    return join_key(prefix, MANIFEST)


def _object_key(prefix: str, sha: str) -> str:
    from mlwf.storage import join_key

    return join_key(prefix, "versions", f"{sha}.mlwf")


def _parse_manifest(raw: bytes, key: str, prefix: str) -> dict[str, Any]:
    """A manifest's bytes as a dict, every entry checked; :class:`ModelError` if corrupt.

    The current model and every history entry must name the object
    ``<prefix>/versions/<sha256>.mlwf`` of their own checksum, so a manifest
    can never point a reader outside its model's folder.
    """
    def corrupt(why: str):
        raise ModelError(f"model manifest {key!r} is corrupt ({why}): publish a model again with "
                         "'mlwf run ml-training'")

    if len(raw) > MAX_MANIFEST_BYTES:
        corrupt(f"larger than {MAX_MANIFEST_BYTES >> 10} KiB")
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError):
        corrupt("not JSON")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        corrupt("not an mlwf model manifest")
    history = manifest.setdefault("history", [])
    if not isinstance(history, list):
        corrupt("its history is not a list")
    for i, entry in enumerate([manifest, *history]):
        where = "current model" if i == 0 else f"history entry {i}"
        if not isinstance(entry, dict):
            corrupt(f"{where} is not an object")
        sha = entry.get("sha256")
        if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            corrupt(f"{where} has no valid sha256")
        if entry.get("object") != _object_key(prefix, sha):
            corrupt(f"{where} names an object other than {_object_key(prefix, '<sha256>')!r}")
        for name in ("run_id", "published_at", "rolled_back_at", "write_id"):
            value = entry.get(name)
            if value is not None and not (isinstance(value, str) and len(value) <= 256 and not CONTROL.search(value)):
                corrupt(f"{where} has a {name} that is not plain text")
        size = entry.get("size")
        if size is not None and not is_int(size, 0, 1 << 62):
            corrupt(f"{where} has a size that is not a byte count")
    return manifest


def read_manifest(get, prefix: str, *, where: str = "the store") -> dict[str, Any]:
    """The manifest of the model published at ``prefix``.

    ``get(key) -> bytes`` reads one object (e.g. ``store.get``). Raises
    :class:`~mlwf.errors.ModelError` if there is no model there or its
    manifest is corrupt, :class:`~mlwf.errors.UsageError` for a blank prefix.
    """
    key = manifest_key(prefix)
    try:
        raw = get(key)
    except NotFoundError:
        raise ModelError(
            f"no model at {prefix!r} in {where}: run ml-training first, e.g. "
            f"'mlwf run ml-training ml-training/mnist-images-2k 2 8 --model-prefix {prefix}'"
        ) from None
    return _parse_manifest(raw, key, prefix)


def read_published(get, prefix: str, *, where: str = "the store") -> tuple[bytes, dict[str, Any]]:
    """Bytes and manifest of the model published at ``prefix``, checksum verified."""
    manifest = read_manifest(get, prefix, where=where)
    try:
        data = get(manifest["object"])
    except NotFoundError:
        raise ModelError(f"model object {manifest['object']!r} named by {prefix}/{MANIFEST} is missing: "
                         "retrain with 'mlwf run ml-training'") from None
    if codec.digest(data) != manifest.get("sha256"):
        raise ModelError(f"model object {manifest['object']!r} does not match its manifest checksum "
                         "(truncated or modified): refusing to load it; retrain with 'mlwf run ml-training'")
    return data, manifest


def publish(store, prefix: str, data: bytes, *, run_id: str, summary: dict[str, Any] | None = None) -> dict:
    """Publish validated model bytes at ``prefix``; return the new manifest.

    The model object is written first under a content-addressed key
    (``versions/<sha256>.mlwf``), then the manifest that names it. The
    manifest is replaced by compare-and-swap (:meth:`~mlwf.storage.Store.put_if_tag`):
    a publisher that finds the manifest changed since it read it reads it
    again and retries, so concurrent publishers each land in turn, the last
    one current and every other in ``history``, and a reader sees one whole
    model or the other, never a mix. Earlier versions stay, listed in the
    manifest's ``history`` (the newest :data:`HISTORY_LENGTH`).

    A manifest that is corrupt is replaced, its history with it.

    Raises
    ------
    UsageError
        If ``prefix`` is blank.
    StoreError
        If the store fails, or the manifest kept changing for
        :data:`_CAS_ATTEMPTS` attempts.
    """
    manifest_key(prefix)
    sha = codec.digest(data)
    obj = _object_key(prefix, sha)
    try:
        intact = codec.digest(store.get(obj)) == sha  # republishing a version: one read, no write
    except NotFoundError:
        intact = False
    if not intact:
        # Absent, or other bytes at a content address (damage: its name says what belongs there).
        store.put(obj, data)

    def change(current: dict | None, write_id: str) -> dict:
        history = [] if current is None else [_entry(current), *current["history"]]
        return {
            "format": MANIFEST_FORMAT,
            "version": 1,
            "object": obj,
            "sha256": sha,
            "size": len(data),
            "run_id": run_id,
            "published_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "write_id": write_id,
            "summary": summary or {},
            "history": [h for h in history if h.get("sha256") != sha][:HISTORY_LENGTH],
        }

    return _update_manifest(store, prefix, change, replace_corrupt=True)


def rollback(store, prefix: str, *, expected: str | None = None) -> dict:
    """Make the previous published version current again; return the new manifest.

    The model it replaces becomes the newest entry of ``history`` (so a
    second rollback undoes the first, and ``history[0]`` of the result names
    what was replaced). The manifest is replaced by compare-and-swap, as in
    :func:`publish`.

    Parameters
    ----------
    expected : the sha256 of the version the caller saw current (``mlwf ui``
        shows it before asking to confirm), or None for whatever is current.
        Checked inside the compare-and-swap, so a publish that lands between
        the caller's look and the rollback makes it refuse, never roll back
        from a version nobody looked at.

    Raises
    ------
    ModelError
        If there is no model, no earlier version, the manifest is corrupt, the
        current version is not ``expected``, or the earlier object is missing,
        does not match its checksum or is not a valid model.
    """
    where = f"bucket {store.bucket!r} of {store.location}"
    checked: set[str] = set()

    def change(current: dict | None, write_id: str) -> dict:
        if current is None:
            read_manifest(store.get, prefix, where=where)  # raises the "no model" error
        if expected is not None and current["sha256"] != expected:
            raise ModelError(f"the model at {prefix!r} changed since you looked: {current['sha256'][:12]} "
                             f"(run {current.get('run_id')}) is current now, not {expected[:12]}; nothing was "
                             "rolled back: look again, then roll back if you still want to")
        history = current["history"]
        if not history:
            raise ModelError(f"no earlier version of the model at {prefix!r} to roll back to")
        previous = history[0]
        if previous["sha256"] not in checked:
            try:
                data = store.get(previous["object"])
            except NotFoundError:
                raise ModelError(f"the earlier model object {previous['object']!r} is gone: cannot roll back") from None
            if codec.digest(data) != previous["sha256"]:
                raise ModelError(f"the earlier model object {previous['object']!r} does not match its checksum: "
                                 "cannot roll back to it")
            from_bytes(data, source=previous["object"])
            checked.add(previous["sha256"])
        manifest = {**current, **{k: previous.get(k) for k in _ENTRY_FIELDS},
                    "rolled_back_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    "write_id": write_id, "history": [_entry(current)] + history[1:]}
        manifest.pop("summary", None)
        return manifest

    return _update_manifest(store, prefix, change, replace_corrupt=False)


def _update_manifest(store, prefix: str, change, *, replace_corrupt: bool) -> dict:
    """Read, change and compare-and-swap the manifest at ``prefix`` until it lands.

    ``change(current_or_None, write_id)`` returns the new manifest. Each
    attempt carries a fresh ``write_id``; finding one of ours in the manifest
    read back means that attempt landed although the store reported it had
    not (an S3 request retried after a lost answer sees its own write).
    """
    from mlwf.errors import StoreError

    key = manifest_key(prefix)
    ours: dict[str, dict] = {}  # write_id -> the manifest that attempt wrote
    for attempt in range(_CAS_ATTEMPTS):
        try:
            raw, tag = store.get_tagged(key)
        except NotFoundError:
            raw, tag = None, None
        current = None
        if raw is not None:
            try:
                current = _parse_manifest(raw, key, prefix)
            except ModelError:
                if not replace_corrupt:
                    raise
            if current is not None and ours:
                # A landed attempt is current, or already in the history of a writer who came after.
                for entry in [current, *current["history"]]:
                    if entry.get("write_id") in ours:
                        return ours[entry["write_id"]]
        write_id = secrets.token_hex(8)
        manifest = ours[write_id] = change(current, write_id)
        body = json.dumps(manifest, indent=2).encode()
        if store.put_if_absent(key, body) if tag is None else store.put_if_tag(key, body, tag):
            return manifest
        time.sleep(random.uniform(0, min(1.0, 0.005 * 2**attempt)))  # let the winner's write settle
    raise StoreError(f"the model manifest {key!r} in {store.location} kept changing during {_CAS_ATTEMPTS} attempts "
                     "to update it (other publishers at the same prefix): try again")


_ENTRY_FIELDS = ("object", "sha256", "size", "run_id", "published_at", "write_id")


def _entry(manifest: dict) -> dict:
    return {k: manifest.get(k) for k in _ENTRY_FIELDS}
