"""The drop zone: a file a customer puts under incoming/<account>/ becomes one classification job.

A sweep lists the drop zones. Each complete object version it has not seen yet is claimed first
(one catalog row per key and version; whoever inserts it owns it, so overlapping sweeps and a
retried sensing task start one job per version), then registered: a job is created and the file
stored in the account's raw area under the same checks and limits as any job's input, and only
then is the object removed from the drop zone. What is refused (a closed account, a plan or service
limit) stays in the drop zone with its claim marked refused, and the customer is told once; putting
the file there again makes a new version, which is tried again. A file that is not LAS/LAZ is
registered like any other: its job's validation quarantines it and sends the usual notice, once.

Complete means: on S3 every listed object is (a PUT or a multipart upload appears whole); in a
local folder a file is taken once it has not changed for SETTLE, and names starting with "." (the
temporary names of rsync, our own writes and most uploaders) are never taken.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update

from pipelines.accounts import get_account
from pipelines.admission import AdmissionRefused, check_file_size
from pipelines.catalog import CatalogError
from pipelines.catalog.db import insert_ignoring_duplicates
from pipelines.catalog.models import IntakeClaim, utcnow
from pipelines.customer_text import render_mail
from pipelines.errors import InvalidValue, PointflowError
from pipelines.lifecycle.operations import AccountLocked
from pipelines.notify import DeliveryError, Message
from pipelines.runtime import Runtime
from pipelines.scratch import work_dir
from pipelines.steps.ingest import attach_file, create_job
from pipelines.steps.meter import meter_step
from pipelines.steps.record import AdmissionRefusedJob, job_view, refuse_job
from pipelines.storage import (
    INCOMING_PREFIX,
    LocalStore,
    ObjectInfo,
    ObjectTooLarge,
    StaleObject,
    UnsafeKeyError,
    check_account_id,
    safe_name,
)

log = logging.getLogger(__name__)

# A local copy in progress writes more often than this; S3 objects are complete when listed.
SETTLE = timedelta(seconds=10)
# A claim whose sweep stopped (process killed) is taken over by another sweep after this long;
# registering one file (a download and a checksum) takes far less.
LEASE = timedelta(minutes=10)
CLASSIFIER = "standard"


@dataclass(frozen=True)
class Outcome:
    """What a sweep did with one object of a drop zone."""

    key: str
    account_id: str
    job_id: str | None
    outcome: str  # registered | refused | superseded | skipped (a link or other non-file, local store)
    reason: str | None = None

    def to_public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SweepResult:
    outcomes: list[Outcome]
    job_ids: list[str]  # the jobs this sweep registered (a retried sweep: also its earlier tries'), to run
    errors: dict[str, str]  # key -> why it could not be registered now (the next sweep tries again)


class IntakeError(PointflowError, RuntimeError):
    """Some objects could not be registered (storage or catalog unavailable); retry the sweep."""


def job_id_for(key: str, version: str) -> str:
    """One job per object version, whichever sweep registers it."""
    return "job-" + uuid.uuid5(uuid.NAMESPACE_URL, f"pointflow:intake:{key}:{version}").hex[:20]


def _drop(info: ObjectInfo) -> tuple[str, str] | None:
    """(account id, file name) of an object in a drop zone, or None for what is not a customer's file."""
    parts = info.key[len(INCOMING_PREFIX) :].split("/")
    if len(parts) < 2 or any(p.startswith(".") for p in parts[1:]):
        return None
    try:
        return check_account_id(parts[0]), safe_name(parts[-1])
    except UnsafeKeyError:
        return None


