"""Ingest: copy a customer's file into its account's raw area, checksum it and register it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import select

from pipelines.accounts import get_account
from pipelines.admission import Candidate
from pipelines.catalog import Catalog, CatalogError
from pipelines.catalog.db import insert_ignoring_duplicates
from pipelines.catalog.models import FileState, StoredFile
from pipelines.gate import NotPointCloudError
from pipelines.lasio import read_info
from pipelines.storage import AccountArea, ObjectStore, file_sha256, safe_name


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
        return {
            "key": self.key,
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "points": self.points,
            "state": self.state,
        }


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
    bounds = (
        dict(zip(("min_x", "min_y", "min_z"), info.mins)) | dict(zip(("max_x", "max_y", "max_z"), info.maxs))
        if info
        else {}
    )
    row = dict(
        account_id=account_id,
        key=key,
        original_name=name,
        size=size,
        sha256=digest,
        point_count=points,
        crs=info.crs if info else None,
        **bounds,
    )
    with catalog.session() as session:
        # Concurrent ingests of the same bytes: one row wins, the others return it.
        inserted = session.execute(insert_ignoring_duplicates(session, StoredFile).values(**row)).rowcount == 1
    stored = _stored(catalog, account_id, digest)
    if stored is None:
        raise CatalogError(
            f"the object key {key} is taken by other bytes of account {account_id}: ingest the file under another name"
        )
    if stored.key != key:
        # Another ingest stored the same bytes under another name first: ours is a duplicate.
        store.delete(key)
    return replace(stored, created=inserted)


def _stored(catalog: Catalog, account_id: str, digest: str) -> StoredFileInfo | None:
    with catalog.session() as session:
        existing = session.scalars(
            select(StoredFile).where(StoredFile.account_id == account_id, StoredFile.sha256 == digest)
        ).first()
        return None if existing is None else _info(existing, created=False)


def _info(record: StoredFile, created: bool) -> StoredFileInfo:
    return StoredFileInfo(
        record.id,
        record.account_id,
        record.key,
        record.original_name,
        record.size,
        record.sha256,
        record.point_count,
        record.state,
        created,
    )


def list_files(catalog: Catalog, account_id: str) -> list[StoredFileInfo]:
    get_account(catalog, account_id)
    with catalog.session() as session:
        rows = session.scalars(select(StoredFile).where(StoredFile.account_id == account_id).order_by(StoredFile.id))
        return [_info(r, created=False) for r in rows]
