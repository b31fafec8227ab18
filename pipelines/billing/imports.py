"""File imports for billing: usage events (JSONL), payments and outages (CSV).

Every import checks the whole file first and reports each bad line with its number; if any line
is bad nothing is written. Every import is idempotent: a row already known is counted, not added.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipelines.accounts import parse_utc_datetime
from pipelines.billing.models import BillingRun, Invoice, Outage, Payment
from pipelines.billing.periods import Period
from pipelines.catalog import Catalog, batches
from pipelines.catalog.db import insert_ignoring_duplicates
from pipelines.catalog.models import Account
from pipelines.errors import InvalidValue, UserError
from pipelines.metering import UsageRecord, write_usage

_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f", ""}


class ImportFileError(UserError, ValueError):
    """Lines that cannot be imported, each with its number; nothing was written."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        super().__init__(f"{path}: nothing imported: " + "; ".join(shown))


@dataclass(frozen=True)
class ImportResult:
    new: int
    known: int
    # Months already invoiced that new rows fall in: those rows will not be billed by a re-run.
    closed_periods: tuple[str, ...] = field(default_factory=tuple)
    # What becomes of such rows.
    closed_note: str = "the new rows in it are on no invoice (correct with a credit note)"

    def summary(self, what: str) -> str:
        text = f"{what}: {self.new} new, {self.known} already known"
        if self.closed_periods:
            text += f"; note: {', '.join(self.closed_periods)} already invoiced, {self.closed_note}"
        return text


def _closed_periods(session: Session, instants: Iterable[datetime]) -> tuple[str, ...]:
    periods = {Period.of(instant.date()).label for instant in instants}
    if not periods:
        return ()
    return tuple(sorted(session.scalars(select(BillingRun.period).where(BillingRun.period.in_(periods)))))


def _known_accounts(session: Session, account_ids: set[str]) -> set[str]:
    known: set[str] = set()
    for ids in batches(sorted(account_ids)):
        known.update(session.scalars(select(Account.account_id).where(Account.account_id.in_(ids))))
    return known


# --- usage events -------------------------------------------------------------------------------


