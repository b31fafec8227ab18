"""The price book: plans, prices with effective dates, and billing terms, read from YAML.

Nothing here knows a price: every number comes from the file (the default ships as
`pipelines/data/pricebook.yaml`), so a price change is a reviewed edit of data, not of code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import date
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import UserError


class PriceBookError(UserError, ValueError):
    """The price book cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class PlanTerms:
    """One plan's values as in force from `effective_from` (None: since the beginning)."""

    plan: str
    effective_from: date | None
    monthly_fee: Decimal = Decimal("0.00")
    discount: Decimal = Decimal("0")
    price_per_million_points: Decimal | None = None
    monthly_points_cap: int | None = None
    seat_fee: Decimal = Decimal("0.00")
    extra_storage_fee_per_gb: Decimal = Decimal("0.00")
    storage_limit_gb: int | None = None
    max_files: int | None = None
    max_stored_points: int | None = None
    downloads: bool = True
    result_retention_days: int | None = None
    trial_days: int | None = None


@dataclass(frozen=True)
class PlanLimits:
    """What admission and retention enforce for a plan on a day; None means no limit."""

    monthly_points_cap: int | None
    storage_limit_gb: int | None
    max_files: int | None
    max_stored_points: int | None
    downloads: bool
    result_retention_days: int | None


_MONEY_FIELDS = {"monthly_fee", "discount", "price_per_million_points", "seat_fee", "extra_storage_fee_per_gb"}
_INT_FIELDS = {
    "monthly_points_cap",
    "storage_limit_gb",
    "max_files",
    "max_stored_points",
    "result_retention_days",
    "trial_days",
}
_BOOL_FIELDS = {"downloads"}
_PLAN_FIELDS = _MONEY_FIELDS | _INT_FIELDS | _BOOL_FIELDS


@dataclass(frozen=True)
class Seller:
    """Who issues the invoices, as an invoice must name them (EU VAT Directive, Art. 226)."""

    name: str
    street: str
    postcode: str
    city: str
    country: str
    vat_id: str
    email: str | None = None
    registration: str | None = None  # e.g. the commercial register entry
    bank: str | None = None
    iban: str | None = None
    bic: str | None = None

    @property
    def address_lines(self) -> tuple[str, ...]:
        return (self.street, f"{self.postcode} {self.city}".strip(), self.country)


_SELLER_REQUIRED = ("name", "street", "postcode", "city", "country", "vat_id")
_SELLER_OPTIONAL = ("email", "registration", "bank", "iban", "bic")


@dataclass(frozen=True)
class PriceBook:
    currency: str
    invoice_prefix: str
    payment_terms_days: int
    late_fee_monthly_rate: Decimal
    late_fee_legal_max_monthly_rate: Mapping[str, Decimal]
    availability_target_percent: Decimal
    maintenance_notice_hours: int
    dispute_window_days: int
    billing_error_dispute_window_days: int
    # Per plan, its versions ordered by effective date; the first is in force since the beginning.
    plans: Mapping[str, tuple[PlanTerms, ...]]
    source: str
    sha256: str
    # Whether a plan change inside a prepaid quarterly/yearly cycle refunds its unused days.
    refund_unused_prepaid: bool = False
    # None until the operator names itself: documents then say they are not valid tax invoices.
    seller: Seller | None = None
    # Months whose invoices a punctual run issued before this day charged finance charges on the
    # whole overdue balance, earlier unpaid finance charges included; kept so that such a month
    # drafted again bills what was issued. None: no month did.
    finance_charges_compound_before: date | None = None

    @property
    def seller_country(self) -> str | None:
        return self.seller.country if self.seller else None

    def terms(self, plan: str, on: date) -> PlanTerms:
        """The plan's values in force on `on` (never a later version: no retroactive prices)."""
        versions = self.plans.get(plan)
        if versions is None:
            raise PriceBookError(
                f"{self.source}: plan {plan!r} is not in the price book (plans: {', '.join(self.plans)})"
            )
        current = versions[0]
        for version in versions[1:]:
            if version.effective_from is not None and version.effective_from <= on:
                current = version
        return current

    def change_dates(self, plan: str, start: date, end: date) -> list[date]:
        """Effective dates of the plan's versions strictly after `start` and before `end`."""
        return sorted(
            {v.effective_from for v in self.plans.get(plan, ()) if v.effective_from and start < v.effective_from < end}
        )

    def late_fee_rate(self, country: str) -> Decimal:
        """The contractual rate, or the country's legal maximum if that is lower."""
        legal_max = self.late_fee_legal_max_monthly_rate.get(country.upper())
        return self.late_fee_monthly_rate if legal_max is None else min(self.late_fee_monthly_rate, legal_max)

    def finance_charges_compound(self, issued_on: date) -> bool:
        """Whether the finance charge of an invoice a punctual run issues on `issued_on` (the 1st
        after its month, whatever day it really runs) is charged on earlier finance charges too."""
        cutover = self.finance_charges_compound_before
        return cutover is not None and issued_on < cutover


