"""Usage events: the billing evidence of every job and login, recorded once per idempotency key."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite

from pipelines.catalog import Catalog
from pipelines.catalog.models import Account, UsageEvent

KINDS = ("classification", "login")
STATUSES = ("succeeded", "failed", "aborted")


@dataclass(frozen=True)
class UsageRecord:
    event_id: str
    account_id: str
    kind: str
    occurred_at: datetime
    points: int = 0
    status: str | None = None
    classifier: str | None = None
    classifier_version: str | None = None
    filename: str | None = None
    job_id: str | None = None

    def __post_init__(self) -> None:
        if not self.event_id:
            raise ValueError("event_id is empty")
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at must carry a time zone (UTC)")
        if self.kind == "classification":
            if self.status not in STATUSES:
                raise ValueError(f"status {self.status!r} is not one of {', '.join(STATUSES)}")
            if self.points < 0:
                raise ValueError(f"points {self.points} is negative")


@dataclass(frozen=True)
class RecordResult:
    new: int
    known: int


def _insert_ignoring_duplicates(dialect_name: str):
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    return dialect.insert(UsageEvent).on_conflict_do_nothing(index_elements=["event_id"])


def record_usage(catalog: Catalog, records: Iterable[UsageRecord]) -> RecordResult:
    """Insert events whose event_id is new; a replay of a known id is counted as known, not billed."""
    rows = [asdict(r) for r in records]
    if not rows:
        return RecordResult(0, 0)
    new = 0
    with catalog.session() as session:
        statement = _insert_ignoring_duplicates(session.bind.dialect.name)
        for row in rows:
            new += session.connection().execute(statement, row).rowcount
        for row in rows:
            if row["kind"] == "login":
                session.execute(
                    update(Account)
                    .where(Account.account_id == row["account_id"])
                    .where((Account.last_login_at.is_(None)) | (Account.last_login_at < row["occurred_at"]))
                    .values(last_login_at=row["occurred_at"])
                )
    return RecordResult(new, len(rows) - new)


def usage_for_job(catalog: Catalog, job_id: str) -> list[UsageEvent]:
    with catalog.session() as session:
        return list(session.scalars(select(UsageEvent).where(UsageEvent.job_id == job_id)))
