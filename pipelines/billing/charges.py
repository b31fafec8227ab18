"""What each kind of invoice line charges for a stretch of one account's month (`MonthLines`): the
subscription of each plan for its own days, prepaid cycles and their refunds, agreed extras, usage,
the availability credit and the late fee. `drafting` decides which stretches a month's invoice or a
correction of an invoiced month drafts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from fractions import Fraction

from pipelines.billing.ledger import Ledger
from pipelines.billing.lines import CYCLE_MONTHS, AccountFacts, Line, UsageSlice, prorate
from pipelines.billing.money import format_money, format_quantity, round_half_up
from pipelines.billing.periods import Period, add_months, months_between
from pipelines.billing.pricebook import PlanTerms, PriceBook
from pipelines.billing.terms import Agreed, History, Parties, TaxRegime


@dataclass
class MonthLines:
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

    def add(
        self,
        kind: str,
        description: str,
        quantity: Decimal,
        unit_price: Decimal,
        amount: Decimal,
        regime: TaxRegime,
        base_quantity: Decimal = Decimal(1),
    ) -> None:
        self.lines.append(
            Line(kind, description, quantity, unit_price, amount, True, regime.rate, regime.category, base_quantity)
        )

    def per_day(self, days: int) -> tuple[Decimal, Decimal]:
        """Quantity and base quantity of a monthly price for `days` of the month: the whole month is
        1 x the price; part of it `days` x the price per `days in month` (exact, unlike a rounded share)."""
        if days == self.period.days:
            return Decimal("1.0000"), Decimal(1)
        return Decimal(days), Decimal(self.period.days)

    def days_note(self, start: date, end: date, with_start: bool) -> str:
        """Nothing for the whole month; else how many days, and which."""
        days = (end - start).days + 1
        if days == self.period.days:
            return ""
        if start == self.first and end == self.last and self.price_from is None:
            return f", {days} of {self.period.days} days" + (f" from {start.isoformat()}" if with_start else "")
        return f", {days} of {self.period.days} days, {start.isoformat()} to {end.isoformat()}"


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


def invoiced_cycle(anchor: date, months: int, day: date) -> tuple[date, date]:
    """First and last day of the anchor's quarterly or yearly cycle that contains `day`, as its
    invoice line states them (what a termination lets run to its end)."""
    start = _cycle_start(anchor, months, Period.of(day))
    if start > day:
        start = _cycle_start(anchor, months, Period.of(add_months(start, -months)))
    return start, add_months(start, months) - timedelta(days=1)


def subscription_lines(month: MonthLines) -> None:
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
                quantity, base = month.per_day(days)
                month.add(
                    "subscription",
                    f"{_plan_name(agreed.plan)} plan, {period}{month.days_note(start, end, True)}",
                    quantity,
                    fee,
                    amount,
                    regime,
                    base,
                )
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
                month.add(
                    "subscription",
                    f"{_plan_name(agreed.plan)} plan, {agreed.billing_cycle} "
                    f"{cycle_start.isoformat()} to {cycle_end.isoformat()}, in advance",
                    Decimal(months),
                    fee,
                    amount,
                    month.regime(cycle_start),
                )
                _discount_line(month, terms.discount, amount, month.regime(cycle_start))
        # The month's share of the cycle's fee, which an availability credit refers to.
        month.month_fees[regime] += round_half_up(Fraction(fee) * (1 - Fraction(terms.discount)) * share)


def _cycle_fee(pricebook: PriceBook, plan: str, custom: Decimal | None, cycle_start: date) -> tuple[Decimal, PlanTerms]:
    """A prepaid cycle's monthly fee: agreed, else the plan's on the day the cycle starts."""
    terms = pricebook.terms(plan, cycle_start)
    return (custom if custom is not None else terms.monthly_fee), terms


def prepaid_refunds(month: MonthLines) -> None:
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
            month.add(
                "prepaid_refund",
                f"Refund of the unused {_plan_name(before.plan).lower()} plan {before.billing_cycle} "
                f"{cycle_start.isoformat()} to {cycle_end.isoformat()}: {unused} of {cycle_days} days from {change.isoformat()}",
                round_half_up(Fraction(unused, cycle_days), 4),
                -net,
                -refund,
                month.regime(cycle_start),
            )


def _discount_line(month: MonthLines, discount: Decimal, amount: Decimal, regime: TaxRegime) -> None:
    if discount and amount:
        month.add(
            "discount",
            f"Data-sharing discount {format_quantity(discount * 100)} %",
            discount,
            -amount,
            -round_half_up(Fraction(amount) * Fraction(discount)),
            regime,
        )


def recurring_extras(month: MonthLines) -> None:
    """Seats and extra storage: monthly, charged by the days each count was agreed."""
    period = month.period
    extras = (
        ("seats", lambda a: a.seats, lambda t: t.seat_fee, lambda n: f"User seats ({n}), {period}"),
        (
            "extra_storage",
            lambda a: a.extra_storage_gb,
            lambda t: t.extra_storage_fee_per_gb,
            lambda n: f"Extra storage {n} GB, {period}",
        ),
    )
    for kind, count_of, price_of, describe in extras:

        def price(agreed: Agreed, price_of=price_of) -> Decimal:
            return price_of(month.pricebook.terms(agreed.plan, max(month.priced_from, agreed.plan_since)))

        pieces = _merged(
            month.history.pieces(month.first, month.last),
            lambda start, a, count_of=count_of, price=price: (count_of(a), price(a), month.regime(start)),
        )
        for start, end, agreed in pieces:
            count, unit = count_of(agreed), price(agreed)
            if count and unit:
                share = Fraction((end - start).days + 1, period.days)
                quantity, base = month.per_day((end - start).days + 1)
                month.add(
                    kind,
                    describe(count) + month.days_note(start, end, False),
                    count * quantity,  # seat-days (GB-days) of a price per seat (GB) and month
                    unit,
                    round_half_up(Fraction(unit) * count * share),
                    month.regime(start),
                    base,
                )


def usage_lines(month: MonthLines, usage: Sequence[UsageSlice], late: bool = False) -> None:
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
        if (
            previous
            and priced[-1][:2] == (price, regime)
            and previous.last_day + timedelta(days=1) == piece.first_day
            and Period.of(previous.last_day) == Period.of(piece.first_day)
        ):
            previous = priced[-1][2]
            priced[-1] = (price, regime, UsageSlice(previous.first_day, piece.last_day, previous.points + piece.points))
        else:
            priced.append((price, regime, piece))
    for price, regime, piece in priced:
        millions = Decimal(piece.points).scaleb(-6)
        kind, received = (
            ("late_usage", f"Usage of {Period.of(piece.first_day)} received late: ") if late else ("usage", "")
        )
        month.add(
            kind,
            f"{received}Classification, {piece.points:,} points, {piece.first_day.isoformat()} to "
            f"{piece.last_day.isoformat()}, per million points",
            millions,
            price,
            round_half_up(Fraction(millions) * Fraction(price)),
            regime,
        )


def availability_credit(month: MonthLines, availability: Fraction) -> None:
    target = Fraction(month.pricebook.availability_target_percent)
    if availability >= target:
        return
    shortfall = (target - availability) / 100
    for regime, fee in month.month_fees.items():
        if fee <= 0:
            continue
        # Credited pro rata to the shortfall, never more than the month's fee.
        credit = min(fee, round_half_up(Fraction(fee) * shortfall))
        month.add(
            "availability_credit",
            f"Availability credit: {round_half_up(availability, 3)} % in {month.period}, "
            f"target {month.pricebook.availability_target_percent} %",
            round_half_up(shortfall, 6),
            -fee,
            -credit,
            regime,
        )


def late_fee(pricebook: PriceBook, period: Period, account: AccountFacts, ledger: Ledger, lines: list[Line]) -> None:
    """The finance charge on what was overdue when the month ended: on the overdue charges less
    earlier finance charges (which stay owed but bear none), or, for a month of a price book that
    still compounded them then, on the whole overdue balance as was issued."""
    rate = pricebook.late_fee_rate(account.country)
    percent, currency = format_quantity(rate * 100), pricebook.currency
    if pricebook.finance_charges_compound(period.next().first_day):
        base = ledger.overdue
        description = f"Finance charge {percent} % per month on the overdue balance of {format_money(base)} {currency}"
    else:
        base = ledger.finance_charge_base
        description = f"Finance charge {percent} % per month on {format_money(base)} {currency} overdue"
        if ledger.overdue_since is not None:
            description += f" since {(ledger.overdue_since + timedelta(days=1)).isoformat()}"
        if ledger.overdue_finance_charges:
            description += (
                f"; not on the earlier finance charges of {format_money(ledger.overdue_finance_charges)} "
                f"{currency} also overdue"
            )
    if base <= 0 or not rate:
        return
    lines.append(
        Line("late_fee", description, base, rate, round_half_up(Fraction(base) * Fraction(rate)), taxable=False)
    )
