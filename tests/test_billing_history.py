"""Dated plan changes and dated terms: each plan, seat count, price and VAT rate is charged for the
days it was in force, limits follow the plan of the day, and invoiced months are never rewritten."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from pipelines.accounts import AccountRecord, AccountRow, get_account, upsert_accounts
from pipelines.admission import AdmissionRefused, Candidate, check_admission
from pipelines.billing.corrections import TermsUpdate, set_billing_terms
from pipelines.billing.delivery import buyer_of, document_of
from pipelines.billing.documents import document_html
from pipelines.billing.einvoice import cii_xml
from pipelines.billing.history import agreed_on, record_plan_change
from pipelines.billing.imports import OutageRecord, PaymentRecord, import_outages, import_payments, import_usage
from pipelines.billing.invoicing import run_billing
from pipelines.billing.lines import tax_by_rate
from pipelines.billing.usage import PointsCapExceededError, check_points_admission
from pipelines.catalog import Catalog
from pipelines.catalog.models import Account
from pipelines.cli import main
from pipelines.runtime import Runtime
from tests.conftest import make_account
from tests.test_admission import store_files
from tests.test_billing_support import (
    SELLER,
    add_account,
    catalog,
    cli_env,
    database_url,
    job,
    make_pricebook,
    on_time,
    postgres_schema_url,
    utc,
)

__all__ = ["catalog", "cli_env", "database_url", "postgres_schema_url"]  # fixtures used here

D = Decimal
# The issue's figures: professional at 109.00, and a dearer plan to upgrade to.
PLANS = (
    '\n  professional: {monthly_fee: "109.00", seat_fee: "10.00", extra_storage_fee_per_gb: "49.00", storage_limit_gb: 100}'
    '\n  business: {monthly_fee: "199.00", seat_fee: "12.00", storage_limit_gb: 500}\n'
)
BOOK = make_pricebook(PLANS)
SELLER_BOOK = make_pricebook(PLANS + SELLER)  # the same prices, with the seller an e-invoice names


def run(catalog: Catalog, period: str, book=BOOK):
    """The month invoiced on time, as the DAG does: on the 1st of the next month, dated that day."""
    return run_billing(catalog, period, book, now=on_time(period))


def lines_of(result, account_id: str) -> list[tuple[str, str]]:
    invoice = next(i for i in result.invoices if i.account_id == account_id)
    return [(line.kind, str(line.amount)) for line in invoice.lines]


def invoice_of(result, account_id: str):
    return next(i for i in result.invoices if i.account_id == account_id)


# --- plan changes -------------------------------------------------------------------------------


def test_trial_converted_on_the_4th_pays_the_days_from_the_4th(catalog):
    add_account(catalog, "t", plan="trial", started_at="2026-09-20")
    change = record_plan_change(catalog, BOOK, "t", "professional", date(2026, 10, 4))
    assert (change.previous_plan, change.plan, change.recorded) == ("trial", "professional", True)
    assert run(catalog, "2026-09").invoices == []  # the trial costs nothing
    october = invoice_of(run(catalog, "2026-10"), "t")
    assert [(line.kind, line.description, str(line.amount)) for line in october.lines] == [
        ("subscription", "Professional plan, 2026-10, 28 of 31 days, 2026-10-04 to 2026-10-31", "98.45"),  # 109 x 28/31
    ]
    assert (october.subtotal, october.tax) == (D("98.45"), D("18.71"))
    assert lines_of(run(catalog, "2026-11"), "t") == [("subscription", "109.00")]


def test_an_upgrade_on_the_16th_charges_each_plan_for_its_days(catalog):
    add_account(catalog, "u", started_at="2026-01-01")
    record_plan_change(catalog, BOOK, "u", "business", date(2026, 10, 16))
    october = invoice_of(run(catalog, "2026-10"), "u")
    assert [(line.description, str(line.unit_price), str(line.amount)) for line in october.lines] == [
        ("Professional plan, 2026-10, 15 of 31 days, 2026-10-01 to 2026-10-15", "109.00", "52.74"),  # 109 x 15/31
        ("Business plan, 2026-10, 16 of 31 days, 2026-10-16 to 2026-10-31", "199.00", "102.71"),  # 199 x 16/31
    ]
    assert october.tax == D("29.54")  # 19 % of 155.45


def test_seats_follow_the_plan_price_of_each_day(catalog):
    add_account(catalog, "s")
    set_billing_terms(catalog, "s", TermsUpdate(seats=2))
    record_plan_change(catalog, BOOK, "s", "business", date(2026, 10, 16))
    assert lines_of(run(catalog, "2026-10"), "s") == [
        ("subscription", "52.74"),
        ("subscription", "102.71"),
        ("seats", "9.68"),  # 2 x 10.00 x 15/31
        ("seats", "12.39"),  # 2 x 12.00 x 16/31
    ]


def test_a_downgrade_lowers_the_limits_from_its_date(runtime: Runtime):
    upsert_accounts(runtime.catalog, [make_account("d", plan="professional")])
    record_plan_change(runtime.catalog, None, "d", "free", date(2026, 10, 16))
    store_files(runtime, "d", *[(100, 10)] * 3)
    day_before, change_day = datetime(2026, 10, 15, 23, 59, tzinfo=UTC), datetime(2026, 10, 16, tzinfo=UTC)
    check_admission(
        runtime.settings, runtime.catalog, "d", Candidate(1000, 1000), day_before
    )  # professional: no file limit
    with pytest.raises(AdmissionRefused, match=r"free plan's stored files limit: 4 files"):
        check_admission(runtime.settings, runtime.catalog, "d", Candidate(1000, 1000), change_day)


def test_a_quarterly_plan_changed_mid_cycle_refunds_only_if_the_price_book_says_so(catalog):
    add_account(catalog, "q", billing_cycle="quarterly", started_at="2026-08-01")
    record_plan_change(catalog, BOOK, "q", "business", date(2026, 9, 16), "monthly")
    assert lines_of(run(catalog, "2026-08"), "q") == [("subscription", "327.00")]  # Aug 1 to Oct 31, in advance
    assert lines_of(run(catalog, "2026-09"), "q") == [("subscription", "99.50")]  # business 199 x 15/30, nothing back


def test_the_unused_prepaid_cycle_is_refunded_where_the_price_book_says_so(catalog):
    book = make_pricebook("refund_unused_prepaid: true\n", base=BOOK_TEXT)
    add_account(catalog, "q", billing_cycle="quarterly", started_at="2026-08-01")
    record_plan_change(catalog, book, "q", "business", date(2026, 9, 16), "monthly")
    run(catalog, "2026-08", book)
    september = invoice_of(run(catalog, "2026-09", book), "q")
    refund = next(line for line in september.lines if line.kind == "prepaid_refund")
    # 46 of the 92 days of Aug 1 to Oct 31 were not used: 327.00 x 46/92.
    assert (refund.amount, refund.description) == (
        D("-163.50"),
        "Refund of the unused professional plan quarterly 2026-08-01 to 2026-10-31: 46 of 92 days from 2026-09-16",
    )


def test_a_change_to_a_yearly_cycle_starts_a_cycle_on_its_date(catalog):
    add_account(catalog, "y")
    record_plan_change(catalog, BOOK, "y", "professional", date(2026, 10, 10), "yearly")
    assert lines_of(run(catalog, "2026-10"), "y") == [("subscription", "31.65"), ("subscription", "1308.00")]
    assert run(catalog, "2026-11").invoices == []


# --- changes dated in an invoiced month: corrected on the next invoice ---------------------------


def described(invoice) -> list[tuple[str, str, str]]:
    return [(line.kind, line.description, str(line.amount)) for line in invoice.lines]


def test_a_trial_converted_in_an_invoiced_month_is_charged_on_the_next_invoice(catalog):
    add_account(catalog, "t", plan="trial", started_at="2026-09-20")
    assert run(catalog, "2026-09").invoices == run(catalog, "2026-10").invoices == []  # the trial costs nothing
    # Told on 2026-11-03 that the customer converted on 2026-10-04: October is invoiced already.
    assert record_plan_change(catalog, BOOK, "t", "professional", date(2026, 10, 4)).recorded
    assert run(catalog, "2026-10").invoices == []  # an issued month is never rewritten
    november = invoice_of(run(catalog, "2026-11"), "t")
    assert described(november) == [
        ("subscription", "Professional plan, 2026-11", "109.00"),
        (
            "correction",
            "Correction of 2026-10: Professional plan, 2026-10, 28 of 31 days, 2026-10-04 to 2026-10-31",
            "98.45",
        ),
    ]
    assert (november.subtotal, november.tax) == (D("207.45"), D("39.42"))
    # Once: a re-run changes nothing, and December does not correct October again.
    assert invoice_of(run(catalog, "2026-11"), "t") == november
    assert lines_of(run(catalog, "2026-12"), "t") == [
        ("subscription", "109.00"),
        ("late_fee", "3.70"),
    ]  # November unpaid


def test_an_upgrade_recorded_after_its_month_was_invoiced_charges_the_difference_for_its_days(catalog):
    add_account(catalog, "u", started_at="2026-01-01")
    october = invoice_of(run(catalog, "2026-10"), "u")
    record_plan_change(catalog, BOOK, "u", "business", date(2026, 10, 16))
    assert invoice_of(run(catalog, "2026-10"), "u") == october
    november = invoice_of(run(catalog, "2026-11"), "u")
    assert [
        (line.description, str(line.quantity), str(line.unit_price), str(line.amount)) for line in november.lines
    ] == [
        ("Business plan, 2026-11", "1.0000", "199.00", "199.00"),
        (
            "Correction of 2026-10: Business plan, 2026-10, 16 of 31 days, 2026-10-16 to 2026-10-31",
            "16",
            "199.00",
            "102.71",
        ),
        (
            "Correction of 2026-10, credit for: Professional plan, 2026-10, 16 of 31 days, 2026-10-16 to 2026-10-31",
            "-16",
            "109.00",
            "-56.26",
        ),
    ]
    # October as invoiced and corrected comes to what it would have been with the change known in time.
    assert october.subtotal + sum(line.amount for line in november.lines[1:]) == D("52.74") + D("102.71")


def test_a_contract_end_recorded_after_its_month_was_invoiced_credits_the_days_after_it_once(catalog):
    add_account(catalog, "e", started_at="2026-01-01")
    set_billing_terms(catalog, "e", TermsUpdate(seats=2))
    october = invoice_of(run(catalog, "2026-10"), "e")
    assert [(line.kind, str(line.amount)) for line in october.lines] == [("subscription", "109.00"), ("seats", "20.00")]
    # The customer's last day was Oct 15, learnt after October was invoiced in full.
    terms = set_billing_terms(catalog, "e", TermsUpdate(ended_on=date(2026, 10, 15)))
    assert (terms["ended_on"], terms["corrects"]) == ("2026-10-15", ["2026-10"])
    assert invoice_of(run(catalog, "2026-10"), "e") == october  # an issued invoice is never edited
    november = invoice_of(run(catalog, "2026-11"), "e")
    # Oct 16-31, 16 of 31 days, credited: 109.00 x 16/31 = 56.258 -> 56.26 and 2 x 10.00 x 16/31
    # = 10.322 -> 10.32; nothing for November, after the end.
    assert described(november) == [
        (
            "correction",
            "Correction of 2026-10, credit for: Professional plan, 2026-10, 16 of 31 days, 2026-10-16 to 2026-10-31",
            "-56.26",
        ),
        (
            "correction",
            "Correction of 2026-10, credit for: User seats (2), 2026-10, 16 of 31 days, 2026-10-16 to 2026-10-31",
            "-10.32",
        ),
    ]
    # VAT 19 % of -66.58 = -12.6502 -> -12.65: a credit note of 79.23.
    assert (november.subtotal, november.tax, november.total) == (D("-66.58"), D("-12.65"), D("-79.23"))
    # October as invoiced and corrected is what 15 days would have cost: 109 x 15/31 = 52.74, 20 x 15/31 = 9.68.
    assert october.subtotal + november.subtotal == D("52.74") + D("9.68")
    # Once: a re-run, a later month and the same end recorded again correct nothing more.
    assert invoice_of(run(catalog, "2026-11"), "e") == november
    assert set_billing_terms(catalog, "e", TermsUpdate(ended_on=date(2026, 10, 15)))["corrects"] == []
    # The customer pays October (153.51) less the credit (79.23): 74.28; December bills nothing.
    import_payments(catalog, [(1, PaymentRecord("e", october.invoice_number, D("74.28"), utc("2026-12-10T00:00Z")))])
    assert october.total == D("153.51")
    assert run(catalog, "2026-12").invoices == []


def test_a_contract_end_moved_later_charges_the_days_added(catalog):
    add_account(catalog, "x", started_at="2026-01-01")
    set_billing_terms(catalog, "x", TermsUpdate(ended_on=date(2026, 10, 15)))
    assert lines_of(run(catalog, "2026-10"), "x") == [("subscription", "52.74")]  # 109 x 15/31
    # The customer stayed to Oct 20 after all: Oct 16-20, 5 of 31 days, 109 x 5/31 = 17.58.
    assert set_billing_terms(catalog, "x", TermsUpdate(ended_on=date(2026, 10, 20)))["corrects"] == ["2026-10"]
    assert described(invoice_of(run(catalog, "2026-11"), "x")) == [
        (
            "correction",
            "Correction of 2026-10: Professional plan, 2026-10, 5 of 31 days, 2026-10-16 to 2026-10-20",
            "17.58",
        )
    ]


def test_a_month_invoiced_before_the_account_was_added_gets_its_invoice_not_a_correction(catalog):
    run(catalog, "2026-10")
    add_account(catalog, "new", started_at="2026-01-01")  # added after October's run: October billed it nothing
    # Nothing of its is invoiced yet: no correction is announced (`accounts change-plan` prints none).
    assert record_plan_change(catalog, BOOK, "new", "business", date(2026, 10, 16)).corrects == ()
    november = run(catalog, "2026-11")
    assert lines_of(november, "new") == [("subscription", "199.00")]
    # Its October invoice is issued with November's, with each plan for its days: nothing to correct.
    [october] = november.caught_up
    assert (october.invoice_number, october.issue_date) == ("PF-2026-10-0001", date(2026, 12, 1))
    assert described(october) == [
        ("subscription", "Professional plan, 2026-10, 15 of 31 days, 2026-10-01 to 2026-10-15", "52.74"),
        ("subscription", "Business plan, 2026-10, 16 of 31 days, 2026-10-16 to 2026-10-31", "102.71"),
    ]


def test_a_change_reaching_into_two_invoiced_months_corrects_each_once(catalog):
    add_account(catalog, "s", started_at="2026-01-01")
    run(catalog, "2026-09")
    run(catalog, "2026-10")
    set_billing_terms(catalog, "s", TermsUpdate(seats=4, effective_on=date(2026, 9, 21)))
    november = invoice_of(run(catalog, "2026-11"), "s")
    assert [line for line in described(november) if line[0] != "late_fee"] == [  # September is overdue
        ("subscription", "Professional plan, 2026-11", "109.00"),
        ("seats", "User seats (4), 2026-11", "40.00"),
        (
            "correction",
            "Correction of 2026-09: User seats (4), 2026-09, 10 of 30 days, 2026-09-21 to 2026-09-30",
            "13.33",
        ),
        ("correction", "Correction of 2026-10: User seats (4), 2026-10", "40.00"),
    ]
    with catalog.session() as session:
        from sqlalchemy import select

        from pipelines.billing.models import ChangeBilling

        assert session.execute(select(ChangeBilling.kind, ChangeBilling.period)).tuples().all() == [
            ("terms", "2026-11")
        ]
    assert [line for line in lines_of(run(catalog, "2026-12"), "s") if line[0] != "late_fee"] == [
        ("subscription", "109.00"),
        ("seats", "40.00"),
    ]


def test_an_agreed_price_dated_back_reprices_the_usage_already_billed(catalog):
    add_account(catalog, "api1", plan="api", tax_rate="0.20")
    import_usage(
        catalog,
        [
            (1, job("a", "api1", "2026-10-05T10:00Z", 40_000_000)),
            (2, job("b", "api1", "2026-10-20T10:00Z", 60_000_000)),
        ],
    )
    assert lines_of(run(catalog, "2026-10"), "api1") == [("usage", "50.00")]
    set_billing_terms(catalog, "api1", TermsUpdate(price_per_million_points=D("0.40"), effective_on=date(2026, 10, 16)))
    # Usage of October that arrives now is billed late at the new price, and is not repriced twice.
    import_usage(catalog, [(1, job("c", "api1", "2026-10-30T10:00Z", 10_000_000))])
    november = invoice_of(run(catalog, "2026-11"), "api1")
    assert described(november) == [
        (
            "late_usage",
            "Usage of 2026-10 received late: Classification, 10,000,000 points, 2026-10-16 to 2026-10-31, per million points",
            "4.00",
        ),
        (
            "correction",
            "Correction of 2026-10: Classification, 60,000,000 points, 2026-10-16 to 2026-10-31, per million points",
            "24.00",
        ),
        (
            "correction",
            "Correction of 2026-10, credit for: Classification, 60,000,000 points, 2026-10-16 to 2026-10-31, "
            "per million points",
            "-30.00",
        ),
    ]
    assert (november.subtotal, november.tax, november.total) == (D("-2.00"), D("-0.40"), D("-2.40"))


def test_an_exemption_dated_back_credits_the_vat_charged_and_a_negative_month_is_a_credit_note(catalog):
    add_account(catalog, "nl", tax_rate="0.19", country="NL")
    with catalog.session() as session:
        session.get(Account, "nl").vat_id = "NL123456789B01"
    october = invoice_of(run(catalog, "2026-10", SELLER_BOOK), "nl")
    set_billing_terms(catalog, "nl", TermsUpdate(tax_exempt=True, effective_on=date(2026, 10, 1)))
    record_plan_change(catalog, SELLER_BOOK, "nl", "free", date(2026, 11, 1))
    november = invoice_of(run(catalog, "2026-11", SELLER_BOOK), "nl")
    assert [(line.description, str(line.amount), str(line.tax_rate), line.tax_category) for line in november.lines] == [
        ("Correction of 2026-10: Professional plan, 2026-10", "109.00", "0", "AE"),
        ("Correction of 2026-10, credit for: Professional plan, 2026-10", "-109.00", "0.19", "S"),
    ]
    assert (november.subtotal, november.tax, november.total) == (D("0.00"), -october.tax, -october.tax)
    # The month's total is a credit: its document is a credit note (EN 16931 type 381), amounts positive.
    document = document_of(catalog, SELLER_BOOK, november, buyer_of(get_account(catalog, "nl")))
    xml = cii_xml(document)
    assert (document.kind, document.gross_total, document.amount_due, document.due_date) == (
        "credit_note",
        october.tax,
        october.tax,
        None,
    )
    assert (
        b"<ram:TypeCode>381</ram:TypeCode>" in xml
        and f"<ram:GrandTotalAmount>{october.tax}</ram:GrandTotalAmount>".encode() in xml
    )
    assert "Reverse charge" in document_html(document) and "Credit note" in document_html(document)
    # The ledger carries it: October paid, nothing charged in December, the credit waits for a later invoice.
    import_payments(
        catalog, [(1, PaymentRecord("nl", october.invoice_number, october.total, utc("2026-11-15T00:00Z")))]
    )
    assert run(catalog, "2026-12", SELLER_BOOK).invoices == []


def test_the_migration_marks_the_changes_invoiced_before_it_as_taken_into_account(catalog, database_url):
    from alembic import command
    from sqlalchemy import select

    from pipelines.billing.models import ChangeBilling
    from pipelines.catalog.db import alembic_config

    add_account(catalog, "m")
    set_billing_terms(catalog, "m", TermsUpdate(seats=1))  # nothing invoiced yet: since the start
    record_plan_change(catalog, BOOK, "m", "business", date(2026, 10, 16))
    record_plan_change(catalog, BOOK, "m", "professional", date(2026, 12, 1))
    october = invoice_of(run(catalog, "2026-10"), "m")
    with catalog.engine.begin() as connection:  # as a catalog invoiced before the table existed
        config = alembic_config(database_url)
        config.attributes["connection"] = connection
        command.downgrade(config, "0010")
        command.upgrade(config, "head")
    with catalog.session() as session:
        marks = (
            session.execute(select(ChangeBilling.kind, ChangeBilling.period).order_by(ChangeBilling.kind))
            .tuples()
            .all()
        )
    assert marks == [("plan", "2026-10"), ("terms", "2026-10")]  # December's change waits for its month
    # Going below 0016 drops the lines' base quantities (a catalog of then had none); all else is kept.
    unbased = tuple(dataclasses.replace(line, base_quantity=D(1)) for line in october.lines)
    assert invoice_of(run(catalog, "2026-10"), "m") == dataclasses.replace(october, lines=unbased)
    assert "correction" not in {kind for kind, _ in lines_of(run(catalog, "2026-11"), "m")}


def test_the_migration_records_contract_ends_known_before_it_as_taken_into_account(catalog, database_url):
    from alembic import command
    from sqlalchemy import select

    from pipelines.billing.models import ChangeBilling, TermChange
    from pipelines.catalog.db import alembic_config

    add_account(catalog, "g")
    set_billing_terms(catalog, "g", TermsUpdate(ended_on=date(2026, 10, 15)))
    october = invoice_of(run(catalog, "2026-10"), "g")  # 15 days, the end known in time
    with catalog.engine.begin() as connection:  # as a catalog whose ends are in billing_terms only
        config = alembic_config(database_url)
        config.attributes["connection"] = connection
        command.downgrade(config, "0016")
        command.upgrade(config, "head")
    with catalog.session() as session:
        [change_id] = session.scalars(select(TermChange.id).where(TermChange.ended_on == date(2026, 10, 15))).all()
        assert session.get(ChangeBilling, ("terms", change_id)).period == "2026-10"
    assert invoice_of(run(catalog, "2026-10"), "g") == october
    assert run(catalog, "2026-11").invoices == []  # nothing to correct


def test_recording_the_plan_in_force_records_nothing(catalog):
    add_account(catalog, "same")
    assert not record_plan_change(catalog, BOOK, "same", "professional", date(2026, 10, 1)).recorded
    with pytest.raises(Exception, match="'gold' is not in the price book"):
        record_plan_change(catalog, BOOK, "same", "gold", date(2026, 10, 1))


def test_import_records_a_change_only_when_the_plan_differs(catalog):
    record = AccountRecord("imp", "Imp Ltd", "a@imp.example", "DE", "trial", date(2026, 9, 20), D("0.19"))
    upsert_accounts(catalog, [record])
    upsert_accounts(catalog, [record], today=date(2026, 10, 2))
    assert agreed_on(catalog, "imp", date(2026, 12, 1)).plan == "trial"
    converted = AccountRow(**{**record.__dict__, "plan": "professional", "plan_effective": date(2026, 10, 4)})
    upsert_accounts(catalog, [converted], today=date(2026, 10, 5))
    assert [agreed_on(catalog, "imp", date(2026, 10, d)).plan for d in (3, 4)] == ["trial", "professional"]
    assert lines_of(run(catalog, "2026-10"), "imp") == [("subscription", "98.45")]


# --- dated terms ----------------------------------------------------------------------------------


def test_seats_and_storage_are_charged_by_the_days_they_were_agreed(catalog):
    add_account(catalog, "t")
    set_billing_terms(catalog, "t", TermsUpdate(seats=2))
    set_billing_terms(catalog, "t", TermsUpdate(seats=5, extra_storage_gb=1, effective_on=date(2026, 10, 11)))
    october = invoice_of(run(catalog, "2026-10"), "t")
    assert [(line.kind, line.description, str(line.amount)) for line in october.lines] == [
        ("subscription", "Professional plan, 2026-10", "109.00"),
        ("seats", "User seats (2), 2026-10, 10 of 31 days, 2026-10-01 to 2026-10-10", "6.45"),
        ("seats", "User seats (5), 2026-10, 21 of 31 days, 2026-10-11 to 2026-10-31", "33.87"),
        ("extra_storage", "Extra storage 1 GB, 2026-10, 21 of 31 days, 2026-10-11 to 2026-10-31", "33.19"),
    ]


def test_agreed_prices_and_points_cap_apply_from_their_date(catalog):
    add_account(catalog, "api1", plan="api")
    set_billing_terms(
        catalog,
        "api1",
        TermsUpdate(price_per_million_points=D("0.40"), monthly_points_cap=1000, effective_on=date(2026, 10, 16)),
    )
    import_usage(
        catalog,
        [
            (1, job("a", "api1", "2026-10-15T23:00Z", 10_000_000)),
            (2, job("b", "api1", "2026-10-16T01:00Z", 10_000_000)),
        ],
    )
    assert lines_of(run(catalog, "2026-10"), "api1") == [("usage", "5.00"), ("usage", "4.00")]
    # Before the 16th the plan's cap of 500 M applied; from the 16th the agreed 1,000.
    check_points_admission(catalog, BOOK, "api1", 1_000_000, utc("2026-10-15T12:00Z"))
    with pytest.raises(PointsCapExceededError, match="20,000,000 of its 1,000 points"):
        check_points_admission(catalog, BOOK, "api1", 1, utc("2026-10-20T00:00Z"))


def test_a_vat_rate_change_mid_month_gives_a_line_and_a_tax_per_rate(catalog):
    add_account(catalog, "vat", tax_rate="0.19")
    set_billing_terms(catalog, "vat", TermsUpdate(tax_rate=D("0.16"), effective_on=date(2026, 10, 16)))
    october = invoice_of(run(catalog, "2026-10"), "vat")
    assert [(str(line.amount), str(line.tax_rate)) for line in october.lines] == [("52.74", "0.19"), ("56.26", "0.16")]
    assert tax_by_rate(october.lines) == {D("0.19"): (D("52.74"), D("10.02")), D("0.16"): (D("56.26"), D("9.00"))}
    assert (october.tax, october.total, october.tax_rate) == (D("19.02"), D("128.02"), D("0.16"))


def test_an_exemption_ends_on_its_valid_until_date(catalog):
    add_account(catalog, "ex", tax_rate="0.19")
    set_billing_terms(catalog, "ex", TermsUpdate(tax_exempt=True, exempt_until=date(2026, 10, 20)))
    october = invoice_of(run(catalog, "2026-10"), "ex")
    assert [(str(line.amount), str(line.tax_rate), line.tax_category) for line in october.lines] == [
        ("70.32", "0", "E"),
        ("38.68", "0.19", "S"),
    ]
    assert october.tax == D("7.35")  # 19 % of the 11 days after the exemption


# --- the commands ---------------------------------------------------------------------------------


def cli(capsys, *argv: str) -> str:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


BOOK_TEXT = """
currency: EUR
invoice_prefix: PF
payment_terms_days: 30
late_fee_monthly_rate: "0.015"
plans:
  free: {monthly_fee: "0.00", max_files: 3}
  trial: {monthly_fee: "0.00", trial_days: 14}
  professional: {monthly_fee: "109.00", seat_fee: "10.00", storage_limit_gb: 100}
  professional_sharing: {monthly_fee: "99.00", discount: "0.20"}
  api: {price_per_million_points: "0.50"}
  business: {monthly_fee: "199.00", seat_fee: "12.00", storage_limit_gb: 500}
