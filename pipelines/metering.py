"""Usage events: the billing evidence of every job and login, recorded once per idempotency key."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pipelines.catalog import Catalog, batches
from pipelines.catalog.db import insert_ignoring_duplicates
from pipelines.catalog.models import Account, UsageEvent
from pipelines.errors import InvalidValue

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
            raise InvalidValue("event_id is empty")
        if self.kind not in KINDS:
            raise InvalidValue(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at must carry a time zone (UTC)")
        if self.kind == "classification":
            if self.status not in STATUSES:
                raise InvalidValue(f"status {self.status!r} is not one of {', '.join(STATUSES)}")
            if self.points < 0:
                raise InvalidValue(f"points {self.points} is negative")


@dataclass(frozen=True)
class RecordResult:
    new: int
    known: int


def write_usage(session: Session, records: Sequence[UsageRecord]) -> list[UsageRecord]:
    """Insert the events whose event_id is new (the first occurrence wins) and move logins'
    accounts forward; returns the new events. Runs inside the caller's transaction."""
    unique: dict[str, UsageRecord] = {}
    for record in records:
        unique.setdefault(record.event_id, record)
    ids = list(unique)
    existing: set[str] = set()
    for chunk in batches(ids):
        existing.update(session.scalars(select(UsageEvent.event_id).where(UsageEvent.event_id.in_(chunk))))
    fresh = [record for event_id, record in unique.items() if event_id not in existing]
    # A concurrent writer may insert the same id between the check and here: skip, never bill twice.
    statement = insert_ignoring_duplicates(session, UsageEvent, ["event_id"])
    rows = [asdict(record) for record in fresh]
    for chunk in batches(rows):
        session.execute(statement, chunk)
    last_login: dict[str, datetime] = {}
    for record in fresh:
        if record.kind == "login" and (
            record.account_id not in last_login or record.occurred_at > last_login[record.account_id]
        ):
            last_login[record.account_id] = record.occurred_at
    for account_id, when in last_login.items():
        session.execute(
            update(Account)
            .where(Account.account_id == account_id)
            .where(Account.last_login_at.is_(None) | (Account.last_login_at < when))
            .values(last_login_at=when)
        )
    return fresh


def record_usage(catalog: Catalog, records: Sequence[UsageRecord]) -> RecordResult:
    """Record events once per event_id; a replay of a known id is counted as known, not billed."""
    records = list(records)
    with catalog.session() as session:
        fresh = write_usage(session, records)
    return RecordResult(len(fresh), len(records) - len(fresh))
