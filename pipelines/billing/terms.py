"""What an account had agreed on a given day: its plan and billing cycle, seats, extra storage,
agreed prices and points cap, VAT rate and exemption, from its dated changes. Pure: no database.

A change takes effect at 00:00 UTC on its date, so the change day belongs to the new terms. Every
month is charged by the days each set of terms was in force.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date, timedelta
from decimal import Decimal

# Member states of the EU (ISO 3166 codes; Greece is "GR" in ISO, "EL" in VAT numbers).
EU_COUNTRIES = frozenset("AT BE BG CY CZ DE DK EE ES FI FR GR HR HU IE IT LT LU LV MT NL PL PT RO SE SI SK".split())

# EN 16931 VAT category codes (UNTDID 5305) the invoices use.
STANDARD, ZERO_RATED, EXEMPT, REVERSE_CHARGE, OUTSIDE_SCOPE = "S", "Z", "E", "AE", "O"


@dataclass(frozen=True)
class PlanStep:
    """From `effective_on` on, the account is on `plan` with `billing_cycle`."""

    effective_on: date
    plan: str
    billing_cycle: str


@dataclass(frozen=True)
class TermStep:
    """A dated change of agreed terms; None leaves a field as it was. `effective_on` None: since
    the account started. `tax_exempt` and `exempt_until` change together. `ended_on`: the contract's
    last day of service (a step of its own, since the start); the one recorded last is in force."""

    effective_on: date | None
    seats: int | None = None
    extra_storage_gb: int | None = None
    monthly_fee: Decimal | None = None
    price_per_million_points: Decimal | None = None
    monthly_points_cap: int | None = None
    tax_rate: Decimal | None = None
    tax_exempt: bool | None = None
    exempt_until: date | None = None
    ended_on: date | None = None


@dataclass(frozen=True)
class TaxRegime:
    """The VAT a charge carries: the rate applied (0 unless standard-rated) and its category."""

    rate: Decimal
    category: str


@dataclass(frozen=True)
class Agreed:
    """Every term in force on one day."""

    plan: str
    billing_cycle: str
    # First day of the plan period this day is in: the account's start, or its latest plan change.
    plan_since: date
    seats: int = 0
    extra_storage_gb: int = 0
    monthly_fee: Decimal | None = None
    price_per_million_points: Decimal | None = None
    monthly_points_cap: int | None = None
    tax_rate: Decimal = Decimal("0")
    tax_exempt: bool = False
    exempt_until: date | None = None

    def exempt_on(self, day: date) -> bool:
        return self.tax_exempt and (self.exempt_until is None or day <= self.exempt_until)


@dataclass(frozen=True)
class Parties:
    """Where seller and buyer are, which decides the wording and category of a zero VAT."""

    seller_country: str | None
    buyer_country: str
    buyer_vat_id: str | None = None

    def regime(self, agreed: Agreed, day: date) -> TaxRegime:
        if agreed.exempt_on(day):
            return TaxRegime(Decimal("0"), self.exempt_category())
        if agreed.tax_rate:
            return TaxRegime(agreed.tax_rate, STANDARD)
        return TaxRegime(Decimal("0"), ZERO_RATED)

    def exempt_category(self) -> str:
        """A B2B service to a business registered for VAT in another member state is taxed where
        the customer is, by the customer (Art. 196 VAT Directive): reverse charge. To a customer
        outside the EU it is outside the scope of EU VAT. Any other exemption is an exemption."""
        if self.seller_country is None or self.seller_country.upper() not in EU_COUNTRIES:
            return EXEMPT  # where the seller is decides; unknown, it is a plain exemption
        buyer_country = self.buyer_country.upper()
        if buyer_country not in EU_COUNTRIES:
            return OUTSIDE_SCOPE
        if self.buyer_vat_id and buyer_country != self.seller_country.upper():
            return REVERSE_CHARGE
        return EXEMPT


@dataclass(frozen=True)
class History:
    """An account's starting terms and its dated changes, to ask what was in force on a day."""

    base: Agreed
    plan_steps: tuple[PlanStep, ...] = ()
    term_steps: tuple[TermStep, ...] = ()

    def on(self, day: date) -> Agreed:
        agreed = self.base
        for step in self.plan_steps:
            if step.effective_on <= day:
                agreed = replace(agreed, plan=step.plan, billing_cycle=step.billing_cycle, plan_since=step.effective_on)
        for step in self.term_steps:
            if step.effective_on is None or step.effective_on <= day:
                agreed = _apply(agreed, step)
        return agreed

    @property
    def ended_on(self) -> date | None:
        """The contract's last day of service, None while no end is recorded."""
        ends = [step.ended_on for step in self.term_steps if step.ended_on is not None]
        return ends[-1] if ends else None

    def without(self, plan_steps: Iterable[PlanStep], term_steps: Iterable[TermStep]) -> History:
        """This history less the given steps (each given step removes one equal step)."""
        plans, terms = list(self.plan_steps), list(self.term_steps)
        for step in plan_steps:
            plans.remove(step)
        for step in term_steps:
            terms.remove(step)
        return History(self.base, tuple(plans), tuple(terms))

    def boundaries(self, first: date, last: date) -> list[date]:
        """Days in (first, last] on which something in force may change."""
        days = {s.effective_on for s in self.plan_steps} | {s.effective_on for s in self.term_steps if s.effective_on}
        days |= {s.exempt_until + timedelta(days=1) for s in self.term_steps if s.exempt_until}
        if self.base.exempt_until:
            days.add(self.base.exempt_until + timedelta(days=1))
        return sorted(d for d in days if first < d <= last)

    def pieces(self, first: date, last: date) -> list[tuple[date, date, Agreed]]:
        """[first, last] cut where the terms change, each piece with the terms in force in it."""
        starts = [first, *self.boundaries(first, last)]
        ends = [d - timedelta(days=1) for d in starts[1:]] + [last]
        return [(start, end, self.on(start)) for start, end in zip(starts, ends, strict=True)]


def _apply(agreed: Agreed, step: TermStep) -> Agreed:
    changes = {
        name: getattr(step, name)
        for name in (
            "seats",
            "extra_storage_gb",
            "monthly_fee",
            "price_per_million_points",
            "monthly_points_cap",
            "tax_rate",
        )
        if getattr(step, name) is not None
    }
    if step.tax_exempt is not None:
        changes |= {"tax_exempt": step.tax_exempt, "exempt_until": step.exempt_until}
    return replace(agreed, **changes)


def ordered_plan_steps(steps: Iterable[tuple[int, PlanStep]]) -> tuple[tuple[int, PlanStep], ...]:
    """(id, step) by effective date; of two changes on the same day, the one recorded later (higher
    id) comes later and so wins."""
    return tuple(sorted(steps, key=lambda item: (item[1].effective_on, item[0])))


def ordered_term_steps(steps: Iterable[tuple[int, TermStep]]) -> tuple[tuple[int, TermStep], ...]:
    return tuple(sorted(steps, key=lambda item: (item[1].effective_on or date.min, item[0])))
