"""Safe deletion: inventory first (every version), audit entry before the first delete, then
delete, then list again and fail loudly if anything of the inventory is still there.

Every deletion of an account's data runs holding `account_lock`, which placing a legal hold takes
too: a hold waits for a deletion under way, and one placed before is found by `execute_deletion`
before anything goes.

The same `inventory` feeds `--dry-run`, so a dry run lists exactly what a real run deletes.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from pipelines.catalog import Catalog, CatalogError, batches
from pipelines.catalog.models import Job, StoredFile, TrainedModelRecord, utcnow
from pipelines.errors import PointflowError
from pipelines.lifecycle.models import DeletionAudit, LegalHold
from pipelines.scratch import account_folders
from pipelines.storage import AccountArea, LocalStore, ObjectStore, S3Store

PARTIAL_WHAT = "an unfinished upload (a part file)"
UPLOAD_WHAT = "an unfinished multipart upload (its parts), initiated"
# The deletion audit's rules of deletions no nightly rule redoes when one is killed.
REQUEST_RULE = "customer_request"
FAILED_JOB_RULE = "failed_job_cleanup"  # the working objects of a job closed as failed


class DeletionIncomplete(PointflowError, RuntimeError):
    """Objects survived a deletion; the audit entry is marked failed and lists them."""


class AccountOnHold(CatalogError):
    """The account is on legal hold: nothing of it may be deleted, on anyone's request."""


def account_lock(catalog: Catalog, account_id: str) -> AbstractContextManager[None]:
    """The account's lifecycle lock (`lifecycle:<id>`, the one `run_lifecycle` holds per account):
    every deletion of the account's data holds it from its checks to its end, and placing a legal
    hold takes it. Not re-entrant: take it once."""
    return catalog.lock(f"lifecycle:{account_id}")


def active_hold(session: Session, account_id: str) -> LegalHold | None:
    return session.scalars(
        select(LegalHold)
        .where(LegalHold.account_id == account_id, LegalHold.released_at.is_(None))
        .order_by(LegalHold.id)
    ).first()


def on_hold_message(account_id: str, hold: LegalHold) -> str:
    return f"account {account_id} is on legal hold since {hold.placed_at.isoformat()} ({hold.reason}): nothing may be deleted"


@dataclass(frozen=True)
class StoredObject:
    key: str
    bytes: int  # all versions together
    versions: int  # versions and delete markers; 1 where the store keeps no versions
    current_bytes: int | None = None  # the current version's; None when it is a delete marker
    # Set for an entry of a local store that is no object (a symbolic link, a FIFO): what it is.
    # It is removed itself, never what a link points at, and is nothing to export.
    what: str | None = None
    # Set for an unfinished S3 multipart upload (its key is the one it would complete): aborted,
    # never deleted as the key's object, which may exist beside it.
    upload_id: str | None = None


@dataclass(frozen=True)
class LocalPath:
    path: str
    bytes: int


@dataclass(frozen=True)
class DeletionPlan:
    """What one deletion removes. `prefixes` must be empty afterwards, except under `kept`
    (billing records); `keys` must be gone."""

    prefixes: tuple[str, ...]
    keys: tuple[str, ...]
    kept: tuple[str, ...]
    objects: tuple[StoredObject, ...]
    local_paths: tuple[LocalPath, ...]

    def covers(self, key: str) -> bool:
        """False for keys under a kept prefix."""
        return not any(key.startswith(k) for k in self.kept)

    @property
    def bytes(self) -> int:
        return sum(o.bytes for o in self.objects) + sum(p.bytes for p in self.local_paths)

    def summary(self) -> dict[str, Any]:
        return {
            "objects": len(self.objects),
            "versions": sum(o.versions for o in self.objects),
            "bytes": self.bytes,
            "keys": [
                {"key": o.key, "bytes": o.bytes, "versions": o.versions}
                | ({"what": o.what} if o.what else {})
                | ({"upload_id": o.upload_id} if o.upload_id else {})
                for o in self.objects
            ],
            "local_paths": [{"path": p.path, "bytes": p.bytes} for p in self.local_paths],
        }


