"""Moving folders in and out of a store: the ``mlwf s3`` commands.

They mirror the reference's ``s3 upload-dir`` / ``clear-bucket`` / ``clear-dir``
and work on whichever store is configured (a local directory or S3).

None of them acts on an empty or ambiguous target, and none replaces data
unasked: a blank prefix or folder is refused (emptying a whole bucket is
:func:`clear_bucket`, and only that), ``clear-dir`` deletes one folder (never
its string-prefix neighbours), an upload or download that would replace
different bytes stops before writing anything unless told to ``overwrite``,
and an upload never writes into the folder of a published model (only
``mlwf run ml-training`` publishes, after validating).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from mlwf.errors import DataError, StoreError, UsageError
from mlwf.storage import Store, check_key, check_prefix, join_key

_BATCH = 256
_EXAMPLES = 3
#: Called as work is done: ``(done, total)``.
DoneOfTotal = Callable[[int, int], None]
#: The manifest that marks a folder as a published model (see :mod:`mlwf.model`).
_MODEL_MANIFEST = "MODEL.json"


def folder_prefix(prefix: str, *, flag: str) -> str:
    """``prefix`` as one folder, ``'a/b'`` → ``'a/b/'``; refuse a blank or bucket-wide one.

    Raises
    ------
    UsageError
        If ``prefix`` is empty, blank or only slashes: the destructive and
        bulk commands act on a named folder, never on a whole bucket by accident.
    StoreError
        If it is not a valid key prefix (``..``, backslashes, …).
    """
    if not isinstance(prefix, str) or not prefix.strip().strip("/").strip():
        raise UsageError(f"{flag} {prefix!r} names no folder: give one such as 'ml-training/mnist-images-2k'"
                         + ("; to empty the whole bucket use 'mlwf s3 clear-bucket'" if flag == "--prefix" else ""))
    check_prefix(prefix)
    return join_key(prefix) + "/"


def _files_under(host_path: str | os.PathLike) -> tuple[list[tuple[Path, str]], list[str]]:
    """The regular files under ``host_path`` (relative paths in key form), and what was ignored.

    Hidden files and folders are left out. Symbolic links and special files
    (FIFOs, devices, sockets) inside the folder are ignored and returned, so
    an upload never reads outside the folder nor blocks on a pipe; the folder
    itself may be a link.
    """
    root = Path(host_path).expanduser()
    if not root.exists():
        raise DataError(f"no such directory {str(root)!r}: give --host-path an existing folder")
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is a file, not a directory: give --host-path a folder")
    found, ignored = [], []
    for dirpath, dirnames, filenames in os.walk(root):  # never descends into linked folders
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        ignored += [str(Path(dirpath) / d) for d in dirnames if (Path(dirpath) / d).is_symlink()]
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if not stat.S_ISREG(os.lstat(path).st_mode):
                ignored.append(str(path))
                continue
            found.append((path, path.relative_to(root).as_posix()))
    return found, ignored


def _examples(items: list[str]) -> str:
    return ", ".join(repr(k) for k in items[:_EXAMPLES]) + (", …" if len(items) > _EXAMPLES else "")


def upload_dir(store: Store, host_path, s3_path: str, *, create_bucket: bool = False, overwrite: bool = False,
               progress: DoneOfTotal | None = None) -> dict[str, int]:
    """Upload every file under ``host_path`` to ``s3_path/<relative path>``.

    Idempotent: an object that already holds the same bytes is skipped (on S3
    compared by size and ETag, locally by content). Hidden files are left out;
    symbolic links and special files inside the folder are ignored and
    counted (``ignored``), never followed or read.

    Parameters
    ----------
    overwrite : replace objects that hold other bytes. Without it such an
        upload is refused before anything is written.

    Returns counts: ``files``, ``uploaded``, ``replaced`` (of the uploaded),
    ``skipped``, ``bytes``, ``ignored`` (with ``ignored_examples``).

    Raises
    ------
    UsageError
        If ``s3_path`` is blank, or objects would be replaced without
        ``overwrite``, or a file would land in the folder of a published model.
    DataError
        If the folder is missing or holds no files.
    NotFoundError
        If the bucket does not exist and ``create_bucket`` is false.
    """
    folder = folder_prefix(s3_path, flag="--s3-path")
    files, ignored = _files_under(host_path)
    if not files:
        raise DataError(f"no files under {str(host_path)!r}: nothing to upload")
    keys = [join_key(folder, rel) for _, rel in files]
    for key in keys:
        check_key(key)
    if create_bucket:
        store.create_bucket()
    elif not store.bucket_exists():
        if store.is_local:
            store.create_bucket()  # a local bucket is just a folder
        else:
            store.require_bucket()
    existing = {o.key: o for o in store.list(folder)}
    # Any published model at or below the target folder (or the target inside one).
    models = {k[: -len(_MODEL_MANIFEST)] for k in existing if k.endswith("/" + _MODEL_MANIFEST)}
    models |= {p for p in _enclosing_folders(folder) if store.exists(p + _MODEL_MANIFEST)}
    inside = [k for k in keys if any(k.startswith(m) for m in models)]
    if inside:
        raise UsageError(f"refusing to upload into the published model at {sorted(models)[0].rstrip('/')!r} "
                         f"({len(inside)} files, e.g. {_examples(inside)}): models are published by "
                         "'mlwf run ml-training' only; choose another --s3-path")
    changed = []
    for (path, _), key in zip(files, keys):
        info = existing.get(key)
        if info is not None and not store.same_object(info, key, path.read_bytes()):
            changed.append(key)
    if changed and not overwrite:
        raise UsageError(f"{len(changed)} objects under {folder!r} hold other bytes than the files "
                         f"(e.g. {_examples(changed)}): nothing uploaded; pass --overwrite to replace them")
    changed_set = set(changed)
    uploaded = skipped = nbytes = 0
    total = len(files)
    for start in range(0, total, _BATCH):
        batch = []
        for (path, _), key in zip(files[start : start + _BATCH], keys[start : start + _BATCH]):
            if key in existing and key not in changed_set:
                skipped += 1
                continue
            data = path.read_bytes()
            batch.append((key, data))
            nbytes += len(data)
        store.put_many(batch)
        uploaded += len(batch)
        if progress:
            progress(min(start + _BATCH, total), total)
    return {"files": total, "uploaded": uploaded, "replaced": len(changed), "skipped": skipped, "bytes": nbytes,
            "ignored": len(ignored), "ignored_examples": ignored[:_EXAMPLES]}


def _enclosing_folders(folder: str) -> list[str]:
    """``'a/b/c/'`` → ``['a/', 'a/b/']``: the folders that contain ``folder``."""
    parts = folder.rstrip("/").split("/")
    return ["/".join(parts[:i]) + "/" for i in range(1, len(parts))]


def download_dir(store: Store, s3_path: str, host_path, *, overwrite: bool = False,
                 progress: DoneOfTotal | None = None) -> dict[str, int]:
    """Download every object under ``s3_path/`` into ``host_path`` (same relative layout).

    Every target is checked before anything is written: a key that would land
    outside ``host_path`` (``..``, absolute, backslashes, as another S3 client
    may have written) or that is both a file and a folder refuses the download;
    folder markers (keys ending in ``/``, or empty objects named like a folder)
    are skipped. Files already there with
    the same bytes are left alone.

    Parameters
    ----------
    overwrite : replace local files that hold other bytes; without it such a
        download is refused before anything is written.

    Returns counts: ``objects``, ``written``, ``unchanged``, ``bytes``.

    Raises
    ------
    UsageError
        If ``s3_path`` or ``host_path`` is blank, or files would be replaced
        without ``overwrite``.
    DataError
        If there is nothing to download, ``host_path`` is a file, or a key
        cannot be a local path.
    """
    folder = folder_prefix(s3_path, flag="--s3-path")
    if not str(host_path).strip():
        raise UsageError("--host-path '' names no folder: give the folder to download into, e.g. results/")
    objects = [o for o in store.list(folder) if not o.key.endswith("/")]
    if not objects:
        raise DataError(f"no objects under {folder!r} in bucket {store.bucket!r}: nothing to download")
    root = Path(host_path).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"{str(root)!r} is a file: give --host-path a folder")
    relative = []
    for o in objects:
        rel = o.key[len(folder):]
        try:
            check_key(rel)
        except StoreError:
            raise DataError(f"object {o.key!r} cannot be saved under {str(root)!r} (its name would leave the "
                            "folder or is not a plain path): nothing downloaded; rename it in the store") from None
        relative.append(rel)
    folders = {"/".join(r.split("/")[:i]) for r in relative for i in range(1, r.count("/") + 1)}
    # An empty object named like a folder is a folder marker (S3 clients list 'd/sub/' as 'd/sub').
    kept = [(o, r) for o, r in zip(objects, relative) if not (r in folders and o.size == 0)]
    objects, relative = [o for o, _ in kept], [r for _, r in kept]
    clash = [r for r in relative if r in folders]
    if clash:
        raise DataError(f"objects under {folder!r} use one name as both a file and a folder (e.g. "
                        f"{_examples(clash)}): nothing downloaded; they cannot be saved as files")
    linked = sorted({str(p) for rel in relative for p in _folders_below(root, rel) if p.is_symlink()})
    if linked:
        raise DataError(f"{str(root)!r} holds folders that are symbolic links ({_examples(linked)}): nothing "
                        "downloaded, as writing through them would leave the folder; choose an empty folder")
    changed, unchanged = [], set()
    for o, rel in zip(objects, relative):
        target = root / rel
        if target.is_dir() or any(p.exists() and not p.is_dir() for p in list(target.parents)[: rel.count("/")]):
            changed.append(str(target))
        elif target.exists():
            if target.stat().st_size == o.size and store.same_object(o, o.key, target.read_bytes()):
                unchanged.add(rel)
            else:
                changed.append(str(target))
    if changed and not overwrite:
        raise UsageError(f"{len(changed)} files in {str(root)!r} would be replaced by other bytes (e.g. "
                         f"{_examples(changed)}): nothing downloaded; pass --overwrite or choose an empty folder")
    todo = [(o, rel) for o, rel in zip(objects, relative) if rel not in unchanged]
    nbytes = 0
    for start in range(0, len(todo), _BATCH):
        batch = todo[start : start + _BATCH]
        for (obj, rel), data in zip(batch, store.get_many([o.key for o, _ in batch])):
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            nbytes += len(data)
        if progress:
            progress(min(start + _BATCH, len(todo)), len(todo))
    return {"objects": len(objects), "written": len(todo), "unchanged": len(unchanged), "bytes": nbytes}


def _folders_below(root: Path, rel: str) -> list[Path]:
    """The folders between ``root`` and the file ``rel``: ``'a/b/c'`` → ``root/a``, ``root/a/b``."""
    parts = rel.split("/")
    return [root.joinpath(*parts[:i]) for i in range(1, len(parts))]


def clear_prefix(store: Store, prefix: str, *, progress: DoneOfTotal | None = None) -> dict[str, int]:
    """Delete every object in the folder ``prefix/`` (``'a/b'`` never touches ``'a/bc'``).

    Raises
    ------
    UsageError
        If ``prefix`` is empty, blank or only slashes: emptying the whole
        bucket is :func:`clear_bucket`, and only that.
    """
    return _delete_all(store, folder_prefix(prefix, flag="--prefix"), progress)


def clear_bucket(store: Store, *, progress: DoneOfTotal | None = None) -> dict[str, int]:
    """Delete every object in the bucket."""
    return _delete_all(store, "", progress)


def _delete_all(store: Store, prefix: str, progress: DoneOfTotal | None) -> dict[str, int]:
    keys = [o.key for o in store.list(prefix)]
    for start in range(0, len(keys), _BATCH):
        store.delete_many(keys[start : start + _BATCH])
        if progress:
            progress(min(start + _BATCH, len(keys)), len(keys))
    return {"deleted": len(keys)}
