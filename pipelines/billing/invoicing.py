"""Monthly invoicing: from accounts, usage, outages, payments and credit notes to issued invoices.

`draft_invoice` is the pure rule book (one account, one month, no database); `run_billing` gathers
the facts for every account in bulk, drafts, numbers and stores the month's invoices in one
transaction, and returns the stored invoices. A month is invoiced once: a re-run, or a run racing
another, returns the invoices that exist and creates nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from itertools import pairwise
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipelines.billing.history import histories
from pipelines.billing.ledger import Ledger, before_invoice
from pipelines.billing.models import BillingRun, BillingTerms, ChangeBilling, Invoice, InvoiceLine, Outage
from pipelines.billing.money import format_money, format_quantity, format_rate, round_half_up
from pipelines.billing.periods import Period, add_months, months_between, start_of
from pipelines.billing.pricebook import PlanTerms, PriceBook
from pipelines.billing.terms import Agreed, History, Parties, PlanStep, TaxRegime, TermStep
from pipelines.billing.usage import (
    Claim,
    billable_points_by_account,
    billed_points_by_day,
    claim_usage,
    late_points_by_account_day,
)
from pipelines.catalog import Catalog
from pipelines.catalog.models import Account, BillingCycle
from pipelines.errors import UserError

ZERO = Decimal("0.00")
CYCLE_MONTHS = {BillingCycle.MONTHLY.value: 1, BillingCycle.QUARTERLY.value: 3, BillingCycle.YEARLY.value: 12}
MINUTES_PER_DAY = 24 * 60


class BillingError(UserError, ValueError):
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
    # The VAT of this line: rate applied and EN 16931 category (None: the invoice's rate applies).
    tax_rate: Decimal | None = None
    tax_category: str | None = None

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
    """What an invoice depends on about the account: its terms when it started (or, for accounts
    without dated changes, throughout) and its dated plan and term changes."""

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
    vat_id: str | None = None
    plan_steps: tuple[PlanStep, ...] = ()
    term_steps: tuple[TermStep, ...] = ()
    # The catalog ids of the steps, in the same order (to tell which ones a run takes into account).
    plan_ids: tuple[int, ...] = ()
    term_ids: tuple[int, ...] = ()
    # When the account was added to the catalog: a month invoiced before that never billed it.
    created_at: datetime | None = None

    def history(self) -> History:
        base = Agreed(
            plan=self.plan, billing_cycle=self.billing_cycle, plan_since=self.started_at, seats=self.seats,
            extra_storage_gb=self.extra_storage_gb, monthly_fee=self.custom_monthly_fee,
            price_per_million_points=self.custom_price_per_million_points, tax_rate=self.tax_rate, tax_exempt=self.tax_exempt,
        )  # fmt: skip
        return History(base, self.plan_steps, self.term_steps)


@dataclass(frozen=True)
class UsageSlice:
    """Billable points of one account between two price-change boundaries of the month."""

    first_day: date
    last_day: date
    points: int


@dataclass(frozen=True)
class Draft:
    lines: tuple[Line, ...]
    tax_rate: Decimal
    subtotal: Decimal
    taxable_subtotal: Decimal
    tax: Decimal
    total: Decimal
    credit_applied: Decimal
    # Credit (overpayments, credit notes) still available for later invoices.
    credit_remaining: Decimal = ZERO


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


def tax_by_rate(lines: Sequence[Line]) -> dict[Decimal, tuple[Decimal, Decimal]]:
    """Per VAT rate: the taxable base and its tax, rounded half-up once per rate."""
    bases: dict[Decimal, Decimal] = defaultdict(lambda: ZERO)
    for line in lines:
        if line.taxable:
            bases[line.tax_rate or Decimal("0")] += line.amount
    return {rate: (base, round_half_up(Fraction(base) * Fraction(rate))) for rate, base in bases.items()}


@dataclass
class _Month:
    """One account's month being drafted: where its terms change, and the lines so far."""

    pricebook: PriceBook
    period: Period
    account: AccountFacts
    history: History
    parties: Parties
    first: date
    last: date
    lines: list[Line]
    # The month's net subscription fee per VAT regime, which an availability credit refers to.
    month_fees: dict[TaxRegime, Decimal]
    # The first active day of the whole month, whose prices a monthly subscription pays, when
    # only a part of the month [first, last] is drafted (a correction of some of its days).
    price_from: date | None = None

    @property
    def active(self) -> bool:
        return self.first <= self.last

    @property
    def priced_from(self) -> date:
        return self.price_from or self.first

    def regime(self, day: date) -> TaxRegime:
        return self.parties.regime(self.history.on(day), day)

    def add(self, kind: str, description: str, quantity: Decimal, unit_price: Decimal, amount: Decimal, regime: TaxRegime) -> None:
        self.lines.append(Line(kind, description, quantity, unit_price, amount, True, regime.rate, regime.category))

    def days_note(self, start: date, end: date, with_start: bool) -> str:
        """Nothing for the whole month; else how many days, and which."""
        days = (end - start).days + 1
        if days == self.period.days:
            return ""
        if start == self.first and end == self.last and self.price_from is None:
            return f", {days} of {self.period.days} days" + (f" from {start.isoformat()}" if with_start else "")
        return f", {days} of {self.period.days} days, {start.isoformat()} to {end.isoformat()}"


