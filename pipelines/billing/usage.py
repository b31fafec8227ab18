"""Usage figures from the metering events, aggregated in the database: what a month bills, what an
account has used against its monthly cap, and points per account and day for the UI."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import Date, and_, cast, func, insert, literal, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from pipelines.billing.history import account_limits
from pipelines.billing.models import UsageBilling
from pipelines.billing.periods import Period, start_of
from pipelines.billing.pricebook import PriceBook
from pipelines.catalog import Catalog, CatalogError, batches
from pipelines.catalog.models import UsageEvent

# A failed job's points are not billed; an aborted job's points were processed and are billed.
BILLABLE_STATUSES = ("succeeded", "aborted")
CLASSIFICATION = "classification"


class PointsCapExceededError(CatalogError):
    """A job would take an account past its monthly points cap; it is refused at admission."""


def billable_points_by_account(
    session: Session, start: datetime, end: datetime, billed_by: Period | None = None
) -> dict[str, int]:
    """Billable points per account for events with start <= occurred_at < end (UTC); with
    `billed_by`, only the events that month's invoices bill (see `mark_usage`)."""
    query = (
        select(UsageEvent.account_id, func.sum(UsageEvent.points))
        .where(UsageEvent.kind == CLASSIFICATION)
        .where(UsageEvent.status.in_(BILLABLE_STATUSES))
        .where(UsageEvent.occurred_at >= start)
        .where(UsageEvent.occurred_at < end)
        .group_by(UsageEvent.account_id)
    )
    if billed_by is not None:
        query = query.join(UsageBilling, UsageBilling.event_id == UsageEvent.event_id).where(
            UsageBilling.period == billed_by.label
        )
    return {account_id: int(points or 0) for account_id, points in session.execute(query)}


def mark_usage(session: Session, period: Period, account_ids: Sequence[str], invoiced: Iterable[Period]) -> None:
    """Mark the events that `period`'s invoices of `account_ids` bill, before they are summed:
    every billable event of those accounts that no invoice has billed yet, of `period` itself or
    of one of the `invoiced` months before it (usage received late). Every billed event is marked,
    so what an invoice bills never depends on when events were recorded: an event committed after
    this statement is unmarked, and billed by the account's next invoice."""
    ranges = _merge((month.start, month.end) for month in sorted({*invoiced, period}) if month <= period)
    unbilled = ~select(UsageBilling.event_id).where(UsageBilling.event_id == UsageEvent.event_id).exists()
    for ids in batches(sorted(account_ids)):
        events = (
            select(UsageEvent.event_id, literal(period.label))
            .where(UsageEvent.account_id.in_(ids))
            .where(UsageEvent.kind == CLASSIFICATION)
            .where(UsageEvent.status.in_(BILLABLE_STATUSES))
            .where(or_(*(and_(UsageEvent.occurred_at >= start, UsageEvent.occurred_at < end) for start, end in ranges)))
            .where(unbilled)
        )
        session.execute(insert(UsageBilling).from_select(["event_id", "period"], events))


