"""Read-only: which accounts owe money past its due date, and since when (for the overdue notice)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import select

from pipelines.billing.models import CreditNote, Invoice, Payment
from pipelines.catalog import Catalog

ZERO = Decimal("0.00")


@dataclass(frozen=True)
class OverdueBalance:
    account_id: str
    amount: Decimal  # unpaid charges whose due date has passed
    oldest_due_date: date  # due date of the oldest invoice that is still not fully paid


def overdue_balances(catalog: Catalog, at: datetime) -> dict[str, OverdueBalance]:
    """Accounts with an overdue balance at `at`, from invoices, payments and credit notes known then.

    As in invoicing's ledger, payments and credits settle the oldest charges first, so what is
    still open is the newest charges; an invoice is overdue the day after its due date.
    """
    today = at.date()
    charges: dict[str, list[tuple[date, Decimal]]] = defaultdict(list)
    settled: dict[str, Decimal] = defaultdict(lambda: ZERO)
    with catalog.session() as session:
        for account_id, total, credit_applied, due_date in session.execute(
            select(Invoice.account_id, Invoice.total, Invoice.credit_applied, Invoice.due_date)
            .where(Invoice.issue_date <= today)
            .order_by(Invoice.due_date, Invoice.invoice_number)
        ):
            # Credit an invoice consumed was counted when it arose: count the invoice's charges.
            amount = total + credit_applied
            if amount > 0:
                charges[account_id].append((due_date, amount))
            else:
                settled[account_id] -= amount
        for account_id, amount in session.execute(select(Payment.account_id, Payment.amount).where(Payment.paid_at <= at)):
            settled[account_id] += amount
        for account_id, total in session.execute(select(CreditNote.account_id, CreditNote.total).where(CreditNote.issued_on <= today)):
            settled[account_id] += total
    result: dict[str, OverdueBalance] = {}
    for account_id, items in charges.items():
        pool = settled[account_id]
        overdue, oldest = ZERO, None
        for due_date, amount in items:
            paid = min(pool, amount)
            pool -= paid
            if amount > paid and due_date < today:
                overdue += amount - paid
                oldest = due_date if oldest is None else oldest
        if oldest is not None:
            result[account_id] = OverdueBalance(account_id, overdue, oldest)
    return result