def draft_invoice(
    pricebook: PriceBook,
    period: Period,
    account: AccountFacts,
    usage: Sequence[UsageSlice],
    availability: Fraction,
    ledger: Ledger,
    late_usage: Sequence[UsageSlice] = (),
    corrections: Sequence[Line] = (),
) -> Draft | None:
    """The invoice of `account` for `period`, or None when there is nothing to charge or credit.
    `late_usage`: slices of earlier, already invoiced months whose events arrived since;
    `corrections`: lines correcting invoiced months for changes recorded after they were invoiced
    (see `correction_lines`)."""
    history = account.history()
    month = _Month(
        pricebook, period, account, history, Parties(pricebook.seller_country, account.country, account.vat_id),
        first=max(account.started_at, period.first_day), last=min(account.ended_on or period.last_day, period.last_day),
        lines=[], month_fees=defaultdict(lambda: ZERO),
    )  # fmt: skip
    if month.active:
        _subscription_lines(month)
        _prepaid_refunds(month)
        _recurring_extras(month)
    _usage_lines(month, usage)
    _usage_lines(month, late_usage, late=True)
    month.lines.extend(corrections)
    _availability_credit(month, availability)
    _late_fee(pricebook, account, ledger, month.lines)
    lines = month.lines

    closing_day = month.last if month.active else period.last_day
    tax_rate = month.regime(closing_day).rate
    taxable_subtotal = sum((line.amount for line in lines if line.taxable), ZERO)
    tax = sum((tax for _, tax in tax_by_rate(lines).values()), ZERO)
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
    return Draft(tuple(lines), tax_rate, subtotal, taxable_subtotal, tax, subtotal + tax, credit_applied, ledger.credit - credit_applied)


def _plan_name(plan: str) -> str:
    return plan.replace("_", " ").capitalize()


def _merged(pieces: list[tuple[date, date, Agreed]], key) -> list[tuple[date, date, Agreed]]:
    """Adjacent pieces that agree on `key` joined into one."""
    merged: list[tuple[date, date, Agreed]] = []
    for start, end, agreed in pieces:
        if merged and key(merged[-1][0], merged[-1][2]) == key(start, agreed):
            merged[-1] = (merged[-1][0], end, merged[-1][2])
        else:
            merged.append((start, end, agreed))
    return merged


