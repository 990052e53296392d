"""Moving folders in and out of a store: the ``mlwf s3`` commands.

They mirror the seed's ``s3 upload-dir`` / ``clear-bucket`` / ``clear-dir``
and work on whichever store is configured (a local directory or S3).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mlwf.errors import DataError, UsageError
from mlwf.storage import Store, check_prefix, join_key

_BATCH = 256
Progress = Callable[[int, int], None]


def _files_under(host_path: str | os.PathLike) -> list[tuple[Path, str]]:
    root = Path(host_path).expanduser()
    if not root.exists():
        raise DataError(f"no such directory {str(root)!r}: give --host-path an existing folder")
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is a file, not a directory: give --host-path a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            found.append((path, path.relative_to(root).as_posix()))
    return found


def upload_dir(store: Store, host_path, s3_path: str, *, create_bucket: bool = False,
               progress: Progress | None = None) -> dict[str, int]:
    """Upload every file under ``host_path`` to ``s3_path/<relative path>``.

    Idempotent: an object that already holds the same bytes is skipped (on S3
    compared by size and ETag, locally by content). Hidden files are ignored.

    Returns counts: ``files``, ``uploaded``, ``skipped``, ``bytes``.

    Raises
    ------
    DataError
        If the folder is missing or holds no files.
    NotFoundError
        If the bucket does not exist and ``create_bucket`` is false.
    """
    check_prefix(s3_path)
    files = _files_under(host_path)
    if not files:
        raise DataError(f"no files under {str(host_path)!r}: nothing to upload")
    if create_bucket:
        store.create_bucket()
    elif not store.bucket_exists():
        if store.url.startswith("file://"):
            store.create_bucket()  # a local bucket is just a folder
        else:
            store.require_bucket()
    existing = {o.key: o for o in store.list(join_key(s3_path) + "/" if s3_path.strip("/") else "")}
    uploaded = skipped = nbytes = 0
    total = len(files)
    for start in range(0, total, _BATCH):
        batch = []
        for path, rel in files[start : start + _BATCH]:
            key = join_key(s3_path, rel)
            data = path.read_bytes()
            if store.same_object(existing.get(key), key, data):
                skipped += 1
                continue
            batch.append((key, data))
            nbytes += len(data)
        store.put_many(batch)
        uploaded += len(batch)
        if progress:
            progress(min(start + _BATCH, total), total)
    return {"files": total, "uploaded": uploaded, "skipped": skipped, "bytes": nbytes}


def download_dir(store: Store, s3_path: str, host_path, *, progress: Progress | None = None) -> dict[str, int]:
    """Download every object under ``s3_path/`` into ``host_path`` (same relative layout)."""
    check_prefix(s3_path)
    folder = join_key(s3_path) + "/" if s3_path.strip("/") else ""
    objects = store.list(folder)
    if not objects:
        raise DataError(f"no objects under {folder!r} in bucket {store.bucket!r}: nothing to download")
    root = Path(host_path).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"{str(root)!r} is a file: give --host-path a folder")
    nbytes = 0
    for start in range(0, len(objects), _BATCH):
        batch = objects[start : start + _BATCH]
        for obj, data in zip(batch, store.get_many([o.key for o in batch])):
            target = root / obj.key[len(folder):]
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            nbytes += len(data)
        if progress:
            progress(min(start + _BATCH, len(objects)), len(objects))
    return {"objects": len(objects), "bytes": nbytes}


def clear(store: Store, prefix: str = "", *, progress: Progress | None = None) -> dict[str, int]:
    """Delete every object under ``prefix`` (the whole bucket for ``""``)."""
    if prefix:
        check_prefix(prefix)
        if not prefix.strip("/"):
            raise UsageError("refusing to clear prefix '/': use 'mlwf s3 clear-bucket' to empty the bucket")
    keys = [o.key for o in store.list(prefix)]
    for start in range(0, len(keys), _BATCH):
        store.delete_many(keys[start : start + _BATCH])
        if progress:
            progress(min(start + _BATCH, len(keys)), len(keys))
    return {"deleted": len(keys)}
