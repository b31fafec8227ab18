"""After an invoice is issued: disputes, credit notes that reference it (it is never edited), and the
per-account terms the next invoices use."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from pipelines.accounts import UnknownAccountError
from pipelines.billing.documents import buyer_of, parties_json
from pipelines.billing.history import (
    DATED_TERMS,
    account_history,
    invoiced_since,
    record_contract_end,
    record_term_change,
)
from pipelines.billing.invoicing import BillingError, invoice_view
from pipelines.billing.lines import InvoiceView, Line, tax_by_rate
from pipelines.billing.models import BillingTerms, CreditNote, CreditNoteLine, Dispute, Invoice, InvoiceLine, Payment
from pipelines.billing.money import format_money, format_quantity, round_half_up
from pipelines.billing.pricebook import PriceBook
from pipelines.billing.terms import STANDARD, Parties
from pipelines.catalog import Catalog
from pipelines.catalog.models import Account

# Concurrent credit notes of one month can pick the same next number; the loser retries.
_NUMBERING_ATTEMPTS = 5
ZERO = Decimal("0.00")


@dataclass(frozen=True)
class CreditNoteView:
    credit_note_number: str
    invoice_number: str
    account_id: str
    issued_on: date
    amount: Decimal
    tax: Decimal
    total: Decimal
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "credit_note_number": self.credit_note_number,
            "invoice_number": self.invoice_number,
            "account_id": self.account_id,
            "issued_on": self.issued_on.isoformat(),
            "amount": format_money(self.amount),
            "tax": format_money(self.tax),
            "total": format_money(self.total),
            "reason": self.reason,
        }


def _credit_view(note: CreditNote) -> CreditNoteView:
    return CreditNoteView(
        note.credit_note_number,
        note.invoice_number,
        note.account_id,
        note.issued_on,
        note.amount,
        note.tax,
        note.total,
        note.reason,
    )


def issue_credit_note(
    catalog: Catalog,
    pricebook: PriceBook,
    invoice_number: str,
    amount: Decimal,
    reason: str,
    issued_on: date | None = None,
    line: int | None = None,
) -> tuple[CreditNoteView, bool]:
    """Credit `amount` (net of tax) against an issued invoice; returns the note and whether it is new.

    A credit note mirrors what it reverses: `line` (the invoice line's position, from 1) is credited
    with the VAT rate and category that line had, and a finance charge without VAT. Without `line`
    the invoice's lines must all have the same VAT, which is credited; an invoice with several
    (a VAT change within the month, an exemption ending, a finance charge) needs the line named.
    Tax is computed on the credited amount at that rate, rounded half-up, never more than that
    rate's tax left on the invoice; the credits on a line, and on the invoice, never exceed what it
    charged. The same (invoice, amount, reason) again returns the note already issued.
    """
    reason = reason.strip()
    if not reason:
        raise BillingError("a credit note needs a reason")
    if amount <= 0 or amount != amount.quantize(Decimal("0.01")):
        raise BillingError(f"credit amount {amount} must be positive with at most two decimals")
    amount = amount.quantize(Decimal("0.01"))
    issued_on = issued_on or datetime.now(UTC).date()
    for _ in range(_NUMBERING_ATTEMPTS):
        try:
            with catalog.session() as session:
                invoice = session.get(Invoice, invoice_number)
                if invoice is None:
                    raise BillingError(f"unknown invoice {invoice_number!r}")
                replay = session.scalar(
                    select(CreditNote)
                    .where(CreditNote.invoice_number == invoice_number)
                    .where(CreditNote.amount == amount)
                    .where(CreditNote.reason == reason)
                )
                if replay is not None:
                    return _credit_view(replay), False
                if issued_on < invoice.issue_date:
                    raise BillingError(f"a credit note cannot predate invoice {invoice_number} ({invoice.issue_date})")
                earlier = list(session.scalars(select(CreditNote).where(CreditNote.invoice_number == invoice_number)))
                # What the invoice charged, before it consumed earlier credit.
                creditable = invoice.subtotal + invoice.credit_applied - sum((n.amount for n in earlier), Decimal("0"))
                if amount > creditable:
                    raise BillingError(
                        f"invoice {invoice_number} has {format_money(creditable)} left to credit, not {format_money(amount)}"
                    )
                account = session.get(Account, invoice.account_id)
                exempt = Parties(pricebook.seller_country, account.country, account.vat_id).exempt_category()
                vat = _reversed_vat(invoice, earlier, amount, line, exempt)
                # Tax per rate, as the invoice computed it, less what earlier credit notes gave back at that rate.
                tax_left = invoice.tax - sum((n.tax for n in earlier), Decimal("0"))
                rate_tax = tax_by_rate([invoice_line(row, invoice.tax_rate) for row in invoice.lines])
                rate_left = rate_tax.get(vat.rate, (ZERO, ZERO))[1] - sum(
                    (n.tax for n in earlier if _note_rate(n, invoice.tax_rate) == vat.rate), Decimal("0")
                )
                tax = ZERO
                if vat.taxable and vat.category == STANDARD:
                    tax = max(ZERO, min(tax_left, rate_left, round_half_up(Fraction(amount) * Fraction(vat.rate))))
                month = f"{issued_on:%Y-%m}"
                prefix = f"{pricebook.invoice_prefix}-CN-{month}-"
                count = session.scalar(
                    select(func.count()).select_from(CreditNote).where(CreditNote.credit_note_number.like(f"{prefix}%"))
                )
                number = f"{prefix}{count + 1:04d}"
                note = CreditNote(
                    credit_note_number=number,
                    invoice_number=invoice_number,
                    account_id=invoice.account_id,
                    issued_on=issued_on,
                    amount=amount,
                    tax=tax,
                    total=amount + tax,
                    reason=reason,
                    parties=parties_json(buyer_of(account), pricebook.seller),
                )
                session.add(note)
                session.flush()
                described = f"Credit on invoice {invoice_number}: {reason}"
                if vat.invoice_position is not None:
                    described += f" (line {vat.invoice_position}: {vat.description})"
                session.add(
                    CreditNoteLine(
                        credit_note_number=number,
                        position=1,
                        invoice_position=vat.invoice_position,
                        description=described[:300],
                        amount=amount,
                        taxable=vat.taxable,
                        tax_rate=vat.rate,
                        tax_category=vat.category,
                    )
                )
                session.flush()
                return _credit_view(note), True
        except IntegrityError:
            continue
    raise BillingError(f"could not number a credit note for {invoice_number}: too many concurrent requests, try again")


@dataclass(frozen=True)
class _ReversedVat:
    """The VAT of what a credit note reverses: one invoice line, or all of an invoice of one VAT."""

    invoice_position: int | None
    description: str
    taxable: bool
    rate: Decimal
    category: str | None


def invoice_line(row: InvoiceLine, invoice_rate: Decimal) -> Line:
    """A stored line with its own VAT rate (lines issued before rates were kept per line: the invoice's)."""
    rate = row.tax_rate if row.tax_rate is not None else invoice_rate
    return Line(
        row.kind, row.description, row.quantity, row.unit_price, row.amount, row.taxable, rate, row.tax_category
    )


def _vat_of(row: InvoiceLine, invoice_rate: Decimal, exempt_category: str) -> tuple[bool, Decimal, str | None]:
    if not row.taxable:
        return False, Decimal("0"), None
    rate = row.tax_rate if row.tax_rate is not None else invoice_rate
    return True, rate, row.tax_category or (STANDARD if rate else exempt_category)


def _vat_label(vat: tuple[bool, Decimal, str | None]) -> str:
    taxable, rate, category = vat
    if not taxable:
        return "no VAT"
    return f"VAT {format_quantity(rate * 100)} %" + ("" if category == STANDARD else f" ({category})")


def _note_rate(note: CreditNote, invoice_rate: Decimal) -> Decimal:
    return note.lines[0].tax_rate if note.lines else invoice_rate


def _reversed_vat(
    invoice: Invoice, earlier: list[CreditNote], amount: Decimal, position: int | None, exempt_category: str
) -> _ReversedVat:
    rows = [row for row in invoice.lines if row.kind != "credit" and row.amount]
    if position is not None:
        row = next((row for row in rows if row.position == position), None)
        if row is None or row.amount < 0:
            raise BillingError(f"invoice {invoice.invoice_number} has no line {position} that charged anything")
        credited = sum(
            (cl.amount for note in earlier for cl in note.lines if cl.invoice_position == position), Decimal("0")
        )
        left = row.amount - credited
        if amount > left:
            raise BillingError(
                f"invoice {invoice.invoice_number} has {format_money(left)} left to credit on line {position} "
                f"({row.description}), not {format_money(amount)}"
            )
        taxable, rate, category = _vat_of(row, invoice.tax_rate, exempt_category)
        return _ReversedVat(position, row.description, taxable, rate, category)
    kinds = {_vat_of(row, invoice.tax_rate, exempt_category) for row in rows}
    if len(kinds) > 1:
        listed = ", ".join(
            f"line {row.position} {row.kind} {format_money(row.amount)} "
            f"{_vat_label(_vat_of(row, invoice.tax_rate, exempt_category))}"
            for row in rows
            if row.amount > 0
        )
        raise BillingError(
            f"invoice {invoice.invoice_number} has lines with different VAT: name the line to credit "
            f"(--line N): {listed}"
        )
    taxable, rate, category = (
        kinds.pop() if kinds else (True, invoice.tax_rate, STANDARD if invoice.tax_rate else exempt_category)
    )
    return _ReversedVat(None, "", taxable, rate, category)


@dataclass(frozen=True)
class DisputeView:
    invoice_number: str
    opened_at: datetime
    reason: str
    billing_error: bool
    deadline: date

    def to_dict(self) -> dict[str, Any]:
        return {
            "invoice_number": self.invoice_number,
            "opened_at": self.opened_at.isoformat(),
            "reason": self.reason,
            "billing_error": self.billing_error,
            "deadline": self.deadline.isoformat(),
        }


def dispute_deadline(pricebook: PriceBook, issue_date: date, billing_error: bool) -> date:
    """Last day (UTC) a dispute is accepted: 7 days after issue, 60 for billing errors (defaults)."""
    days = pricebook.billing_error_dispute_window_days if billing_error else pricebook.dispute_window_days
    return issue_date + timedelta(days=days)


def open_dispute(
    catalog: Catalog,
    pricebook: PriceBook,
    invoice_number: str,
    reason: str,
    billing_error: bool = False,
    at: datetime | None = None,
) -> tuple[DisputeView, bool]:
    """Record a customer's dispute if it is within its window; the same reason again is a replay."""
    reason = reason.strip()
    if not reason:
        raise BillingError("a dispute needs a reason")
    at = at or datetime.now(UTC)
    with catalog.session() as session:
        invoice = session.get(Invoice, invoice_number)
        if invoice is None:
            raise BillingError(f"unknown invoice {invoice_number!r}")
        existing = session.scalar(
            select(Dispute).where(Dispute.invoice_number == invoice_number).where(Dispute.reason == reason)
        )
        if existing is not None:
            deadline = dispute_deadline(pricebook, invoice.issue_date, existing.billing_error)
            return DisputeView(
                invoice_number, existing.opened_at, existing.reason, existing.billing_error, deadline
            ), False
        deadline = dispute_deadline(pricebook, invoice.issue_date, billing_error)
        if at.astimezone(UTC).date() > deadline:
            kind = "billing errors" if billing_error else "disputes"
            raise BillingError(
                f"invoice {invoice_number} was issued on {invoice.issue_date}: {kind} were accepted until {deadline}"
            )
        session.add(Dispute(invoice_number=invoice_number, opened_at=at, reason=reason, billing_error=billing_error))
    return DisputeView(invoice_number, at, reason, billing_error, deadline), True


@dataclass(frozen=True)
class InvoiceStatement:
    """An invoice with what happened to it since: payments, credit notes, disputes."""

    invoice: InvoiceView
    payments: Decimal
    credit_notes: tuple[CreditNoteView, ...]
    disputes: tuple[DisputeView, ...]

    @property
    def open_amount(self) -> Decimal:
        return self.invoice.total - self.payments - sum((n.total for n in self.credit_notes), Decimal("0"))

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.invoice.to_dict(),
            "paid": format_money(self.payments),
            "credit_notes": [n.to_dict() for n in self.credit_notes],
            "disputes": [d.to_dict() for d in self.disputes],
            "open_amount": format_money(self.open_amount),
        }


def invoice_statement(catalog: Catalog, pricebook: PriceBook, invoice_number: str) -> InvoiceStatement:
    with catalog.session() as session:
        invoice = session.get(Invoice, invoice_number)
        if invoice is None:
            raise BillingError(f"unknown invoice {invoice_number!r}")
        paid = sum(
            session.scalars(select(Payment.amount).where(Payment.invoice_number == invoice_number)), Decimal("0.00")
        )
        notes = session.scalars(
            select(CreditNote)
            .where(CreditNote.invoice_number == invoice_number)
            .order_by(CreditNote.credit_note_number)
        )
        disputes = session.scalars(select(Dispute).where(Dispute.invoice_number == invoice_number).order_by(Dispute.id))
        return InvoiceStatement(
            invoice_view(invoice),
            paid,
            tuple(_credit_view(n) for n in notes),
            tuple(
                DisputeView(
                    d.invoice_number,
                    d.opened_at,
                    d.reason,
                    d.billing_error,
                    dispute_deadline(pricebook, invoice.issue_date, d.billing_error),
                )
                for d in disputes
            ),
        )


def list_invoices(catalog: Catalog, period: str | None = None, account_id: str | None = None) -> list[InvoiceView]:
    with catalog.session() as session:
        query = select(Invoice).order_by(Invoice.period, Invoice.sequence)
        if period is not None:
            query = query.where(Invoice.period == period)
        if account_id is not None:
            query = query.where(Invoice.account_id == account_id)
        return [invoice_view(invoice) for invoice in session.scalars(query)]


@dataclass(frozen=True)
class TermsUpdate:
    """Changes to an account's billing terms; None leaves a field as it is.

    Everything but `ended_on` is dated: in force from `effective_on` (default: the first month not
    invoiced yet), so a month is charged by the days each value was agreed. `ended_on`, the last day
    of service, is recorded as a change of its own: an end in an invoiced month is corrected too.
    """

    seats: int | None = None
    extra_storage_gb: int | None = None
    monthly_fee: Decimal | None = None
    price_per_million_points: Decimal | None = None
    monthly_points_cap: int | None = None
    ended_on: date | None = None
    tax_rate: Decimal | None = None
    tax_exempt: bool | None = None
    exempt_until: date | None = None
    effective_on: date | None = None


def set_billing_terms(catalog: Catalog, account_id: str, update: TermsUpdate) -> dict[str, Any]:
    """Record a dated change of an account's terms (and/or its contract end); returns the terms as
    they stand after every recorded change, and the date this change applies from."""
    for name in ("seats", "extra_storage_gb", "monthly_points_cap"):
        value = getattr(update, name)
        if value is not None and value < 0:
            raise BillingError(f"{name} must not be negative")
    for name in ("monthly_fee", "price_per_million_points"):
        value = getattr(update, name)
        if value is not None and (not value.is_finite() or value < 0):
            raise BillingError(f"{name} must be a decimal >= 0")
    if update.tax_rate is not None and not (update.tax_rate.is_finite() and Decimal("0") <= update.tax_rate < 1):
        raise BillingError(f"tax_rate {update.tax_rate} must be a fraction between 0 and 1 (e.g. 0.19)")
    with catalog.session() as session:
        account = session.get(Account, account_id)
        if account is None:
            raise UnknownAccountError(account_id)
        terms = session.get(BillingTerms, account_id)
        if terms is None:
            terms = BillingTerms(account_id=account_id, seats=0, extra_storage_gb=0)
            session.add(terms)
        dated = {name: getattr(update, name) for name in DATED_TERMS if getattr(update, name) is not None}
        effective_on = None
        history = account_history(session, account)
        if dated:
            effective_on, history = record_term_change(session, account, dated, update.effective_on)
        corrects: set[str] = set()
        if update.ended_on is not None and update.ended_on != terms.ended_on:
            # The days between the end known so far and this one change: invoiced, they are corrected.
            changed_from = min(d for d in (terms.ended_on, update.ended_on) if d is not None) + timedelta(days=1)
            history = record_contract_end(session, account, update.ended_on)
            terms.ended_on = update.ended_on
            corrects.update(invoiced_since(session, account.account_id, max(changed_from, account.started_at)))
        if effective_on is not None:
            corrects.update(invoiced_since(session, account.account_id, max(effective_on, account.started_at)))
        latest = history.on(date.max)
        # The snapshot `billing terms` prints: every recorded change applied, whatever its date.
        terms.seats, terms.extra_storage_gb = latest.seats, latest.extra_storage_gb
        terms.monthly_fee, terms.price_per_million_points = latest.monthly_fee, latest.price_per_million_points
        terms.monthly_points_cap = latest.monthly_points_cap
        session.flush()
        return {
            "account_id": account_id,
            "seats": terms.seats,
            "extra_storage_gb": terms.extra_storage_gb,
            "monthly_fee": None if terms.monthly_fee is None else str(terms.monthly_fee),
            "price_per_million_points": None
            if terms.price_per_million_points is None
            else str(terms.price_per_million_points),
            "monthly_points_cap": terms.monthly_points_cap,
            "ended_on": None if terms.ended_on is None else terms.ended_on.isoformat(),
            "tax_rate": str(latest.tax_rate),
            "tax_exempt": latest.tax_exempt,
            "exempt_until": None if latest.exempt_until is None else latest.exempt_until.isoformat(),
            "effective_on": None if effective_on is None else effective_on.isoformat(),
            # Invoiced months this change reaches into: the next monthly run corrects them.
            "corrects": sorted(corrects),
        }
