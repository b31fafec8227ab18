"""Lifecycle tables. None has a foreign key to `accounts`: the audit must outlive anything else.

Instants named `*_at` that a rule compares are the run's `as_of` moment (so `--as-of` can
simulate time); `recorded_at` is the wall clock, for the audit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from pipelines.catalog.models import Base, utcnow
from pipelines.catalog.types import UTCDateTime


class LifecycleAction(Base):
    """Every action a run took, once per (account, action, subject): re-runs add nothing."""

    __tablename__ = "lifecycle_actions"
    __table_args__ = (UniqueConstraint("account_id", "action", "subject", name="uq_lifecycle_actions_once"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(255))
    effective_at: Mapped[datetime] = mapped_column(UTCDateTime)
    as_of: Mapped[datetime] = mapped_column(UTCDateTime)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LifecycleNotice(Base):
    """A notice really delivered; `sent_at` starts the clocks that depend on it."""

    __tablename__ = "lifecycle_notices"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)  # also the sent_messages key
    account_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime)
    message_id: Mapped[str] = mapped_column(String(255))
    recipient: Mapped[str] = mapped_column(String(320))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LifecycleDeliveryFailure(Base):
    """A notice the mail server refused; the next run tries again."""

    __tablename__ = "lifecycle_delivery_failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(255), index=True)
    account_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    error: Mapped[str] = mapped_column(Text)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LegalHold(Base):
    """While `released_at` is null, nothing of the account is deleted."""

    __tablename__ = "lifecycle_holds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(64), index=True)
    reason: Mapped[str] = mapped_column(Text)
    placed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Termination(Base):
    """The end of an account's contract and what followed: lock, announcement, deletion."""

    __tablename__ = "lifecycle_terminations"

    account_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(String(32))  # customer, non_payment, inactivity, trial_ended
    effective_at: Mapped[datetime] = mapped_column(UTCDateTime)  # access ends here; data locked from here
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime)
    locked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    announced_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    deletion_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class DeletionAudit(Base):
    """One deletion: written before the first object goes, completed (or failed) after the check;
    interrupted when a later deletion finds it left `started` and finishes it."""

    __tablename__ = "lifecycle_deletions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(64), index=True)
    rule: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    as_of: Mapped[datetime] = mapped_column(UTCDateTime)
    # started, completed, failed; interrupted: its process ended mid-way, `error` names the entry
    # that took over (and lists, with `deleted_by`, the objects this one had removed)
    status: Mapped[str] = mapped_column(String(16))
    object_count: Mapped[int] = mapped_column(Integer)
    version_count: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    objects: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    local_paths: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
