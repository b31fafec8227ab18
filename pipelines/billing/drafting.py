"""The rule book: one account's invoice for one month from its facts, no database. `draft_invoice`
charges each plan for its own days, prepaid cycles, agreed extras, usage, availability credits and
late fees; `correction_lines` re-bills invoiced months whose facts changed. What each kind of line
charges for a stretch of the month is `charges`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import date, timedelta
from decimal import Decimal
from fractions import Fraction
from itertools import pairwise

from pipelines.billing.charges import (
    MonthLines,
    availability_credit,
    late_fee,
    prepaid_refunds,
    recurring_extras,
    subscription_lines,
    usage_lines,
)
from pipelines.billing.ledger import Ledger
from pipelines.billing.lines import ZERO, AccountFacts, Draft, Line, UsageSlice, tax_by_rate
from pipelines.billing.money import format_money
from pipelines.billing.periods import Period
from pipelines.billing.pricebook import PriceBook
from pipelines.billing.terms import History, Parties


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
    month = MonthLines(
        pricebook,
        period,
        account,
        history,
        Parties(pricebook.seller_country, account.country, account.vat_id),
        first=max(account.started_at, period.first_day),
        last=min(account.ended_on or period.last_day, period.last_day),
        lines=[],
        month_fees=defaultdict(lambda: ZERO),
    )
    if month.active:
        subscription_lines(month)
        prepaid_refunds(month)
        recurring_extras(month)
    usage_lines(month, usage)
    usage_lines(month, late_usage, late=True)
    month.lines.extend(corrections)
    availability_credit(month, availability)
    late_fee(pricebook, period, account, ledger, month.lines)
    lines = month.lines

    closing_day = month.last if month.active else period.last_day
    tax_rate = month.regime(closing_day).rate
    taxable_subtotal = sum((line.amount for line in lines if line.taxable), ZERO)
    tax = sum((tax for _, tax in tax_by_rate(lines).values()), ZERO)
    gross = sum((line.amount for line in lines), ZERO) + tax
    credit_applied = min(ledger.credit, gross) if gross > 0 else ZERO
    if credit_applied > 0:
        lines.append(
            Line(
                "credit",
                f"Credit carried forward (overpayments and credit notes, {format_money(ledger.credit)} available)",
                Decimal(1),
                -credit_applied,
                -credit_applied,
                taxable=False,
            )
        )
    if not any(line.amount for line in lines):
        return None
    subtotal = sum((line.amount for line in lines), ZERO)
    return Draft(
        tuple(lines),
        tax_rate,
        subtotal,
        taxable_subtotal,
        tax,
        subtotal + tax,
        credit_applied,
        ledger.credit - credit_applied,
    )


# --- corrections of invoiced months ---------------------------------------------------------------


def _differing_ranges(
    before: History, after: History, first: date, last: date, ends_of: Mapping[bool, date | None]
) -> list[tuple[date, date]]:
    """The days in [first, last] on which `after` has other terms in force than `before`, or the
    contract is over in one and not in the other, joined into ranges. `ends_of`: the contract's
    last day before (True) and after (False) the changes."""
    cuts = {end + timedelta(days=1) for end in ends_of.values() if end is not None}
    starts = sorted(
        {
            first,
            *before.boundaries(first, last),
            *after.boundaries(first, last),
            *(d for d in cuts if first < d <= last),
        }
    )
    ends = [day - timedelta(days=1) for day in starts[1:]] + [last]

    def over(credit: bool, day: date) -> bool:
        end = ends_of[credit]
        return end is not None and day > end

    ranges: list[tuple[date, date]] = []
    for start, end in zip(starts, ends, strict=True):
        if before.on(start) == after.on(start) and over(True, start) == over(False, start):
            continue
        if ranges and ranges[-1][1] + timedelta(days=1) == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


def _usage_in(
    pricebook: PriceBook, both: Sequence[History], start: date, end: date, usage_days: Mapping[date, int]
) -> list[UsageSlice]:
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
    pricebook: PriceBook,
    period: Period,
    account: AccountFacts,
    before: History,
    usage_days: Mapping[date, int],
    availability: Fraction,
) -> list[Line]:
    """The correction of `period`, already invoiced, for plan or term changes recorded after that:
    for the days on which the account's history now differs from `before` (what its invoice, and
    any earlier correction, took into account), the lines those days get now are charged and the
    lines they got then are credited (a contract end moved earlier credits the days after it), each
    priced as of its days (plan, agreed price, price book version and VAT of the day). Lines alike
    on both sides cancel out. `usage_days`: the points of the month already billed, per day;
    `availability`: the month's."""
    after = account.history()
    parties = Parties(pricebook.seller_country, account.country, account.vat_id)
    first = max(account.started_at, period.first_day)
    # The contract's end on each side: a recorded end is a change like any other (an end recorded
    # after its month was invoiced credits the days after it); facts without one have the account's.
    ends_of = {
        credit: history.ended_on if after.ended_on is not None else account.ended_on
        for credit, history in ((False, after), (True, before))
    }
    lasts = {credit: min(end or period.last_day, period.last_day) for credit, end in ends_of.items()}
    sides: dict[bool, list[Line]] = {False: [], True: []}  # credit? -> lines

    def month(history: History, start: date, end: date, price_from: date | None) -> MonthLines:
        return MonthLines(
            pricebook, period, account, history, parties, start, end, [], defaultdict(lambda: ZERO), price_from
        )

    for credit, history in ((False, after), (True, before)):
        # A refund of a prepaid cycle belongs to the plan change's day, whatever range it is in.
        whole = month(history, first, lasts[credit], None)
        if whole.active:
            prepaid_refunds(whole)
        sides[credit].extend(whole.lines)
    for start, end in _differing_ranges(before, after, period.first_day, period.last_day, ends_of):
        for credit, history in ((False, after), (True, before)):
            part = month(history, max(start, first), min(end, lasts[credit]), first)
            if part.active:
                subscription_lines(part)
                recurring_extras(part)
            usage_lines(part, _usage_in(pricebook, (before, after), start, end, usage_days))
            availability_credit(part, availability)
            sides[credit].extend(part.lines)
    for line in list(sides[True]):
        if line in sides[False]:
            sides[False].remove(line)
            sides[True].remove(line)
    return [_correction(line, period, credit) for credit in (False, True) for line in sides[credit]]