def plan_limits(pricebook: PriceBook, plan: str, on: date) -> PlanLimits:
    """Limits of `plan` in force on `on`, for admission checks (monthly points cap, storage, files)."""
    terms = pricebook.terms(plan, on)
    return PlanLimits(
        monthly_points_cap=terms.monthly_points_cap,
        storage_limit_gb=terms.storage_limit_gb,
        max_files=terms.max_files,
        max_stored_points=terms.max_stored_points,
        downloads=terms.downloads,
        result_retention_days=terms.result_retention_days,
    )


def default_pricebook_text() -> str:
    return resources.files("pipelines").joinpath("data/pricebook.yaml").read_text(encoding="utf-8")


def load_pricebook(path: Path | None = None) -> PriceBook:
    """Read and check a price book; `None` means the default one shipped with pointflow."""
    if path is None:
        return parse_pricebook(default_pricebook_text(), "default price book")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PriceBookError(f"price book {path} does not exist") from None
    return parse_pricebook(text, str(path))


def parse_pricebook(text: str, source: str) -> PriceBook:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PriceBookError(f"{source}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise PriceBookError(f"{source}: expected a mapping at the top level")
    reader = _Reader(source)
    plans_data = data.get("plans")
    if not isinstance(plans_data, dict) or not plans_data:
        raise PriceBookError(f"{source}: 'plans' must map plan names to their prices")
    legal_max = data.get("late_fee_legal_max_monthly_rate") or {}
    if not isinstance(legal_max, dict):
        raise PriceBookError(f"{source}: late_fee_legal_max_monthly_rate must map country codes to rates")
    known = {
        "currency",
        "invoice_prefix",
        "payment_terms_days",
        "late_fee_monthly_rate",
        "late_fee_legal_max_monthly_rate",
        "availability_target_percent",
        "maintenance_notice_hours",
        "dispute_window_days",
        "billing_error_dispute_window_days",
        "plans",
        "refund_unused_prepaid",
        "seller",
        "finance_charges_compound_before",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise PriceBookError(f"{source}: unknown field(s) {', '.join(unknown)}")
    return PriceBook(
        currency=reader.text(data, "currency"),
        invoice_prefix=reader.text(data, "invoice_prefix", "PF"),
        payment_terms_days=reader.integer(data, "payment_terms_days"),
        late_fee_monthly_rate=reader.decimal(data, "late_fee_monthly_rate"),
        late_fee_legal_max_monthly_rate={str(k).upper(): reader.decimal(legal_max, k) for k in legal_max},
        availability_target_percent=reader.decimal(data, "availability_target_percent", "99.5"),
        maintenance_notice_hours=reader.integer(data, "maintenance_notice_hours", 24),
        dispute_window_days=reader.integer(data, "dispute_window_days", 7),
        billing_error_dispute_window_days=reader.integer(data, "billing_error_dispute_window_days", 60),
        plans={str(name): _plan_versions(reader, str(name), spec) for name, spec in plans_data.items()},
        source=source,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        refund_unused_prepaid=reader.boolean(data, "refund_unused_prepaid", False),
        seller=_seller(reader, data.get("seller")),
        finance_charges_compound_before=(
            reader.date(data, "finance_charges_compound_before", "")
            if data.get("finance_charges_compound_before") is not None
            else None
        ),
    )


def _seller(reader: _Reader, spec: Any) -> Seller | None:
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise PriceBookError(f"{reader.source}: seller must be a mapping ({', '.join(_SELLER_REQUIRED)}, ...)")
    unknown = sorted(set(spec) - set(_SELLER_REQUIRED) - set(_SELLER_OPTIONAL))
    if unknown:
        raise PriceBookError(f"{reader.source}: seller: unknown field(s) {', '.join(unknown)}")
    values = {key: reader.text(spec, key, where=f"seller.{key}") for key in _SELLER_REQUIRED}
    values |= {
        key: reader.text(spec, key, where=f"seller.{key}") for key in _SELLER_OPTIONAL if spec.get(key) is not None
    }
    country = values["country"].upper()
    if len(country) != 2 or not country.isalpha():
        raise PriceBookError(f"{reader.source}: seller.country: {values['country']!r} is not a two-letter ISO code")
    return Seller(**{**values, "country": country, "vat_id": values["vat_id"].replace(" ", "").upper()})


def _plan_versions(reader: _Reader, name: str, spec: Any) -> tuple[PlanTerms, ...]:
    if not isinstance(spec, dict):
        raise PriceBookError(f"{reader.source}: plan {name!r} must be a mapping of fields")
    changes = spec.get("changes") or []
    if not isinstance(changes, list):
        raise PriceBookError(f"{reader.source}: plans.{name}.changes must be a list")
    base = replace(PlanTerms(plan=name, effective_from=None), **reader.plan_fields(f"plans.{name}", spec, {"changes"}))
    versions = [base]
    dated = []
    for index, change in enumerate(changes):
        where = f"plans.{name}.changes[{index}]"
        if not isinstance(change, dict) or "effective_from" not in change:
            raise PriceBookError(f"{reader.source}: {where} needs an effective_from date")
        dated.append((reader.date(change, "effective_from", where), where, change))
    dated.sort(key=lambda item: item[0])
    for effective_from, where, change in dated:
        if effective_from == versions[-1].effective_from:
            raise PriceBookError(f"{reader.source}: {where}: two changes of plan {name!r} on {effective_from}")
        values = reader.plan_fields(where, change, {"effective_from"})
        versions.append(replace(versions[-1], effective_from=effective_from, **values))
    return tuple(versions)


@dataclass(frozen=True)
class _Reader:
    """Typed field access that names the file and field in every error."""

    source: str

    def fail(self, where: str, message: str) -> PriceBookError:
        return PriceBookError(f"{self.source}: {where}: {message}")

    def text(self, data: Mapping[str, Any], key: str, default: str | None = None, where: str | None = None) -> str:
        value = data.get(key, default)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # a postcode written without quotes
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where or key, "must be a non-empty text")
        return value.strip()

    def boolean(self, data: Mapping[str, Any], key: str, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false")
        return value

    def integer(self, data: Mapping[str, Any], key: str, default: int | None = None, where: str | None = None) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(where or key, f"must be a whole number >= 0, got {value!r}")
        return value

    def decimal(
        self, data: Mapping[str, Any], key: Any, default: str | None = None, where: str | None = None
    ) -> Decimal:
        value = data.get(key, default)
        # A YAML float has already lost exactness (0.1 is not 1/10): insist on quoted decimals.
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self.fail(where or str(key), f'write decimals as quoted strings, e.g. "0.50" (got {value!r})')
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            raise self.fail(where or str(key), f"{value!r} is not a decimal number") from None
        if not number.is_finite() or number < 0:
            raise self.fail(where or str(key), f"{value!r} must be a finite number >= 0")
        return number

    def date(self, data: Mapping[str, Any], key: str, where: str) -> date:
        value = data.get(key)
        if isinstance(value, date):
            return value
        try:
            return date.fromisoformat(str(value))
        except ValueError:
            raise self.fail(f"{where}.{key}" if where else key, f"{value!r} is not an ISO date (YYYY-MM-DD)") from None

    def plan_fields(self, where: str, spec: Mapping[str, Any], allowed_extra: set[str]) -> dict[str, Any]:
        unknown = sorted(set(spec) - _PLAN_FIELDS - allowed_extra)
        if unknown:
            raise self.fail(where, f"unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_PLAN_FIELDS))})")
        values: dict[str, Any] = {}
        for key in spec:
            if key in _MONEY_FIELDS:
                values[key] = self.decimal(spec, key, where=f"{where}.{key}")
            elif key in _INT_FIELDS:
                values[key] = self.integer(spec, key, where=f"{where}.{key}")
            elif key in _BOOL_FIELDS:
                if not isinstance(spec[key], bool):
                    raise self.fail(f"{where}.{key}", "must be true or false")
                values[key] = spec[key]
        if "discount" in values and values["discount"] > 1:
            raise self.fail(f"{where}.discount", 'is a fraction between 0 and 1, e.g. "0.20"')
        return values
