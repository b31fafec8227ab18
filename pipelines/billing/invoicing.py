"""Monthly invoicing: from accounts, usage, outages, payments and credit notes to issued invoices.

`draft_invoice` is the pure rule book (one account, one month, no database); `run_billing` gathers
the facts for every account in bulk, drafts, numbers and stores the month's invoices in one
transaction, and returns the stored invoices. A month is invoiced once: a re-run, or a run racing
another, returns the invoices that exist and creates nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from itertools import pairwise
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipelines.billing.models import BillingRun, BillingTerms, CreditNote, Invoice, InvoiceLine, Outage, Payment
from pipelines.billing.money import format_money, format_quantity, format_rate, round_half_up
from pipelines.billing.periods import Period, add_months, months_between, start_of
from pipelines.billing.pricebook import PriceBook
from pipelines.billing.usage import billable_points_by_account
from pipelines.catalog import Catalog
from pipelines.catalog.models import Account, BillingCycle

ZERO = Decimal("0.00")
CYCLE_MONTHS = {BillingCycle.MONTHLY.value: 1, BillingCycle.QUARTERLY.value: 3, BillingCycle.YEARLY.value: 12}
MINUTES_PER_DAY = 24 * 60


class BillingError(ValueError):
    """A billing request that cannot be carried out as asked (month not over, unknown invoice, ...)."""


@dataclass(frozen=True)
class Line:
    kind: str
    description: str
    quantity: Decimal
    unit_price: Decimal
    amount: Decimal
    # Late fees and carried-forward credit are not supplies: tax is computed without them.
    taxable: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "description": self.description,
            # A late fee's quantity is the overdue balance: money, shown as money.
            "quantity": format_money(self.quantity) if self.kind == "late_fee" else format_quantity(self.quantity),
            "unit_price": format_rate(self.unit_price),
            "amount": format_money(self.amount),
            "taxable": self.taxable,
        }


@dataclass(frozen=True)
class AccountFacts:
    """What an invoice depends on about the account and its agreed extras."""

    account_id: str
    country: str
    plan: str
    billing_cycle: str
    started_at: date
    tax_rate: Decimal
    tax_exempt: bool
    seats: int = 0
    extra_storage_gb: int = 0
    custom_monthly_fee: Decimal | None = None
    custom_price_per_million_points: Decimal | None = None
    ended_on: date | None = None


@dataclass(frozen=True)
class UsageSlice:
    """Billable points of one account between two price-change boundaries of the month."""

    first_day: date
    last_day: date
    points: int


@dataclass(frozen=True)
class Ledger:
    """The account's position at the invoice date, before this invoice."""

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


@dataclass(frozen=True)
class Draft:
    lines: tuple[Line, ...]
    tax_rate: Decimal
    subtotal: Decimal
    taxable_subtotal: Decimal
    tax: Decimal
    total: Decimal
    credit_applied: Decimal


@dataclass(frozen=True)
class InvoiceView:
    invoice_number: str
    account_id: str
    period: str
    currency: str
    issue_date: date
    due_date: date
    tax_rate: Decimal
    lines: tuple[Line, ...]
    subtotal: Decimal
    tax: Decimal
    total: Decimal

    def to_dict(self) -> dict[str, Any]:
        return {
            "invoice_number": self.invoice_number,
            "account_id": self.account_id,
            "period": self.period,
            "currency": self.currency,
            "issue_date": self.issue_date.isoformat(),
            "due_date": self.due_date.isoformat(),
            "tax_rate": str(self.tax_rate),
            "lines": [line.to_dict() for line in self.lines],
            "subtotal": format_money(self.subtotal),
            "tax": format_money(self.tax),
            "total": format_money(self.total),
        }


@dataclass(frozen=True)
class BillingRunResult:
    period: str
    # False when the month had already been invoiced: `invoices` are the stored ones, unchanged.
    created: bool
    invoices: list[InvoiceView]


# --- the rules, for one account and one month ---------------------------------------------------


def prorate(fee: Decimal, active_days: int, days_in_month: int) -> Decimal:
    """fee x active days / days in month, rounded half-up to the cent (the start day is active)."""
    return round_half_up(Fraction(fee) * active_days / days_in_month)