def inventory(store: ObjectStore, prefix: str) -> list[StoredObject]:
    """Every key under `prefix`, counting every version where the bucket keeps versions.

    `ObjectStore.list` shows current objects only; on S3 a key whose current version is a delete
    marker still holds old versions, so S3 is asked for versions directly, and for the unfinished
    multipart uploads (a killed writer's parts, which no listing of objects shows).
    """
    if isinstance(store, S3Store):
        sizes: dict[str, int] = defaultdict(int)
        counts: dict[str, int] = defaultdict(int)
        current: dict[str, int] = {}
        paginator = store.client.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=store.bucket, Prefix=store.prefix + prefix):
            for item in page.get("Versions", []):
                key = item["Key"][len(store.prefix) :]
                sizes[key] += int(item["Size"])
                counts[key] += 1
                if item.get("IsLatest"):
                    current[key] = int(item["Size"])
            for item in page.get("DeleteMarkers", []):
                key = item["Key"][len(store.prefix) :]
                sizes[key] += 0
                counts[key] += 1
        objects = [StoredObject(key, sizes[key], counts[key], current.get(key)) for key in sorted(sizes)]
        uploads = [
            StoredObject(u.key, u.size, 1, None, f"{UPLOAD_WHAT} {u.modified.isoformat()}", u.version)
            for u in store.unfinished_uploads(prefix)
        ]
        return sorted(objects + uploads, key=_identity)
    if isinstance(store, LocalStore):
        # Symbolic links, FIFOs (planted in a drop zone) are no objects, but the account's entries
        # all the same: a deletion removes them themselves (never a link's target), and a prefix
        # whose folder is itself a link is that link alone (nothing is listed through it).
        found, strayed, parts = store.contents(prefix)  # one walk of the folder
        strays = [StoredObject(key, 0, 1, None, what) for key, what in strayed]
        objects = [StoredObject(o.key, o.size, 1, o.size) for o in found]
        # Part files of uploads (a writer killed mid-way, or one still writing) hold the account's
        # points although they are no objects: deleted too, with their size, never exported.
        partials = [StoredObject(o.key, o.size, 1, None, PARTIAL_WHAT) for o in parts]
        return sorted(objects + strays + partials, key=lambda o: o.key)
    return [StoredObject(o.key, o.size, 1, o.size) for o in store.list(prefix)]


def local_inventory(paths: list[Path]) -> list[LocalPath]:
    found = []
    for path in sorted(paths):
        if path.is_dir():
            found.append(LocalPath(str(path), sum(p.stat().st_size for p in path.rglob("*") if p.is_file())))
        elif path.is_file():
            found.append(LocalPath(str(path), path.stat().st_size))
    return found


def plan_deletion(
    store: ObjectStore, prefixes: list[str], keys: list[str], local_paths: list[Path], kept: tuple[str, ...] = ()
) -> DeletionPlan:
    objects: dict[tuple[str, str], StoredObject] = {}
    for prefix in prefixes:
        for item in inventory(store, prefix):
            if not any(item.key.startswith(k) for k in kept):
                objects[_identity(item)] = item
    for key in keys:
        for item in inventory(store, key):
            # A key is also a prefix of longer keys: keep only the key itself.
            if item.key == key:
                objects[_identity(item)] = item
    return DeletionPlan(
        tuple(prefixes),
        tuple(keys),
        kept,
        tuple(objects[k] for k in sorted(objects)),
        tuple(local_inventory(local_paths)),
    )


def account_deletion_plan(store: ObjectStore, scratch: Path, account_id: str) -> DeletionPlan:
    """Everything of the account: its whole prefix (raw, exports, reports, models, ...), its drop
    zone (files refused there stay until then) and every scratch folder holding its points (a
    running job's, or one a killed run left), except its invoice documents: billing records are
    kept, like the usage events and invoices in the catalog."""
    area = AccountArea(account_id)
    return plan_deletion(
        store,
        [area.prefix, area.incoming_prefix],
        [],
        account_folders(scratch, account_id),
        kept=(area.prefix + "invoices/",),
    )


