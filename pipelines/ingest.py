"""Ingest: copy a customer's file into its account's raw area, checksum it and register it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from sqlalchemy import select

from pipelines.accounts import get_account
from pipelines.admission import Candidate
from pipelines.catalog import Catalog
from pipelines.catalog.models import FileState, StoredFile
from pipelines.lasio import NotPointCloudError, read_info
from pipelines.storage import AccountArea, LocalStore, ObjectStore, file_sha256, safe_name


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


@contextmanager
def local_copy(source: str, scratch: Path) -> Iterator[Path]:
    """A local path for a source given as a path, file:// URI or s3://bucket/key URI."""
    parsed = urlparse(source)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        yield path
        return
    if parsed.scheme != "s3":
        raise ValueError(f"unsupported source {source!r}: give a local path, file:// or s3:// URI")
    from pipelines.storage import S3Store

    store = S3Store(parsed.netloc)
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        local = Path(tmp) / safe_name(parsed.path)
        store.get_file(parsed.path.lstrip("/"), local)
        yield local


def ingest_file(
    catalog: Catalog,
    store: ObjectStore,
    account_id: str,
    path: Path,
    name: str | None = None,
    admit: Callable[[Candidate], None] | None = None,
) -> StoredFileInfo:
    """Store `path` for the account; the same bytes ingested twice give the same record.

    `admit` sees each new file before it is stored and raises to refuse it.
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
        # Stored anyway: validation quarantines it with a report the customer can read.
        info, points = None, None
    with catalog.session() as session:
        existing = session.scalars(select(StoredFile).where(StoredFile.account_id == account_id, StoredFile.sha256 == digest)).first()
        if existing is not None:
            if not store.exists(existing.key) and existing.state != FileState.QUARANTINED.value:
                store.put_file(existing.key, path)
            return _info(existing, created=False)
    if admit is not None:
        admit(Candidate(size=size, points=points or 0))
    key = area.key("raw", f"{digest[:12]}-{name}")
    store.put_file(key, path)
    with catalog.session() as session:
        record = StoredFile(
            account_id=account_id,
            key=key,
            original_name=name,
            size=size,
            sha256=digest,
            point_count=points,
            crs=info.crs if info else None,
            **(
                dict(zip(("min_x", "min_y", "min_z"), info.mins)) | dict(zip(("max_x", "max_y", "max_z"), info.maxs))
                if info
                else {}
            ),
        )
        session.add(record)
        session.flush()
        return _info(record, created=True)


def _info(record: StoredFile, created: bool) -> StoredFileInfo:
    return StoredFileInfo(record.id, record.account_id, record.key, record.original_name, record.size, record.sha256, record.point_count, record.state, created)


def list_files(catalog: Catalog, account_id: str) -> list[StoredFileInfo]:
    get_account(catalog, account_id)
    with catalog.session() as session:
        rows = session.scalars(select(StoredFile).where(StoredFile.account_id == account_id).order_by(StoredFile.id))
        return [_info(r, created=False) for r in rows]


@contextmanager
def readable_path(store: ObjectStore, key: str, scratch: Path) -> Iterator[Path]:
    """The object as a local file: the store's own file when local, else a temporary download."""
    if isinstance(store, LocalStore):
        yield store.local_path(key)
        return
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=scratch, prefix="object-"))
    try:
        local = tmp / key.rsplit("/", 1)[-1]
        store.get_file(key, local)
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


