"""Lifecycle e-mails: what each says (the dates that matter and how to avert), sent once per key.

A notice counts only once delivered: `deliver` records it with the run's moment and message id,
or records the refusal so the next run tries again and the clocks that wait for it wait.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pipelines.billing.overdue import OverdueBalance
from pipelines.billing.pricebook import Seller
from pipelines.catalog.models import Account
from pipelines.customer_text import render_mail
from pipelines.lifecycle.models import DeletionAudit, LifecycleDeliveryFailure, LifecycleNotice
from pipelines.notify import DeliveryError, Message
from pipelines.runtime import Runtime

log = logging.getLogger(__name__)


def inactivity_notice(
    account: Account,
    cycle: str,
    last_login: datetime,
    months: int,
    closure_at: datetime,
    deletion_at: datetime,
    *,
    support: str | None = None,
) -> Message:
    return _draft(
        "mail/inactivity_notice.txt.j2",
        "inactivity_notice",
        f"lifecycle:inactivity_notice:{account.account_id}:{cycle}",
        account,
        last_login=last_login,
        months=months,
        closure_at=closure_at,
        deletion_at=deletion_at,
        support=support,
    )


def inactivity_reminder(
    account: Account, cycle: str, days: int, closure_at: datetime, deletion_at: datetime, *, support: str | None = None
) -> Message:
    return _draft(
        "mail/inactivity_reminder.txt.j2",
        "inactivity_reminder",
        f"lifecycle:inactivity_reminder:{account.account_id}:{cycle}:{days}",
        account,
        closure_at=closure_at,
        deletion_at=deletion_at,
        support=support,
    )


def data_locked(
    account: Account, reason: str, effective_at: datetime, deletion_at: datetime, *, support: str | None = None
) -> Message:
    return _draft(
        "mail/data_locked.txt.j2",
        "data_locked",
        f"lifecycle:data_locked:{account.account_id}",
        account,
        reason=reason,
        effective_at=effective_at,
        deletion_at=deletion_at,
        support=support,
    )


def overdue_notice(
    account: Account,
    balance: OverdueBalance,
    currency: str,
    stop_at: datetime,
    *,
    support: str | None = None,
    seller: Seller | None = None,
) -> Message:
    """The overdue invoices (number, date, due date, what is open), their total, how to pay (the
    seller's bank details when the price book has them), when services stop, whom to tell of a payment."""
    return _draft(
        "mail/overdue_notice.txt.j2",
        "overdue_notice",
        f"lifecycle:overdue_notice:{account.account_id}:{balance.oldest_due_date.isoformat()}",
        account,
        amount=balance.amount,
        invoices=balance.invoices,
        currency=currency,
        stop_at=stop_at,
        support=support,
        seller=seller,
    )


def api_results_deleted_prefix(account_id: str) -> str:
    return f"lifecycle:api_results_deleted:{account_id}:"


def api_results_deleted(
    account: Account, deleted_at: datetime, jobs: list[dict[str, Any]], retention_days: str
) -> Message:
    """One per run: the jobs (job_id, finished_at, due_at) whose results the run deleted."""
    return _draft(
        "mail/api_results_deleted.txt.j2",
        "api_results_deleted",
        api_results_deleted_prefix(account.account_id) + deleted_at.astimezone(UTC).isoformat(),
        account,
        deleted_at=deleted_at,
        jobs=jobs,
        retention_days=retention_days,
    )


def deleted_on_request_prefix(account_id: str) -> str:
    return f"lifecycle:deleted_on_request:{account_id}:"


def deleted_on_request(account: Account, audit: DeletionAudit) -> Message:
    """The confirmation of a deletion of all the account's data on the customer's request."""
    return _draft(
        "mail/deleted_on_request.txt.j2",
        "deleted_on_request",
        deleted_on_request_prefix(account.account_id) + str(audit.id),
        account,
        deleted_at=audit.as_of,
        objects=audit.object_count,
        bytes=audit.bytes,
        audit_id=audit.id,
    )


def _draft(template: str, kind: str, key: str, account: Account, **values: Any) -> Message:
    mail = render_mail(template, name=account.name, account_id=account.account_id, **values)
    return Message(key, account.account_id, kind, account.email, mail)


def deliver(runtime: Runtime, message: Message, as_of: datetime, detail: dict[str, Any]) -> LifecycleNotice | None:
    """Send and record the notice; on refusal record the failure and return None."""
    try:
        sent = runtime.mailer.send_once(message)
    except DeliveryError as error:
        log.warning("lifecycle notice %s not delivered, retried next run: %s", message.key, error)
        with runtime.catalog.session() as session:
            session.add(
                LifecycleDeliveryFailure(
                    key=message.key,
                    account_id=message.account_id,
                    kind=message.kind,
                    attempted_at=as_of,
                    error=str(error),
                )
            )
        return None
    with runtime.catalog.session() as session:
        notice = session.get(LifecycleNotice, message.key)
        if notice is None:
            notice = LifecycleNotice(
                key=message.key,
                account_id=message.account_id,
                kind=message.kind,
                sent_at=as_of,
                message_id=sent.message_id,
                recipient=message.to,
                detail=detail,
            )
            session.add(notice)
        session.flush()
        session.expunge(notice)
        return notice