def forget_account_objects(catalog: Catalog, account_id: str, deleted_at: datetime) -> None:
    """The catalog stops pointing at deleted objects; job rows and usage stay (billing evidence)
    until their retention (`retention`), and trained models stay as tombstones (their versions are
    not given out again)."""
    with catalog.session() as session:
        session.execute(
            update(Job)
            .where(Job.account_id == account_id)
            .values(file_id=None, classified_key=None, export_prefix=None, report_key=None)
        )
        session.execute(delete(StoredFile).where(StoredFile.account_id == account_id))
        session.execute(
            update(TrainedModelRecord)
            .where(TrainedModelRecord.account_id == account_id, TrainedModelRecord.deleted_at.is_(None))
            .values(deleted_at=deleted_at, training_files=[])
        )


def forget_keys(catalog: Catalog, account_id: str, keys: list[str], deleted_at: datetime) -> None:
    """The catalog stops pointing at these deleted objects of the account (the stored files, the
    job outputs and models they were), as the deletion that listed them would have done."""
    # An export is its folder: a job points at it while anything listed under it is gone.
    folders = sorted({key[: i + 1] for key in keys for i, char in enumerate(key) if char == "/"})
    mine = Job.account_id == account_id
    with catalog.session() as session:
        for chunk in batches(keys):
            files = select(StoredFile.id).where(StoredFile.account_id == account_id, StoredFile.key.in_(chunk))
            session.execute(update(Job).where(mine, Job.file_id.in_(files)).values(file_id=None))
            session.execute(delete(StoredFile).where(StoredFile.account_id == account_id, StoredFile.key.in_(chunk)))
            session.execute(update(Job).where(mine, Job.classified_key.in_(chunk)).values(classified_key=None))
            session.execute(update(Job).where(mine, Job.report_key.in_(chunk)).values(report_key=None))
            session.execute(
                update(TrainedModelRecord)
                .where(
                    TrainedModelRecord.account_id == account_id,
                    TrainedModelRecord.key.in_(chunk),
                    TrainedModelRecord.deleted_at.is_(None),
                )
                .values(deleted_at=deleted_at, training_files=[])
            )
        for prefixes in batches(folders):
            session.execute(update(Job).where(mine, Job.export_prefix.in_(prefixes)).values(export_prefix=None))


@dataclass(frozen=True)
class Remainder:
    """What is left to do of an interrupted deletion: `plan` deletes what it listed that is still
    there as it was; `kept` are its keys written since it started (someone else's data now)."""

    plan: DeletionPlan
    kept: tuple[str, ...]


def remainder(store: ObjectStore, entry: DeletionAudit) -> Remainder:
    """The rest of the deletion `entry` set out to do. Part files are left to the nightly sweep,
    which removes those no live writer holds."""
    keys: list[str] = []
    kept: list[str] = []
    for item in entry.objects:
        if item.get("what") == PARTIAL_WHAT:
            continue
        info = store.info(item["key"])
        if info is not None and info.modified is not None and info.modified > entry.started_at:
            kept.append(item["key"])
        else:
            keys.append(item["key"])
    paths = [Path(p["path"]) for p in entry.local_paths]
    kept += [str(p) for p in paths if p.exists() and p.stat().st_mtime > entry.started_at.timestamp()]
    paths = [p for p in paths if str(p) not in kept]
    return Remainder(plan_deletion(store, [], keys, paths), tuple(sorted(kept)))


