"""Usage figures from the metering events, aggregated in the database: what a month bills, what an
account has used against its monthly cap, and points per account and day for the UI."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import Date, cast, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from pipelines.billing.history import account_limits
from pipelines.billing.periods import Period, start_of
from pipelines.billing.pricebook import PriceBook
from pipelines.catalog import Catalog, CatalogError
from pipelines.catalog.models import UsageEvent

# A failed job's points are not billed; an aborted job's points were processed and are billed.
BILLABLE_STATUSES = ("succeeded", "aborted")
CLASSIFICATION = "classification"


class PointsCapExceededError(CatalogError):
    """A job would take an account past its monthly points cap; it is refused at admission."""


def billable_points_by_account(session: Session, start: datetime, end: datetime) -> dict[str, int]:
    """Billable points per account for events with start <= occurred_at < end (UTC)."""
    rows = session.execute(
        select(UsageEvent.account_id, func.sum(UsageEvent.points))
        .where(UsageEvent.kind == CLASSIFICATION)
        .where(UsageEvent.status.in_(BILLABLE_STATUSES))
        .where(UsageEvent.occurred_at >= start)
        .where(UsageEvent.occurred_at < end)
        .group_by(UsageEvent.account_id)
    )
    return {account_id: int(points or 0) for account_id, points in rows}


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


def check_points_admission(catalog: Catalog, pricebook: PriceBook, account_id: str, points: int, at: datetime) -> None:
    """Raise PointsCapExceededError if a job of `points` at `at` would exceed the month's cap."""
    cap = monthly_points_cap(catalog, pricebook, account_id, at.date())
    if cap is None:
        return
    used = points_used_in_month(catalog, account_id, at.date())
    if used + points > cap:
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
        UsageDay(account, value if isinstance(value, date) else date.fromisoformat(value), int(jobs), int(ok), int(failed))
        for account, value, jobs, ok, failed in rows
    ]
