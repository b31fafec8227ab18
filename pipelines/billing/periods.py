"""Billing periods: calendar months in UTC, from the first day 00:00 to the next month's first day."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import TypeVar

from pipelines.errors import InvalidValue

_PERIOD_RE = re.compile(r"^(\d{4})-(\d{2})$")


@dataclass(frozen=True, order=True)
class Period:
    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Period:
        match = _PERIOD_RE.fullmatch(text.strip())
        if not match or not 1 <= int(match.group(2)) <= 12:
            raise InvalidValue(f"period {text!r} is not a month written YYYY-MM, e.g. 2026-10")
        return cls(int(match.group(1)), int(match.group(2)))

    @classmethod
    def of(cls, day: date) -> Period:
        return cls(day.year, day.month)

    @property
    def label(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def days(self) -> int:
        return calendar.monthrange(self.year, self.month)[1]

    @property
    def first_day(self) -> date:
        return date(self.year, self.month, 1)

    @property
    def last_day(self) -> date:
        return date(self.year, self.month, self.days)

    @property
    def start(self) -> datetime:
        return start_of(self.first_day)

    @property
    def end(self) -> datetime:
        """Exclusive: events at exactly this instant belong to the next month."""
        return self.next().start

    def next(self) -> Period:
        return Period(self.year + self.month // 12, self.month % 12 + 1)

    def __str__(self) -> str:
        return self.label


def start_of(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


_Day = TypeVar("_Day", bound=date)


def add_months(day: _Day, months: int) -> _Day:
    """Same day (and time, for a datetime) `months` later, clamped to the month's end (Jan 31 + 1
    month = Feb 28/29): billing cycles and the lifecycle's clocks count months alike."""
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    return day.replace(year=year, month=month + 1, day=min(day.day, calendar.monthrange(year, month + 1)[1]))


def months_between(earlier: date, later: date) -> int:
    """Whole calendar months from `earlier`'s month to `later`'s month."""
    return (later.year - earlier.year) * 12 + later.month - earlier.month


def period_for(logical_date: datetime) -> str:
    """The month ("YYYY-MM") a monthly billing run invoices: the calendar month, in UTC, before
    the month of its logical date.

    billing_monthly runs on a cron *trigger* timetable, whose logical date is the moment it fires
    (02:00 UTC on the 1st), so this is the month that has just ended.
    """
    if logical_date.utcoffset() is None:
        raise ValueError(f"logical date {logical_date.isoformat()} has no time zone: pass an aware datetime")
    day = logical_date.astimezone(UTC).date()
    return Period.of(add_months(day.replace(day=1), -1)).label