def execute_deletion(
    catalog: Catalog, store: ObjectStore, plan: DeletionPlan, account_id: str, rule: str, subject: str, as_of: datetime
) -> DeletionAudit:
    """Delete what the plan lists; the audit entry exists before the first object goes.

    Call it holding `account_lock`: a legal hold of the account is checked here, in the transaction
    that writes the audit entry, and none can be placed until the deletion is over. Under the lock
    an entry of the account still `started` is one whose process died mid-way: if this plan covers
    its objects (the same deletion run again, or a wider one), it is closed as `interrupted`,
    pointing at this entry, and this entry also lists the objects it had already removed (those
    the inventory no longer finds), each with `deleted_by` its number.
    """
    summary = plan.summary()
    with catalog.session() as session:
        hold = active_hold(session, account_id)
        if hold is not None:
            raise AccountOnHold(on_hold_message(account_id, hold))
        killed = [
            entry
            for entry in session.scalars(
                select(DeletionAudit)
                .where(DeletionAudit.account_id == account_id, DeletionAudit.status == "started")
                .order_by(DeletionAudit.id)
            )
            if _takes_over(plan, rule, subject, entry)
        ]
        objects, local_paths = summary["keys"], summary["local_paths"]
        listed, listed_paths = {_entry_identity(o) for o in objects}, {p["path"] for p in local_paths}
        for entry in killed:
            for item in entry.objects:
                if _entry_identity(item) not in listed:
                    objects.append({**item, "deleted_by": item.get("deleted_by", entry.id)})
                    listed.add(_entry_identity(item))
            for item in entry.local_paths:
                if item["path"] not in listed_paths:
                    local_paths.append({**item, "deleted_by": item.get("deleted_by", entry.id)})
                    listed_paths.add(item["path"])
        objects.sort(key=_entry_identity)
        local_paths.sort(key=lambda p: p["path"])
        audit = DeletionAudit(
            account_id=account_id,
            rule=rule,
            subject=subject,
            as_of=as_of,
            status="started",
            object_count=len(objects),
            version_count=sum(o["versions"] for o in objects),
            bytes=sum(o["bytes"] for o in objects) + sum(p["bytes"] for p in local_paths),
            objects=objects,
            local_paths=local_paths,
        )
        session.add(audit)
        session.flush()
        audit_id = audit.id
        for entry in killed:
            entry.status, entry.finished_at = "interrupted", utcnow()
            entry.error = f"its process ended before it finished; taken over by #{audit_id}"
    try:
        for item in plan.objects:
            if item.upload_id is None:
                store.delete(item.key)  # every version, on a versioned bucket
            else:
                store.abort_upload(item.key, item.upload_id)
        for local in plan.local_paths:
            path = Path(local.path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        remaining = _remaining(store, plan)
        if remaining:
            raise DeletionIncomplete(
                f"deletion {audit_id} for account {account_id} ({rule}): still present after deleting: {', '.join(remaining[:20])}"
            )
    except Exception as error:
        with catalog.session() as session:
            failed = session.get(DeletionAudit, audit_id)
            failed.status, failed.error, failed.finished_at = "failed", str(error), utcnow()
        raise
    with catalog.session() as session:
        done = session.get(DeletionAudit, audit_id)
        done.status, done.finished_at = "completed", utcnow()
        session.flush()
        session.expunge(done)
        return done


def _identity(item: StoredObject) -> tuple[str, str]:
    """An inventory entry's identity: its key, and which unfinished upload to it it is, if one."""
    return item.key, item.upload_id or ""


def _entry_identity(item: dict[str, Any]) -> tuple[str, str]:
    """`_identity` of an entry as the audit records it."""
    return item["key"], item.get("upload_id", "")


def _takes_over(plan: DeletionPlan, rule: str, subject: str, entry: DeletionAudit) -> bool:
    """Whether this plan finishes what the interrupted `entry` set out to delete: every key of it
    is one this plan deletes (or finds gone), and every local path of it is in the plan or gone."""
    if not entry.objects and (entry.rule, entry.subject) != (rule, subject):
        return False
    paths = {p.path for p in plan.local_paths}
    return all(
        key in plan.keys or (any(key.startswith(p) for p in plan.prefixes) and plan.covers(key))
        for key in (o["key"] for o in entry.objects)
    ) and all(p["path"] in paths or not Path(p["path"]).exists() for p in entry.local_paths)


def _remaining(store: ObjectStore, plan: DeletionPlan) -> list[str]:
    """List again: every prefix must be empty, every planned key gone, every local path gone."""
    left = [o.key for prefix in plan.prefixes for o in inventory(store, prefix) if plan.covers(o.key)]
    left += [o.key for key in plan.keys for o in inventory(store, key) if o.key == key]
    left += [p.path for p in plan.local_paths if Path(p.path).exists()]
    return sorted(set(left))