def _cycle_start(anchor: date, months: int, month: Period) -> date:
    """Start of the anchor's cycle that is running in (or starts in) `month`."""
    elapsed = months_between(anchor, month.first_day)
    return add_months(anchor, (elapsed // months) * months)


def _subscription_lines(month: _Month) -> None:
    """Per plan period in the month: the subscription (and discount) lines; also each piece's net
    fee for the month, for the availability credit."""
    period = month.period
    pieces = _merged(
        month.history.pieces(month.first, month.last),
        lambda start, a: (a.plan, a.billing_cycle, a.plan_since, a.monthly_fee, month.regime(start)),
    )
    for start, end, agreed in pieces:
        days = (end - start).days + 1
        share = Fraction(days, period.days)
        regime = month.regime(start)
        months = CYCLE_MONTHS[agreed.billing_cycle]
        if months == 1:
            # The cycle is the calendar month (or the part of it on this plan), so its price is
            # the one in force on its first day.
            terms = month.pricebook.terms(agreed.plan, max(month.priced_from, agreed.plan_since))
            fee = agreed.monthly_fee if agreed.monthly_fee is not None else terms.monthly_fee
            amount = prorate(fee, days, period.days)
            if amount:
                month.add("subscription", f"{_plan_name(agreed.plan)} plan, {period}{month.days_note(start, end, True)}",
                          round_half_up(share, 4), fee, amount, regime)  # fmt: skip
                _discount_line(month, terms.discount, amount, regime)
            month.month_fees[regime] += amount - round_half_up(Fraction(amount) * Fraction(terms.discount))
            continue

        # Quarterly and yearly cycles run from the plan period's start (the account's start or
        # the plan change) and are invoiced in full, in advance, on the invoice of the month the
        # cycle starts in, at the price in force that day.
        cycle_start = _cycle_start(agreed.plan_since, months, period)
        fee, terms = _cycle_fee(month.pricebook, agreed.plan, agreed.monthly_fee, cycle_start)
        if months_between(agreed.plan_since, period.first_day) % months == 0 and start <= cycle_start <= end:
            amount = round_half_up(Fraction(fee) * months)
            cycle_end = add_months(cycle_start, months) - timedelta(days=1)
            if amount:
                month.add("subscription", f"{_plan_name(agreed.plan)} plan, {agreed.billing_cycle} "
                          f"{cycle_start.isoformat()} to {cycle_end.isoformat()}, in advance", Decimal(months), fee, amount,
                          month.regime(cycle_start))  # fmt: skip
                _discount_line(month, terms.discount, amount, month.regime(cycle_start))
        # The month's share of the cycle's fee, which an availability credit refers to.
        month.month_fees[regime] += round_half_up(Fraction(fee) * (1 - Fraction(terms.discount)) * share)


def _cycle_fee(pricebook: PriceBook, plan: str, custom: Decimal | None, cycle_start: date) -> tuple[Decimal, PlanTerms]:
    """A prepaid cycle's monthly fee: agreed, else the plan's on the day the cycle starts."""
    terms = pricebook.terms(plan, cycle_start)
    return (custom if custom is not None else terms.monthly_fee), terms


def _prepaid_refunds(month: _Month) -> None:
    """A plan change inside a prepaid quarterly or yearly cycle: the unused days are refunded only
    where the price book says so (refund_unused_prepaid)."""
    if not month.pricebook.refund_unused_prepaid:
        return
    for step in month.history.plan_steps:
        change = step.effective_on
        if not (month.first < change <= month.last) or change <= month.account.started_at:
            continue
        before = month.history.on(change - timedelta(days=1))
        months = CYCLE_MONTHS[before.billing_cycle]
        if months == 1:
            continue
        cycle_start = _cycle_start(before.plan_since, months, Period.of(change - timedelta(days=1)))
        if cycle_start >= change:
            cycle_start = add_months(cycle_start, -months)
        cycle_end = add_months(cycle_start, months) - timedelta(days=1)
        if change > cycle_end or cycle_start < before.plan_since:
            continue
        fee, terms = _cycle_fee(month.pricebook, before.plan, month.history.on(cycle_start).monthly_fee, cycle_start)
        charged = round_half_up(Fraction(fee) * months)
        net = charged - round_half_up(Fraction(charged) * Fraction(terms.discount))
        unused = (cycle_end - change).days + 1
        cycle_days = (cycle_end - cycle_start).days + 1
        refund = round_half_up(Fraction(net) * unused / cycle_days)
        if refund:
            month.add("prepaid_refund", f"Refund of the unused {_plan_name(before.plan).lower()} plan {before.billing_cycle} "
                      f"{cycle_start.isoformat()} to {cycle_end.isoformat()}: {unused} of {cycle_days} days from {change.isoformat()}",
                      round_half_up(Fraction(unused, cycle_days), 4), -net, -refund, month.regime(cycle_start))  # fmt: skip


def _discount_line(month: _Month, discount: Decimal, amount: Decimal, regime: TaxRegime) -> None:
    if discount and amount:
        month.add("discount", f"Data-sharing discount {format_quantity(discount * 100)} %", discount, -amount,
                  -round_half_up(Fraction(amount) * Fraction(discount)), regime)  # fmt: skip


def _recurring_extras(month: _Month) -> None:
    """Seats and extra storage: monthly, charged by the days each count was agreed."""
    period = month.period
    extras = (
        ("seats", lambda a: a.seats, lambda t: t.seat_fee, lambda n: f"User seats ({n}), {period}"),
        ("extra_storage", lambda a: a.extra_storage_gb, lambda t: t.extra_storage_fee_per_gb, lambda n: f"Extra storage {n} GB, {period}"),
    )  # fmt: skip
    for kind, count_of, price_of, describe in extras:

        def price(agreed: Agreed) -> Decimal:
            return price_of(month.pricebook.terms(agreed.plan, max(month.priced_from, agreed.plan_since)))

        pieces = _merged(month.history.pieces(month.first, month.last),
                         lambda start, a: (count_of(a), price(a), month.regime(start)))  # fmt: skip
        for start, end, agreed in pieces:
            count, unit = count_of(agreed), price(agreed)
            if count and unit:
                share = Fraction((end - start).days + 1, period.days)
                month.add(kind, describe(count) + month.days_note(start, end, False), round_half_up(count * share, 4), unit,
                          round_half_up(Fraction(unit) * count * share), month.regime(start))  # fmt: skip


def _usage_lines(month: _Month, usage: Sequence[UsageSlice], late: bool = False) -> None:
    """One line per price (and VAT) in force during the month; each slice priced at its own date,
    with the plan, agreed price and price book version of that date. Late usage gets lines of its
    own, one month at a time, dated with the month it happened in."""
    priced: list[tuple[Decimal, TaxRegime, UsageSlice]] = []
    for piece in usage:
        agreed = month.history.on(piece.first_day)
        price = agreed.price_per_million_points
        if price is None:
            price = month.pricebook.terms(agreed.plan, piece.first_day).price_per_million_points
        if price is None or not piece.points:
            continue
        regime = month.regime(piece.first_day)
        previous = priced[-1][2] if priced else None
        if (previous and priced[-1][:2] == (price, regime) and previous.last_day + timedelta(days=1) == piece.first_day
                and Period.of(previous.last_day) == Period.of(piece.first_day)):  # fmt: skip
            previous = priced[-1][2]
            priced[-1] = (price, regime, UsageSlice(previous.first_day, piece.last_day, previous.points + piece.points))
        else:
            priced.append((price, regime, piece))
    for price, regime, piece in priced:
        millions = Decimal(piece.points).scaleb(-6)
        kind, received = ("late_usage", f"Usage of {Period.of(piece.first_day)} received late: ") if late else ("usage", "")
        month.add(kind, f"{received}Classification, {piece.points:,} points, {piece.first_day.isoformat()} to "
                  f"{piece.last_day.isoformat()}, per million points", millions, price,
                  round_half_up(Fraction(millions) * Fraction(price)), regime)  # fmt: skip


def _availability_credit(month: _Month, availability: Fraction) -> None:
    target = Fraction(month.pricebook.availability_target_percent)
    if availability >= target:
        return
    shortfall = (target - availability) / 100
    for regime, fee in month.month_fees.items():
        if fee <= 0:
            continue
        # Credited pro rata to the shortfall, never more than the month's fee.
        credit = min(fee, round_half_up(Fraction(fee) * shortfall))
        month.add("availability_credit", f"Availability credit: {round_half_up(availability, 3)} % in {month.period}, "
                  f"target {month.pricebook.availability_target_percent} %", round_half_up(shortfall, 6), -fee, -credit,
                  regime)  # fmt: skip


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


# --- corrections of invoiced months ---------------------------------------------------------------


def _differing_ranges(before: History, after: History, first: date, last: date) -> list[tuple[date, date]]:
    """The days in [first, last] on which `after` has other terms in force than `before`, joined
    into ranges."""
    starts = sorted({first, *before.boundaries(first, last), *after.boundaries(first, last)})
    ends = [day - timedelta(days=1) for day in starts[1:]] + [last]
    ranges: list[tuple[date, date]] = []
    for start, end in zip(starts, ends, strict=True):
        if before.on(start) == after.on(start):
            continue
        if ranges and ranges[-1][1] + timedelta(days=1) == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


def _usage_in(pricebook: PriceBook, both: Sequence[History], start: date, end: date, usage_days: Mapping[date, int]) -> list[UsageSlice]:
    """The points of [start, end] cut wherever a price, plan or term of either history changes,
    so that each slice has one price under each."""
    after_end = end + timedelta(days=1)
    plans = {h.base.plan for h in both} | {step.plan for h in both for step in h.plan_steps}
    cuts = {start, after_end} | {d for plan in plans for d in pricebook.change_dates(plan, start, after_end)}
    cuts |= {d for h in both for d in h.boundaries(start, end)}
    slices = []
    for first, stop in pairwise(sorted(cuts)):
        points = sum(n for day, n in usage_days.items() if first <= day < stop)
        if points:
            slices.append(UsageSlice(first, stop - timedelta(days=1), points))
    return slices


def correction_lines(
    pricebook: PriceBook, period: Period, account: AccountFacts, before: History, usage_days: Mapping[date, int],
    availability: Fraction,
) -> list[Line]:  # fmt: skip
    """The correction of `period`, already invoiced, for plan or term changes recorded after that:
    for the days on which the account's history now differs from `before` (what its invoice, and
    any earlier correction, took into account), the lines those days get now are charged and the
    lines they got then are credited, each priced as of its days (plan, agreed price, price book
    version and VAT of the day). Lines alike on both sides cancel out. `usage_days`: the points
    of the month already billed, per day; `availability`: the month's."""
    after = account.history()
    parties = Parties(pricebook.seller_country, account.country, account.vat_id)
    first = max(account.started_at, period.first_day)
    last = min(account.ended_on or period.last_day, period.last_day)
    sides: dict[bool, list[Line]] = {False: [], True: []}  # credit? -> lines

    def month(history: History, start: date, end: date, price_from: date | None) -> _Month:
        return _Month(pricebook, period, account, history, parties, start, end, [], defaultdict(lambda: ZERO), price_from)

    for credit, history in ((False, after), (True, before)):
        # A refund of a prepaid cycle belongs to the plan change's day, whatever range it is in.
        whole = month(history, first, last, None)
        if whole.active:
            _prepaid_refunds(whole)
        sides[credit].extend(whole.lines)
    for start, end in _differing_ranges(before, after, period.first_day, period.last_day):
        for credit, history in ((False, after), (True, before)):
            part = month(history, max(start, first), min(end, last), first)
            if part.active:
                _subscription_lines(part)
                _recurring_extras(part)
            _usage_lines(part, _usage_in(pricebook, (before, after), start, end, usage_days))
            _availability_credit(part, availability)
            sides[credit].extend(part.lines)
    for line in list(sides[True]):
        if line in sides[False]:
            sides[False].remove(line)
            sides[True].remove(line)
    return [_correction(line, period, credit) for credit in (False, True) for line in sides[credit]]


def _correction(line: Line, period: Period, credit: bool) -> Line:
    if not credit:
        return replace(line, kind="correction", description=f"Correction of {period}: {line.description}")
    return replace(line, kind="correction", description=f"Correction of {period}, credit for: {line.description}",
                   quantity=-line.quantity, amount=-line.amount)  # fmt: skip


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
    runs = session.execute(select(BillingRun.period, BillingRun.created_at).where(BillingRun.period != period.label)).all()
    started = session.get(BillingRun, period.label).created_at
    claim = claim_usage(session, period, started, max((created for _, created in runs), default=None),
                        [Period.parse(label) for label, _ in runs if label < period.label])  # fmt: skip
    accounts = _accounts(session, period)
    usage = _usage_slices(session, pricebook, period, accounts, claim)
    late = _late_usage(pricebook, late_points_by_account_day(session, period), {a.account_id: a for a in accounts})
    corrections = _corrections(session, pricebook, period, accounts, [(Period.parse(label), at) for label, at in runs if label < period.label])
    availability = _availability(session, pricebook, period)
    issue_date = issue_date_of(period)
    ledgers = before_invoice(session, issue_date)
    due_date = issue_date + timedelta(days=pricebook.payment_terms_days)

    invoice_rows: list[dict[str, Any]] = []
    line_rows: list[dict[str, Any]] = []
    for account in accounts:  # ordered by account id: numbers follow that order, without gaps
        slices = [UsageSlice(first, last, points.get(account.account_id, 0)) for first, last, points in usage]
        draft = draft_invoice(pricebook, period, account, slices, availability, ledgers.get(account.account_id, Ledger()),
                              late.get(account.account_id, ()), corrections.get(account.account_id, ()))  # fmt: skip
        if draft is None:
            continue
        sequence = len(invoice_rows) + 1
        number = f"{pricebook.invoice_prefix}-{period.label}-{sequence:04d}"
        invoice_rows.append({
            "invoice_number": number, "account_id": account.account_id, "period": period.label, "sequence": sequence,
            "currency": pricebook.currency, "issue_date": issue_date, "due_date": due_date, "tax_rate": draft.tax_rate,
            "subtotal": draft.subtotal, "taxable_subtotal": draft.taxable_subtotal, "tax": draft.tax,
            "total": draft.total, "credit_applied": draft.credit_applied, "credit_remaining": draft.credit_remaining,
        })  # fmt: skip
        line_rows.extend(
            {"invoice_number": number, "position": position, "kind": line.kind, "description": line.description,
             "quantity": line.quantity, "unit_price": line.unit_price, "amount": line.amount, "taxable": line.taxable,
             "tax_rate": line.tax_rate, "tax_category": line.tax_category}
            for position, line in enumerate(draft.lines, start=1)
        )  # fmt: skip
    if invoice_rows:
        session.execute(insert(Invoice), invoice_rows)
        session.execute(insert(InvoiceLine), line_rows)
    return len(invoice_rows)


def _accounts(session: Session, period: Period) -> list[AccountFacts]:
    rows = session.execute(
        select(Account, BillingTerms.ended_on)
        .outerjoin(BillingTerms, BillingTerms.account_id == Account.account_id)
        .where(Account.started_at <= period.last_day)
        .order_by(Account.account_id)
    ).all()
    found = histories(session, [account for account, _ in rows])
    facts = []
    for account, ended_on in rows:
        if ended_on is not None and ended_on < account.started_at:
            continue
        history = found[account.account_id]
        facts.append(AccountFacts(account.account_id, account.country, history.plan, history.billing_cycle, account.started_at,
                                  account.tax_rate, account.tax_exempt, ended_on=ended_on, vat_id=account.vat_id, plan_steps=history.plan_steps,
                                  term_steps=history.term_steps, plan_ids=history.plan_ids, term_ids=history.term_ids,
                                  created_at=account.created_at))  # fmt: skip
    return facts


def _corrections(session: Session, pricebook: PriceBook, period: Period, accounts: Sequence[AccountFacts],
                 invoiced: Sequence[tuple[Period, datetime]]) -> dict[str, list[Line]]:  # fmt: skip
    """Take every plan and term change in force by the end of `period` into account, once: mark
    the ones no run has taken into account yet, and for those dated before `period` (recorded after
    the months they reach into were invoiced) return the lines correcting those invoiced months.
    `invoiced`: the earlier invoiced months with the time their run started."""
    marked = set(session.execute(select(ChangeBilling.kind, ChangeBilling.change_id)).tuples())
    marks: list[dict[str, Any]] = []
    found: dict[str, list[Line]] = {}
    for account in accounts:
        new_plans = [(i, s) for i, s in zip(account.plan_ids, account.plan_steps, strict=True)
                     if ("plan", i) not in marked and s.effective_on <= period.last_day]  # fmt: skip
        new_terms = [(i, s) for i, s in zip(account.term_ids, account.term_steps, strict=True)
                     if ("terms", i) not in marked and (s.effective_on is None or s.effective_on <= period.last_day)]  # fmt: skip
        marks += [{"kind": "plan", "change_id": i, "period": period.label} for i, _ in new_plans]
        marks += [{"kind": "terms", "change_id": i, "period": period.label} for i, _ in new_terms]
        dates = [s.effective_on for _, s in new_plans] + [s.effective_on or account.started_at for _, s in new_terms]
        earliest = min((d for d in dates if d < period.first_day), default=None)
        if earliest is None:
            continue
        before = account.history().without([s for _, s in new_plans], [s for _, s in new_terms])
        for month, run_started in sorted(invoiced):
            # A month invoiced before the account was added billed it nothing, so has nothing to correct.
            if month.last_day < earliest or (account.created_at is not None and account.created_at >= run_started):
                continue
            lines = correction_lines(pricebook, month, account, before, billed_points_by_day(session, account.account_id, month, period),
                                     _availability(session, pricebook, month))  # fmt: skip
            found.setdefault(account.account_id, []).extend(lines)
    if marks:
        session.execute(insert(ChangeBilling), marks)
    return found


def _slice_bounds(pricebook: PriceBook, period: Period, accounts: Sequence[AccountFacts]) -> list[date]:
    """The month cut on every day a price, a plan or a term of one of `accounts` changes."""
    next_month = period.next().first_day
    plans = {a.plan for a in accounts} | {step.plan for a in accounts for step in a.plan_steps}
    changes = {d for plan in plans for d in pricebook.change_dates(plan, period.first_day, next_month)}
    for account in accounts:
        if account.plan_steps or account.term_steps:
            changes.update(account.history().boundaries(period.first_day, period.last_day))
    return [period.first_day, *sorted(changes), next_month]


def _usage_slices(
    session: Session, pricebook: PriceBook, period: Period, accounts: Sequence[AccountFacts], claim: Claim
) -> list[tuple[date, date, dict[str, int]]]:
    """Billable points per account that this run bills for its month, between the days on which a
    price, a plan or a term changes: one query per slice (at most one per day of the month)."""
    return [
        (start, end - timedelta(days=1), billable_points_by_account(session, start_of(start), start_of(end), claim))
        for start, end in pairwise(_slice_bounds(pricebook, period, accounts))
    ]


def _late_usage(pricebook: PriceBook, points: dict[str, dict[date, int]], accounts: dict[str, AccountFacts]) -> dict[str, list[UsageSlice]]:
    """Per account, the late points cut like their own month's usage would have been."""
    late: dict[str, list[UsageSlice]] = {}
    for account_id, days in points.items():
        account = accounts.get(account_id)
        if account is None:
            continue
        for month in sorted({Period.of(day) for day in days}):
            for start, end in pairwise(_slice_bounds(pricebook, month, [account])):
                total = sum(n for day, n in days.items() if start <= day < end)
                if total:
                    late.setdefault(account_id, []).append(UsageSlice(start, end - timedelta(days=1), total))
    return late


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
        lines=tuple(Line(l.kind, l.description, l.quantity, l.unit_price, l.amount, l.taxable, l.tax_rate, l.tax_category)
                    for l in invoice.lines),
        subtotal=invoice.subtotal,
        tax=invoice.tax,
        total=invoice.total,
    )
