"""Where a job's input may come from: which sources an account may read (`check_source`), and
a local path for a source or a stored object (`local_copy`, `readable_path`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipelines.errors import InvalidValue, UserError
from pipelines.scratch import work_dir
from pipelines.settings import Settings
from pipelines.storage import AccountArea, LocalStore, ObjectStore, ObjectTooLarge, S3Store, safe_name


class ForeignSource(UserError, PermissionError):
    """A source the account may not have read: another account's objects, the service's own
    files, or a local path outside the allowed input folders."""


def _local_path(source: str) -> Path | None:
    parsed = urlparse(source)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path) if parsed.scheme == "file" else source).expanduser()
    return None


def check_source(settings: Settings, store: ObjectStore, account_id: str | None, source: str) -> None:
    """Whether `account_id`'s input may be read from `source`; raises ForeignSource if not.

    Inside the service's object store only the account's own area and drop zone are its input. A local path is
    never inside POINTFLOW_HOME (the catalog, every account's objects, scratch, the model key) nor a
    hard link on its disk or on a local object store's (one of those files under another name), and must lie inside an allowed
    input folder: POINTFLOW_INPUT_DIRS, plus the files a command was given by name
    (`Settings.allowing`). Other URLs (s3:// outside the store) are read with the service's credentials.
    """
    key = store.key_of(source)
    if key is not None:
        area = AccountArea(account_id) if account_id is not None else None
        if area is None or not key.startswith((area.prefix, area.incoming_prefix)):
            owner = f"account {account_id}'s area" if account_id else "any account's area (no account given)"
            raise ForeignSource(
                f"the source {source} lies in the service's storage outside {owner}: give the customer's own file"
            )
        return
    path = _local_path(source)
    if path is None:
        return
    resolved = path.resolve()
    home = settings.home.resolve()
    if resolved == home or home in resolved.parents:
        raise ForeignSource(
            f"the source {source} lies inside POINTFLOW_HOME ({home}), the service's own files: give the customer's own file"
        )
    if resolved.exists():
        facts = resolved.stat()
        # The service's files live in POINTFLOW_HOME and, for a local store, under its root,
        # which may be on another disk (POINTFLOW_STORAGE_URL=file://...).
        guarded = [("POINTFLOW_HOME", home)]
        if isinstance(store, LocalStore):
            guarded.append(("the object store", store.root))
        for name, folder in guarded:
            if facts.st_nlink > 1 and folder.exists() and facts.st_dev == folder.stat().st_dev:
                raise ForeignSource(
                    f"the source {source} is a hard link on the disk of {name} and may be one of the service's own files: give a copy"
                )
    if not any(resolved == allowed or allowed in resolved.parents for allowed in settings.input_dirs):
        folders = ", ".join(str(p) for p in settings.input_dirs) or "none set"
        raise ForeignSource(
            f"the source {source} is not inside an allowed input folder (POINTFLOW_INPUT_DIRS: {folders}): "
            "move it into one, or add its folder to POINTFLOW_INPUT_DIRS"
        )


@contextmanager
def local_copy(settings: Settings, source: str, account_id: str | None = None) -> Iterator[Path]:
    """A local path for a source given as a path, file:// URI or s3://bucket/key URI; a download
    is kept in a scratch folder marked as `account_id`'s. A file larger than POINTFLOW_MAX_FILE_BYTES
    is refused (AdmissionRefused) on its size alone, before an object is downloaded, and a download
    stops at that size."""
    from pipelines.admission import check_file_size

    path = _local_path(source)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        check_file_size(settings, path.stat().st_size)
        yield path.resolve()
        return
    parsed = urlparse(source)
    if parsed.scheme != "s3":
        raise InvalidValue(f"unsupported source {source!r}: give a local path, file:// or s3:// URI")
    store, key = S3Store(parsed.netloc), parsed.path.lstrip("/")
    check_file_size(settings, store.size(key))
    with work_dir(settings.scratch_dir, "source", account_id) as tmp:
        local = tmp / safe_name(parsed.path)
        try:
            # The download stops at the limit too: an object replaced by a larger one since its size was read.
            store.get_file(key, local, max_bytes=settings.max_file_bytes)
        except ObjectTooLarge as too_large:
            check_file_size(settings, too_large.size)
            raise
        yield local


@contextmanager
def readable_path(store: ObjectStore, key: str, scratch: Path) -> Iterator[Path]:
    """The object as a local file: the store's own file when local, else a download into a
    scratch folder marked as the account's whose key it is."""
    if isinstance(store, LocalStore):
        yield store.local_path(key)
        return
    parts = key.split("/")
    account_id = parts[1] if len(parts) > 2 and parts[0] == "accounts" else None
    with work_dir(scratch, "object", account_id) as tmp:
        local = tmp / key.rsplit("/", 1)[-1]
        store.get_file(key, local)
        yield local
