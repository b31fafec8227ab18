"""Shared fixtures and builders for the billing tests (this module holds no tests itself).

`catalog` is a freshly migrated catalog on SQLite and, when 127.0.0.1:5432 answers, on
PostgreSQL too (a schema of its own, emptied between tests, dropped at the end).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from pipelines.billing.pricebook import PriceBook, parse_pricebook
from pipelines.catalog import Catalog
from pipelines.catalog.models import Account
from pipelines.metering import UsageRecord

# Same variable as tests/conftest.py. psycopg2 is named: SQLAlchemy 2.1 maps postgresql:// to psycopg 3.
PG_ADMIN_URL = os.environ.get("POINTFLOW_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")

BASE_PRICEBOOK = """
currency: EUR
invoice_prefix: PF
payment_terms_days: 30
late_fee_monthly_rate: "0.015"
availability_target_percent: "99.5"
maintenance_notice_hours: 24
dispute_window_days: 7
billing_error_dispute_window_days: 60
plans:
  free: {monthly_fee: "0.00", max_files: 3, max_stored_points: 45000000, downloads: false}
  trial: {monthly_fee: "0.00", trial_days: 14}
  professional: {monthly_fee: "99.00", seat_fee: "10.00", extra_storage_fee_per_gb: "49.00", storage_limit_gb: 100}
  professional_sharing: {monthly_fee: "99.00", discount: "0.20"}
  api: {monthly_fee: "0.00", price_per_million_points: "0.50", monthly_points_cap: 500000000, result_retention_days: 10}
"""


SELLER = """
seller:
  name: pointflow GmbH
  street: Punktwolkenweg 1
  postcode: "10115"
  city: Berlin
  country: DE
  vat_id: DE123456789
  email: billing@pointflow.example
  registration: Amtsgericht Berlin-Charlottenburg HRB 123456
  bank: Example Bank
  iban: DE02120300000000202051
  bic: BYLADEM1001
"""


def make_pricebook(extra: str = "", base: str = BASE_PRICEBOOK) -> PriceBook:
    """The test price book, optionally with YAML appended (later keys win in a mapping)."""
    return parse_pricebook(base + extra, "test price book")


def utc(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def on_time(period: str) -> datetime:
    """When the monthly DAG invoices `period` ("2026-10"): 02:00 UTC on the 1st of the next month,
    so its invoices are dated that 1st."""
    from pipelines.billing.periods import Period

    return Period.parse(period).end.replace(hour=2)


def bill_on_time(monkeypatch: pytest.MonkeyPatch, target: str = "pipelines.cli.billing.run_billing") -> None:
    """Make the `run_billing` that `target` names invoice each month that has ended on time
    (`on_time`), whatever today is; a month not ended yet is still run now (and refused)."""
    from pipelines.billing import invoicing

    run_billing = invoicing.run_billing

    def run_on_time(catalog, period, pricebook, now=None):
        return run_billing(catalog, period, pricebook, now=min(on_time(str(period)), datetime.now(UTC)))

    monkeypatch.setattr(target, run_on_time)


def add_account(
    catalog: Catalog,
    account_id: str,
    plan: str = "professional",
    started_at: str = "2026-01-01",
    tax_rate: str = "0.19",
    tax_exempt: bool = False,
    billing_cycle: str = "monthly",
    country: str = "DE",
) -> None:
    with catalog.session() as session:
        session.add(
            Account(
                account_id=account_id,
                name=f"{account_id} Ltd",
                email=f"billing@{account_id}.example",
                country=country,
                plan=plan,
                billing_cycle=billing_cycle,
                started_at=date.fromisoformat(started_at),
                tax_rate=Decimal(tax_rate),
                tax_exempt=tax_exempt,
            )
        )


def job(event_id: str, account_id: str, when: str, points: int, status: str = "succeeded") -> UsageRecord:
    return UsageRecord(
        event_id, account_id, "classification", utc(when), points, status, "grid", "1.0", f"{event_id}.laz"
    )


def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "billing-template.db"
    if not path.exists():
        catalog = Catalog(f"sqlite:///{path}")
        catalog.migrate()
        catalog.dispose()
    return path


def postgres_reachable() -> bool:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 2})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def postgres_schema_url() -> Iterator[str]:
    """A migrated schema of this test session's own; tables are emptied by `catalog` per test."""
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    schema = f"pf_billing_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{PG_ADMIN_URL}{'&' if '?' in PG_ADMIN_URL else '?'}options=-csearch_path%3D{schema}"
    catalog = Catalog(url)
    catalog.migrate()
    catalog.dispose()
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _empty_postgres(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        tables = connection.execute(
            text(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename <> 'alembic_version'"
            )
        ).scalars()
        names = ", ".join(f'"{name}"' for name in tables)
        if names:
            connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        path = tmp_path / "catalog.db"
        shutil.copy(_sqlite_template(tmp_path_factory), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("postgres_schema_url")
    _empty_postgres(url)
    return url


def check_einvoices(catalog: Catalog) -> int:
    """Every invoice and credit note in the catalog, as an EN 16931 e-invoice of the test seller:
    its CII XML must validate against the official Factur-X schema. Returns how many were checked."""
    from facturx import xml_check_xsd
    from sqlalchemy import select

    from pipelines.billing.delivery import buyer_of, credit_note_of, document_of
    from pipelines.billing.einvoice import cii_xml
    from pipelines.billing.invoicing import invoice_view
    from pipelines.billing.models import CreditNote, Invoice

    book = make_pricebook(SELLER)
    with catalog.session() as session:
        invoices = [
            (invoice_view(i), buyer_of(session.get(Account, i.account_id))) for i in session.scalars(select(Invoice))
        ]
        notes = list(session.scalars(select(CreditNote.credit_note_number)))
    documents = [document_of(catalog, book, invoice, buyer) for invoice, buyer in invoices]
    documents += [credit_note_of(catalog, book, number) for number in notes]
    for document in documents:
        xml_check_xsd(cii_xml(document), flavor="factur-x", level="en16931")
    return len(documents)


@pytest.fixture
def catalog(database_url: str) -> Iterator[Catalog]:
    """A migrated catalog; afterwards, every invoice a test left must make a valid e-invoice."""
    catalog = Catalog(database_url)
    catalog.migrate()
    yield catalog
    try:
        check_einvoices(catalog)
    finally:
        catalog.dispose()


@pytest.fixture
def sqlite_catalog(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalog]:
    """SQLite only, for tests that exercise rules rather than the database."""
    path = tmp_path / "catalog.db"
    shutil.copy(_sqlite_template(tmp_path_factory), path)
    catalog = Catalog(f"sqlite:///{path}")
    yield catalog
    catalog.dispose()


@pytest.fixture
def cli_env(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Environment for `pipelines.cli.main`: the test database and a private POINTFLOW_HOME.
    Afterwards, like `catalog`, every invoice the commands left must make a valid e-invoice."""
    monkeypatch.setenv("POINTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("POINTFLOW_DATABASE_URL", database_url)
    monkeypatch.delenv("POINTFLOW_PRICEBOOK", raising=False)
    yield database_url
    catalog = Catalog(database_url)
    try:
        check_einvoices(catalog)
    finally:
        catalog.dispose()
