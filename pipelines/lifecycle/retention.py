"""Usage records past their retention (the policy's `usage_retention_years`): which of an account's
records may go, and their deletion, audited in the same transaction.

A record is kept until the retention has passed since it happened, since it was recorded (a late
event is billed after it happened) and since the latest invoice that billed it, or credit note
correcting that invoice, was issued: an accounting record is evidence as long as it is kept, and
so is the usage it billed. Invoices and credit notes are never deleted here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from pipelines.billing.models import CreditNote, Invoice, UsageBilling
from pipelines.catalog import Catalog
from pipelines.catalog.models import UsageEvent, utcnow
from pipelines.lifecycle.deletion import AccountOnHold, active_hold, on_hold_message
from pipelines.lifecycle.models import DeletionAudit

USAGE_RULE = "usage_retention"
_CHUNK = 500


@dataclass(frozen=True)
class ExpiredUsage:
    event_id: str
    kind: str
    occurred_at: datetime
    recorded_at: datetime


def expired_usage(session: Session, account_id: str, cutoff: datetime) -> list[ExpiredUsage]:
    """The account's usage records whose retention ended before `cutoff` (the run's moment less
    the retention), oldest first."""
    issued_since = cutoff.date()
    needed = (
        select(UsageBilling.event_id)
        .join(Invoice, Invoice.period == UsageBilling.period)
        .outerjoin(CreditNote, CreditNote.invoice_number == Invoice.invoice_number)
        .where(UsageBilling.event_id == UsageEvent.event_id, Invoice.account_id == UsageEvent.account_id)
        .where(or_(Invoice.issue_date >= issued_since, CreditNote.issued_on >= issued_since))
        .exists()
    )
    rows = session.execute(
        select(UsageEvent.event_id, UsageEvent.kind, UsageEvent.occurred_at, UsageEvent.recorded_at)
        .where(UsageEvent.account_id == account_id)
        .where(UsageEvent.occurred_at < cutoff, UsageEvent.recorded_at < cutoff)
        .where(~needed)
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
        audit = DeletionAudit(
            account_id=account_id,
            rule=USAGE_RULE,
            subject=f"usage records before {cutoff.isoformat()}"[:255],
            as_of=as_of,
            status="completed",
            object_count=len(records),
            version_count=len(records),
            bytes=0,
            # Which records went, never what they held (file names, points).
            objects=[
                {
                    "key": f"usage_events/{r.event_id}",
                    "bytes": 0,
                    "versions": 1,
                    "what": f"usage record ({r.kind}, {r.occurred_at.isoformat()})",
                }
                for r in records
            ],
            local_paths=[],
            finished_at=utcnow(),
        )
        session.add(audit)
        ids = [r.event_id for r in records]
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            session.execute(delete(UsageBilling).where(UsageBilling.event_id.in_(chunk)))
            session.execute(delete(UsageEvent).where(UsageEvent.event_id.in_(chunk)))
        session.flush()
        session.expunge(audit)
        return audit
