"""Usage figures from the metering events, aggregated in the database: what a month bills, what an
account has used against its monthly cap, and points per account and day for the UI."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import Date, and_, cast, func, insert, literal, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from pipelines.billing.history import account_limits
from pipelines.billing.models import UsageBilling
from pipelines.billing.periods import Period, start_of
from pipelines.billing.pricebook import PriceBook
from pipelines.catalog import Catalog, CatalogError
from pipelines.catalog.models import UsageEvent

# A failed job's points are not billed; an aborted job's points were processed and are billed.
BILLABLE_STATUSES = ("succeeded", "aborted")
CLASSIFICATION = "classification"


class PointsCapExceededError(CatalogError):
    """A job would take an account past its monthly points cap; it is refused at admission."""


# A usage import commits within this long of stamping its events' recorded_at, so an event
# recorded earlier than this before a run started is visible to that run.
COMMIT_MARGIN = timedelta(days=1)


@dataclass(frozen=True)
class Claim:
    """What a month's run bills: every event of its month it can see, its own `period`'s marks
    settling the events recorded since `cutoff` (its start less COMMIT_MARGIN)."""

    period: str
    cutoff: datetime


def billable_points_by_account(
    session: Session, start: datetime, end: datetime, claim: Claim | None = None
) -> dict[str, int]:
    """Billable points per account for events with start <= occurred_at < end (UTC); with a
    `claim`, only the events that month's run bills."""
    query = (
        select(UsageEvent.account_id, func.sum(UsageEvent.points))
        .where(UsageEvent.kind == CLASSIFICATION)
        .where(UsageEvent.status.in_(BILLABLE_STATUSES))
        .where(UsageEvent.occurred_at >= start)
        .where(UsageEvent.occurred_at < end)
        .group_by(UsageEvent.account_id)
    )
    if claim is not None:
        marked = select(UsageBilling.event_id).where(UsageBilling.period == claim.period)
        query = query.where(or_(UsageEvent.recorded_at < claim.cutoff, UsageEvent.event_id.in_(marked)))
    return {account_id: int(points or 0) for account_id, points in session.execute(query)}


def claim_usage(
    session: Session, period: Period, started: datetime, previous_start: datetime | None, invoiced: Iterable[Period]
) -> Claim:
    """Mark the events `period`'s run bills, where marks are needed, before it sums them.

    Events of the month recorded in the last COMMIT_MARGIN before the run are marked: an import
    committing while the run reads could otherwise leave them half seen. Events of an invoiced
    month that no run has billed yet (late usage) can only have been committed after the previous
    run looked, so they are searched among the events recorded since then and marked too. Events
    recorded earlier were seen by their month's run, and need no mark: a month of usage costs a
    run marks for a day's worth of events, not for every event."""
    claim = Claim(period.label, started - COMMIT_MARGIN)
    on_time = (
        select(UsageEvent.event_id, literal(period.label))
        .where(UsageEvent.kind == CLASSIFICATION)
        .where(UsageEvent.status.in_(BILLABLE_STATUSES))
        .where(UsageEvent.occurred_at >= period.start)
        .where(UsageEvent.occurred_at < period.end)
        .where(UsageEvent.recorded_at >= claim.cutoff)
    )
    session.execute(insert(UsageBilling).from_select(["event_id", "period"], on_time))
    ranges = _merge((month.start, month.end) for month in sorted(invoiced))
    if previous_start is None or not ranges:
        return claim
    unbilled = ~select(UsageBilling.event_id).where(UsageBilling.event_id == UsageEvent.event_id).exists()
    late = (
        select(UsageEvent.event_id, literal(period.label))
        .where(UsageEvent.kind == CLASSIFICATION)
        .where(UsageEvent.status.in_(BILLABLE_STATUSES))
        .where(UsageEvent.recorded_at >= previous_start - COMMIT_MARGIN)
        .where(or_(*(and_(UsageEvent.occurred_at >= start, UsageEvent.occurred_at < end) for start, end in ranges)))
        .where(unbilled)
    )
    session.execute(insert(UsageBilling).from_select(["event_id", "period"], late))
    return claim


def _merge(ranges: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    merged: list[tuple[datetime, datetime]] = []
    for start, end in ranges:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def late_points_by_account_day(session: Session, period: Period) -> dict[str, dict[date, int]]:
    """Points that `period`'s run bills late (events of earlier months), per account and UTC day."""
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
    """Billable points of the account per UTC day of `month` that runs before `excluding`'s have
    billed: the month's events but those `excluding`'s run bills as usage received late."""
    day = _utc_day(session).label("day")
    billed_late = select(UsageBilling.event_id).where(UsageBilling.period == excluding.label)
    rows = session.execute(
        select(day, func.sum(UsageEvent.points))
        .where(UsageEvent.account_id == account_id)
        .where(UsageEvent.kind == CLASSIFICATION)
        .where(UsageEvent.status.in_(BILLABLE_STATUSES))
        .where(UsageEvent.occurred_at >= month.start)
        .where(UsageEvent.occurred_at < month.end)
        .where(UsageEvent.event_id.not_in(billed_late))
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
