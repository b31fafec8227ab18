"""Usage records past their retention (the policy's `usage_retention_years`): which of an account's
records may go, and their deletion, audited in the same transaction; then the job rows that held
the same facts (file name, points, classes, errors), which go under the same retention.

A record is kept until the retention has passed since it happened, since it was recorded (a late
event is billed after it happened) and since the latest invoice that billed it, or credit note
correcting that invoice, was issued: an accounting record is evidence as long as it is kept, and
so is the usage it billed. Invoices and credit notes are never deleted here.

A finished job's row goes once the retention has passed since it finished, its usage records have
gone (or go in the same run) and nothing of its data is stored any more; with it go the rows that
exist only for it: the records of its e-mails (their subject may name the file) and its drop-zone
claims (they hold the file's path). Deleted, not anonymised: no foreign key points at a job, and
its id is unique to one DAG run or drop-zone object version, so it never comes back as a new job.
What names the job in the lifecycle's actions and audit entries stays: it is the account of what
was deleted, and holds ids and dates only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, and_, delete, literal, or_, select
from sqlalchemy.orm import Session

from pipelines.billing.models import CreditNote, Invoice, UsageBilling
from pipelines.catalog import Catalog, batches
from pipelines.catalog.models import (
    TERMINAL_JOB_STATES,
    IntakeClaim,
    Job,
    MessageClaim,
    SentMessage,
    UsageEvent,
    utcnow,
)
from pipelines.lifecycle.deletion import AccountOnHold, active_hold, on_hold_message
from pipelines.lifecycle.models import DeletionAudit

USAGE_RULE = "usage_retention"
JOB_RULE = "job_retention"
# The keys a job's e-mails are sent under (steps.deliver, steps.validate, intake), each + ":<job id>".
_JOB_MESSAGES = ("export", "quarantine", "intake-refused")
_FINISHED = [state.value for state in TERMINAL_JOB_STATES]


@dataclass(frozen=True)
class ExpiredJob:
    job_id: str
    state: str
    finished_at: datetime


@dataclass(frozen=True)
class ExpiredUsage:
    event_id: str
    kind: str
    occurred_at: datetime
    recorded_at: datetime


def _usage_expired(cutoff: datetime) -> ColumnElement[bool]:
    """A usage record's retention ended before `cutoff`."""
    issued_since = cutoff.date()
    needed = (
        select(UsageBilling.event_id)
        .join(Invoice, Invoice.period == UsageBilling.period)
        .outerjoin(CreditNote, CreditNote.invoice_number == Invoice.invoice_number)
        .where(UsageBilling.event_id == UsageEvent.event_id, Invoice.account_id == UsageEvent.account_id)
        .where(or_(Invoice.issue_date >= issued_since, CreditNote.issued_on >= issued_since))
        .exists()
    )
    return and_(UsageEvent.occurred_at < cutoff, UsageEvent.recorded_at < cutoff, ~needed)


def expired_usage(session: Session, account_id: str, cutoff: datetime) -> list[ExpiredUsage]:
    """The account's usage records whose retention ended before `cutoff` (the run's moment less
    the retention), oldest first."""
    rows = session.execute(
        select(UsageEvent.event_id, UsageEvent.kind, UsageEvent.occurred_at, UsageEvent.recorded_at)
        .where(UsageEvent.account_id == account_id, _usage_expired(cutoff))
        .order_by(UsageEvent.occurred_at, UsageEvent.event_id)
    )
    return [ExpiredUsage(*row) for row in rows]


def delete_usage(
    catalog: Catalog, account_id: str, records: list[ExpiredUsage], cutoff: datetime, as_of: datetime
) -> DeletionAudit:
    """Delete the records (and the marks of the run that billed them) with their audit entry, in
    one transaction: completed, or nothing happened. Refused for an account on legal hold; call it
    holding the account's lock, as every deletion."""
    with catalog.session() as session:
        hold = active_hold(session, account_id)
        if hold is not None:
            raise AccountOnHold(on_hold_message(account_id, hold))
        # Which records went, never what they held (file names, points).
        audit = _completed(
            account_id,
            USAGE_RULE,
            f"usage records before {cutoff.isoformat()}",
            as_of,
            {f"usage_events/{r.event_id}": f"usage record ({r.kind}, {r.occurred_at.isoformat()})" for r in records},
        )
        session.add(audit)
        ids = [r.event_id for r in records]
        for chunk in batches(ids):
            session.execute(delete(UsageBilling).where(UsageBilling.event_id.in_(chunk)))
            session.execute(delete(UsageEvent).where(UsageEvent.event_id.in_(chunk)))
        session.flush()
        session.expunge(audit)
        return audit