def _merge(ranges: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    merged: list[tuple[datetime, datetime]] = []
    for start, end in ranges:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def late_points_by_account_day(session: Session, period: Period) -> dict[str, dict[date, int]]:
    """Points that `period`'s invoices bill late (events of earlier months), per account and UTC day."""
    day = _utc_day(session).label("day")
    rows = session.execute(
        select(UsageEvent.account_id, day, func.sum(UsageEvent.points))
        .join(UsageBilling, UsageBilling.event_id == UsageEvent.event_id)
        .where(UsageBilling.period == period.label)
        .where(UsageEvent.occurred_at < period.start)
        .group_by(UsageEvent.account_id, day)
    )
    found: dict[str, dict[date, int]] = {}
    for account_id, value, points in rows:
        found.setdefault(account_id, {})[value if isinstance(value, date) else date.fromisoformat(value)] = int(
            points or 0
        )
    return found


def billed_points_by_day(session: Session, account_id: str, month: Period, excluding: Period) -> dict[date, int]:
    """Billable points of the account per UTC day of `month` that invoices before `excluding`'s
    have billed: the month's billed events but those `excluding`'s invoice bills as usage received late."""
    day = _utc_day(session).label("day")
    rows = session.execute(
        select(day, func.sum(UsageEvent.points))
        .join(UsageBilling, UsageBilling.event_id == UsageEvent.event_id)
        .where(UsageBilling.period != excluding.label)
        .where(UsageEvent.account_id == account_id)
        .where(UsageEvent.kind == CLASSIFICATION)
        .where(UsageEvent.status.in_(BILLABLE_STATUSES))
        .where(UsageEvent.occurred_at >= month.start)
        .where(UsageEvent.occurred_at < month.end)
        .group_by(day)
    )
    return {value if isinstance(value, date) else date.fromisoformat(value): int(points or 0) for value, points in rows}


def _month(month: date | str) -> Period:
    return Period.parse(month) if isinstance(month, str) else Period.of(month)


def points_used_in_month(catalog: Catalog, account_id: str, month: date | str) -> int:
    """Billable points the account used in the calendar month (UTC) of `month` ("2026-10" or a day in it)."""
    period = _month(month)
    with catalog.session() as session:
        total = session.scalar(
            select(func.coalesce(func.sum(UsageEvent.points), 0))
            .where(UsageEvent.account_id == account_id)
            .where(UsageEvent.kind == CLASSIFICATION)
            .where(UsageEvent.status.in_(BILLABLE_STATUSES))
            .where(UsageEvent.occurred_at >= period.start)
            .where(UsageEvent.occurred_at < period.end)
        )
    return int(total or 0)


def monthly_points_cap(catalog: Catalog, pricebook: PriceBook, account_id: str, on: date) -> int | None:
    """The account's cap on `on`: a cap agreed in its terms then, else its plan's then; None = no cap."""
    return account_limits(catalog, pricebook, account_id, on)[1].monthly_points_cap


def points_over_cap(catalog: Catalog, account_id: str, cap: int | None, points: int, at: datetime) -> int | None:
    """The points the account used in `at`'s month (UTC) when a job of `points` would take it past
    `cap`; None when it stays within (or there is no cap)."""
    if cap is None:
        return None
    used = points_used_in_month(catalog, account_id, at.date())
    return used if used + points > cap else None


def check_points_admission(catalog: Catalog, pricebook: PriceBook, account_id: str, points: int, at: datetime) -> None:
    """Raise PointsCapExceededError if a job of `points` at `at` would exceed the month's cap."""
    cap = monthly_points_cap(catalog, pricebook, account_id, at.date())
    used = points_over_cap(catalog, account_id, cap, points, at)
    if used is not None:
        raise PointsCapExceededError(
            f"job refused: account {account_id} has used {used:,} of its {cap:,} points for {Period.of(at.date())}; "
            f"this job needs {points:,} more. The cap resets on the 1st (UTC); ask us to raise it if you need more."
        )


@dataclass(frozen=True)
class UsageDay:
    account_id: str
    day: date
    jobs: int
    billable_points: int
    failed_points: int


def _utc_day(session: Session) -> ColumnElement[date]:
    # SQLite stores the UTC wall clock as text; PostgreSQL must be told to take the day in UTC,
    # not in the session's time zone.
    if session.bind.dialect.name == "sqlite":
        return func.date(UsageEvent.occurred_at)
    return cast(func.timezone("UTC", UsageEvent.occurred_at), Date)


def usage_daily(catalog: Catalog, first_day: date, last_day: date, account_id: str | None = None) -> list[UsageDay]:
    """Classification usage per account and UTC day between two days (inclusive), for the UI."""
    with catalog.session() as session:
        day = _utc_day(session).label("day")
        billable = UsageEvent.status.in_(BILLABLE_STATUSES)
        query = (
            select(
                UsageEvent.account_id,
                day,
                func.count(),
                func.coalesce(func.sum(UsageEvent.points).filter(billable), 0),
                func.coalesce(func.sum(UsageEvent.points).filter(UsageEvent.status == "failed"), 0),
            )
            .where(UsageEvent.kind == CLASSIFICATION)
            .where(UsageEvent.occurred_at >= start_of(first_day))
            .where(UsageEvent.occurred_at < start_of(last_day + timedelta(days=1)))
            .group_by(UsageEvent.account_id, day)
            .order_by(UsageEvent.account_id, day)
        )
        if account_id is not None:
            query = query.where(UsageEvent.account_id == account_id)
        rows = session.execute(query).all()
    return [
        UsageDay(
            account, value if isinstance(value, date) else date.fromisoformat(value), int(jobs), int(ok), int(failed)
        )
        for account, value, jobs, ok, failed in rows
    ]
