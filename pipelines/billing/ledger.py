"""The account ledger: what each account was charged (invoices, by due date) and what settled it
(payments, credit notes, negative invoices). Invoicing reads it as it stood before an invoice (the
balance carried forward, the late fee's overdue part); the overdue notice as it stands at a moment.

Payments and credits settle the oldest charges first, so what is still open is the newest charges;
a charge is overdue the day after its due date.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipelines.billing.models import CreditNote, Invoice, Payment
from pipelines.billing.periods import Period

ZERO = Decimal("0.00")


@dataclass(frozen=True)
class Ledger:
    """The account's position before an invoice: when its month ended (see `before_invoice`)."""

    # Charges (invoice totals before consumed credit) less payments and credit notes; < 0 is credit.
    balance: Decimal = ZERO
    # The part of the charges whose due date has not passed yet.
    not_yet_due: Decimal = ZERO

    @property
    def overdue(self) -> Decimal:
        # Payments settle the oldest charges first, so what is unpaid is the newest charges.
        return max(ZERO, self.balance - self.not_yet_due)

    @property
    def credit(self) -> Decimal:
        return max(ZERO, -self.balance)


class Charge(NamedTuple):
    """One invoice's charges (its total before consumed credit)."""

    due_date: date
    amount: Decimal
    invoice_number: str = ""
    issue_date: date | None = None


@dataclass
class Entries:
    """One account's charges, oldest due date first, and the sum of what settled them."""

    charges: list[Charge] = field(default_factory=list)
    settled: Decimal = ZERO

    def position(self, day: date) -> Ledger:
        """The balance, and the part of it not yet due on `day`."""
        charged = sum((charge.amount for charge in self.charges), ZERO)
        return Ledger(
            charged - self.settled, sum((charge.amount for charge in self.charges if charge.due_date >= day), ZERO)
        )

    def overdue_charges(self, day: date) -> list[tuple[Charge, Decimal]]:
        """The charges due before `day` that are not fully settled, oldest first, each with what is open of it."""
        pool, open_charges = self.settled, []
        for charge in self.charges:
            paid = min(pool, charge.amount)
            pool -= paid
            if charge.amount > paid and charge.due_date < day:
                open_charges.append((charge, charge.amount - paid))
        return open_charges


def before_invoice(session: Session, period: Period) -> dict[str, Ledger]:
    """Every account's position for `period`'s invoice, as it stood when the month ended (the 1st of
    the next month, when a punctual run issues it): the invoices of earlier months, and the payments
    and credit notes made before that moment; charges due before that day are overdue. Whatever day
    the run happens, it bills what a punctual run would: a payment made after the month ended counts
    on the next month's invoice, and an invoice issued late is overdue only from its own (real) due
    date on."""
    closed = period.end
    entries = _entries(
        session,
        Invoice.period < period.label,
        Payment.paid_at < closed,
        CreditNote.issued_on < closed.date(),
    )
    return {account_id: account.position(closed.date()) for account_id, account in entries.items()}


def known_at(session: Session, at: datetime) -> dict[str, Entries]:
    """Every account's entries from what was issued and paid by `at`."""
    today = at.date()
    return _entries(session, Invoice.issue_date <= today, Payment.paid_at <= at, CreditNote.issued_on <= today)


def _entries(session: Session, invoiced, paid, credited) -> dict[str, Entries]:
    books: dict[str, Entries] = defaultdict(Entries)
    for account_id, total, credit_applied, due_date, number, issued in session.execute(
        select(
            Invoice.account_id,
            Invoice.total,
            Invoice.credit_applied,
            Invoice.due_date,
            Invoice.invoice_number,
            Invoice.issue_date,
        )
        .where(invoiced)
        .order_by(Invoice.due_date, Invoice.invoice_number)
    ):
        # Credit consumed by an invoice was already counted when it arose: count the charges only.
        charges = total + credit_applied
        # A credit (negative invoice) settles at once; only charges wait for a due date.
        if charges > 0:
            books[account_id].charges.append(Charge(due_date, charges, number, issued))
        else:
            books[account_id].settled -= charges
    for account_id, amount in session.execute(select(Payment.account_id, Payment.amount).where(paid)):
        books[account_id].settled += amount
    for account_id, total in session.execute(select(CreditNote.account_id, CreditNote.total).where(credited)):
        books[account_id].settled += total
    return dict(books)
