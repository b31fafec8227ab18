"""Lifecycle e-mails: what each says (the dates that matter and how to avert), sent once per key.

A notice counts only once delivered: `deliver` records it with the run's moment and message id,
or records the refusal so the next run tries again and the clocks that wait for it wait.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from pipelines.catalog import Catalog
from pipelines.catalog.models import Account
from pipelines.lifecycle.models import LifecycleDeliveryFailure, LifecycleNotice
from pipelines.notify import DeliveryError, send_once
from pipelines.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Draft:
    kind: str
    key: str
    subject: str
    body: str


def when(moment: datetime) -> str:
    return moment.strftime("%d %B %Y, %H:%M UTC")


def inactivity_notice(account: Account, cycle: str, last_login: datetime, months: int, closure_at: datetime, deletion_at: datetime) -> Draft:
    return Draft(
        "inactivity_notice",
        f"lifecycle:inactivity_notice:{account.account_id}:{cycle}",
        f"pointflow: your free account {account.account_id} will close on {closure_at:%d %B %Y} unless you log in",
        f"Hello {account.name},\n\n"
        f"nobody has logged in to your pointflow account {account.account_id} since {when(last_login)}. "
        f"Free accounts without a login for {months} months are closed.\n\n"
        f"Closure: {when(closure_at)}. From then on your data is no longer accessible.\n"
        f"Deletion: {when(deletion_at)}. Your files, results and reports are then deleted for good.\n\n"
        f"To keep your account, just log in before {when(closure_at)}. Nothing else is needed.\n"
        "To get a copy of all your data first, ask pointflow support for an export: you will receive "
        "a download link.\n\n-- pointflow\n",
    )


def inactivity_reminder(account: Account, cycle: str, days: int, closure_at: datetime, deletion_at: datetime) -> Draft:
    return Draft(
        "inactivity_reminder",
        f"lifecycle:inactivity_reminder:{account.account_id}:{cycle}:{days}",
        f"pointflow reminder: your free account {account.account_id} closes on {closure_at:%d %B %Y}",
        f"Hello {account.name},\n\n"
        f"this is a reminder: your pointflow account {account.account_id} has had no login for a long "
        "time and will close unless you log in.\n\n"
        f"Closure: {when(closure_at)}. From then on your data is no longer accessible.\n"
        f"Deletion: {when(deletion_at)}.\n\n"
        f"To keep your account, log in before {when(closure_at)}.\n"
        "To get a copy of all your data, ask pointflow support for an export.\n\n-- pointflow\n",
    )


REASONS = {
    "inactivity": "the account was closed after a long time without a login",
    "trial_ended": "your trial ended",
    "customer": "you ended the contract",
    "non_payment": "the contract was ended for non-payment",
}


def data_locked(account: Account, reason: str, effective_at: datetime, deletion_at: datetime) -> Draft:
    return Draft(
        "data_locked",
        f"lifecycle:data_locked:{account.account_id}",
        f"pointflow: the data of account {account.account_id} will be deleted on {deletion_at:%d %B %Y}",
        f"Hello {account.name},\n\n"
        f"your pointflow contract for account {account.account_id} ended on {when(effective_at)} "
        f"({REASONS.get(reason, reason)}). Your data is no longer accessible.\n\n"
        f"Deletion: {when(deletion_at)}. Then every file, result, export and report of the account is "
        "deleted, in every copy we control. Invoices and usage records are kept, as the law requires.\n\n"
        f"Until then you can get all your data back: ask pointflow support for an export before "
        f"{when(deletion_at)}; you will receive a download link.\n\n-- pointflow\n",
    )


def overdue_notice(account: Account, amount: Decimal, currency: str, due_date: str, stop_at: datetime) -> Draft:
    return Draft(
        "overdue_notice",
        f"lifecycle:overdue_notice:{account.account_id}:{due_date}",
        f"pointflow: payment overdue, services for {account.account_id} stop on {stop_at:%d %B %Y}",
        f"Hello {account.name},\n\n"
        f"{currency} {amount} of your pointflow invoices is overdue (oldest due date {due_date}).\n\n"
        f"Services stop: {when(stop_at)}.\n\n"
        f"To avoid this, pay the overdue amount before {when(stop_at)}. If you have already paid, "
        "send the payment reference to pointflow support and we will check.\n\n-- pointflow\n",
    )


def deliver(settings: Settings, catalog: Catalog, account: Account, draft: Draft, as_of: datetime, detail: dict[str, Any]) -> LifecycleNotice | None:
    """Send and record the notice; on refusal record the failure and return None."""
    try:
        sent = send_once(settings, catalog, draft.key, account.account_id, draft.kind, account.email, draft.subject, draft.body)
    except DeliveryError as error:
        log.warning("lifecycle notice %s not delivered, retried next run: %s", draft.key, error)
        with catalog.session() as session:
            session.add(LifecycleDeliveryFailure(key=draft.key, account_id=account.account_id, kind=draft.kind, attempted_at=as_of, error=str(error)))
        return None
    with catalog.session() as session:
        notice = session.get(LifecycleNotice, draft.key)
        if notice is None:
            notice = LifecycleNotice(key=draft.key, account_id=account.account_id, kind=draft.kind, sent_at=as_of,
                                     message_id=sent.message_id, recipient=account.email, detail=detail)  # fmt: skip
            session.add(notice)
        session.flush()
        session.expunge(notice)
        return notice
