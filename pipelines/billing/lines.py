"""Invoice lines and the facts they are drawn from: the value types of billing (a line, an account's
facts for a month, a usage slice, a draft, an invoice as shown) and the arithmetic every rule
shares (proration, availability, tax by rate)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

from pipelines.billing.money import format_money, format_quantity, format_rate, round_half_up
from pipelines.billing.periods import Period
from pipelines.billing.terms import Agreed, History, PlanStep, TermStep
from pipelines.catalog.models import BillingCycle

ZERO = Decimal("0.00")
CYCLE_MONTHS = {BillingCycle.MONTHLY.value: 1, BillingCycle.QUARTERLY.value: 3, BillingCycle.YEARLY.value: 12}
MINUTES_PER_DAY = 24 * 60


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
    # EN 16931 item price base quantity (BT-149): the unit price is for this many units, so
    # amount = quantity x unit price / base quantity, exactly before rounding to the cent. A month's
    # fee for 16 of 30 days: quantity 16, unit price the monthly fee, base quantity 30.
    base_quantity: Decimal = Decimal(1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "description": self.description,
            # A late fee's quantity is the overdue balance: money, shown as money.
            "quantity": format_money(self.quantity) if self.kind == "late_fee" else format_quantity(self.quantity),
            "unit_price": format_rate(self.unit_price),
            "amount": format_money(self.amount),
            "taxable": self.taxable,
        } | ({} if self.base_quantity == 1 else {"base_quantity": format_quantity(self.base_quantity)})


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

    def history(self) -> History:
        base = Agreed(
            plan=self.plan,
            billing_cycle=self.billing_cycle,
            plan_since=self.started_at,
            seats=self.seats,
            extra_storage_gb=self.extra_storage_gb,
            monthly_fee=self.custom_monthly_fee,
            price_per_million_points=self.custom_price_per_million_points,
            tax_rate=self.tax_rate,
            tax_exempt=self.tax_exempt,
        )
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
    # False when every account had been covered already: `invoices` are the stored ones, unchanged.
    created: bool
    # All of the month's invoices, in number order.
    invoices: list[InvoiceView]
    # Invoices of earlier months this run issued, for accounts their runs had not covered.
    caught_up: list[InvoiceView] = field(default_factory=list)
    # The numbers of the invoices this run issued, of its month and caught up.
    issued: tuple[str, ...] = ()


# --- the rules, for one account and one month ---------------------------------------------------


def prorate(fee: Decimal, active_days: int, days_in_month: int) -> Decimal:
    """fee x active days / days in month, rounded half-up to the cent (the start day is active)."""
    return round_half_up(Fraction(fee) * active_days / days_in_month)


def availability_percent(outages: Sequence[tuple[datetime, datetime]], period: Period) -> Fraction:
    """100 x (minutes in month - outage minutes) / minutes in month; overlapping outages count once."""
    clipped = sorted(
        (max(s, period.start), min(e, period.end)) for s, e in outages if s < period.end and e > period.start
    )
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
