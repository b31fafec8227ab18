"""Accounts: CSV import (all rows or none), single adds and look-ups."""

from __future__ import annotations

import csv
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

from pipelines.addresses import check_address
from pipelines.catalog import Catalog, UnknownAccountError
from pipelines.catalog.models import Account, BillingCycle, Plan
from pipelines.errors import InvalidValue, UserError
from pipelines.storage import UnsafeKeyError, check_account_id

REQUIRED_COLUMNS = (
    "account_id",
    "name",
    "email",
    "country",
    "plan",
    "started_at",
    "tax_rate",
    "tax_exempt",
    "last_login_at",
)
OPTIONAL_BUYER_FIELDS = ("street", "postcode", "city", "vat_id")
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f", ""}


class AccountImportError(UserError, ValueError):
    """Rows that cannot be imported, each with its line number; nothing was written."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class AccountRecord:
    account_id: str
    name: str
    email: str
    country: str
    plan: str
    started_at: date
    tax_rate: Decimal = Decimal("0")
    tax_exempt: bool = False
    last_login_at: datetime | None = None
    billing_cycle: str = BillingCycle.MONTHLY.value
    street: str | None = None
    postcode: str | None = None
    city: str | None = None
    vat_id: str | None = None


@dataclass(frozen=True)
class AccountRow(AccountRecord):
    """An account as a CSV row or `accounts add` gives it: also when a changed plan takes effect."""

    # Default: today, UTC; the days before keep the old plan.
    plan_effective: date | None = None


def parse_utc_datetime(text: str) -> datetime:
    """ISO 8601 in; timezone-aware UTC out. A value without offset is taken as UTC."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def make_record(row: dict[str, str]) -> AccountRow:
    """Check one row; raises InvalidValue with a reason a person can act on."""
    account_id = (row.get("account_id") or "").strip()
    try:
        check_account_id(account_id)
    except UnsafeKeyError as error:
        raise InvalidValue(str(error)) from None
    name = (row.get("name") or "").strip()
    if not name:
        raise InvalidValue("name is empty")
    email = check_address((row.get("email") or "").strip())
    country = (row.get("country") or "").strip().upper()
    if len(country) != 2 or not country.isalpha():
        raise InvalidValue(f"country {country!r} is not a two-letter ISO code")
    plan = (row.get("plan") or "").strip()
    if plan not in {p.value for p in Plan}:
        raise InvalidValue(f"plan {plan!r} is not one of {', '.join(p.value for p in Plan)}")
    try:
        started_at = date.fromisoformat((row.get("started_at") or "").strip())
    except ValueError:
        raise InvalidValue(f"started_at {row.get('started_at')!r} is not an ISO date (YYYY-MM-DD)") from None
    raw_rate = (row.get("tax_rate") or "0").strip() or "0"
    try:
        tax_rate = Decimal(raw_rate)
    except InvalidOperation:
        raise InvalidValue(f"tax_rate {raw_rate!r} is not a decimal number") from None
    if not (Decimal("0") <= tax_rate < Decimal("1")):
        raise InvalidValue(f"tax_rate {raw_rate} must be a fraction between 0 and 1 (e.g. 0.19)")
    raw_exempt = (row.get("tax_exempt") or "").strip().lower()
    if raw_exempt not in _TRUE | _FALSE:
        raise InvalidValue(f"tax_exempt {raw_exempt!r} is not true or false")
    raw_login = (row.get("last_login_at") or "").strip()
    try:
        last_login_at = parse_utc_datetime(raw_login) if raw_login else None
    except ValueError:
        raise InvalidValue(f"last_login_at {raw_login!r} is not an ISO datetime") from None
    cycle = (row.get("billing_cycle") or BillingCycle.MONTHLY.value).strip() or BillingCycle.MONTHLY.value
    if cycle not in {c.value for c in BillingCycle}:
        raise InvalidValue(f"billing_cycle {cycle!r} is not one of {', '.join(c.value for c in BillingCycle)}")
    raw_effective = (row.get("plan_effective") or "").strip()
    try:
        plan_effective = date.fromisoformat(raw_effective) if raw_effective else None
    except ValueError:
        raise InvalidValue(f"plan_effective {raw_effective!r} is not an ISO date (YYYY-MM-DD)") from None
    address = {field: (row.get(field) or "").strip() or None for field in ("street", "postcode", "city")}
    for field, limit in (("street", 200), ("postcode", 20), ("city", 100)):
        if address[field] and len(address[field]) > limit:
            raise InvalidValue(f"{field} is longer than {limit} characters")
    vat_id = (row.get("vat_id") or "").replace(" ", "").upper() or None
    if vat_id and not (4 <= len(vat_id) <= 20 and vat_id[:2].isalpha() and vat_id.isalnum()):
        raise InvalidValue(
            f"vat_id {vat_id!r} is not a VAT ID: a country prefix and up to 18 letters or digits, e.g. DE123456789"
        )
    return AccountRow(
        account_id,
        name,
        email,
        country,
        plan,
        started_at,
        tax_rate,
        raw_exempt in _TRUE,
        last_login_at,
        cycle,
        vat_id=vat_id,
        plan_effective=plan_effective,
        **address,
    )


def read_accounts_csv(path: Path) -> list[AccountRow]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise AccountImportError([f"{path}: missing column(s) {', '.join(missing)}"])
        records: list[AccountRow] = []
        problems: list[str] = []
        seen: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            try:
                record = make_record(row)
            except ValueError as error:
                problems.append(f"line {line}: {error}")
                continue
            if record.account_id in seen:
                problems.append(
                    f"line {line}: account {record.account_id} already given on line {seen[record.account_id]}"
                )
                continue
            seen[record.account_id] = line
            records.append(record)
    if problems:
        raise AccountImportError(problems)
    return records


@dataclass(frozen=True)
class UpsertResult:
    created: int
    updated: int


def upsert_accounts(catalog: Catalog, records: list[AccountRecord], today: date | None = None) -> UpsertResult:
    """Insert or update all records in one transaction. The latest known login is kept. A plan or
    billing cycle that differs is recorded as a dated change (from `plan_effective`, else today)."""
    # Imported when accounts are written: every task reads an account (get_account), few record a
    # plan change, and billing's models are 0.05 CPU-s of imports.
    from pipelines.billing.history import record_plan_change

    today = today or datetime.now(UTC).date()
    created = updated = 0
    with catalog.session() as session:
        for record in records:
            account = session.get(Account, record.account_id)
            values = {f.name: getattr(record, f.name) for f in fields(AccountRecord)}
            effective = (record.plan_effective if isinstance(record, AccountRow) else None) or today
            if account is None:
                session.add(Account(**values))
                created += 1
                continue
            login = values.pop("last_login_at")
            plan, cycle = values.pop("plan"), values.pop("billing_cycle")
            for name, value in values.items():
                # A file without the optional address columns leaves the address as it was.
                if value is not None or name not in OPTIONAL_BUYER_FIELDS:
                    setattr(account, name, value)
            record_plan_change(catalog, None, record.account_id, plan, effective, cycle, session=session)
            if login is not None and (account.last_login_at is None or login > account.last_login_at):
                account.last_login_at = login
            updated += 1
    return UpsertResult(created, updated)


def get_account(catalog: Catalog, account_id: str) -> Account:
    with catalog.session() as session:
        account = session.get(Account, account_id)
        if account is None:
            raise UnknownAccountError(account_id)
        session.expunge(account)
        return account
