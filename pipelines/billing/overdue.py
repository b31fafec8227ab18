"""Read-only: which accounts owe money past its due date, and since when (for the overdue notice)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from pipelines.billing.ledger import known_at
from pipelines.catalog import Catalog


@dataclass(frozen=True)
class OverdueBalance:
    account_id: str
    amount: Decimal  # unpaid charges whose due date has passed
    oldest_due_date: date  # due date of the oldest invoice that is still not fully paid


def overdue_balances(catalog: Catalog, at: datetime) -> dict[str, OverdueBalance]:
    """Accounts with an overdue balance at `at`, from invoices, payments and credit notes known then
    (the ledger's reading: the oldest charges are settled first)."""
    with catalog.session() as session:
        entries = known_at(session, at)
    result: dict[str, OverdueBalance] = {}
    for account_id, account in entries.items():
        amount, oldest = account.overdue(at.date())
        if oldest is not None:
            result[account_id] = OverdueBalance(account_id, amount, oldest)
    return result