def availability_percent(outages: Sequence[tuple[datetime, datetime]], period: Period) -> Fraction:
    """100 x (minutes in month - outage minutes) / minutes in month; overlapping outages count once."""
    clipped = sorted((max(s, period.start), min(e, period.end)) for s, e in outages if s < period.end and e > period.start)
    down = timedelta(0)
    cursor = period.start
    for start, end in clipped:
        start = max(start, cursor)
        if end > start:
            down += end - start
            cursor = end
    month_minutes = Fraction(period.days * MINUTES_PER_DAY)
    outage_minutes = Fraction(down // timedelta(microseconds=1), 60_000_000)
    return 100 * (month_minutes - outage_minutes) / month_minutes


def draft_invoice(
    pricebook: PriceBook,
    period: Period,
    account: AccountFacts,
    usage: Sequence[UsageSlice],
    availability: Fraction,
    ledger: Ledger,
) -> Draft | None:
    """The invoice of `account` for `period`, or None when there is nothing to charge or credit."""
    lines: list[Line] = []
    first = max(account.started_at, period.first_day)
    last = min(account.ended_on or period.last_day, period.last_day)
    active_days = (last - first).days + 1 if first <= last else 0

    month_fee = _subscription_lines(pricebook, period, account, first, active_days, lines)
    if active_days:
        _recurring_extras(pricebook, period, account, first, active_days, lines)
    _usage_lines(pricebook, account, usage, lines)
    _availability_credit(pricebook, period, availability, month_fee, lines)
    _late_fee(pricebook, account, ledger, lines)

    tax_rate = Decimal("0") if account.tax_exempt else account.tax_rate
    taxable_subtotal = sum((line.amount for line in lines if line.taxable), ZERO)
    tax = round_half_up(Fraction(taxable_subtotal) * Fraction(tax_rate))
    gross = sum((line.amount for line in lines), ZERO) + tax
    credit_applied = min(ledger.credit, gross) if gross > 0 else ZERO
    if credit_applied > 0:
        lines.append(
            Line("credit", f"Credit carried forward (overpayments and credit notes, {format_money(ledger.credit)} available)",
                 Decimal(1), -credit_applied, -credit_applied, taxable=False)  # fmt: skip
        )
    if not any(line.amount for line in lines):
        return None
    subtotal = sum((line.amount for line in lines), ZERO)
    return Draft(tuple(lines), tax_rate, subtotal, taxable_subtotal, tax, subtotal + tax, credit_applied)


def _plan_name(plan: str) -> str:
    return plan.replace("_", " ").capitalize()


def _subscription_lines(
    pricebook: PriceBook, period: Period, account: AccountFacts, first: date, active_days: int, lines: list[Line]
) -> Decimal:
    """Add the subscription (and discount) lines; return the month's net fee for availability credit."""
    if not active_days:
        return ZERO
    months = CYCLE_MONTHS[account.billing_cycle]
    share = Fraction(active_days, period.days)
    if months == 1:
        # The cycle is the calendar month, so its price is the one in force on its first active day.
        terms = pricebook.terms(account.plan, first)
        fee = account.custom_monthly_fee if account.custom_monthly_fee is not None else terms.monthly_fee
        amount = prorate(fee, active_days, period.days)
        if amount:
            days = "" if active_days == period.days else f", {active_days} of {period.days} days from {first.isoformat()}"
            lines.append(Line("subscription", f"{_plan_name(account.plan)} plan, {period}{days}",
                              round_half_up(share, 4), fee, amount, taxable=True))  # fmt: skip
            _discount_line(terms.discount, amount, lines)
        return amount - round_half_up(Fraction(amount) * Fraction(terms.discount))

    # Quarterly and yearly cycles run from the start date's anniversaries and are invoiced in full,
    # in advance, on the invoice of the month the cycle starts in, at the price in force that day.
    elapsed = months_between(account.started_at, period.first_day)
    cycle_start = add_months(account.started_at, (elapsed // months) * months)
    terms = pricebook.terms(account.plan, cycle_start)
    fee = account.custom_monthly_fee if account.custom_monthly_fee is not None else terms.monthly_fee
    if elapsed % months == 0 and (account.ended_on is None or account.ended_on >= cycle_start):
        amount = round_half_up(Fraction(fee) * months)
        cycle_end = add_months(cycle_start, months) - timedelta(days=1)
        if amount:
            lines.append(Line("subscription", f"{_plan_name(account.plan)} plan, {account.billing_cycle} "
                              f"{cycle_start.isoformat()} to {cycle_end.isoformat()}, in advance",
                              Decimal(months), fee, amount, taxable=True))  # fmt: skip
            _discount_line(terms.discount, amount, lines)
    # The month's share of the cycle's fee, which an availability credit refers to.
    return round_half_up(Fraction(fee) * (1 - Fraction(terms.discount)) * share)


def _discount_line(discount: Decimal, amount: Decimal, lines: list[Line]) -> None:
    if discount and amount:
        lines.append(Line("discount", f"Data-sharing discount {format_quantity(discount * 100)} %",
                          discount, -amount, -round_half_up(Fraction(amount) * Fraction(discount)), taxable=True))  # fmt: skip


def _recurring_extras(
    pricebook: PriceBook, period: Period, account: AccountFacts, first: date, active_days: int, lines: list[Line]
) -> None:
    """Seats and extra storage: monthly, prorated by active days like a monthly subscription."""
    terms = pricebook.terms(account.plan, first)
    share = Fraction(active_days, period.days)
    extras = (
        ("seats", account.seats, terms.seat_fee, f"User seats ({account.seats}), {period}"),
        ("extra_storage", account.extra_storage_gb, terms.extra_storage_fee_per_gb,
         f"Extra storage {account.extra_storage_gb} GB, {period}"),
    )  # fmt: skip
    for kind, count, price, description in extras:
        if count and price:
            if active_days != period.days:
                description += f", {active_days} of {period.days} days"
            amount = round_half_up(Fraction(price) * count * share)
            lines.append(Line(kind, description, round_half_up(count * share, 4), price, amount, taxable=True))


def _usage_lines(pricebook: PriceBook, account: AccountFacts, usage: Sequence[UsageSlice], lines: list[Line]) -> None:
    """One line per price in force during the month; each slice is priced at its own date's price."""
    priced: list[tuple[Decimal, UsageSlice]] = []
    for piece in usage:
        price = account.custom_price_per_million_points
        if price is None:
            price = pricebook.terms(account.plan, piece.first_day).price_per_million_points
        if price is None or not piece.points:
            continue
        if priced and priced[-1][0] == price and priced[-1][1].last_day + timedelta(days=1) == piece.first_day:
            previous = priced[-1][1]
            piece = UsageSlice(previous.first_day, piece.last_day, previous.points + piece.points)
            priced[-1] = (price, piece)
        else:
            priced.append((price, piece))
    for price, piece in priced:
        millions = Decimal(piece.points).scaleb(-6)
        lines.append(
            Line("usage", f"Classification, {piece.points:,} points, {piece.first_day.isoformat()} to "
                 f"{piece.last_day.isoformat()}, per million points", millions, price,
                 round_half_up(Fraction(millions) * Fraction(price)), taxable=True)  # fmt: skip
        )


def _availability_credit(pricebook: PriceBook, period: Period, availability: Fraction, month_fee: Decimal, lines: list[Line]) -> None:
    target = Fraction(pricebook.availability_target_percent)
    if availability >= target or month_fee <= 0:
        return
    shortfall = (target - availability) / 100
    # Credited pro rata to the shortfall, never more than the month's fee.
    credit = min(month_fee, round_half_up(Fraction(month_fee) * shortfall))
    lines.append(
        Line("availability_credit", f"Availability credit: {round_half_up(availability, 3)} % in {period}, "
             f"target {pricebook.availability_target_percent} %", round_half_up(shortfall, 6), -month_fee, -credit,
             taxable=True)  # fmt: skip
    )


def _late_fee(pricebook: PriceBook, account: AccountFacts, ledger: Ledger, lines: list[Line]) -> None:
    overdue = ledger.overdue
    rate = pricebook.late_fee_rate(account.country)
    if overdue <= 0 or not rate:
        return
    lines.append(
        Line("late_fee", f"Finance charge {format_quantity(rate * 100)} % per month on the overdue balance of "
             f"{format_money(overdue)} {pricebook.currency}", overdue, rate,
             round_half_up(Fraction(overdue) * Fraction(rate)), taxable=False)  # fmt: skip
    )


# --- the month's run, against the catalog --------------------------------------------------------


def issue_date_of(period: Period) -> date:
    """Invoices for a month are dated the first day of the next month."""
    return period.next().first_day


def run_billing(catalog: Catalog, period: Period | str, pricebook: PriceBook, now: datetime | None = None) -> BillingRunResult:
    """Invoice every account for `period` once; a re-run returns the stored invoices unchanged."""
    period = Period.parse(period) if isinstance(period, str) else period
    now = now or datetime.now(timezone.utc)
    if now < period.end:
        raise BillingError(f"period {period} has not ended yet: it can be invoiced from {period.end:%Y-%m-%d %H:%M} UTC")
    existing = load_invoices(catalog, period)
    if existing is not None:
        return BillingRunResult(period.label, False, existing)
    try:
        with catalog.session() as session:
            # The run's row is written first: it is the lock a concurrent run of this month waits on.
            session.add(BillingRun(period=period.label, pricebook_sha256=pricebook.sha256, invoice_count=0))
            session.flush()
            count = _create_invoices(session, pricebook, period)
            session.get(BillingRun, period.label).invoice_count = count
        created = True
    except IntegrityError:
        # Another run of the same month committed first; its invoices are the month's invoices.
        created = False
    invoices = load_invoices(catalog, period)
    if invoices is None:
        raise BillingError(f"billing run for {period} failed and left no invoices; run it again")
    return BillingRunResult(period.label, created, invoices)


def _create_invoices(session: Session, pricebook: PriceBook, period: Period) -> int:
    accounts = _accounts(session, period)
    usage = _usage_slices(session, pricebook, period, {a.plan for a in accounts})
    availability = _availability(session, pricebook, period)
    issue_date = issue_date_of(period)
    ledgers = _ledgers(session, issue_date)
    due_date = issue_date + timedelta(days=pricebook.payment_terms_days)

    invoice_rows: list[dict[str, Any]] = []
    line_rows: list[dict[str, Any]] = []
    for account in accounts:  # ordered by account id: numbers follow that order, without gaps
        slices = [UsageSlice(first, last, points.get(account.account_id, 0)) for first, last, points in usage]
        draft = draft_invoice(pricebook, period, account, slices, availability, ledgers.get(account.account_id, Ledger()))
        if draft is None:
            continue
        sequence = len(invoice_rows) + 1
        number = f"{pricebook.invoice_prefix}-{period.label}-{sequence:04d}"
        invoice_rows.append({
            "invoice_number": number, "account_id": account.account_id, "period": period.label, "sequence": sequence,
            "currency": pricebook.currency, "issue_date": issue_date, "due_date": due_date, "tax_rate": draft.tax_rate,
            "subtotal": draft.subtotal, "taxable_subtotal": draft.taxable_subtotal, "tax": draft.tax,
            "total": draft.total, "credit_applied": draft.credit_applied,
        })  # fmt: skip
        line_rows.extend(
            {"invoice_number": number, "position": position, "kind": line.kind, "description": line.description,
             "quantity": line.quantity, "unit_price": line.unit_price, "amount": line.amount, "taxable": line.taxable}
            for position, line in enumerate(draft.lines, start=1)
        )  # fmt: skip
    if invoice_rows:
        session.execute(insert(Invoice), invoice_rows)
        session.execute(insert(InvoiceLine), line_rows)
    return len(invoice_rows)


def _accounts(session: Session, period: Period) -> list[AccountFacts]:
    rows = session.execute(
        select(Account, BillingTerms)
        .outerjoin(BillingTerms, BillingTerms.account_id == Account.account_id)
        .where(Account.started_at <= period.last_day)
        .order_by(Account.account_id)
    )
    facts = []
    for account, terms in rows:
        extras: dict[str, Any] = {}
        if terms is not None:
            extras = {
                "seats": terms.seats, "extra_storage_gb": terms.extra_storage_gb,
                "custom_monthly_fee": terms.monthly_fee, "custom_price_per_million_points": terms.price_per_million_points,
                "ended_on": terms.ended_on,
            }  # fmt: skip
        if extras.get("ended_on") is not None and extras["ended_on"] < account.started_at:
            continue
        facts.append(AccountFacts(account.account_id, account.country, account.plan, account.billing_cycle,
                                  account.started_at, account.tax_rate, account.tax_exempt, **extras))  # fmt: skip
    return facts


def _usage_slices(
    session: Session, pricebook: PriceBook, period: Period, plans: set[str]
) -> list[tuple[date, date, dict[str, int]]]:
    """Billable points per account between the month's price-change dates, one query per slice."""
    changes = sorted({d for plan in plans for d in pricebook.change_dates(plan, period.first_day, period.next().first_day)})
    bounds = [period.first_day, *changes, period.next().first_day]
    return [
        (start, end - timedelta(days=1), billable_points_by_account(session, start_of(start), start_of(end)))
        for start, end in pairwise(bounds)
    ]


def _availability(session: Session, pricebook: PriceBook, period: Period) -> Fraction:
    notice = timedelta(hours=pricebook.maintenance_notice_hours)
    rows = session.execute(
        select(Outage.started_at, Outage.ended_at, Outage.scheduled, Outage.announced_at)
        .where(Outage.started_at < period.end)
        .where(Outage.ended_at > period.start)
    )
    counted = [
        (start, end)
        for start, end, scheduled, announced in rows
        # Maintenance counts as outage unless it was scheduled and announced early enough.
        if not (scheduled and (announced is None or announced <= start - notice))
    ]
    return availability_percent(counted, period)


def _ledgers(session: Session, issue_date: date) -> dict[str, Ledger]:
    """Every account's balance at `issue_date` from earlier invoices, payments and credit notes."""
    balance: dict[str, Decimal] = defaultdict(lambda: ZERO)
    not_yet_due: dict[str, Decimal] = defaultdict(lambda: ZERO)
    for account_id, total, credit_applied, due_date in session.execute(
        select(Invoice.account_id, Invoice.total, Invoice.credit_applied, Invoice.due_date).where(Invoice.issue_date < issue_date)
    ):
        # Credit consumed by an invoice was already counted when it arose: count the charges only.
        charges = total + credit_applied
        balance[account_id] += charges
        # A credit (negative invoice) lowers the balance at once; only charges wait for a due date.
        if due_date >= issue_date and charges > 0:
            not_yet_due[account_id] += charges
    for account_id, amount in session.execute(
        select(Payment.account_id, Payment.amount).where(Payment.paid_at < start_of(issue_date))
    ):
        balance[account_id] -= amount
    for account_id, total in session.execute(
        select(CreditNote.account_id, CreditNote.total).where(CreditNote.issued_on < issue_date)
    ):
        balance[account_id] -= total
    return {account_id: Ledger(value, not_yet_due[account_id]) for account_id, value in balance.items()}


def load_invoices(catalog: Catalog, period: Period) -> list[InvoiceView] | None:
    """The stored invoices of a month in number order, or None if the month has not been run."""
    with catalog.session() as session:
        if session.get(BillingRun, period.label) is None:
            return None
        invoices = session.scalars(select(Invoice).where(Invoice.period == period.label).order_by(Invoice.sequence))
        return [invoice_view(invoice) for invoice in invoices]


def invoice_view(invoice: Invoice) -> InvoiceView:
    return InvoiceView(
        invoice_number=invoice.invoice_number,
        account_id=invoice.account_id,
        period=invoice.period,
        currency=invoice.currency,
        issue_date=invoice.issue_date,
        due_date=invoice.due_date,
        tax_rate=invoice.tax_rate,
        lines=tuple(Line(l.kind, l.description, l.quantity, l.unit_price, l.amount, l.taxable) for l in invoice.lines),
        subtotal=invoice.subtotal,
        tax=invoice.tax,
        total=invoice.total,
    )
