"""The local-folder backend: objects as files under one folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipelines.storage.base import ObjectInfo, ObjectStore, StaleObject, StorageError, UnsafeKeyError, check_key


def _local_version(facts: os.stat_result) -> str:
    # A copy onto an existing name keeps its inode but changes mtime and usually size; a rename
    # onto it brings another inode: any of the three differing is another upload.
    return f"{facts.st_ino}-{facts.st_mtime_ns}-{facts.st_size}"


class LocalStore(ObjectStore):
    """Objects as files under one folder; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if self.root not in path.parents:
            raise UnsafeKeyError(f"key {key!r} resolves outside the store")
        return path

    def _write_atomic(self, key: str, writer) -> None:
        target = self._path(key)
        # Another process's delete may prune a folder on our path between mkdir and mkstemp, or
        # inside mkdir itself (it finds the folder, then pathlib's is_dir() check no longer does
        # and raises FileExistsError). Each such failure means that delete made progress, so
        # retrying cannot livelock; the bound is only for a folder that keeps vanishing.
        for attempt in range(1000):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
                break
            except (FileNotFoundError, FileExistsError):
                if attempt == 999:
                    raise
        try:
            with os.fdopen(fd, "wb") as handle:
                writer(handle)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as source:
            self._write_atomic(key, lambda handle: shutil.copyfileobj(source, handle, 1 << 20))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomic(key, lambda handle: handle.write(data))

    def get_file(self, key: str, path: Path, version: str | None = None) -> None:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"no object {key!r} in {self.url}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(source, "rb") as handle, open(path, "wb") as copy:
            # A file renamed over the key leaves our open handle on the old one; one written in
            # place changes its mtime: checked before and after, the copy is that version whole.
            self._check_version(key, handle, version)
            shutil.copyfileobj(handle, copy, 1 << 20)
            self._check_version(key, handle, version)

    def _check_version(self, key: str, handle, version: str | None) -> None:
        if version is not None and _local_version(os.fstat(handle.fileno())) != version:
            raise StaleObject(f"{key!r} in {self.url} was replaced after it was listed")

    def get_bytes(self, key: str) -> bytes:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"no object {key!r} in {self.url}")
        return source.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"no object {key!r} in {self.url}")
        return source.stat().st_size

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self._path(folder) if folder else self.root
        if not base.is_dir():
            return
        # os.walk skips folders that vanish under it: other tasks delete while we list.
        paths = sorted(
            Path(folder, name) for folder, _, names in os.walk(base) for name in names if not name.startswith(".part-")
        )
        for path in paths:
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix):
                try:
                    facts = path.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, facts.st_size, _local_version(facts), datetime.fromtimestamp(facts.st_mtime, UTC))

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Remove emptied folders so a deleted account leaves no trace in the tree.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                # Not empty, or already pruned by a concurrent delete: either way, done here.
                break
            parent = parent.parent

    def copy(self, source: str, destination: str) -> None:
        src = self._path(source)
        if not src.is_file():
            raise StorageError(f"no object {source!r} in {self.url}")
        self.put_file(destination, src)

    def link(self, key: str, expires_in: timedelta) -> str:
        path = self._path(key)
        if not path.is_file():
            raise StorageError(f"no object {key!r} in {self.url}")
        return path.as_uri()

    def direct_link(self, key: str, expires_in: timedelta) -> str | None:
        return None

    def read_chunks(self, key: str, size: int = 1 << 20) -> Iterator[bytes]:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"no object {key!r} in {self.url}")
        with open(source, "rb") as handle:
            yield from iter(lambda: handle.read(size), b"")

    def key_of(self, source: str) -> str | None:
        parsed = urlparse(source)
        if parsed.scheme not in ("", "file"):
            return None
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else source).expanduser().resolve()
        if path == self.root or self.root in path.parents:
            return path.relative_to(self.root).as_posix()
        return None

    def local_path(self, key: str) -> Path:
        """Direct read access for the local backend, avoiding a copy of large inputs."""
        return self._path(key)
