"""The local-folder backend: objects as files under one folder."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipelines.storage.base import (
    ObjectInfo,
    ObjectStore,
    ObjectTooLarge,
    StaleObject,
    StorageError,
    UnsafeKeyError,
    check_key,
)


def _local_version(facts: os.stat_result) -> str:
    # A copy onto an existing name keeps its inode but changes mtime and usually size; a rename
    # onto it brings another inode: any of the three differing is another upload.
    return f"{facts.st_ino}-{facts.st_mtime_ns}-{facts.st_size}"


# An upload is written to a hidden part file beside its key, then renamed onto it.
PART_PREFIX = ".part-"
# A part file nobody holds (its writer was killed) is removed by `sweep_partials` once it has not
# changed for this long; a live writer holds a lock on its part file, which is never taken.
PARTIAL_MIN_AGE = timedelta(hours=1)


class LocalStore(ObjectStore):
    """Objects as files under one folder; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def _path(self, key: str, *, last_may_be_link: bool = False) -> Path:
        """The key's own path, never through a symbolic link: a key names one file under the root
        by its own name, or nothing (a link planted in a drop zone would otherwise hand over
        another account's objects or the service's files, and a delete would remove them)."""
        parts = check_key(key).split("/")
        path = self.root
        for index, part in enumerate(parts):
            path = path / part
            try:
                facts = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                break
            if stat.S_ISLNK(facts.st_mode) and not (last_may_be_link and index == len(parts) - 1):
                raise UnsafeKeyError(
                    f"key {key!r} in {self.url} goes through a symbolic link ({'/'.join(parts[: index + 1])}): "
                    "links are never followed"
                )
        return self.root.joinpath(*parts)

    def _regular(self, key: str) -> Path:
        """The path of the regular file the key names, or StorageError (absent, a link, a FIFO...)."""
        path = self._path(key)
        try:
            facts = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise StorageError(f"no object {key!r} in {self.url}") from None
        if not stat.S_ISREG(facts.st_mode):
            raise StorageError(f"no object {key!r} in {self.url}: not a regular file")
        return path

    def _open(self, key: str):
        """The key's regular file, opened without following a link put in its place meanwhile."""
        path = self._regular(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise StorageError(f"no object {key!r} in {self.url}") from None
        except OSError as error:
            raise UnsafeKeyError(f"key {key!r} in {self.url} is no longer a regular file: {error.strerror}") from None
        handle = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            handle.close()
            raise StorageError(f"no object {key!r} in {self.url}: not a regular file")
        return handle

    def _write_atomic(self, key: str, writer) -> None:
        target = self._path(key)
        # Another process's delete may prune a folder on our path between mkdir and mkstemp, or
        # inside mkdir itself (it finds the folder, then pathlib's is_dir() check no longer does
        # and raises FileExistsError). Each such failure means that delete made progress, so
        # retrying cannot livelock; the bound is only for a folder that keeps vanishing.
        for attempt in range(1000):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=PART_PREFIX)
                break
            except (FileNotFoundError, FileExistsError):
                if attempt == 999:
                    raise
        handle = os.fdopen(fd, "wb")
        try:
            # Locked until it is renamed: `sweep_partials` never takes a live writer's part file.
            fcntl.flock(fd, fcntl.LOCK_EX)
            writer(handle)
            handle.flush()
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            handle.close()

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as source:
            self._write_atomic(key, lambda handle: shutil.copyfileobj(source, handle, 1 << 20))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomic(key, lambda handle: handle.write(data))

    def get_file(self, key: str, path: Path, version: str | None = None, max_bytes: int | None = None) -> None:
        try:
            opened = self._open(key)
        except UnsafeKeyError as error:
            if version is None:
                raise
            # A link put in place of the listed file is not that version.
            raise StaleObject(f"{key!r} in {self.url} was replaced after it was listed ({error})") from None
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with opened as handle, open(path, "wb") as copy:
            # A file renamed over the key leaves our open handle on the old one; one written in
            # place changes its mtime: checked before and after, the copy is that version whole.
            self._check_version(key, handle, version)
            if max_bytes is None:
                shutil.copyfileobj(handle, copy, 1 << 20)
            else:
                # A file that grows while it is read is not read past the bound.
                left = max_bytes + 1
                while left > 0 and (block := handle.read(min(1 << 20, left))):
                    copy.write(block)
                    left -= len(block)
                if left == 0:
                    copy.close()
                    Path(path).unlink(missing_ok=True)
                    self._check_version(key, handle, version)
                    raise ObjectTooLarge(key, os.fstat(handle.fileno()).st_size, max_bytes)
            self._check_version(key, handle, version)

    def _check_version(self, key: str, handle, version: str | None) -> None:
        if version is not None and _local_version(os.fstat(handle.fileno())) != version:
            raise StaleObject(f"{key!r} in {self.url} was replaced after it was listed")

    def get_bytes(self, key: str) -> bytes:
        with self._open(key) as handle:
            return handle.read()

    def exists(self, key: str) -> bool:
        try:
            self._regular(key)
        except StorageError:
            return False
        return True

    def size(self, key: str) -> int:
        return os.lstat(self._regular(key)).st_size

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._base(prefix)
        if base is None:
            return
        for path, facts in self._entries(base, prefix):
            # Regular files only: a link (to a file or a folder), a FIFO or a device is no object.
            if stat.S_ISREG(facts.st_mode):
                yield self._info(path, facts)

    def _base(self, prefix: str) -> Path | None:
        """The folder holding every key under `prefix`; None when there is none."""
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self._path(folder) if folder else self.root
        return base if base.is_dir() else None

    def _info(self, path: Path, facts: os.stat_result) -> ObjectInfo:
        key = path.relative_to(self.root).as_posix()
        return ObjectInfo(key, facts.st_size, _local_version(facts), datetime.fromtimestamp(facts.st_mtime, UTC))

    def _entries(self, base: Path, prefix: str, partials: bool | None = False) -> Iterator[tuple[Path, os.stat_result]]:
        """Every entry under `base` whose key starts with `prefix`, with its own facts (lstat):
        files and links (to folders too, which os.walk does not enter), never what a link points at.
        Part files (`PART_PREFIX`, an upload not finished) only with `partials`, and then only them;
        with `partials` None, every entry."""
        # os.walk skips folders that vanish under it: other tasks delete while we list.
        paths = sorted(
            Path(folder, name)
            for folder, subfolders, names in os.walk(base)
            for name in names + [d for d in subfolders if os.path.islink(os.path.join(folder, d))]
            if partials is None or name.startswith(PART_PREFIX) == partials
        )
        for path in paths:
            if path.relative_to(self.root).as_posix().startswith(prefix):
                try:
                    yield path, os.lstat(path)
                except FileNotFoundError:
                    continue

    @staticmethod
    def _no_object(path: Path, facts: os.stat_result) -> str | None:
        """What an entry that is no regular file is (a symbolic link, a FIFO, a device); None for a file."""
        if stat.S_ISLNK(facts.st_mode):
            return f"a symbolic link (to {os.readlink(path)})"
        if not stat.S_ISREG(facts.st_mode):
            return "not a regular file (a FIFO, socket or device)"
        return None

    def irregular(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(key, what it is) of each entry under `prefix` that `list` leaves out because it is no
        regular file (a symbolic link, a FIFO, a device), and of each file with other names (hard
        links): what a drop-zone sweep reports and never takes."""
        base = self._base(prefix)
        if base is None:
            return
        for path, facts in self._entries(base, prefix):
            key = path.relative_to(self.root).as_posix()
            if (what := self._no_object(path, facts)) is not None:
                yield key, what
            elif facts.st_nlink > 1:
                yield key, f"a hard link: the same file has {facts.st_nlink - 1} other name(s) on this disk"

    def contents(self, prefix: str) -> tuple[list[ObjectInfo], list[tuple[str, str]], list[ObjectInfo]]:
        """Everything under `prefix` that deleting all of it removes, from one walk of its folder:
        the objects (`list`); the strays, (key, what it is) of each entry that is no object (a
        symbolic link, a FIFO, a device), or of the folder `prefix` names ("incoming/acme/") when
        it is itself a symbolic link (then alone: nothing is listed through it); the part files
        (`partials`). `delete(key)` removes a stray itself, never what a link points at. (Hard links
        are regular files: objects.)"""
        if prefix.endswith("/"):
            folder = prefix[:-1]
            path = self._path(folder, last_may_be_link=True)
            try:
                facts = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                return [], [], []
            if stat.S_ISLNK(facts.st_mode):
                return [], [(folder, self._no_object(path, facts))], []
        objects: list[ObjectInfo] = []
        strays: list[tuple[str, str]] = []
        partials: list[ObjectInfo] = []
        base = self._base(prefix)
        for path, facts in self._entries(base, prefix, partials=None) if base is not None else ():
            if path.name.startswith(PART_PREFIX):
                if stat.S_ISREG(facts.st_mode):
                    partials.append(self._info(path, facts))
            elif (what := self._no_object(path, facts)) is not None:
                strays.append((path.relative_to(self.root).as_posix(), what))
            else:
                objects.append(self._info(path, facts))
        return objects, strays, partials

    def partials(self, prefix: str) -> Iterator[ObjectInfo]:
        """The part files under `prefix`: uploads under way, or left by a writer that was killed.
        `list` leaves them out (they are no objects), but they hold the account's bytes: deleting
        everything under `prefix` removes them too (`delete(key)` takes one)."""
        base = self._base(prefix)
        if base is None:
            return
        for path, facts in self._entries(base, prefix, partials=True):
            if stat.S_ISREG(facts.st_mode):
                yield self._info(path, facts)

    def sweep_partials(
        self,
        prefix: str = "",
        min_age: timedelta = PARTIAL_MIN_AGE,
        now: datetime | None = None,
        keep: tuple[str, ...] = (),
    ) -> list[str]:
        """Remove the part files under `prefix` that no live writer holds and that have not changed
        for `min_age`: what a killed upload left; never one under a prefix of `keep`. Returns their keys."""
        now = now or datetime.now(UTC)
        removed = []
        for info in self.partials(prefix):
            if info.modified > now - min_age or info.key.startswith(keep):
                continue
            path = self._path(info.key)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue  # renamed onto its key, or removed, meanwhile
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its writer is alive
                facts = os.fstat(fd)
                try:
                    still = os.lstat(path).st_ino == facts.st_ino
                except FileNotFoundError:
                    still = False  # renamed onto its key just before we locked it
                if still and datetime.fromtimestamp(facts.st_mtime, UTC) <= now - min_age:
                    self.delete(info.key)
                    removed.append(info.key)
            finally:
                os.close(fd)
        return removed

    def delete(self, key: str) -> None:
        # A link named by the key is removed itself (unlink never follows the last component);
        # a key through a linked folder is refused.
        path = self._path(key, last_may_be_link=True)
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
        with self._open(source) as handle:
            self._write_atomic(destination, lambda copy: shutil.copyfileobj(handle, copy, 1 << 20))

    def link(self, key: str, expires_in: timedelta) -> str:
        return self._regular(key).as_uri()

    def direct_link(self, key: str, expires_in: timedelta) -> str | None:
        return None

    def read_chunks(self, key: str, size: int = 1 << 20) -> Iterator[bytes]:
        with self._open(key) as handle:
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
        """Direct read access for the local backend, avoiding a copy of large inputs: the key's
        own regular file, never a link's target."""
        return self._regular(key)