def sweep(runtime: Runtime, owner: str, now: datetime | None = None) -> SweepResult:
    """Register a job for every new complete file version in the drop zones; `owner` names this
    sweep (a DAG run, a CLI process): a retry under the same name resumes its claims at once."""
    now = now or utcnow()
    store = runtime.store
    outcomes: list[Outcome] = []
    errors: dict[str, str] = {}
    skipped: set[str] = set()
    if isinstance(store, LocalStore):
        for key, what in store.irregular(INCOMING_PREFIX):
            # Never taken, never deleted: a link would hand over what it points at (another
            # account's objects, the service's files). Reported at every sweep until removed.
            reason = f"{what}: not taken, put the file itself there"
            log.warning("drop-zone entry %s skipped: %s", key, reason)
            account_id = key[len(INCOMING_PREFIX) :].split("/", 1)[0]
            outcomes.append(Outcome(key, account_id, None, "skipped", reason))
            skipped.add(key)
    for info in store.list(INCOMING_PREFIX):
        if info.key in skipped:
            continue
        drop = _drop(info)
        if drop is None:
            continue
        if isinstance(store, LocalStore) and info.modified is not None and info.modified > now - SETTLE:
            continue  # still being written, perhaps: the next sweep looks again
        account_id, name = drop
        job_id = _claim(runtime, info, account_id, owner, now)
        if job_id is None:
            continue
        try:
            outcomes.append(_register(runtime, info, account_id, name, job_id))
        except Exception as error:  # noqa: BLE001 - one file's failure must not hold back the others
            log.warning("drop-zone file %s not registered yet: %s", info.key, error)
            errors[info.key] = f"{type(error).__name__}: {error}"
    with runtime.catalog.session() as session:
        job_ids = list(
            session.scalars(
                select(IntakeClaim.job_id)
                .where(IntakeClaim.owner == owner, IntakeClaim.state == "registered")
                .order_by(IntakeClaim.id)
            )
        )
    return SweepResult(outcomes, job_ids, errors)


def _claim(runtime: Runtime, info: ObjectInfo, account_id: str, owner: str, now: datetime) -> str | None:
    """The job id if this sweep now owns the object version, else None."""
    job_id = job_id_for(info.key, info.version)
    row = dict(
        source_key=info.key,
        version=info.version,
        account_id=account_id,
        job_id=job_id,
        state="claimed",
        owner=owner,
        claimed_at=now,
        updated_at=now,
    )
    with runtime.catalog.session() as session:
        if session.execute(insert_ignoring_duplicates(session, IntakeClaim).values(**row)).rowcount == 1:
            return job_id
    with runtime.catalog.session() as session:
        taken = session.execute(
            update(IntakeClaim)
            .where(
                IntakeClaim.source_key == info.key, IntakeClaim.version == info.version, IntakeClaim.state == "claimed"
            )
            .where(or_(IntakeClaim.owner == owner, IntakeClaim.updated_at < now - LEASE))
            .values(owner=owner, updated_at=now)
        ).rowcount
        claim = session.scalars(
            select(IntakeClaim).where(IntakeClaim.source_key == info.key, IntakeClaim.version == info.version)
        ).one()
        state, claimed_job = claim.state, claim.job_id
    if taken == 1:
        return claimed_job
    if state == "registered":
        # Registered by a sweep that stopped before removing it from the drop zone.
        _remove(runtime, info)
    return None


def _register(runtime: Runtime, info: ObjectInfo, account_id: str, name: str, job_id: str) -> Outcome:
    store = runtime.store
    try:
        get_account(runtime.catalog, account_id)
    except CatalogError as error:
        # Nobody to tell: only the service's own credentials reach a prefix without an account.
        return _refuse(runtime, info, account_id, name, job_id, str(error), notify=False)
    try:
        create_job(runtime, job_id, account_id, store.location(info.key), CLASSIFIER)
    except AccountLocked as error:
        return _refuse(runtime, info, account_id, name, job_id, str(error))
    try:
        # Refused on its listed size before a byte is downloaded, as a job's s3:// source is; the
        # download itself stops at the limit (a file that grew since it was listed).
        _check_size(runtime, job_id, info.size)
        with work_dir(runtime.settings.scratch_dir, "intake", account_id, job_id) as work:
            # A copy of the listed version: read in place, a file replaced meanwhile would be
            # registered under the old version's claim, and the new version again by the next sweep.
            path = work / name
            try:
                store.get_file(info.key, path, version=info.version, max_bytes=runtime.settings.max_file_bytes)
            except ObjectTooLarge as too_large:
                _check_size(runtime, job_id, too_large.size)
                raise
            attach_file(runtime, job_id, path, name)
    except StaleObject as stale:
        return _supersede(runtime, info, account_id, job_id, str(stale))
    except AdmissionRefusedJob:
        meter_step(runtime, job_id)  # metered once as failed, nothing billed, as for any refused job
        return _refuse(runtime, info, account_id, name, job_id, job_view(runtime, job_id).error)
    with runtime.catalog.session() as session:
        session.execute(update(IntakeClaim).where(IntakeClaim.job_id == job_id).values(state="registered"))
    _remove(runtime, info)
    log.info("drop-zone file %s registered as %s", info.key, job_id)
    return Outcome(info.key, account_id, job_id, "registered")