def expired_jobs(session: Session, account_id: str, cutoff: datetime) -> list[ExpiredJob]:
    """The account's finished jobs whose retention ended before `cutoff`, oldest first: finished
    before it and metered (an unmetered job's record is still to come, kept from then on), every
    usage record of theirs gone or going now, nothing of their data stored (a job's row is how its
    stored outputs are found), their working objects not kept by a legal hold for a later sweep,
    and no unfinished deletion of theirs that a later run resumes by their row."""
    # Not correlated: usage_events.job_id has no index, the account's records are read once.
    usage_kept = select(UsageEvent.job_id).where(
        UsageEvent.account_id == account_id, UsageEvent.job_id.is_not(None), ~_usage_expired(cutoff)
    )
    deletion_unfinished = (
        select(DeletionAudit.id)
        .where(DeletionAudit.account_id == account_id, DeletionAudit.status == "started")
        .where(DeletionAudit.subject == literal("job ") + Job.job_id)
        .exists()
    )
    rows = session.execute(
        select(Job.job_id, Job.state, Job.finished_at)
        .where(Job.account_id == account_id, Job.state.in_(_FINISHED), Job.finished_at < cutoff)
        .where(Job.metered_at.is_not(None), Job.working_objects_held_at.is_(None))
        .where(Job.classified_key.is_(None), Job.export_prefix.is_(None), Job.report_key.is_(None))
        .where(Job.job_id.not_in(usage_kept), ~deletion_unfinished)
        .order_by(Job.finished_at, Job.job_id)
    )
    return [ExpiredJob(*row) for row in rows]


def delete_jobs(
    catalog: Catalog, account_id: str, jobs: list[ExpiredJob], cutoff: datetime, as_of: datetime
) -> DeletionAudit:
    """Delete the job rows, the records of their e-mails and their drop-zone claims with their
    audit entry, in one transaction. Refused for an account on legal hold; call it holding the
    account's lock, as every deletion."""
    with catalog.session() as session:
        hold = active_hold(session, account_id)
        if hold is not None:
            raise AccountOnHold(on_hold_message(account_id, hold))
        messages: dict[str, int] = {}
        claims: dict[str, int] = {}
        ids = [j.job_id for j in jobs]
        for chunk in batches(ids):
            keys = {f"{kind}:{job_id}": job_id for job_id in chunk for kind in _JOB_MESSAGES}
            mine = SentMessage.account_id == account_id
            for key in session.scalars(select(SentMessage.key).where(mine, SentMessage.key.in_(keys))):
                messages[keys[key]] = messages.get(keys[key], 0) + 1
            for job_id in session.scalars(
                select(IntakeClaim.job_id).where(IntakeClaim.account_id == account_id, IntakeClaim.job_id.in_(chunk))
            ):
                claims[job_id] = claims.get(job_id, 0) + 1
            session.execute(delete(SentMessage).where(mine, SentMessage.key.in_(keys)))
            session.execute(
                delete(MessageClaim).where(MessageClaim.account_id == account_id, MessageClaim.key.in_(keys))
            )
            session.execute(
                delete(IntakeClaim).where(IntakeClaim.account_id == account_id, IntakeClaim.job_id.in_(chunk))
            )
            session.execute(
                delete(Job).where(Job.account_id == account_id, Job.state.in_(_FINISHED), Job.job_id.in_(chunk))
            )
        # Which jobs went, never what they held (file names, paths, points, errors).
        audit = _completed(
            account_id,
            JOB_RULE,
            f"job records finished before {cutoff.isoformat()}",
            as_of,
            {
                f"jobs/{j.job_id}": (
                    f"job record ({j.state}, finished {j.finished_at.isoformat()}), with "
                    f"{messages.get(j.job_id, 0)} e-mail record(s) and {claims.get(j.job_id, 0)} drop-zone claim(s)"
                )
                for j in jobs
            },
        )
        session.add(audit)
        session.flush()
        session.expunge(audit)
        return audit


def _completed(account_id: str, rule: str, subject: str, as_of: datetime, rows: dict[str, str]) -> DeletionAudit:
    """The audit entry of catalog rows deleted in the transaction that writes it (`rows`: a key
    naming each row, and what it was)."""
    return DeletionAudit(
        account_id=account_id,
        rule=rule,
        subject=subject[:255],
        as_of=as_of,
        status="completed",
        object_count=len(rows),
        version_count=len(rows),
        bytes=0,
        objects=[{"key": key, "bytes": 0, "versions": 1, "what": what} for key, what in rows.items()],
        local_paths=[],
        finished_at=utcnow(),
    )
