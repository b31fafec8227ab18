"""Billing tables: per-account terms and their dated history, plan changes, monthly runs, invoices
and their lines, payments, outages, credit notes and disputes. Money and rates are `ExactDecimal`;
instants are `UTCDateTime`.

Issued invoices are never updated: corrections are credit notes that reference them. Plan and term
changes are only ever added: what was known when a month was invoiced can always be told apart
from what was learnt later.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import BigInteger, Boolean, Date, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from pipelines.catalog.models import Base, utcnow
from pipelines.catalog.types import ExactDecimal, UTCDateTime


class BillingTerms(Base):
    """Per-account extras agreed beyond the plan, as they stand after every recorded change (what
    `billing terms` prints), and the contract end. Invoicing reads the dated `TermChange` rows."""

    __tablename__ = "billing_terms"

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"), primary_key=True)
    seats: Mapped[int] = mapped_column(Integer, default=0)
    extra_storage_gb: Mapped[int] = mapped_column(Integer, default=0)
    monthly_fee: Mapped[Decimal | None] = mapped_column(ExactDecimal, nullable=True)
    price_per_million_points: Mapped[Decimal | None] = mapped_column(ExactDecimal, nullable=True)
    monthly_points_cap: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Last day of service (inclusive); the subscription is prorated up to it.
    ended_on: Mapped[date | None] = mapped_column(Date, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class PlanChange(Base):
    """A dated change of an account's plan (and billing cycle). `accounts.plan` holds the plan of the
    latest change; `previous_*` hold what was in force before it, so the plan on any day is known
    even for accounts whose first plan was never recorded here."""

    __tablename__ = "plan_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"), index=True)
    # First day on the new plan (00:00 UTC): the change day belongs to the new plan.
    effective_on: Mapped[date] = mapped_column(Date)
    plan: Mapped[str] = mapped_column(String(32))
    billing_cycle: Mapped[str] = mapped_column(String(16))
    previous_plan: Mapped[str] = mapped_column(String(32))
    previous_billing_cycle: Mapped[str] = mapped_column(String(16))
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TermChange(Base):
    """A dated change of an account's agreed terms; fields left NULL keep their earlier value.
    effective_on NULL: in force since the account started."""

    __tablename__ = "term_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"), index=True)
    effective_on: Mapped[date | None] = mapped_column(Date, nullable=True)
    seats: Mapped[int | None] = mapped_column(Integer, nullable=True)
    extra_storage_gb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    monthly_fee: Mapped[Decimal | None] = mapped_column(ExactDecimal, nullable=True)
    price_per_million_points: Mapped[Decimal | None] = mapped_column(ExactDecimal, nullable=True)
    monthly_points_cap: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    tax_rate: Mapped[Decimal | None] = mapped_column(ExactDecimal, nullable=True)
    tax_exempt: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    # Last day the exemption is valid (inclusive); from the next day the rate applies.
    exempt_until: Mapped[date | None] = mapped_column(Date, nullable=True)
    # The contract's last day of service (inclusive), recorded with effective_on NULL: the end
    # recorded last is the contract's (billing_terms.ended_on), the earlier ones what was known before.
    ended_on: Mapped[date | None] = mapped_column(Date, nullable=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BillingRun(Base):
    """One row per invoiced month, written by its first run (a later run of the month may invoice
    accounts that run did not cover: `billing_coverage`)."""

    __tablename__ = "billing_runs"

    period: Mapped[str] = mapped_column(String(7), primary_key=True)
    # The price book of the first run.
    pricebook_sha256: Mapped[str] = mapped_column(String(64))
    # The month's invoices so far.
    invoice_count: Mapped[int] = mapped_column(Integer, default=0)
    # The first run's `now` (the day it issued on); before revision 0020, when that run started.
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BillingCoverage(Base):
    """Which accounts a month's invoicing has dealt with: one row per account and month, written
    with the account's invoice for the month, or alone when it had nothing to charge. An account
    with no row for an invoiced month (added after that month's run, with an earlier start) is
    invoiced for it by the next run of that month or of a later one; one with a row never is again."""

    __tablename__ = "billing_coverage"

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"), primary_key=True)
    period: Mapped[str] = mapped_column(ForeignKey("billing_runs.period"), primary_key=True)
    # The month whose run covered it: `period` itself, or a later month's run catching up; that
    # run's delivery publishes and mails the invoice.
    run_period: Mapped[str] = mapped_column(ForeignKey("billing_runs.period"), index=True)
    # The covering run's `now`.
    covered_at: Mapped[datetime] = mapped_column(UTCDateTime)


class UsageBilling(Base):
    """Which invoice billed a usage event: its account's invoice for the event's own month, or, for
    an event that arrived after that invoice was issued, its account's next one (as usage received
    late), named by that invoice's month. Every billed event has a row; an event is billed once."""

    __tablename__ = "usage_billing"

    event_id: Mapped[str] = mapped_column(ForeignKey("usage_events.event_id"), primary_key=True)
    period: Mapped[str] = mapped_column(ForeignKey("billing_runs.period"), index=True)


