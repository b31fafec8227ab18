"""Nightly sweeps over jobs: close those whose run was killed or lost, and send the ready e-mails
that classification runs could not."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from pipelines.billing.pricebook import load_pricebook
from pipelines.catalog.models import TERMINAL_JOB_STATES, Job, JobState, SentMessage, utcnow
from pipelines.lifecycle.operations import is_locked
from pipelines.notify import DeliveryError
from pipelines.runtime import Runtime
from pipelines.steps.deliver import deliver_step
from pipelines.steps.meter import meter_step
from pipelines.steps.record import JobRecord, job_row, set_state
from pipelines.storage import LocalStore

log = logging.getLogger(__name__)


def close_stale_jobs(runtime: Runtime, as_of: datetime | None = None) -> list[JobRecord]:
    """Close as failed every job that made no progress for POINTFLOW_STALE_JOB_HOURS: its run was
    killed or lost (a CLI process killed, a DAG run deleted). Each is metered once as failed, so
    nothing is billed; the customer is not mailed, since nothing in the input was theirs to fix
    (a bad input is refused, and told, when it is found)."""
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
    closed = []
    for job_id in stale:
        with runtime.catalog.session() as session:
            job = job_row(session, job_id)
            if JobState(job.state) in TERMINAL_JOB_STATES:
                continue  # finished meanwhile
            last = f" (last error: {job.error})" if job.error else ""
            job.error = f"no progress since {job.updated_at:%Y-%m-%d %H:%M} UTC while {job.state}{last}: closed after {runtime.settings.stale_job_hours} h, nothing billed"
            set_state(job, JobState.FAILED)
        closed.append(meter_step(runtime, job_id))
    return closed


def sweep_partial_uploads(runtime: Runtime, as_of: datetime | None = None) -> list[str]:
    """Remove the part files that killed uploads left in a local object store (no live writer
    holds them, unchanged for an hour); their keys. S3 keeps no part objects under our keys."""
    if not isinstance(runtime.store, LocalStore):
        return []
    removed = runtime.store.sweep_partials(now=as_of or utcnow())
    if removed:
        log.info("removed %d part file(s) of killed uploads: %s", len(removed), ", ".join(removed[:20]))
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
            deliver_step(runtime, job_id)
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
