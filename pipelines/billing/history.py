"""Dated plan and term changes in the catalog: recording them, and reading what an account had
agreed on a day (for invoicing, and for admission, which applies a plan's limits from its date).

Changes are only ever added. A change dated in a month that is already invoiced is recorded like
any other: an issued invoice is never edited, so the next monthly run corrects the invoiced months
on its invoice (`change_billing` records which run took each change into account).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import date, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipelines.billing.models import BillingCoverage, BillingRun, PlanChange, TermChange
from pipelines.billing.periods import Period
from pipelines.billing.pricebook import PlanLimits, PriceBook, plan_limits
from pipelines.billing.terms import Agreed, History, PlanStep, TermStep, ordered_plan_steps, ordered_term_steps
from pipelines.catalog import Catalog, UnknownAccountError
from pipelines.catalog.models import Account, BillingCycle
from pipelines.errors import UserError


class ChangeRefused(UserError, ValueError):
    """A plan or term change that cannot be recorded as asked; the message says what to do."""


@dataclass(frozen=True)
class PlanChangeView:
    account_id: str
    effective_on: date
    plan: str
    billing_cycle: str
    previous_plan: str
    previous_billing_cycle: str
    # False when the account was already on this plan and cycle from that day: nothing recorded.
    recorded: bool
    # The invoiced months the change reaches into, which the next monthly run corrects.
    corrects: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "effective_on": self.effective_on.isoformat(),
            "corrects": list(self.corrects),
        }


def correction_note(months: Sequence[str]) -> str:
    """What the commands say about a change dated in invoiced months."""
    if len(months) == 1:
        return f"{months[0]} is invoiced already: the next monthly run corrects it on its invoice"
    return f"{months[0]} to {months[-1]} are invoiced already: the next monthly run corrects them on its invoice"


# --- reading --------------------------------------------------------------------------------------


def last_invoiced_period(session: Session) -> Period | None:
    label = session.scalar(select(func.max(BillingRun.period)))
    return None if label is None else Period.parse(label)


def invoiced_since(session: Session, account_id: str, day: date) -> tuple[str, ...]:
    """The account's invoiced months from the month of `day` on, oldest first: those a run has
    covered for it. A month invoiced before the account was added is not one: its run for the
    account, still to come, bills the change as it is."""
    return tuple(
        session.scalars(
            select(BillingCoverage.period)
            .where(BillingCoverage.account_id == account_id, BillingCoverage.period >= Period.of(day).label)
            .order_by(BillingCoverage.period)
        )
    )


def first_open_day(session: Session) -> date | None:
    """The first day of the first month after the latest invoiced one; None if none is invoiced."""
    last = last_invoiced_period(session)
    return None if last is None else last.next().first_day


def _plan_steps(session: Session, account_ids: Iterable[str] | None) -> dict[str, list[PlanChange]]:
    query = select(PlanChange)
    if account_ids is not None:
        query = query.where(PlanChange.account_id.in_(list(account_ids)))
    found: dict[str, list[PlanChange]] = defaultdict(list)
    for change in session.scalars(query.order_by(PlanChange.effective_on, PlanChange.id)):
        found[change.account_id].append(change)
    return found


def _term_steps(session: Session, account_ids: Iterable[str] | None) -> dict[str, list[tuple[int, TermStep]]]:
    query = select(TermChange)
    if account_ids is not None:
        query = query.where(TermChange.account_id.in_(list(account_ids)))
    found: dict[str, list[tuple[int, TermStep]]] = defaultdict(list)
    names = [f.name for f in fields(TermStep)]
    for change in session.scalars(query):
        found[change.account_id].append((change.id, TermStep(**{name: getattr(change, name) for name in names})))
    return found


@dataclass(frozen=True)
class AccountHistory:
    """An account's first plan and cycle, and its dated plan and term changes (with the ids of
    their rows, in the same order)."""

    plan: str
    billing_cycle: str
    plan_steps: tuple[PlanStep, ...]
    term_steps: tuple[TermStep, ...]
    plan_ids: tuple[int, ...] = ()
    term_ids: tuple[int, ...] = ()


def histories(session: Session, accounts: Iterable[Account]) -> dict[str, AccountHistory]:
    """Every given account's history, in two queries."""
    accounts = list(accounts)
    ids = None if len(accounts) > 500 else [a.account_id for a in accounts]
    plans, terms = _plan_steps(session, ids), _term_steps(session, ids)
    result = {}
    for account in accounts:
        changes = plans.get(account.account_id, [])
        # Before its first recorded change the account was on that change's previous plan.
        first = changes[0] if changes else None
        plan, cycle = (
            (first.previous_plan, first.previous_billing_cycle) if first else (account.plan, account.billing_cycle)
        )
        plan_ids, steps = _unzip(
            ordered_plan_steps((c.id, PlanStep(c.effective_on, c.plan, c.billing_cycle)) for c in changes)
        )
        term_ids, term_steps = _unzip(ordered_term_steps(terms.get(account.account_id, [])))
        result[account.account_id] = AccountHistory(plan, cycle, steps, term_steps, plan_ids, term_ids)
    return result


def _unzip(pairs: tuple[tuple[int, Any], ...]) -> tuple[tuple[int, ...], tuple[Any, ...]]:
    return tuple(i for i, _ in pairs), tuple(step for _, step in pairs)


def account_history(session: Session, account: Account) -> History:
    found = histories(session, [account])[account.account_id]
    base = Agreed(
        plan=found.plan,
        billing_cycle=found.billing_cycle,
        plan_since=account.started_at,
        tax_rate=account.tax_rate,
        tax_exempt=account.tax_exempt,
    )
    return History(base, found.plan_steps, found.term_steps)


