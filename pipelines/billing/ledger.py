"""The account ledger: what each account was charged (invoices, by due date) and what settled it
(payments, credit notes, negative invoices). Invoicing reads it as it stood before an invoice (the
balance carried forward, the late fee's overdue part); the overdue notice as it stands at a moment.

Payments and credits settle the oldest charges first, so what is still open is the newest charges;
a charge is overdue the day after its due date. Within one invoice they settle its other charges
before its finance charge, so that what stays open of it bears no further finance charge for as
long as possible; a credit note crediting a finance charge settles that finance charge itself.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipelines.billing.models import CreditNote, CreditNoteLine, Invoice, InvoiceLine, Payment
from pipelines.billing.periods import Period

ZERO = Decimal("0.00")


@dataclass(frozen=True)
class Ledger:
    """The account's position before an invoice: when its month ended (see `before_invoice`)."""

    # Charges (invoice totals before consumed credit) less payments and credit notes; < 0 is credit.
    balance: Decimal = ZERO
    # The part of the charges whose due date has not passed yet.
    not_yet_due: Decimal = ZERO
    # The part of the overdue charges that is earlier finance charges, still unpaid.
    overdue_finance_charges: Decimal = ZERO
    # Due date of the oldest invoice whose charges other than finance charges are overdue.
    overdue_since: date | None = None

    @property
    def overdue(self) -> Decimal:
        # Payments settle the oldest charges first, so what is unpaid is the newest charges.
        return max(ZERO, self.balance - self.not_yet_due)

    @property
    def finance_charge_base(self) -> Decimal:
        """The overdue charges less unpaid finance charges: what a finance charge is computed on
        where interest on interest is not charged."""
        return max(ZERO, self.overdue - self.overdue_finance_charges)

    @property
    def credit(self) -> Decimal:
        return max(ZERO, -self.balance)


class Charge(NamedTuple):
    """One invoice's charges (its total before consumed credit)."""

    due_date: date
    amount: Decimal
    invoice_number: str = ""
    issue_date: date | None = None
    finance_charges: Decimal = ZERO  # the part of `amount` that is finance charges (late_fee lines)


@dataclass
class Entries:
    """One account's charges, oldest due date first, and the sum of what settled them."""

    charges: list[Charge] = field(default_factory=list)
    settled: Decimal = ZERO

    def position(self, day: date) -> Ledger:
        """The balance, the part of it not yet due on `day`, and the finance charges among the rest."""
        charged = sum((charge.amount for charge in self.charges), ZERO)
        open_charges = self.overdue_charges(day)
        return Ledger(
            charged - self.settled,
            sum((charge.amount for charge in self.charges if charge.due_date >= day), ZERO),
            sum((min(amount, charge.finance_charges) for charge, amount in open_charges), ZERO),
            next((c.due_date for c, amount in open_charges if amount > c.finance_charges), None),
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
    finance = _sums_by_invoice(
        session, select(InvoiceLine.invoice_number, InvoiceLine.amount).join(Invoice).where(invoiced)
    )
    waived = _sums_by_invoice(
        session,
        select(CreditNote.invoice_number, CreditNoteLine.amount)
        .join(CreditNoteLine)
        .join(
            InvoiceLine,
            (InvoiceLine.invoice_number == CreditNote.invoice_number)
            & (InvoiceLine.position == CreditNoteLine.invoice_position),
        )
        .where(credited),
    )
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
            finance_charges = min(charges, finance.get(number, ZERO))
            # A finance charge credited (waived) is settled in its own invoice, not the oldest charge.
            settled = min(finance_charges, waived.get(number, ZERO))
            books[account_id].charges.append(
                Charge(due_date, charges - settled, number, issued, finance_charges - settled)
            )
            books[account_id].settled -= settled
        else:
            books[account_id].settled -= charges
    for account_id, amount in session.execute(select(Payment.account_id, Payment.amount).where(paid)):
        books[account_id].settled += amount
    for account_id, total in session.execute(select(CreditNote.account_id, CreditNote.total).where(credited)):
        books[account_id].settled += total
    return dict(books)


def _sums_by_invoice(session: Session, query) -> dict[str, Decimal]:
    """Per invoice, the sum of the amounts `query` selects that concern its finance charges (lines
    of kind late_fee); added up here, since amounts are stored as exact decimal strings."""
    sums: dict[str, Decimal] = defaultdict(lambda: ZERO)
    for number, amount in session.execute(query.where(InvoiceLine.kind == "late_fee")):
        sums[number] += amount
    return dict(sums)