def parse_usage_line(text: str) -> UsageRecord:
    """One JSONL line to a checked UsageRecord; raises InvalidValue with a reason."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidValue(f"not JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise InvalidValue("not a JSON object")
    for name in ("event_id", "account_id", "occurred_at", "kind"):
        if not isinstance(data.get(name), str) or not data[name].strip():
            raise InvalidValue(f"{name} is missing or not a text")
    try:
        occurred_at = parse_utc_datetime(data["occurred_at"])
    except ValueError:
        raise InvalidValue(f"occurred_at {data['occurred_at']!r} is not an ISO datetime") from None
    points = data.get("points", 0)
    # Points are counted, never measured: a float or a boolean here is a producer bug.
    if isinstance(points, bool) or not isinstance(points, int):
        raise InvalidValue(f"points {points!r} is not a whole number")
    if data["kind"] == "classification" and "points" not in data:
        raise InvalidValue("a classification event needs points")
    optional = {name: data.get(name) for name in ("status", "classifier", "classifier_version", "filename", "job_id")}
    for name, value in optional.items():
        if value is not None and not isinstance(value, str):
            raise InvalidValue(f"{name} {value!r} is not a text")
    return UsageRecord(
        event_id=data["event_id"].strip(),
        account_id=data["account_id"].strip(),
        kind=data["kind"],
        occurred_at=occurred_at,
        points=points,
        **optional,
    )


def read_usage_jsonl(path: Path) -> list[tuple[int, UsageRecord]]:
    """All events of a file with their line numbers; blank lines are skipped."""
    records: list[tuple[int, UsageRecord]] = []
    problems: list[str] = []
    with open(path, encoding="utf-8-sig") as handle:  # a byte order mark (Windows editors) is fine
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                records.append((number, parse_usage_line(text)))
            except ValueError as error:
                problems.append(f"line {number}: {error}")
    if problems:
        raise ImportFileError(path, problems)
    return records


def import_usage(
    catalog: Catalog,
    records: Sequence[tuple[int, UsageRecord]],
    source: str = "usage",
    kept_since: datetime | None = None,
) -> ImportResult:
    """Record events whose event_id is new, in bulk; logins also move the account's last login.

    Events that happened before `kept_since` (now less the usage records' retention) are refused:
    the lifecycle run deletes records that old, so one imported again after its deletion would be
    taken for a new event and billed twice."""
    with catalog.session() as session:
        accounts = _known_accounts(session, {record.account_id for _, record in records})
        problems = [f"line {n}: unknown account {r.account_id!r}" for n, r in records if r.account_id not in accounts]
        if kept_since is not None:
            problems += [
                f"line {n}: happened {r.occurred_at.isoformat()}, before {kept_since.isoformat()}: older than the "
                "usage records' retention (lifecycle policy usage_retention_years), so it may have been billed "
                "and deleted already"
                for n, r in records
                if r.occurred_at < kept_since
            ]
        if problems:
            raise ImportFileError(source, problems)

        fresh = write_usage(session, [record for _, record in records])
        closed = _closed_periods(session, (r.occurred_at for r in fresh if r.kind == "classification"))
    return ImportResult(
        len(fresh),
        len(records) - len(fresh),
        closed,
        "its new usage is billed on the next invoice, as usage received late (on the month's own invoice "
        "for an account not yet invoiced for it)",
    )


# --- payments -----------------------------------------------------------------------------------

PAYMENT_COLUMNS = ("account_id", "invoice_number", "amount", "paid_at")


@dataclass(frozen=True)
class PaymentRecord:
    account_id: str
    invoice_number: str | None
    amount: Decimal
    paid_at: datetime
    payment_id: str | None = None

    @property
    def key(self) -> str:
        if self.payment_id:
            return self.payment_id
        return f"{self.account_id}|{self.invoice_number or ''}|{self.amount}|{self.paid_at.isoformat()}"


def parse_money(text: str, name: str = "amount") -> Decimal:
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise InvalidValue(f"{name} {text!r} is not a decimal number") from None
    if not value.is_finite() or value <= 0:
        raise InvalidValue(f"{name} {text!r} must be positive")
    if value != value.quantize(Decimal("0.01")):
        raise InvalidValue(f"{name} {text!r} has more than two decimals")
    return value.quantize(Decimal("0.01"))


def _read_csv(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ImportFileError(path, [f"missing column(s) {', '.join(missing)}"])
        return [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}) for row in reader]


def read_payments_csv(path: Path) -> list[tuple[int, PaymentRecord]]:
    records: list[tuple[int, PaymentRecord]] = []
    problems: list[str] = []
    for number, row in _read_csv(path, PAYMENT_COLUMNS):
        try:
            if not row["account_id"]:
                raise InvalidValue("account_id is empty")
            try:
                paid_at = parse_utc_datetime(row["paid_at"])
            except ValueError:
                raise InvalidValue(f"paid_at {row['paid_at']!r} is not an ISO datetime") from None
            record = PaymentRecord(
                row["account_id"],
                row["invoice_number"] or None,
                parse_money(row["amount"]),
                paid_at,
                row.get("payment_id") or None,
            )
        except ValueError as error:
            problems.append(f"line {number}: {error}")
            continue
        records.append((number, record))
    if problems:
        raise ImportFileError(path, problems)
    return records


def import_payments(
    catalog: Catalog, records: Sequence[tuple[int, PaymentRecord]], source: str = "payments"
) -> ImportResult:
    """Record payments not seen before; each must name a known account and, if given, its invoice."""
    with catalog.session() as session:
        accounts = _known_accounts(session, {r.account_id for _, r in records})
        numbers = sorted({r.invoice_number for _, r in records if r.invoice_number})
        owners: dict[str, str] = {}
        for chunk in batches(numbers):
            owners.update(
                session.execute(
                    select(Invoice.invoice_number, Invoice.account_id).where(Invoice.invoice_number.in_(chunk))
                )
                .tuples()
                .all()
            )
        problems = []
        for number, record in records:
            if record.account_id not in accounts:
                problems.append(f"line {number}: unknown account {record.account_id!r}")
            elif record.invoice_number and owners.get(record.invoice_number) != record.account_id:
                problems.append(
                    f"line {number}: invoice {record.invoice_number!r} is not an invoice of account {record.account_id}"
                )
        if problems:
            raise ImportFileError(source, problems)
        unique: dict[str, PaymentRecord] = {}
        for _, record in records:
            unique.setdefault(record.key, record)
        keys = list(unique)
        existing: set[str] = set()
        for chunk in batches(keys):
            existing.update(session.scalars(select(Payment.payment_key).where(Payment.payment_key.in_(chunk))))
        rows = [
            {
                "payment_key": key,
                "account_id": r.account_id,
                "invoice_number": r.invoice_number,
                "amount": r.amount,
                "paid_at": r.paid_at,
            }
            for key, r in unique.items()
            if key not in existing
        ]
        statement = insert_ignoring_duplicates(session, Payment, ["payment_key"])
        for chunk in batches(rows):
            session.execute(statement, chunk)
        closed = _closed_periods(session, (row["paid_at"] for row in rows))
    return ImportResult(len(rows), len(records) - len(rows), closed, "they count on the next invoice's balance")


# --- outages ------------------------------------------------------------------------------------

OUTAGE_COLUMNS = ("started_at", "ended_at", "scheduled")


@dataclass(frozen=True)
class OutageRecord:
    started_at: datetime
    ended_at: datetime
    scheduled: bool
    # When scheduled maintenance was announced; only maintenance announced early enough is excluded.
    announced_at: datetime | None = None


def read_outages_csv(path: Path) -> list[tuple[int, OutageRecord]]:
    records: list[tuple[int, OutageRecord]] = []
    problems: list[str] = []
    for number, row in _read_csv(path, OUTAGE_COLUMNS):
        try:
            times = {}
            for name in ("started_at", "ended_at", "announced_at"):
                raw = row.get(name, "")
                try:
                    times[name] = parse_utc_datetime(raw) if raw else None
                except ValueError:
                    raise InvalidValue(f"{name} {raw!r} is not an ISO datetime") from None
            if times["started_at"] is None or times["ended_at"] is None:
                raise InvalidValue("started_at and ended_at are required")
            if times["ended_at"] <= times["started_at"]:
                raise InvalidValue("ended_at must be after started_at")
            flag = row["scheduled"].lower()
            if flag not in _TRUE | _FALSE:
                raise InvalidValue(f"scheduled {row['scheduled']!r} is not true or false")
            record = OutageRecord(times["started_at"], times["ended_at"], flag in _TRUE, times["announced_at"])
        except ValueError as error:
            problems.append(f"line {number}: {error}")
            continue
        records.append((number, record))
    if problems:
        raise ImportFileError(path, problems)
    return records


def import_outages(catalog: Catalog, records: Sequence[tuple[int, OutageRecord]]) -> ImportResult:
    """Record outages not seen before (an outage is identified by its start and end)."""
    unique: dict[tuple[datetime, datetime], OutageRecord] = {}
    for _, record in records:
        unique.setdefault((record.started_at, record.ended_at), record)
    with catalog.session() as session:
        existing: set[tuple[datetime, datetime]] = set()
        if unique:
            # Outages are few: fetch those in the file's time span and compare here.
            earliest = min(start for start, _ in unique)
            latest = max(start for start, _ in unique)
            existing.update(
                session.execute(
                    select(Outage.started_at, Outage.ended_at)
                    .where(Outage.started_at >= earliest)
                    .where(Outage.started_at <= latest)
                ).tuples()
            )
        rows = [
            {
                "started_at": r.started_at,
                "ended_at": r.ended_at,
                "scheduled": r.scheduled,
                "announced_at": r.announced_at,
            }
            for key, r in unique.items()
            if key not in existing
        ]
        statement = insert_ignoring_duplicates(session, Outage, ["started_at", "ended_at"])
        for chunk in batches(rows):
            session.execute(statement, chunk)
        closed = _closed_periods(session, (row["started_at"] for row in rows))
    return ImportResult(len(rows), len(records) - len(rows), closed, "its new outages are credited on the next invoice")