class ChangeBilling(Base):
    """Which month's run first took a dated plan or term change into account: the run of the month
    it takes effect in when it was recorded in time, else the next run after it was recorded, which
    corrects the months already invoiced (an issued invoice is never edited). A change is taken
    into account once."""

    __tablename__ = "change_billing"

    # "plan" (plan_changes.id) or "terms" (term_changes.id).
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    change_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    period: Mapped[str] = mapped_column(ForeignKey("billing_runs.period"), index=True)


class OutageBilling(Base):
    """Which month's run first took an outage into account: the run of a month it falls in when it
    was recorded in time, else the first run after it was recorded, which credits the months already
    invoiced that it falls in (an issued invoice is never edited). An outage is taken into account once."""

    __tablename__ = "outage_billing"

    outage_id: Mapped[int] = mapped_column(ForeignKey("outages.id"), primary_key=True)
    period: Mapped[str] = mapped_column(ForeignKey("billing_runs.period"), index=True)


class Invoice(Base):
    __tablename__ = "invoices"
    __table_args__ = (
        UniqueConstraint("account_id", "period", name="uq_invoices_account_period"),
        UniqueConstraint("period", "sequence", name="uq_invoices_period_sequence"),
    )

    invoice_number: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"), index=True)
    period: Mapped[str] = mapped_column(ForeignKey("billing_runs.period"), index=True)
    sequence: Mapped[int] = mapped_column(Integer)
    currency: Mapped[str] = mapped_column(String(3))
    issue_date: Mapped[date] = mapped_column(Date)
    due_date: Mapped[date] = mapped_column(Date)
    # The rate actually applied: 0 for a tax-exempt account. Credit notes reuse it.
    tax_rate: Mapped[Decimal] = mapped_column(ExactDecimal)
    subtotal: Mapped[Decimal] = mapped_column(ExactDecimal)
    taxable_subtotal: Mapped[Decimal] = mapped_column(ExactDecimal)
    tax: Mapped[Decimal] = mapped_column(ExactDecimal)
    total: Mapped[Decimal] = mapped_column(ExactDecimal)
    # Earlier credit consumed by this invoice (its "credit" line, as a positive amount).
    credit_applied: Mapped[Decimal] = mapped_column(ExactDecimal)
    # Credit still available for later invoices after this one (NULL on invoices issued before it was kept).
    credit_remaining: Mapped[Decimal | None] = mapped_column(ExactDecimal, nullable=True)
    # Seller and buyer as issued (JSON, `documents.parties_json`): the documents show them, not the
    # account's or price book's current data. NULL on invoices issued before they were kept.
    parties: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    lines: Mapped[list[InvoiceLine]] = relationship(order_by="InvoiceLine.position", lazy="selectin")


