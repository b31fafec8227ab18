"""Nightly sweeps over jobs: close those whose run was killed or lost, meter those whose run ended
before its meter step, and send the ready e-mails that classification runs could not."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select

from pipelines.billing.pricebook import load_pricebook
from pipelines.catalog.models import TERMINAL_JOB_STATES, Job, JobState, SentMessage, utcnow
from pipelines.export import export_prefix, read_manifest
from pipelines.lifecycle.deletion import FAILED_JOB_RULE, DeletionPlan, account_lock, execute_deletion, plan_deletion
from pipelines.lifecycle.models import LegalHold
from pipelines.lifecycle.operations import active_hold, is_locked
from pipelines.notify import DeliveryError
from pipelines.runtime import Runtime
from pipelines.steps.deliver import deliver_step
from pipelines.steps.meter import meter_step
from pipelines.steps.record import JobRecord, job_row, set_state
from pipelines.storage import AccountArea, LocalStore, S3Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StaleReport:
    closed: list[JobRecord]  # stale jobs closed now as failed, each metered once (nothing billed)
    metered: list[JobRecord]  # finished jobs that had no usage event, metered now as their record says
    # job id -> the working objects of a closed job removed now (audited as FAILED_JOB_RULE): a job
    # closed now, or one closed under a legal hold released since
    removed: dict[str, list[str]] = field(default_factory=dict)
    held: list[str] = field(default_factory=list)  # closed jobs whose objects stay: the account is on legal hold


def working_objects_plan(runtime: Runtime, account_id: str, job_id: str) -> DeletionPlan:
    """What a job that never finished leaves in the store: its classified points, its staged export
    artefacts and, when no manifest was written, the unpublished ones. Never a published export
    (one with a manifest) and never the raw input, which other jobs may share."""
    area = AccountArea(account_id)
    prefixes = [area.key("classified", job_id) + "/", area.key("tmp", "exports", job_id) + "/"]
    published = export_prefix(account_id, job_id)
    if read_manifest(runtime.store, published) is None:
        prefixes.append(published)
    return plan_deletion(runtime.store, prefixes, [], [])


def remove_working_objects(runtime: Runtime, account_id: str, job_id: str, as_of: datetime) -> list[str] | None:
    """Delete a failed job's working objects, audited like any deletion; the keys removed, or None
    when the account is on legal hold (nothing of it may be deleted). Run again, it finds nothing."""
    with account_lock(runtime.catalog, account_id):  # taken before any catalog session, as every holder does
        if active_hold(runtime.catalog, account_id) is not None:
            return None
        plan = working_objects_plan(runtime, account_id, job_id)
        if not plan.objects:
            return []
        execute_deletion(runtime.catalog, runtime.store, plan, account_id, FAILED_JOB_RULE, f"job {job_id}", as_of)
    return [o.key for o in plan.objects]


def close_stale_jobs(runtime: Runtime, as_of: datetime | None = None) -> StaleReport:
    """Close as failed every job that made no progress for POINTFLOW_STALE_JOB_HOURS: its run was
    killed or lost (a CLI process killed, a DAG run deleted). Each is metered once as failed, so
    nothing is billed (as aborted, with the points its record holds, when its abort was asked for); the customer is not mailed, since nothing in the input was theirs to fix
    (a bad input is refused, and told, when it is found). A job closed while its account was on
    legal hold keeps its working objects; they go on the first sweep after the hold's release.
    Then meter every finished job never metered, however long ago it finished: its run was killed
    or failed between its last step and the meter step; it is metered as its record says
    (exported: succeeded, with its points), dated when it finished."""
    as_of = as_of or utcnow()
    sweep_partial_uploads(runtime, as_of)
    timeout = timedelta(hours=runtime.settings.stale_job_hours)
    open_states = [s.value for s in JobState if s not in TERMINAL_JOB_STATES]
    with runtime.catalog.session() as session:
        stale = list(
            session.scalars(
                select(Job.job_id)
                .where(Job.state.in_(open_states), Job.updated_at < as_of - timeout)
                .order_by(Job.created_at)
            )
        )
    report = StaleReport([], [])
    for job_id in stale:
        with runtime.catalog.session() as session:
            job = job_row(session, job_id)
            if JobState(job.state) in TERMINAL_JOB_STATES:
                continue  # finished meanwhile
            account_id = job.account_id
        # Its working objects go first, while the job is still open: a sweep killed mid-way finds
        # the job again the next night and finishes the deletion (the audit takes over the entry).
        removed = remove_working_objects(runtime, account_id, job_id, as_of)
        with runtime.catalog.session() as session:
            job = job_row(session, job_id)
            if JobState(job.state) in TERMINAL_JOB_STATES:
                continue  # finished meanwhile
            last = f" (last error: {job.error})" if job.error else ""
            kept = (
                "; its working objects are kept: the account is on legal hold"
                if removed is None
                else f"; {len(removed)} working object(s) removed"
                if removed
                else ""
            )
            if job.abort_requested_at is not None:
                # Its abort was asked for: it ends aborted, billed for what its record says it
                # processed (a run killed mid-classification recorded none of its tiles: 0).
                job.error = f"aborted at request ({job.abort_requested_at:%Y-%m-%d %H:%M} UTC); its run ended without finishing while {job.state}{last}: closed after {runtime.settings.stale_job_hours} h{kept}"
                set_state(job, JobState.ABORTED)
            else:
                job.error = f"no progress since {job.updated_at:%Y-%m-%d %H:%M} UTC while {job.state}{last}: closed after {runtime.settings.stale_job_hours} h, nothing billed{kept}"
                set_state(job, JobState.FAILED)
            if removed is None:
                job.working_objects_held_at = as_of
        report.closed.append(meter_step(runtime, job_id))
        if removed is None:
            report.held.append(job_id)
        elif removed:
            report.removed[job_id] = removed
    report.removed.update(remove_released_working_objects(runtime, as_of))
    report.metered.extend(meter_step(runtime, job_id) for job_id in unmetered_jobs(runtime))
    return report


def remove_released_working_objects(runtime: Runtime, as_of: datetime) -> dict[str, list[str]]:
    """The working objects of jobs closed under a legal hold, for accounts no longer on hold:
    removed and audited as FAILED_JOB_RULE; job id -> the keys removed (none left: not listed)."""
    with runtime.catalog.session() as session:
        kept = list(
            session.execute(
                select(Job.job_id, Job.account_id)
                .where(Job.working_objects_held_at.is_not(None))
                .order_by(Job.working_objects_held_at, Job.job_id)
            )
        )
    removed: dict[str, list[str]] = {}
    for job_id, account_id in kept:
        keys = remove_working_objects(runtime, account_id, job_id, as_of)
        if keys is None:
            continue  # still on hold
        with runtime.catalog.session() as session:
            job_row(session, job_id).working_objects_held_at = None
        if keys:
            removed[job_id] = keys
    return removed


def unmetered_jobs(runtime: Runtime) -> list[str]:
    """Finished jobs never metered (`metered_at` unset, found through its partial index)."""
    terminal = [s.value for s in TERMINAL_JOB_STATES]
    with runtime.catalog.session() as session:
        return list(
            session.scalars(
                select(Job.job_id)
                .where(Job.metered_at.is_(None), Job.state.in_(terminal), Job.finished_at.is_not(None))
                .order_by(Job.finished_at)
            )
        )


def sweep_partial_uploads(runtime: Runtime, as_of: datetime | None = None) -> list[str]:
    """Remove what killed uploads left under the store's prefix (the service's own writes and the
    customers' drop zones alike); their keys. In a local store: the part files no live writer holds,
    unchanged for an hour. On S3: the unfinished multipart uploads initiated more than
    POINTFLOW_STALE_UPLOAD_HOURS ago, aborted (S3 cannot tell whether their writer lives). Never
    those of an account on legal hold."""
    now = as_of or utcnow()
    # An account on legal hold keeps even these: nothing of its may be deleted.
    with runtime.catalog.session() as session:
        held = set(session.scalars(select(LegalHold.account_id).where(LegalHold.released_at.is_(None))))
    areas = [AccountArea(account_id) for account_id in sorted(held)]
    keep = tuple(prefix for area in areas for prefix in (area.prefix, area.incoming_prefix))
    if isinstance(runtime.store, LocalStore):
        removed = runtime.store.sweep_partials(now=now, keep=keep)
    elif isinstance(runtime.store, S3Store):
        removed = runtime.store.sweep_uploads(timedelta(hours=runtime.settings.stale_upload_hours), now=now, keep=keep)
    else:
        return []
    if removed:
        log.info("removed %d unfinished upload(s) of killed writers: %s", len(removed), ", ".join(removed[:20]))
    return removed


# A ready e-mail the pipeline could not send is retried by the nightly sweep: only for jobs whose run
# has settled (the deliver task and its retries are over, so the two never race), and only while
# the customer can still use the news.
UNSENT_SETTLE_TIME = timedelta(minutes=30)


UNSENT_RETRY_WINDOW = timedelta(days=14)


@dataclass(frozen=True)
class UnsentReport:
    sent: list[str]  # job ids whose ready e-mail went out now
    failed: dict[str, str]  # job id -> why it still could not be sent
    skipped_locked: list[str]  # the account's data is locked: no links to send


def deliver_unsent(runtime: Runtime, as_of: datetime) -> UnsentReport:
    """Send the ready e-mails that the pipeline could not (mail server down past the task's retries)."""
    with runtime.catalog.session() as session:
        pending = list(
            session.execute(
                select(Job.job_id, Job.account_id)
                .where(Job.state == JobState.EXPORTED.value)
                .where(
                    Job.finished_at.is_not(None),
                    Job.finished_at <= as_of - UNSENT_SETTLE_TIME,
                    Job.finished_at > as_of - UNSENT_RETRY_WINDOW,
                )
                .where(~select(SentMessage.key).where(SentMessage.key == "export:" + Job.job_id).exists())
                .order_by(Job.finished_at)
            ).all()
        )
    sent: list[str] = []
    failed: dict[str, str] = {}
    locked: list[str] = []
    pricebook = load_pricebook(runtime.settings.pricebook_path)
    for job_id, account_id in pending:
        if is_locked(runtime.catalog, account_id, as_of, pricebook=pricebook):
            locked.append(job_id)
            continue
        try:
            deliver_step(runtime, job_id)  # meters the job first if its run did not
            sent.append(job_id)
        except DeliveryError as error:
            failed[job_id] = str(error)
    if failed:
        log.warning(
            "%d ready e-mail(s) still not sent (next try tomorrow); check POINTFLOW_SMTP_URL: %s",
            len(failed),
            next(iter(failed.values())),
        )
    return UnsentReport(sent, failed, locked)
