"""Catalog tables: accounts, stored files, jobs and usage events."""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from pipelines.catalog.types import ExactDecimal, UTCDateTime


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Plan(str, enum.Enum):
    FREE = "free"
    TRIAL = "trial"
    PROFESSIONAL = "professional"
    PROFESSIONAL_SHARING = "professional_sharing"
    API = "api"


class BillingCycle(str, enum.Enum):
    MONTHLY = "monthly"
    QUARTERLY = "quarterly"
    YEARLY = "yearly"


class Account(Base):
    __tablename__ = "accounts"

    account_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(320))
    country: Mapped[str] = mapped_column(String(2))
    plan: Mapped[str] = mapped_column(String(32))
    billing_cycle: Mapped[str] = mapped_column(String(16), default=BillingCycle.MONTHLY.value)
    started_at: Mapped[date] = mapped_column(Date)
    tax_rate: Mapped[Decimal] = mapped_column(ExactDecimal, default=Decimal("0"))
    tax_exempt: Mapped[bool] = mapped_column(Boolean, default=False)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The buyer on invoices (optional): postal address and VAT ID.
    street: Mapped[str | None] = mapped_column(String(200), nullable=True)
    postcode: Mapped[str | None] = mapped_column(String(20), nullable=True)
    city: Mapped[str | None] = mapped_column(String(100), nullable=True)
    vat_id: Mapped[str | None] = mapped_column(String(20), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    files: Mapped[list[StoredFile]] = relationship(back_populates="account")


class FileState(str, enum.Enum):
    STORED = "stored"
    VALIDATED = "validated"
    QUARANTINED = "quarantined"


class StoredFile(Base):
    __tablename__ = "files"
    # The same bytes uploaded twice by one account are one file: ingest retries converge on it.
    __table_args__ = (UniqueConstraint("account_id", "sha256", name="uq_files_account_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"), index=True)
    key: Mapped[str] = mapped_column(String(1024), unique=True)
    original_name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    point_count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    min_x: Mapped[float | None] = mapped_column(Float, nullable=True)
    min_y: Mapped[float | None] = mapped_column(Float, nullable=True)
    min_z: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_x: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_y: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_z: Mapped[float | None] = mapped_column(Float, nullable=True)
    crs: Mapped[str | None] = mapped_column(Text, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=FileState.STORED.value)
    report_key: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    account: Mapped[Account] = relationship(back_populates="files")


class JobState(str, enum.Enum):
    RECEIVED = "received"
    VALIDATED = "validated"
    QUARANTINED = "quarantined"
    CLASSIFYING = "classifying"
    CLASSIFIED = "classified"
    EXPORTED = "exported"
    FAILED = "failed"
    ABORTED = "aborted"


TERMINAL_JOB_STATES = frozenset({JobState.QUARANTINED, JobState.EXPORTED, JobState.FAILED, JobState.ABORTED})

# A retried task re-enters the state it was in (for example classifying -> classifying), so
# self-transitions of non-terminal states are allowed; everything else not listed is a bug.
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.RECEIVED: frozenset({JobState.VALIDATED, JobState.QUARANTINED, JobState.FAILED, JobState.ABORTED}),
    JobState.VALIDATED: frozenset({JobState.CLASSIFYING, JobState.FAILED, JobState.ABORTED}),
    # Points the validation's sample did not cover are checked while classifying: a bad file is
    # still quarantined then.
    JobState.CLASSIFYING: frozenset({JobState.CLASSIFIED, JobState.QUARANTINED, JobState.FAILED, JobState.ABORTED}),
    JobState.CLASSIFIED: frozenset({JobState.EXPORTED, JobState.FAILED, JobState.ABORTED}),
    JobState.EXPORTED: frozenset(),
    JobState.QUARANTINED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.ABORTED: frozenset(),
}


class Job(Base):
    __tablename__ = "jobs"
    # Partial indexes: the nightly sweep reads the few jobs still to meter, or whose working
    # objects a legal hold kept, never every job ever run.
    __table_args__ = (
        Index(
            "ix_jobs_unmetered",
            "finished_at",
            sqlite_where=text("metered_at IS NULL"),
            postgresql_where=text("metered_at IS NULL"),
        ),
        Index(
            "ix_jobs_working_objects_held",
            "working_objects_held_at",
            sqlite_where=text("working_objects_held_at IS NOT NULL"),
            postgresql_where=text("working_objects_held_at IS NOT NULL"),
        ),
    )

    job_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"), index=True)
    file_id: Mapped[int | None] = mapped_column(ForeignKey("files.id"), nullable=True)
    source: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=JobState.RECEIVED.value)
    classifier: Mapped[str] = mapped_column(String(128))
    classifier_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    classifier_params: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    points_processed: Mapped[int] = mapped_column(BigInteger, default=0)
    classified_key: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    export_prefix: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    report_key: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    # Classification figures and validation warnings, as the manifest reports them.
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Set by `pointflow jobs abort` (pipelines.abort): the running classification stops between tiles.
    abort_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # When its usage event was recorded, in the same transaction (steps.meter): a finished job
    # without it is metered by the nightly sweep however old, and never again once its event has
    # been deleted at the end of the usage records' retention.
    metered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Set when the stale-job sweep closed it while the account was on legal hold, keeping its
    # working objects; cleared by the first sweep after the release, which removes them.
    working_objects_held_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class UsageEvent(Base):
    """Billing evidence. Never holds point data; kept after the data itself is deleted."""

    __tablename__ = "usage_events"

    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    points: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    classifier: Mapped[str | None] = mapped_column(String(128), nullable=True)
    classifier_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    filename: Mapped[str | None] = mapped_column(String(255), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # When the event reached the catalog (billing marks the events it bills instead of reading this).
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class SentMessage(Base):
    """Every customer e-mail we sent, once per idempotency key (invoice, notice, ...)."""

    __tablename__ = "sent_messages"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    recipient: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(Text)
    message_id: Mapped[str] = mapped_column(String(255))
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class MessageClaim(Base):
    """A message one process is sending right now: claimed before sending, dropped when it is
    recorded in sent_messages (or refused). One row per key, so two senders cannot both send."""

    __tablename__ = "message_claims"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(255))  # a resend after a crash reuses it
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime)


class TrainedModelRecord(Base):
    """A customer's trained classifier; its bytes and evaluation live in the account's models area."""

    __tablename__ = "trained_models"
    __table_args__ = (UniqueConstraint("account_id", "version", name="uq_trained_models_account_version"),)

    model_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    evaluation: Mapped[dict[str, Any]] = mapped_column(JSON)
    training_files: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # A deleted model's row stays as a tombstone (its bytes and training files' names are gone), so
    # a version is never given out twice and a job's manifest that names one can still be traced.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class IntakeClaim(Base):
    """One version of one object found in a drop zone (pipelines.intake): the first sweep to
    insert it owns it, so overlapping sweeps and retried sensing tasks start one job per version."""

    __tablename__ = "intake_claims"
    __table_args__ = (UniqueConstraint("source_key", "version", name="uq_intake_claims_source_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source_key: Mapped[str] = mapped_column(String(1024))
    version: Mapped[str] = mapped_column(String(255))
    account_id: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[str] = mapped_column(String(128))
    # claimed (a sweep is registering it), registered (its job holds the file), superseded (replaced
    # while it was registered: the new version is claimed anew), refused (kept in the drop zone,
    # the customer told why)
    state: Mapped[str] = mapped_column(String(16), default="claimed")
    owner: Mapped[str] = mapped_column(String(255))  # the sweep working on it: a DAG run, a CLI process
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
