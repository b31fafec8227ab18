"""Importing usage events (JSONL), payments and outages (CSV): checked whole, idempotent."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipelines.accounts import get_account
from pipelines.billing.imports import (
    ImportFileError,
    import_outages,
    import_payments,
    import_usage,
    parse_usage_line,
    read_outages_csv,
    read_payments_csv,
    read_usage_jsonl,
)
from pipelines.billing.invoicing import run_billing
from pipelines.billing.models import Outage, Payment
from pipelines.catalog.models import UsageEvent
from tests.test_billing_support import add_account, catalog, database_url, job, make_pricebook, postgres_schema_url, utc

__all__ = ["catalog", "database_url", "postgres_schema_url"]  # fixtures used here


def write_jsonl(path: Path, *events: dict) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def classification(
    event_id: str, account_id: str = "acme", when: str = "2026-10-05T10:00:00Z", points=1000, status="succeeded"
) -> dict:
    return {
        "event_id": event_id,
        "account_id": account_id,
        "occurred_at": when,
        "kind": "classification",
        "points": points,
        "status": status,
        "classifier": "grid",
        "filename": f"{event_id}.laz",
    }


def count(catalog, model) -> int:
    with catalog.session() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_usage_import_is_idempotent_by_event_id(catalog, tmp_path):
    add_account(catalog, "acme", plan="api")
    path = write_jsonl(tmp_path / "u.jsonl", classification("e1"), classification("e2"), classification("e1"))
    first = import_usage(catalog, read_usage_jsonl(path))
    assert (first.new, first.known) == (2, 1)  # the repeated line in the file is known too
    second = import_usage(catalog, read_usage_jsonl(path))
    assert (second.new, second.known) == (0, 3)
    assert count(catalog, UsageEvent) == 2


def test_replayed_event_id_with_other_values_is_not_billed_again(catalog):
    add_account(catalog, "acme", plan="api")
    import_usage(catalog, [(1, job("e1", "acme", "2026-10-05T10:00Z", 1_000_000))])
    import_usage(catalog, [(1, job("e1", "acme", "2026-10-06T10:00Z", 9_000_000))])
    with catalog.session() as session:
        assert session.get(UsageEvent, "e1").points == 1_000_000


def test_a_bad_line_imports_nothing_and_names_every_bad_line(catalog, tmp_path):
    add_account(catalog, "acme", plan="api")
    path = write_jsonl(
        tmp_path / "u.jsonl",
        classification("ok"),
        classification("bad-status", status="done"),
        classification("bad-points", points=-5),
        {"event_id": "no-time", "account_id": "acme", "kind": "login"},
        classification("bad-time", when="yesterday"),
        {"event_id": "bad-kind", "account_id": "acme", "occurred_at": "2026-10-05T10:00:00Z", "kind": "upload"},
    )
    with pytest.raises(ImportFileError) as error:
        read_usage_jsonl(path)
    assert [p.split(":")[0] for p in error.value.problems] == ["line 2", "line 3", "line 4", "line 5", "line 6"]
    assert "status 'done' is not one of succeeded, failed, aborted" in str(error.value)
    assert count(catalog, UsageEvent) == 0


def test_events_of_unknown_accounts_are_refused_whole(catalog, tmp_path):
    add_account(catalog, "acme", plan="api")
    path = write_jsonl(tmp_path / "u.jsonl", classification("e1"), classification("e2", account_id="ghost"))
    with pytest.raises(ImportFileError, match="line 2: unknown account 'ghost'"):
        import_usage(catalog, read_usage_jsonl(path))
    assert count(catalog, UsageEvent) == 0


def test_timestamps_are_stored_in_utc():
    assert parse_usage_line(json.dumps(classification("e", when="2026-11-01T00:30:00+01:00"))).occurred_at == utc(
        "2026-10-31T23:30Z"
    )
    naive = parse_usage_line(json.dumps(classification("e", when="2026-10-05T10:00:00")))
    assert naive.occurred_at == datetime(2026, 10, 5, 10, tzinfo=UTC)


def test_login_events_move_last_login_forward_only(catalog):
    add_account(catalog, "acme")

    def login(event_id: str, when: str) -> tuple[int, object]:
        return 1, parse_usage_line(
            json.dumps({"event_id": event_id, "account_id": "acme", "occurred_at": when, "kind": "login"})
        )

    import_usage(catalog, [login("l1", "2026-10-05T10:00:00Z"), login("l2", "2026-10-07T10:00:00Z")])
    import_usage(catalog, [login("l0", "2026-09-01T10:00:00Z")])
    assert get_account(catalog, "acme").last_login_at == utc("2026-10-07T10:00Z")


def test_usage_arriving_after_its_month_was_invoiced_is_flagged(catalog):
    add_account(catalog, "acme", plan="api")
    run_billing(catalog, "2026-09", make_pricebook(), now=utc("2026-12-01T00:00Z"))
    result = import_usage(
        catalog, [(1, job("late", "acme", "2026-09-30T10:00Z", 5)), (2, job("now", "acme", "2026-10-02T10:00Z", 5))]
    )
    assert result.closed_periods == ("2026-09",)
    assert "2026-09 already invoiced" in result.summary("usage events")


def test_payments_import_checks_invoice_ownership_and_amounts(catalog, tmp_path):
    add_account(catalog, "acme")
    add_account(catalog, "other")
    run_billing(catalog, "2026-09", make_pricebook(), now=utc("2026-12-01T00:00Z"))  # acme 0001, other 0002
    path = tmp_path / "p.csv"
    path.write_text(
        "account_id,invoice_number,amount,paid_at,payment_id\n"
        "acme,PF-2026-09-0001,117.81,2026-10-02T10:00:00Z,bank-1\n"
        "acme,PF-2026-09-0002,1.00,2026-10-02T10:00:00Z,bank-2\n"
        "ghost,,1.00,2026-10-02T10:00:00Z,bank-3\n"
    )
    with pytest.raises(ImportFileError) as error:
        import_payments(catalog, read_payments_csv(path))
    assert error.value.problems == [
        "line 3: invoice 'PF-2026-09-0002' is not an invoice of account acme",
        "line 4: unknown account 'ghost'",
    ]
    assert count(catalog, Payment) == 0

    bad = tmp_path / "bad.csv"
    bad.write_text(
        "account_id,invoice_number,amount,paid_at\nacme,,1.005,2026-10-02\nacme,,-3,2026-10-02\nacme,,x,2026-10-02\nacme,,1,later\n"
    )
    with pytest.raises(ImportFileError) as error:
        read_payments_csv(bad)
    assert [p.split(":")[0] for p in error.value.problems] == ["line 2", "line 3", "line 4", "line 5"]
    assert "more than two decimals" in error.value.problems[0]


def test_payments_are_known_by_payment_id_or_by_all_their_values(catalog, tmp_path):
    add_account(catalog, "acme")
    path = tmp_path / "p.csv"
    path.write_text(
        "account_id,invoice_number,amount,paid_at\nacme,,10.00,2026-10-02T10:00:00Z\nacme,,10,2026-10-02T10:00:00Z\nacme,,10.00,2026-10-03T10:00:00Z\n"
    )
    first = import_payments(catalog, read_payments_csv(path))
    assert (first.new, first.known) == (2, 1)  # 10 and 10.00 at the same instant are the same payment
    assert (import_payments(catalog, read_payments_csv(path)).new, count(catalog, Payment)) == (0, 2)
    with catalog.session() as session:
        assert sorted(session.scalars(select(Payment.amount))) == [Decimal("10.00"), Decimal("10.00")]


def test_outages_import_is_idempotent_and_checked(catalog, tmp_path):
    path = tmp_path / "o.csv"
    path.write_text(
        "started_at,ended_at,scheduled\n2026-10-20T00:00:00Z,2026-10-20T06:00:00Z,false\n2026-10-21T00:00:00Z,2026-10-21T01:00:00Z,yes\n"
    )
    assert import_outages(catalog, read_outages_csv(path)).new == 2
    again = import_outages(catalog, read_outages_csv(path))
    assert (again.new, again.known, count(catalog, Outage)) == (0, 2, 2)
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "started_at,ended_at,scheduled\n2026-10-20T06:00:00Z,2026-10-20T00:00:00Z,false\n2026-10-20T00:00:00Z,2026-10-20T01:00:00Z,maybe\n"
    )
    with pytest.raises(ImportFileError) as error:
        read_outages_csv(bad)
    assert error.value.problems == [
        "line 2: ended_at must be after started_at",
        "line 3: scheduled 'maybe' is not true or false",
    ]
    missing = tmp_path / "missing.csv"
    missing.write_text("started_at,ended_at\n")
    with pytest.raises(ImportFileError, match="missing column"):
        read_outages_csv(missing)