"""


def test_change_plan_from_the_command_line(cli_env, capsys, tmp_path: Path, monkeypatch):
    book = tmp_path / "book.yaml"
    book.write_text(BOOK_TEXT)
    monkeypatch.setenv("POINTFLOW_PRICEBOOK", str(book))
    cli(
        capsys,
        "accounts",
        "add",
        "conv",
        "--name",
        "Conv",
        "--email",
        "a@conv.example",
        "--country",
        "DE",
        "--plan",
        "trial",
        "--started-at",
        "2026-09-20",
        "--tax-rate",
        "0.19",
    )
    assert cli(capsys, "accounts", "change-plan", "conv", "--plan", "professional", "--effective", "2026-10-04") == (
        "account conv: trial (monthly) until 2026-10-03, professional (monthly) from 2026-10-04\n"
    )
    assert "nothing recorded" in cli(
        capsys, "accounts", "change-plan", "conv", "--plan", "professional", "--effective", "2026-10-10"
    )
    [october] = json.loads(cli(capsys, "billing", "run", "--period", "2026-10", "--json"))
    assert (october["subtotal"], october["lines"][0]["amount"]) == ("98.45", "98.45")
    # October is invoiced: the change is recorded, and November's invoice corrects October.
    assert cli(capsys, "accounts", "change-plan", "conv", "--plan", "business", "--effective", "2026-10-20") == (
        "account conv: professional (monthly) until 2026-10-19, business (monthly) from 2026-10-20\n"
        "2026-10 is invoiced already: the next monthly run corrects it on its invoice\n"
    )
    assert (
        cli(capsys, "billing", "run", "--period", "2026-10")
        == "PF-2026-10-0001  conv  EUR 117.16\n2026-10: 1 invoice(s), already invoiced, nothing created\n"
    )
    change = json.loads(
        cli(capsys, "accounts", "change-plan", "conv", "--plan", "professional", "--effective", "2026-10-25", "--json")
    )
    assert (change["previous_plan"], change["corrects"]) == ("business", ["2026-10"])
    terms = json.loads(
        cli(
            capsys,
            "billing",
            "terms",
            "conv",
            "--seats",
            "3",
            "--exempt-until",
            "2026-12-31",
            "--effective",
            "2026-11-15",
        )
    )
    assert (terms["seats"], terms["tax_exempt"], terms["exempt_until"], terms["effective_on"]) == (
        3,
        True,
        "2026-12-31",
        "2026-11-15",
    )
    assert terms["corrects"] == []
    assert json.loads(cli(capsys, "billing", "terms", "conv", "--seats", "2", "--effective", "2026-10-01"))[
        "corrects"
    ] == ["2026-10"]


# --- usage received late --------------------------------------------------------------------------


def test_late_usage_is_billed_once_on_the_next_invoice_at_the_price_of_its_day(catalog):
    book = make_pricebook(
        '\n  api:\n    price_per_million_points: "0.50"\n    changes: [{effective_from: 2026-10-01, price_per_million_points: "0.60"}]\n'
    )
    add_account(catalog, "api1", plan="api", tax_rate="0.20")
    import_usage(catalog, [(1, job("sep-on-time", "api1", "2026-09-10T10:00Z", 2_000_000))])
    september = run(catalog, "2026-09", book)
    assert lines_of(september, "api1") == [("usage", "1.00")]
    import_payments(
        catalog, [(1, PaymentRecord("api1", september.invoices[0].invoice_number, D("1.20"), utc("2026-10-05T00:00Z")))]
    )

    result = import_usage(
        catalog,
        [
            (1, job("sep-late", "api1", "2026-09-29T10:00Z", 10_000_000)),
            (2, job("oct", "api1", "2026-10-02T10:00Z", 1_000_000)),
        ],
    )
    assert "2026-09 already invoiced, its new usage is billed on the next invoice" in result.summary("usage events")
    october = invoice_of(run(catalog, "2026-10", book), "api1")
    assert [(line.kind, line.description, str(line.unit_price), str(line.amount)) for line in october.lines] == [
        ("usage", "Classification, 1,000,000 points, 2026-10-01 to 2026-10-31, per million points", "0.60", "0.60"),
        (
            "late_usage",
            "Usage of 2026-09 received late: Classification, 10,000,000 points, 2026-09-01 to 2026-09-30, "
            "per million points",
            "0.50",
            "5.00",
        ),
    ]
    assert (october.tax, october.total) == (D("1.12"), D("6.72"))
    # Once: re-running either month changes nothing, and November does not bill it again.
    assert run(catalog, "2026-09", book).invoices == september.invoices
    assert invoice_of(run(catalog, "2026-10", book), "api1") == october
    assert run(catalog, "2026-11", book).invoices == []


def described_credits(result, account_id: str) -> list[tuple[str, str, str]]:
    invoice = invoice_of(result, account_id)
    return [(line.kind, line.description, str(line.amount)) for line in invoice.lines if line.kind != "late_fee"]


def test_an_outage_recorded_after_its_month_was_invoiced_is_credited_once_on_the_next_invoice(catalog):
    add_account(catalog, "acme", started_at="2026-01-01")
    october = run(catalog, "2026-10")
    assert lines_of(october, "acme") == [("subscription", "109.00")]  # no outage known yet

    day = [(1, OutageRecord(utc("2026-10-05T00:00Z"), utc("2026-10-06T00:00Z"), scheduled=False))]
    result = import_outages(catalog, day)
    assert "2026-10 already invoiced, its new outages are credited on the next invoice" in result.summary("outages")
    # October: 44,640 minutes, 1,440 down: 100 x 43,200 / 44,640 = 96.7741935 %; shortfall
    # (99.5 - 96.7741935) / 100 = 0.0272580645; 109.00 x 0.0272580645 = 2.9711290 -> 2.97.
    november = run(catalog, "2026-11")
    assert described_credits(november, "acme") == [
        ("subscription", "Professional plan, 2026-11", "109.00"),
        ("correction", "Correction of 2026-10: Availability credit: 96.774 % in 2026-10, target 99.5 %", "-2.97"),
    ]
    # 106.03 taxable at 19 %: 20.1457 -> 20.15; total 126.18.
    assert (invoice_of(november, "acme").tax, invoice_of(november, "acme").total) == (D("20.15"), D("126.18"))
    # Once: the same outage imported again is known, a re-run returns the same invoice.
    assert import_outages(catalog, day).new == 0
    assert invoice_of(run(catalog, "2026-11"), "acme") == invoice_of(november, "acme")

    # A second outage of October recorded later: 21 more days down (30,240 minutes), 31,680 in all:
    # 100 x 12,960 / 44,640 = 29.0322581 %; shortfall 0.995 - 0.2903226 = 0.7046774;
    # 109.00 x 0.7046774 = 76.8098387 -> 76.81 for the month in all, as if both had been known on
    # time; 2.97 of it was credited already (reversed), so 76.81 - 2.97 = 73.84 more.
    import_outages(catalog, [(1, OutageRecord(utc("2026-10-10T00:00Z"), utc("2026-10-31T00:00Z"), scheduled=False))])
    december = run(catalog, "2026-12")
    assert described_credits(december, "acme") == [
        ("subscription", "Professional plan, 2026-12", "109.00"),
        (
            "correction",
            "Correction of 2026-10: Availability credit: 29.032 % in 2026-10, target 99.5 %",
            "-76.81",
        ),
        (
            "correction",
            "Correction of 2026-10, credit for: Availability credit: 96.774 % in 2026-10, target 99.5 %",
            "2.97",
        ),
    ]
    assert described_credits(run(catalog, "2027-01"), "acme") == [
        ("subscription", "Professional plan, 2027-01", "109.00")
    ]


OCTOBER_OUTAGE = [(1, OutageRecord(utc("2026-10-05T00:00Z"), utc("2026-10-06T00:00Z"), scheduled=False))]
OCTOBER_CORRECTION = (
    "correction",
    "Correction of 2026-10: Availability credit: 96.774 % in 2026-10, target 99.5 %",
    "-2.97",
)


def test_a_rerun_for_an_account_added_later_leaves_new_outages_to_the_next_months_run(catalog):
    add_account(catalog, "acme")
    run(catalog, "2026-10")
    import_outages(catalog, OCTOBER_OUTAGE)  # recorded after October was invoiced
    add_account(catalog, "xnew")  # and an account October's run never saw
    again = run_billing(catalog, "2026-10", BOOK, now=utc("2026-11-15T00:00Z"))
    assert lines_of(again, "xnew") == [("subscription", "109.00")]
    # November's run takes the outage into account, for every account October covered, once.
    november = run(catalog, "2026-11")
    for account_id in ("acme", "xnew"):
        assert described_credits(november, account_id) == [
            ("subscription", "Professional plan, 2026-11", "109.00"),
            OCTOBER_CORRECTION,
        ]


def test_a_months_first_run_invoices_an_account_added_later_with_the_outages_it_takes_into_account(catalog):
    add_account(catalog, "acme")
    run(catalog, "2026-10")
    import_outages(catalog, OCTOBER_OUTAGE)
    add_account(catalog, "xnew")
    november = run(catalog, "2026-11")
    [october] = november.caught_up
    assert [(line.kind, str(line.amount)) for line in october.lines] == [
        ("subscription", "109.00"),
        ("availability_credit", "-2.97"),
    ]
    assert described_credits(november, "acme")[1:] == [OCTOBER_CORRECTION]
    assert described_credits(november, "xnew") == [("subscription", "Professional plan, 2026-11", "109.00")]


def test_an_outage_known_on_time_is_credited_by_its_month_alone(catalog):
    add_account(catalog, "acme", started_at="2026-01-01")
    import_outages(catalog, [(1, OutageRecord(utc("2026-10-05T00:00Z"), utc("2026-10-06T00:00Z"), scheduled=False))])
    assert lines_of(run(catalog, "2026-10"), "acme") == [("subscription", "109.00"), ("availability_credit", "-2.97")]
    assert lines_of(run(catalog, "2026-11"), "acme") == [("subscription", "109.00")]


def test_late_usage_of_a_month_not_invoiced_waits_for_its_own_month(catalog):
    add_account(catalog, "api1", plan="api")
    import_usage(
        catalog,
        [
            (1, job("sep", "api1", "2026-09-10T10:00Z", 2_000_000)),
            (2, job("oct", "api1", "2026-10-10T10:00Z", 4_000_000)),
        ],
    )
    assert lines_of(run(catalog, "2026-10"), "api1") == [("usage", "2.00")]  # September was never invoiced
    assert lines_of(run(catalog, "2026-09"), "api1") == [("usage", "1.00")]


def test_late_usage_on_an_invoice_that_has_nothing_else(catalog):
    add_account(catalog, "gone", plan="api")
    set_billing_terms(catalog, "gone", TermsUpdate(ended_on=date(2026, 9, 30)))
    run(catalog, "2026-09")
    import_usage(catalog, [(1, job("last-job", "gone", "2026-09-30T22:00Z", 3_000_000))])
    assert lines_of(run(catalog, "2026-10"), "gone") == [("late_usage", "1.50")]


def test_every_billed_event_is_marked_whenever_it_was_recorded_and_billed_once(catalog):
    from sqlalchemy import select, update

    from pipelines.billing.models import BillingRun, UsageBilling
    from pipelines.catalog.models import UsageEvent

    add_account(catalog, "api1", plan="api")
    import_usage(
        catalog,
        [
            (1, job("early", "api1", "2026-09-03T10:00Z", 2_000_000)),
            (2, job("recent", "api1", "2026-09-29T10:00Z", 4_000_000)),
        ],
    )
    with catalog.session() as session:  # imported during September, weeks before the run
        session.execute(
            update(UsageEvent).where(UsageEvent.event_id == "early").values(recorded_at=utc("2026-09-03T10:05Z"))
        )
    assert lines_of(run(catalog, "2026-09"), "api1") == [("usage", "3.00")]
    with catalog.session() as session:
        # Which invoice billed an event never depends on when it was recorded: every one is marked,
        # and the run is stamped with its own time, not the clock of the machine that ran it.
        assert dict(session.execute(select(UsageBilling.event_id, UsageBilling.period)).tuples().all()) == {
            "early": "2026-09",
            "recent": "2026-09",
        }
        assert session.get(BillingRun, "2026-09").created_at == utc("2026-10-01T02:00Z")
    import_usage(catalog, [(1, job("late", "api1", "2026-09-30T10:00Z", 8_000_000))])
    assert [line for line in lines_of(run(catalog, "2026-10"), "api1") if "usage" in line[0]] == [
        ("late_usage", "4.00")
    ]
    assert not [line for line in lines_of(run(catalog, "2026-11"), "api1") if "usage" in line[0]]
    with catalog.session() as session:
        assert session.get(UsageBilling, "late").period == "2026-10"
