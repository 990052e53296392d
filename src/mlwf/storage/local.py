"""The embedded default store: a directory, one sub-folder per bucket.

Plain file I/O, because on a local disk it is an order of magnitude faster than
going through an object-store client (2,000 small images: 19 ms with ``open``
against 175 ms through obstore's local backend, measured here). Writes go to a
hidden temporary file in the same folder and are renamed into place, so a
reader never sees half an object.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mlwf.errors import NotFoundError, StoreError
from mlwf.storage.base import ObjectInfo, Store, check_key, check_prefix

TMP_PREFIX = ".mlwf-tmp-"
#: Beside the bucket folders; a bucket name cannot start with a dot.
LOCK_FOLDER = ".mlwf-locks"


class LocalStore(Store):
    """A bucket kept as the folder ``root/bucket``."""

    def __init__(self, root: str | os.PathLike, bucket: str):
        self.root = Path(root).expanduser().absolute()
        self.bucket = check_bucket_name(bucket)
        self.url = f"file://{self.root}"
        self._dir = self.root / self.bucket
        self._safe_dirs: set[Path] = set()

    # -- paths ---------------------------------------------------------------
    def _path(self, key: str) -> Path:
        check_key(key)
        if key.endswith("/"):
            raise StoreError(f"refused key {key!r}: a key cannot end with '/' on a local store")
        path = self._dir / key
        # check_key already refuses '..'; this also catches symlinks pointing out.
        if path.parent not in self._safe_dirs:
            if not _within(path.parent, self._dir):
                raise StoreError(f"refused key {key!r}: it resolves outside the bucket folder {self._dir}")
            self._safe_dirs.add(path.parent)
        return path

    # -- Store ---------------------------------------------------------------
    def bucket_exists(self) -> bool:
        return self._dir.is_dir()

    def create_bucket(self) -> None:
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create bucket folder {self._dir}: {e.strerror}") from e

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)
        self.require_bucket()
        # Walk only the deepest folder the prefix names, then filter by the
        # string prefix, as S3 does ('imgs/0' matches 'imgs/0/a' and 'imgs/01').
        head, _, _ = prefix.rpartition("/")
        start = self._dir / head if head else self._dir
        found: list[ObjectInfo] = []
        base = len(str(self._dir)) + 1
        stack = [str(start)]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except PermissionError as e:
                raise StoreError(f"cannot list {folder}: permission denied") from e
            for entry in entries:
                if entry.name.startswith(TMP_PREFIX):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    key = entry.path[base:].replace(os.sep, "/")
                    if key.startswith(prefix):
                        found.append(ObjectInfo(key, entry.stat(follow_symlinks=False).st_size))
        found.sort(key=lambda o: o.key)
        return found

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self.require_bucket()
            raise NotFoundError(f"no object {key!r} in bucket {self.bucket!r} of {self.url}") from None
        except PermissionError as e:
            raise StoreError(f"cannot read {key!r} in {self.url}: permission denied") from e

    def get_many(self, keys: Sequence[str]) -> list[bytes]:
        # Local reads of small files are fastest done in order from one thread.
        return [self.get(k) for k in keys]

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with self._writing(key):
            tmp = self._write_temporary(path, data)
            try:
                os.replace(tmp, path)
            except BaseException:
                _unlink(tmp)
                raise

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        with self._writing(key):
            tmp = self._write_temporary(path, data)
            try:
                # link() fails if the name exists: an atomic create, also on NFS.
                os.link(tmp, path)
                return True
            except FileExistsError:
                pass
            finally:
                _unlink(tmp)
        return self._holds(key, data)

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, _tag(data)

    def put_if_tag(self, key: str, data: bytes, tag: str) -> bool:
        path = self._path(key)
        with self._bucket_lock(), self._writing(key):
            try:
                current = self.get(key)
            except NotFoundError:
                return False
            if _tag(current) != tag:
                return False
            tmp = self._write_temporary(path, data)
            try:
                os.replace(tmp, path)
            except BaseException:
                _unlink(tmp)
                raise
            return True

    def _holds(self, key: str, data: bytes) -> bool:
        try:
            return self.get(key) == data
        except NotFoundError:
            return False

    def _write_temporary(self, path: Path, data: bytes) -> str:
        """``data`` in a hidden temporary file beside ``path`` (renamed or linked into place by the caller)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException:
            _unlink(tmp)
            raise
        return tmp

    @contextlib.contextmanager
    def _writing(self, key: str):
        """Turn the file system's failures while writing ``key`` into one-line StoreErrors."""
        try:
            yield
        except (NotADirectoryError, FileExistsError, IsADirectoryError) as e:
            raise StoreError(f"cannot write {key!r} in {self.url}: a path segment is an object, not a folder") from e
        except OSError as e:
            raise StoreError(f"cannot write {key!r} in {self.url}: {e.strerror}") from e

    @contextlib.contextmanager
    def _bucket_lock(self):
        """An exclusive lock on the bucket for compare-and-swap, held across processes.

        The lock file lives beside the bucket folders, in a folder no bucket
        can be named after, so it never shows up as an object.
        """
        folder = self.root / LOCK_FOLDER
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / f"{self.bucket}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise StoreError(f"cannot lock bucket {self.bucket!r} in {self.url}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except IsADirectoryError:
            return
        except OSError as e:
            raise StoreError(f"cannot delete {key!r} in {self.url}: {e.strerror}") from e
        _prune_empty(path.parent, self._dir)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()


def check_bucket_name(bucket: str) -> str:
    """Refuse bucket names that are not one plain folder name."""
    if not bucket or "/" in bucket or "\\" in bucket or bucket in (".", "..") or bucket.startswith("."):
        raise StoreError(f"refused bucket name {bucket!r}: use a plain name such as 'tless'")
    return bucket


def _tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _prune_empty(folder: Path, stop: Path) -> None:
    """Remove folders left empty by a delete, up to the bucket folder (S3 has no folders)."""
    while folder != stop and _within(folder, stop):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
