"""Aborting a job on the customer's or an operator's request (`pointflow jobs abort`, or a DAG or
plugin calling `request_abort`).

The request is recorded on the job (`jobs.abort_requested_at`); what happens next depends on where
the job is:

- not classifying yet (received, validated): it ends `aborted` at once, metered with 0 points;
  a process still running it finds it ended at its next step and stops there.
- classifying: the classification polls the request between tiles (`AbortWatch`, at most every
  ABORT_POLL_SECONDS), sends no more tiles, cancels the tasks in flight, publishes nothing, removes
  its working files and ends the job `aborted` with the core points of the tiles classified before
  it stopped (pipelines.steps.classify); the meter step bills those (an aborted job's points are
  billed, a failed job's are not: pipelines.billing.usage.BILLABLE_STATUSES).
- classified, not exported yet: the export step does not start; aborted with the points classified.
- ended (exported, failed, quarantined, aborted): nothing changes; refused with the job's state.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from pipelines.catalog import CatalogError
from pipelines.catalog.models import TERMINAL_JOB_STATES, Job, JobState, utcnow
from pipelines.errors import UserError
from pipelines.runtime import Runtime
from pipelines.steps.record import JobRecord, job_view

log = logging.getLogger(__name__)

# How often a running classification reads the request: one primary-key read of one column.
ABORT_POLL_SECONDS = 2.0

NOT_STARTED = (JobState.RECEIVED, JobState.VALIDATED)


class JobAlreadyEnded(UserError):
    """An abort of a job that has already ended: nothing is changed."""


class UnknownJob(CatalogError):
    """An abort of a job the catalog does not hold (or, for an account's request, not that account's)."""


def request_abort(runtime: Runtime, job_id: str, account_id: str | None = None) -> JobRecord:
    """Record the request to abort `job_id` (of `account_id`, when given: another account's job is
    unknown to it); a job not classifying yet ends `aborted` here and is metered with 0 points.
    Raises JobAlreadyEnded for a job that has ended; asking twice is the same as asking once."""
    with runtime.catalog.session() as session:
        job = session.get(Job, job_id)
        if job is None or (account_id is not None and job.account_id != account_id):
            whose = f" of account {account_id}" if account_id is not None else ""
            raise UnknownJob(f"unknown job {job_id!r}{whose}; 'pointflow jobs list' shows the jobs")
        state = JobState(job.state)
        if state in TERMINAL_JOB_STATES:
            raise JobAlreadyEnded(f"job {job_id} has already ended {state.value}: nothing to abort, nothing changed")
        now = utcnow()
        # One conditional statement: a step moving the job on meanwhile is never overwritten by "aborted".
        ended = session.execute(
            update(Job)
            .where(Job.job_id == job_id, Job.state.in_([s.value for s in NOT_STARTED]))
            .values(
                state=JobState.ABORTED.value,
                abort_requested_at=func.coalesce(Job.abort_requested_at, now),
                finished_at=now,
                updated_at=now,
                error="aborted on request before classification started",
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if not ended:
            session.execute(
                update(Job)
                .where(Job.job_id == job_id, Job.abort_requested_at.is_(None))
                .values(abort_requested_at=now, updated_at=now)
                .execution_options(synchronize_session=False)
            )
    if ended:
        from pipelines.steps.meter import meter_step

        return meter_step(runtime, job_id)
    record = job_view(runtime, job_id)
    if JobState(record.state) in TERMINAL_JOB_STATES and record.state != JobState.ABORTED.value:
        # It ended between the two statements; the request stays on record, unused.
        raise JobAlreadyEnded(f"job {job_id} has already ended {record.state}: nothing to abort, nothing changed")
    return record


def abort_requested(runtime: Runtime, job_id: str) -> bool:
    with runtime.catalog.session() as session:
        return session.scalar(select(Job.abort_requested_at).where(Job.job_id == job_id)) is not None


class AbortWatch:
    """`should_stop` for pipelines.classify.classify_file: whether the job's abort was requested,
    read from the catalog at most every `interval` seconds (the first call reads it), and once
    requested, always True."""

    def __init__(self, runtime: Runtime, job_id: str, interval: float = ABORT_POLL_SECONDS) -> None:
        self.runtime, self.job_id, self.interval = runtime, job_id, interval
        self._read_at: float | None = None
        self._requested = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if self._requested or (self._read_at is not None and now - self._read_at < self.interval):
            return self._requested
        self._read_at = now
        try:
            self._requested = abort_requested(self.runtime, self.job_id)
        except OperationalError as error:
            # The catalog out of reach for a moment (a restart) must not end a classification that
            # would finish: it is asked again next time, and the step records its result at the end.
            log.warning("job %s: could not read whether its abort was asked for: %s", self.job_id, error)
        return self._requested
