"""Ingest: copy a customer's file into its account's raw area, checksum it and register it;
and where any input may be read from (`check_source`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlparse

from sqlalchemy import select

from pipelines.accounts import get_account
from pipelines.admission import Candidate
from pipelines.catalog import Catalog, CatalogError
from pipelines.catalog.db import insert_ignoring_duplicates
from pipelines.catalog.models import FileState, StoredFile
from pipelines.errors import UserError
from pipelines.gate import NotPointCloudError
from pipelines.lasio import read_info
from pipelines.scratch import work_dir
from pipelines.settings import Settings
from pipelines.storage import AccountArea, LocalStore, ObjectStore, S3Store, file_sha256, safe_name


class ForeignSource(UserError, PermissionError):
    """A source the account may not have read: another account's objects, the service's own
    files, or a local path outside the allowed input folders."""


@dataclass(frozen=True)
class StoredFileInfo:
    id: int
    account_id: str
    key: str
    name: str
    size: int
    sha256: str
    points: int | None
    state: str
    created: bool  # False when the same bytes were already stored for this account

    def to_public(self) -> dict:
        return {"key": self.key, "name": self.name, "size": self.size, "sha256": self.sha256, "points": self.points, "state": self.state}


def _local_path(source: str) -> Path | None:
    parsed = urlparse(source)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path) if parsed.scheme == "file" else source).expanduser()
    return None


def check_source(settings: Settings, store: ObjectStore, account_id: str | None, source: str) -> None:
    """Whether `account_id`'s input may be read from `source`; raises ForeignSource if not.

    Inside the service's object store only the account's own area and drop zone are its input. A local path is
    never inside POINTFLOW_HOME (the catalog, every account's objects, scratch, the model key) nor a
    hard link on its disk (one of those files under another name), and must lie inside an allowed
    input folder: POINTFLOW_INPUT_DIRS, plus the files a command was given by name
    (`Settings.allowing`). Other URLs (s3:// outside the store) are read with the service's credentials.
    """
    key = store.key_of(source)
    if key is not None:
        area = AccountArea(account_id) if account_id is not None else None
        if area is None or not key.startswith((area.prefix, area.incoming_prefix)):
            owner = f"account {account_id}'s area" if account_id else "any account's area (no account given)"
            raise ForeignSource(f"the source {source} lies in the service's storage outside {owner}: give the customer's own file")
        return
    path = _local_path(source)
    if path is None:
        return
    resolved = path.resolve()
    home = settings.home.resolve()
    if resolved == home or home in resolved.parents:
        raise ForeignSource(f"the source {source} lies inside POINTFLOW_HOME ({home}), the service's own files: give the customer's own file")
    if resolved.exists():
        facts = resolved.stat()
        if facts.st_nlink > 1 and home.exists() and facts.st_dev == home.stat().st_dev:
            raise ForeignSource(f"the source {source} is a hard link on the disk of POINTFLOW_HOME and may be one of the service's own files: give a copy")
    if not any(resolved == allowed or allowed in resolved.parents for allowed in settings.input_dirs):
        folders = ", ".join(str(p) for p in settings.input_dirs) or "none set"
        raise ForeignSource(f"the source {source} is not inside an allowed input folder (POINTFLOW_INPUT_DIRS: {folders}): "
                            "move it into one, or add its folder to POINTFLOW_INPUT_DIRS")  # fmt: skip


@contextmanager
def local_copy(source: str, scratch: Path, account_id: str | None = None) -> Iterator[Path]:
    """A local path for a source given as a path, file:// URI or s3://bucket/key URI; a download
    is kept in a scratch folder marked as `account_id`'s."""
    path = _local_path(source)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        yield path.resolve()
        return
    parsed = urlparse(source)
    if parsed.scheme != "s3":
        raise ValueError(f"unsupported source {source!r}: give a local path, file:// or s3:// URI")
    store = S3Store(parsed.netloc)
    with work_dir(scratch, "source", account_id) as tmp:
        local = tmp / safe_name(parsed.path)
        store.get_file(parsed.path.lstrip("/"), local)
        yield local


def ingest_file(
    catalog: Catalog,
    store: ObjectStore,
    account_id: str,
    path: Path,
    name: str | None = None,
    admit: Callable[[Candidate], None] | None = None,
    point_clouds_only: bool = False,
) -> StoredFileInfo:
    """Store `path` for the account; the same bytes ingested twice give the same record.

    `admit` sees each new file before it is stored and raises to refuse it. With
    `point_clouds_only`, what the gate refuses raises NotPointCloudError before anything is stored;
    otherwise it is stored for a job's validation to quarantine, with a report the customer can read.
    """
    get_account(catalog, account_id)
    area = AccountArea(account_id)
    name = safe_name(name or path.name)
    digest = file_sha256(path)
    size = path.stat().st_size
    try:
        info = read_info(path)
        points = info.point_count
    except NotPointCloudError:
        if point_clouds_only:
            raise
        info, points = None, None
    existing = _stored(catalog, account_id, digest)
    if existing is not None:
        if not store.exists(existing.key) and existing.state != FileState.QUARANTINED.value:
            store.put_file(existing.key, path)
        return existing
    if admit is not None:
        admit(Candidate(size=size, points=points or 0))
    key = area.key("raw", f"{digest[:12]}-{name}")
    store.put_file(key, path)
    bounds = dict(zip(("min_x", "min_y", "min_z"), info.mins)) | dict(zip(("max_x", "max_y", "max_z"), info.maxs)) if info else {}
    row = dict(account_id=account_id, key=key, original_name=name, size=size, sha256=digest, point_count=points, crs=info.crs if info else None, **bounds)
    with catalog.session() as session:
        # Concurrent ingests of the same bytes: one row wins, the others return it.
        inserted = session.execute(insert_ignoring_duplicates(session, StoredFile).values(**row)).rowcount == 1
    stored = _stored(catalog, account_id, digest)
    if stored is None:
        raise CatalogError(f"the object key {key} is taken by other bytes of account {account_id}: ingest the file under another name")
    if stored.key != key:
        # Another ingest stored the same bytes under another name first: ours is a duplicate.
        store.delete(key)
    return replace(stored, created=inserted)


def _stored(catalog: Catalog, account_id: str, digest: str) -> StoredFileInfo | None:
    with catalog.session() as session:
        existing = session.scalars(select(StoredFile).where(StoredFile.account_id == account_id, StoredFile.sha256 == digest)).first()
        return None if existing is None else _info(existing, created=False)


def _info(record: StoredFile, created: bool) -> StoredFileInfo:
    return StoredFileInfo(record.id, record.account_id, record.key, record.original_name, record.size, record.sha256, record.point_count, record.state, created)


def list_files(catalog: Catalog, account_id: str) -> list[StoredFileInfo]:
    get_account(catalog, account_id)
    with catalog.session() as session:
        rows = session.scalars(select(StoredFile).where(StoredFile.account_id == account_id).order_by(StoredFile.id))
        return [_info(r, created=False) for r in rows]


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