def _check_size(runtime: Runtime, job_id: str, size: int) -> None:
    """Refuse the job (AdmissionRefusedJob) for a file over POINTFLOW_MAX_FILE_BYTES, with
    the message `pointflow ingest` gives."""
    try:
        check_file_size(runtime.settings, size)
    except AdmissionRefused as refused:
        refuse_job(runtime, job_id, str(refused))


def _supersede(runtime: Runtime, info: ObjectInfo, account_id: str, job_id: str, reason: str) -> Outcome:
    """The customer replaced the file while it was being registered: this version's job ends,
    metered as failed and billed nothing, and the next sweep takes the new version; no notice."""
    with runtime.catalog.session() as session:
        session.execute(
            update(IntakeClaim).where(IntakeClaim.job_id == job_id).values(state="superseded", reason=reason)
        )
    try:
        refuse_job(runtime, job_id, f"the upload was replaced by a newer one while it was registered ({reason})")
    except AdmissionRefusedJob:
        meter_step(runtime, job_id)
    log.info("drop-zone file %s superseded: %s", info.key, reason)
    return Outcome(info.key, account_id, job_id, "superseded", reason)


def _remove(runtime: Runtime, info: ObjectInfo) -> None:
    """Remove the registered version from the drop zone, unless the customer has put a newer one there."""
    current = runtime.store.info(info.key)
    if current is not None and current.version == info.version:
        runtime.store.delete(info.key)


def _refuse(
    runtime: Runtime, info: ObjectInfo, account_id: str, name: str, job_id: str, reason: str, notify: bool = True
) -> Outcome:
    """Leave the file in the drop zone, remember this version as refused, and tell the customer once."""
    with runtime.catalog.session() as session:
        session.execute(update(IntakeClaim).where(IntakeClaim.job_id == job_id).values(state="refused", reason=reason))
    log.warning("drop-zone file %s refused: %s", info.key, reason)
    if notify:
        account = get_account(runtime.catalog, account_id)
        mail = render_mail(
            "mail/intake_refused.txt.j2",
            name=account.name,
            file_name=name,
            upload_folder=f"{INCOMING_PREFIX}{account_id}/",
            reason=reason,
        )
        try:
            runtime.mailer.send_once(
                Message(f"intake-refused:{job_id}", account_id, "intake_refused", account.email, mail)
            )
        except DeliveryError as error:
            # The refusal stands; the customer still sees the file unprocessed in the upload folder.
            log.warning("refusal notice for %s not sent: %s", info.key, error)
    return Outcome(info.key, account_id, job_id, "refused", reason)


def customer_policy(store_url: str, account_id: str) -> dict[str, Any]:
    """The S3 policy (AWS IAM and MinIO alike) for a customer's own credentials: upload to, read,
    list and delete in its drop zone only; nothing else in the bucket (README, "Customers' own S3 credentials")."""
    from urllib.parse import urlparse

    parsed = urlparse(store_url)
    if parsed.scheme != "s3":
        raise InvalidValue(
            f"the object store {store_url} is not S3: customers' credentials only exist for s3:// stores"
        )
    root = parsed.path.strip("/")
    zone = (f"{root}/" if root else "") + f"{INCOMING_PREFIX}{check_account_id(account_id)}/"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "UploadToOwnDropZone",
                "Effect": "Allow",
                "Action": [
                    "s3:PutObject",
                    "s3:GetObject",
                    "s3:DeleteObject",
                    "s3:AbortMultipartUpload",
                    "s3:ListMultipartUploadParts",
                ],
                "Resource": [f"arn:aws:s3:::{parsed.netloc}/{zone}*"],
            },
            {
                "Sid": "ListOwnDropZone",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{parsed.netloc}"],
                "Condition": {"StringLike": {"s3:prefix": [zone, f"{zone}*"]}},
            },
        ],
    }