def availability_correction_lines(
    pricebook: PriceBook, period: Period, account: AccountFacts, before: Fraction, after: Fraction
) -> list[Line]:
    """The correction of `period`, already invoiced, for outages recorded after that: its
    availability credit as it is now (`after`) is credited and the one it got then (`before`, what
    its invoice and any earlier correction took into account) is reversed, both on the month's fee
    of each VAT regime and capped at it, so the month is credited in all what it would have been
    had every outage been known on time. Lines alike on both sides cancel out."""
    history = account.history()
    parties = Parties(pricebook.seller_country, account.country, account.vat_id)
    first = max(account.started_at, period.first_day)
    last = min(account.ended_on or period.last_day, period.last_day)
    if first > last:
        return []
    sides: dict[bool, list[Line]] = {}
    for credit, availability in ((False, after), (True, before)):
        month = MonthLines(pricebook, period, account, history, parties, first, last, [], defaultdict(lambda: ZERO))
        subscription_lines(month)  # the month's fee per VAT regime, which the credit refers to
        month.lines.clear()
        availability_credit(month, availability)
        sides[credit] = month.lines
    for line in list(sides[True]):
        if line in sides[False]:
            sides[False].remove(line)
            sides[True].remove(line)
    return [_correction(line, period, credit) for credit in (False, True) for line in sides[credit]]


def _correction(line: Line, period: Period, credit: bool) -> Line:
    if not credit:
        return replace(line, kind="correction", description=f"Correction of {period}: {line.description}")
    return replace(
        line,
        kind="correction",
        description=f"Correction of {period}, credit for: {line.description}",
        quantity=-line.quantity,
        amount=-line.amount,
    )