class InvoiceLine(Base):
    __tablename__ = "invoice_lines"

    invoice_number: Mapped[str] = mapped_column(ForeignKey("invoices.invoice_number"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(String(300))
    quantity: Mapped[Decimal] = mapped_column(ExactDecimal)
    unit_price: Mapped[Decimal] = mapped_column(ExactDecimal)
    amount: Mapped[Decimal] = mapped_column(ExactDecimal)
    taxable: Mapped[bool] = mapped_column(Boolean)
    # The line's own VAT: rate applied (0 when exempt) and EN 16931 category (S, Z, E, AE, O).
    # NULL on lines issued before rates could change within a month: the invoice's rate applies.
    tax_rate: Mapped[Decimal | None] = mapped_column(ExactDecimal, nullable=True)
    tax_category: Mapped[str | None] = mapped_column(String(2), nullable=True)
    # Item price base quantity (EN 16931 BT-149): unit_price is for this many units; NULL: 1.
    base_quantity: Mapped[Decimal | None] = mapped_column(ExactDecimal, nullable=True)


class Payment(Base):
    __tablename__ = "payments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # The file's payment_id, or account|invoice|amount|paid_at: re-importing a file adds nothing.
    payment_key: Mapped[str] = mapped_column(String(300), unique=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"), index=True)
    invoice_number: Mapped[str | None] = mapped_column(ForeignKey("invoices.invoice_number"), nullable=True)
    amount: Mapped[Decimal] = mapped_column(ExactDecimal)
    paid_at: Mapped[datetime] = mapped_column(UTCDateTime)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Outage(Base):
    """A service-wide outage. Scheduled maintenance announced early enough is kept but not counted."""

    __tablename__ = "outages"
    __table_args__ = (UniqueConstraint("started_at", "ended_at", name="uq_outages_interval"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime] = mapped_column(UTCDateTime)
    scheduled: Mapped[bool] = mapped_column(Boolean, default=False)
    announced_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CreditNote(Base):
    __tablename__ = "credit_notes"
    # The same credit (invoice, amount, reason) given twice is one credit note: replays are safe.
    __table_args__ = (UniqueConstraint("invoice_number", "amount", "reason", name="uq_credit_notes_replay"),)

    credit_note_number: Mapped[str] = mapped_column(String(40), primary_key=True)
    invoice_number: Mapped[str] = mapped_column(ForeignKey("invoices.invoice_number"), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"), index=True)
    issued_on: Mapped[date] = mapped_column(Date)
    amount: Mapped[Decimal] = mapped_column(ExactDecimal)
    tax: Mapped[Decimal] = mapped_column(ExactDecimal)
    total: Mapped[Decimal] = mapped_column(ExactDecimal)
    reason: Mapped[str] = mapped_column(String(500))
    # Seller and buyer as issued, like invoices.parties.
    parties: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    lines: Mapped[list[CreditNoteLine]] = relationship(order_by="CreditNoteLine.position", lazy="selectin")


class CreditNoteLine(Base):
    """What a credit note reverses, with the VAT the reversed invoice line had: a credit note mirrors
    the lines it credits. Credit notes issued before these rows were kept have none (the invoice's
    rate applied)."""

    __tablename__ = "credit_note_lines"

    credit_note_number: Mapped[str] = mapped_column(ForeignKey("credit_notes.credit_note_number"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The invoice line it reverses (invoice_lines.position); NULL: the invoice's lines, all of one VAT.
    invoice_position: Mapped[int | None] = mapped_column(Integer, nullable=True)
    description: Mapped[str] = mapped_column(String(300))
    amount: Mapped[Decimal] = mapped_column(ExactDecimal)
    taxable: Mapped[bool] = mapped_column(Boolean)
    tax_rate: Mapped[Decimal] = mapped_column(ExactDecimal)
    # EN 16931 category (S, Z, E, AE, O); NULL for a finance charge (no VAT, not a supply).
    tax_category: Mapped[str | None] = mapped_column(String(2), nullable=True)


class Dispute(Base):
    __tablename__ = "disputes"
    __table_args__ = (UniqueConstraint("invoice_number", "reason", name="uq_disputes_replay"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    invoice_number: Mapped[str] = mapped_column(ForeignKey("invoices.invoice_number"), index=True)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime)
    reason: Mapped[str] = mapped_column(String(500))
    billing_error: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