def agreed_on(catalog: Catalog, account_id: str, day: date) -> Agreed:
    """What the account had agreed on `day`: plan, cycle, seats, storage, prices, cap, VAT."""
    with catalog.session() as session:
        account = session.get(Account, account_id)
        if account is None:
            raise UnknownAccountError(account_id)
        return account_history(session, account).on(day)


def account_limits(catalog: Catalog, pricebook: PriceBook, account_id: str, day: date) -> tuple[str, PlanLimits]:
    """The plan in force on `day` and the limits admission enforces then: an agreed points cap
    replaces the plan's, and extra storage bought then raises the plan's storage limit (which is
    also the monthly upload limit) by as many GB."""
    return agreed_limits(pricebook, agreed_on(catalog, account_id, day), day)


def agreed_limits(pricebook: PriceBook, agreed: Agreed, day: date) -> tuple[str, PlanLimits]:
    """`account_limits` of what the account had agreed on `day`, for a caller that read it already."""
    limits = plan_limits(pricebook, agreed.plan, day)
    if agreed.monthly_points_cap is not None:
        limits = replace(limits, monthly_points_cap=agreed.monthly_points_cap)
    if limits.storage_limit_gb is not None and agreed.extra_storage_gb:
        limits = replace(limits, storage_limit_gb=limits.storage_limit_gb + agreed.extra_storage_gb)
    return agreed.plan, limits


# --- recording ------------------------------------------------------------------------------------


def record_plan_change(
    catalog: Catalog,
    pricebook: PriceBook | None,
    account_id: str,
    plan: str,
    effective_on: date,
    billing_cycle: str | None = None,
    session: Session | None = None,
) -> PlanChangeView:
    """Record that the account is on `plan` from `effective_on` (00:00 UTC; that day is the new
    plan's). The cycle stays as it is unless given. Recording the plan already in force from that
    day records nothing. With a price book, a plan it does not list is refused. A date in a month
    already invoiced is recorded too: the next monthly run corrects the invoiced months."""
    if pricebook is not None:
        pricebook.terms(plan, effective_on)
    if billing_cycle is not None and billing_cycle not in {c.value for c in BillingCycle}:
        raise ChangeRefused(f"billing cycle {billing_cycle!r} is not one of {', '.join(c.value for c in BillingCycle)}")
    if session is None:
        with catalog.session() as own:
            return record_plan_change(catalog, pricebook, account_id, plan, effective_on, billing_cycle, own)
    account = session.get(Account, account_id)
    if account is None:
        raise UnknownAccountError(account_id)
    history = account_history(session, account)
    then = history.on(effective_on)
    cycle = billing_cycle or then.billing_cycle
    if (then.plan, then.billing_cycle) == (plan, cycle):
        return PlanChangeView(account_id, effective_on, plan, cycle, then.plan, then.billing_cycle, recorded=False)
    last = last_invoiced_period(session)
    if (
        effective_on <= account.started_at
        and not history.plan_steps
        and (last is None or last.last_day < account.started_at)
    ):
        # Nothing else was ever agreed nor invoiced: the account simply starts on this plan.
        account.plan, account.billing_cycle = plan, cycle
        return PlanChangeView(account_id, effective_on, plan, cycle, then.plan, then.billing_cycle, recorded=True)
    previous = history.on(effective_on - timedelta(days=1))
    session.add(
        PlanChange(
            account_id=account_id,
            effective_on=effective_on,
            plan=plan,
            billing_cycle=cycle,
            previous_plan=previous.plan,
            previous_billing_cycle=previous.billing_cycle,
        )
    )
    session.flush()
    # accounts.plan is the plan of the latest change, whatever its date.
    latest = account_history(session, account).on(date.max)
    account.plan, account.billing_cycle = latest.plan, latest.billing_cycle
    return PlanChangeView(
        account_id,
        effective_on,
        plan,
        cycle,
        previous.plan,
        previous.billing_cycle,
        recorded=True,
        corrects=invoiced_since(session, account_id, max(effective_on, account.started_at)),
    )


DATED_TERMS = (
    "seats",
    "extra_storage_gb",
    "monthly_fee",
    "price_per_million_points",
    "monthly_points_cap",
    "tax_rate",
    "tax_exempt",
    "exempt_until",
)


def record_term_change(
    session: Session, account: Account, values: dict[str, Any], effective_on: date | None
) -> tuple[date | None, History]:
    """Record a dated change of agreed terms. Without a date it applies from the first month not
    invoiced yet (since the start when none is); a date in an invoiced month is corrected by the
    next monthly run. Returns the date used and the new history."""
    if "exempt_until" in values and "tax_exempt" not in values:
        values = {**values, "tax_exempt": True}
    if values.get("tax_exempt") is False and values.get("exempt_until") is not None:
        raise ChangeRefused(
            "an exemption's valid-until date needs the exemption: drop --exempt-until or the --no-tax-exempt"
        )
    if effective_on is None:
        effective_on = first_open_day(session)
    session.add(TermChange(account_id=account.account_id, effective_on=effective_on, **values))
    session.flush()
    return effective_on, account_history(session, account)


def record_contract_end(session: Session, account: Account, ended_on: date) -> History:
    """Record the contract's last day of service (`billing_terms.ended_on` holds the latest). Like
    a dated change, an end in an invoiced month is corrected by the next monthly run: the days
    between the end known before and this one are charged or credited. Returns the new history."""
    session.add(TermChange(account_id=account.account_id, effective_on=None, ended_on=ended_on))
    session.flush()
    return account_history(session, account)
