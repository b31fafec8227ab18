"""Read-only: which accounts owe money past its due date, and since when (for the overdue notice)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from pipelines.billing.ledger import known_at
from pipelines.catalog import Catalog


@dataclass(frozen=True)
class OverdueInvoice:
    number: str
    issue_date: date | None
    due_date: date
    open: Decimal  # what is still unpaid of it (payments settle the oldest invoices first)


@dataclass(frozen=True)
class OverdueBalance:
    account_id: str
    amount: Decimal  # unpaid charges whose due date has passed
    oldest_due_date: date  # due date of the oldest invoice that is still not fully paid
    invoices: tuple[OverdueInvoice, ...] = ()  # the invoices that make up `amount`, oldest first


def overdue_balances(catalog: Catalog, at: datetime) -> dict[str, OverdueBalance]:
    """Accounts with an overdue balance at `at`, from invoices, payments and credit notes known then
    (the ledger's reading: the oldest charges are settled first)."""
    with catalog.session() as session:
        entries = known_at(session, at)
    result: dict[str, OverdueBalance] = {}
    for account_id, account in entries.items():
        open_charges = account.overdue_charges(at.date())
        if open_charges:
            invoices = tuple(
                OverdueInvoice(charge.invoice_number, charge.issue_date, charge.due_date, amount)
                for charge, amount in open_charges
            )
            total = sum((invoice.open for invoice in invoices), Decimal("0.00"))
            result[account_id] = OverdueBalance(account_id, total, invoices[0].due_date, invoices)
    return result
