"""The catalog on SQLite and PostgreSQL: migrations, exact types, accounts, metering, job states."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from pipelines.accounts import AccountImportError, UnknownAccountError, get_account, read_accounts_csv, upsert_accounts
from pipelines.catalog import Catalog
from pipelines.catalog.models import JOB_TRANSITIONS, Account, Base, JobState
from pipelines.metering import UsageRecord, record_usage
from tests.conftest import make_account

CSV_HEADER = "account_id,name,email,country,plan,started_at,tax_rate,tax_exempt,last_login_at\n"


@pytest.fixture
def catalog(database_url: str) -> Catalog:
    catalog = Catalog(database_url)
    catalog.migrate()
    yield catalog
    catalog.dispose()


def test_migrations_match_the_models(catalog: Catalog) -> None:
    with catalog.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_head_revision_is_alembics_head() -> None:
    """The revision every task checks the catalog against is the one Alembic upgrades to."""
    from alembic.script import ScriptDirectory

    from pipelines.catalog.db import alembic_config, head_revision

    assert head_revision() == ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def test_db_upgrade_migrates_the_configured_catalog(home: Path) -> None:
    from pipelines.catalog.db import head_revision
    from pipelines.cli import main

    assert main(["db", "upgrade"]) == 0
    catalog = Catalog(f"sqlite:///{home / 'catalog.db'}")
    assert catalog._revision() == head_revision()
    assert main(["db", "upgrade"]) == 0  # a second upgrade finds the newest schema and does nothing


def test_migrate_twice_is_harmless(catalog: Catalog) -> None:
    catalog.migrate()
    assert catalog.is_migrated()


def test_times_come_back_as_utc_and_money_exact(catalog: Catalog) -> None:
    login = datetime(2026, 3, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    record = make_account("exact")
    upsert_accounts(
        catalog, [record.__class__(**{**record.__dict__, "tax_rate": Decimal("0.1925"), "last_login_at": login})]
    )
    account = get_account(catalog, "exact")
    assert account.last_login_at == login and account.last_login_at.tzinfo == UTC
    assert account.last_login_at.hour == 10
    assert account.tax_rate == Decimal("0.1925") and isinstance(account.tax_rate, Decimal)


def test_naive_datetimes_and_float_money_are_refused(catalog: Catalog) -> None:
    with pytest.raises(Exception, match="naive"):
        with catalog.session() as session:
            session.add(Account(**{**make_account("naive").__dict__, "last_login_at": datetime(2026, 1, 1)}))
    with pytest.raises(Exception, match="Decimal"):
        with catalog.session() as session:
            session.add(Account(**{**make_account("floaty").__dict__, "tax_rate": 0.19}))


def test_account_csv_import_upserts_and_keeps_latest_login(catalog: Catalog, tmp_path: Path) -> None:
    path = tmp_path / "accounts.csv"
    path.write_text(
        CSV_HEADER + "a1,Alpha,a@x.example,de,free,2026-01-15,0.19,false,2026-05-01T10:00:00Z\n"
        "a2,Beta,b@x.example,FR,api,2026-02-01,0.20,true,\n"
    )
    result = upsert_accounts(catalog, read_accounts_csv(path))
    assert (result.created, result.updated) == (2, 0)
    path.write_text(
        CSV_HEADER + "a1,Alpha Two,a@x.example,DE,professional,2026-01-15,0.19,false,2026-04-01T10:00:00Z\n"
    )
    result = upsert_accounts(catalog, read_accounts_csv(path))
    assert (result.created, result.updated) == (0, 1)
    account = get_account(catalog, "a1")
    assert (account.name, account.plan, account.country) == ("Alpha Two", "professional", "DE")
    assert account.last_login_at == datetime(2026, 5, 1, 10, tzinfo=UTC)
    assert get_account(catalog, "a2").tax_exempt is True


def test_bad_account_rows_are_reported_with_line_numbers_and_nothing_imported(catalog: Catalog, tmp_path: Path) -> None:
    path = tmp_path / "accounts.csv"
    path.write_text(
        CSV_HEADER
        + "ok1,Fine,f@x.example,DE,free,2026-01-01,0.19,false,\n"
        + "bad/1,Slash,s@x.example,DE,free,2026-01-01,0.19,false,\n"
        + "ok2,Plan,p@x.example,DE,gold,2026-01-01,0.19,false,\n"
        + "ok3,Rate,r@x.example,DE,free,2026-01-01,abc,false,\n"
        + "ok4,Date,d@x.example,DE,free,01/02/2026,0.19,false,\n"
        + "ok1,Again,f@x.example,DE,free,2026-01-01,0.19,false,\n"
    )
    with pytest.raises(AccountImportError) as error:
        upsert_accounts(catalog, read_accounts_csv(path))
    problems = error.value.problems
    assert [p.split(":")[0] for p in problems] == ["line 3", "line 4", "line 5", "line 6", "line 7"]
    assert "gold" in problems[1] and "abc" in problems[2] and "ISO date" in problems[3] and "line 2" in problems[4]
    with pytest.raises(UnknownAccountError):
        get_account(catalog, "ok1")


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = tmp_path / "accounts.csv"
    path.write_text("account_id,name\nx,y\n")
    with pytest.raises(AccountImportError, match="email.*country"):
        read_accounts_csv(path)


def _event(event_id: str, **changes) -> UsageRecord:
    values = dict(
        event_id=event_id,
        account_id="m",
        kind="classification",
        occurred_at=datetime(2026, 10, 3, tzinfo=UTC),
        points=1000,
        status="succeeded",
        classifier="standard",
        classifier_version="1.0.0",
        filename="a.laz",
    )
    return UsageRecord(**{**values, **changes})


def test_usage_events_are_recorded_once(catalog: Catalog) -> None:
    upsert_accounts(catalog, [make_account("m")])
    first = record_usage(catalog, [_event("e1"), _event("e2")])
    again = record_usage(catalog, [_event("e1"), _event("e2", points=999999), _event("e3")])
    assert (first.new, first.known) == (2, 0)
    assert (again.new, again.known) == (1, 2)
    from sqlalchemy import func, select

    from pipelines.catalog.models import UsageEvent

    with catalog.session() as session:
        assert session.scalar(select(func.sum(UsageEvent.points))) == 3000


def test_login_events_move_last_login_forward_only(catalog: Catalog) -> None:
    upsert_accounts(catalog, [make_account("m")])
    late, early = datetime(2026, 9, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)
    record_usage(catalog, [UsageRecord("l1", "m", "login", late)])
    record_usage(catalog, [UsageRecord("l2", "m", "login", early)])
    assert get_account(catalog, "m").last_login_at == late


@pytest.mark.parametrize(
    "bad",
    [
        dict(kind="upload"),
        dict(status="done"),
        dict(points=-1),
        dict(occurred_at=datetime(2026, 1, 1)),
        dict(event_id=""),
    ],
)
def test_malformed_usage_events_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        _event(**{"event_id": "x", **bad})


def test_job_state_machine_has_one_way_to_finish() -> None:
    terminal = {s for s, nexts in JOB_TRANSITIONS.items() if not nexts}
    assert terminal == {JobState.EXPORTED, JobState.QUARANTINED, JobState.FAILED, JobState.ABORTED}
    assert JobState.EXPORTED in JOB_TRANSITIONS[JobState.CLASSIFIED]
    assert JobState.EXPORTED not in JOB_TRANSITIONS[JobState.VALIDATED]
    assert JobState.CLASSIFYING not in JOB_TRANSITIONS[JobState.RECEIVED]


def test_plain_postgresql_urls_use_the_shipped_driver(postgres_url: str) -> None:
    catalog = Catalog(postgres_url.replace("postgresql+psycopg2://", "postgresql://"))
    catalog.migrate()
    assert catalog.engine.dialect.driver == "psycopg2"
    catalog.dispose()


def test_database_errors_name_neither_the_user_nor_the_password(postgres_url: str) -> None:
    """README: errors name host, port and database, never the user or password."""
    import psycopg2
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from pipelines.catalog.db import CatalogUnavailable, database_failure

    # A role the server does not know (the test server trusts loopback, so a password is not asked).
    url = make_url(postgres_url).set(username="pf_secret_user", password="pf-secret-pass")
    url = url.render_as_string(hide_password=False)
    with pytest.raises(CatalogUnavailable) as refused:
        Catalog(url).migrate()
    message = str(refused.value)
    assert "does not exist" in message and make_url(postgres_url).database in message, message
    assert "pf_secret_user" not in message and "pf-secret-pass" not in message, message
    # What a server asking for passwords answers, as psycopg2 reports it.
    driver = psycopg2.OperationalError(
        'connection to server at "127.0.0.1", port 5432 failed: FATAL:  password authentication failed for user "postgres"\n'
    )
    message = str(database_failure("postgresql://postgres:pw@127.0.0.1/cat", OperationalError("connect", {}, driver)))
    assert "password authentication failed" in message and "127.0.0.1:5432/cat" in message, message
    assert "postgres" not in message.replace("POINTFLOW_DATABASE_URL", ""), message
