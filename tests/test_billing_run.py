"""Monthly runs against the catalog (SQLite, and PostgreSQL when reachable): what gets billed,
numbering, idempotency, concurrency, balances across months, credit notes and disputes."""

from __future__ import annotations

import threading
from datetime import date
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from pipelines.billing.corrections import (
    TermsUpdate,
    invoice_statement,
    issue_credit_note,
    open_dispute,
    set_billing_terms,
)
from pipelines.billing.imports import OutageRecord, PaymentRecord, import_outages, import_payments, import_usage
from pipelines.billing.invoicing import BillingError, run_billing
from pipelines.billing.models import BillingRun, Invoice, InvoiceLine
from pipelines.billing.overdue import overdue_balances
from pipelines.billing.usage import PointsCapExceededError, check_points_admission, points_used_in_month, usage_daily
from pipelines.catalog import Catalog
from tests.test_billing_support import (
    add_account,
    catalog,
    database_url,
    job,
    make_pricebook,
    on_time,
    postgres_schema_url,
    utc,
)

__all__ = ["catalog", "database_url", "postgres_schema_url"]  # fixtures used here

D = Decimal
BOOK = make_pricebook()


def run(catalog: Catalog, period: str, book=BOOK):
    """The month invoiced on time, as the DAG does: on the 1st of the next month, dated that day."""
    return run_billing(catalog, period, book, now=on_time(period))


def usage(catalog: Catalog, *records) -> None:
    import_usage(catalog, list(enumerate(records, start=1)))


def pay(catalog: Catalog, account_id: str, invoice_number: str | None, amount: str, when: str) -> None:
    import_payments(catalog, [(1, PaymentRecord(account_id, invoice_number, D(amount), utc(when)))])


def totals(result) -> dict[str, tuple[str, str]]:
    return {i.account_id: (i.invoice_number, str(i.total)) for i in result.invoices}


def lines_of(result, account_id: str) -> list[tuple[str, str]]:
    invoice = next(i for i in result.invoices if i.account_id == account_id)
    return [(line.kind, str(line.amount)) for line in invoice.lines]


def test_failed_jobs_are_not_billed_and_aborted_jobs_are(catalog):
    add_account(catalog, "api1", plan="api")
    usage(
        catalog,
        job("ok", "api1", "2026-10-05T10:00Z", 4_000_000),
        job("aborted", "api1", "2026-10-06T10:00Z", 2_000_000, status="aborted"),
        job("failed", "api1", "2026-10-07T10:00Z", 90_000_000, status="failed"),
    )
    result = run(catalog, "2026-10")
    assert lines_of(result, "api1") == [("usage", "3.00")]  # 6 M points x 0.50
    assert result.invoices[0].lines[0].quantity == D("6")


def test_events_are_assigned_to_months_by_their_utc_timestamp(catalog):
    add_account(catalog, "api1", plan="api")
    usage(
        catalog,
        job("before", "api1", "2026-09-30T23:59:59.999999Z", 1_000_000),
        job("first-instant", "api1", "2026-10-01T00:00:00Z", 2_000_000),
        job("last-instant", "api1", "2026-10-31T23:59:59.999999Z", 4_000_000),
        job("local-time", "api1", "2026-11-01T00:30:00+01:00", 8_000_000),  # = Oct 31 23:30 UTC
        job("after", "api1", "2026-11-01T00:00:00Z", 16_000_000),
    )
    october = run(catalog, "2026-10")
    assert october.invoices[0].lines[0].quantity == D("14")
    assert run(catalog, "2026-11").invoices[0].lines[0].quantity == D("16")
    assert run(catalog, "2026-09").invoices[0].lines[0].quantity == D("1")


def test_invoice_numbers_are_gap_free_in_account_order_and_zero_periods_get_none(catalog):
    for account_id, plan in (
        ("a-free", "free"),
        ("b-pro", "professional"),
        ("c-trial", "trial"),
        ("d-api", "api"),
        ("e-pro", "professional"),
    ):
        add_account(catalog, account_id, plan=plan)
    add_account(catalog, "f-later", started_at="2026-11-02")  # not yet a customer in October
    result = run(catalog, "2026-10")
    assert totals(result) == {"b-pro": ("PF-2026-10-0001", "117.81"), "e-pro": ("PF-2026-10-0002", "117.81")}
    invoice = result.invoices[0]
    assert (invoice.issue_date, invoice.due_date, invoice.currency, invoice.period) == (
        date(2026, 11, 1),
        date(2026, 12, 1),
        "EUR",
        "2026-10",
    )


def test_rerun_returns_the_same_invoices_and_creates_nothing(catalog):
    add_account(catalog, "pro")
    add_account(catalog, "api1", plan="api")
    usage(catalog, job("e1", "api1", "2026-10-05T10:00Z", 123_456_789))
    first = run(catalog, "2026-10")
    # Usage of an account already invoiced for the month goes on its next invoice, not on this one.
    usage(catalog, job("e2", "api1", "2026-10-06T10:00Z", 1_000_000))
    again = run_billing(
        catalog, "2026-10", make_pricebook('\n  professional: {monthly_fee: "1.00"}\n'), now=utc("2027-03-01T00:00Z")
    )
    assert first.created and not again.created
    assert [i.to_dict() for i in again.invoices] == [i.to_dict() for i in first.invoices]
    with catalog.session() as session:
        assert session.scalar(select(func.count()).select_from(Invoice)) == 2
        assert session.scalar(select(func.count()).select_from(InvoiceLine)) == 2
        assert session.scalar(select(func.count()).select_from(BillingRun)) == 1
    assert lines_of(run(catalog, "2026-11"), "api1") == [("late_usage", "0.50")]


def test_an_account_added_after_its_months_run_is_invoiced_by_a_rerun_and_only_it(catalog):
    add_account(catalog, "a-pro")
    add_account(catalog, "c-api", plan="api")
    usage(catalog, job("c-oct", "c-api", "2026-10-05T10:00Z", 2_000_000))
    first = run(catalog, "2026-10")
    # Imported on Nov 10 with a start in October, with its October usage: October's run never saw it.
    add_account(catalog, "b-pro", started_at="2026-10-22")
    add_account(catalog, "d-api", plan="api", started_at="2026-10-01")
    usage(
        catalog,
        job("d-oct", "d-api", "2026-10-20T10:00Z", 6_000_000),
        job("c-late", "c-api", "2026-10-30T10:00Z", 4_000_000),  # c-api has its October invoice
    )
    again = run_billing(catalog, "2026-10", BOOK, now=utc("2026-11-10T09:00Z"))
    assert again.created and again.issued == ("PF-2026-10-0003", "PF-2026-10-0004")
    # The issued invoices are returned unchanged; the new ones take the next numbers, dated the day issued.
    assert again.invoices[:2] == first.invoices
    assert totals(again) == {
        "a-pro": ("PF-2026-10-0001", "117.81"),
        "c-api": ("PF-2026-10-0002", "1.19"),
        "b-pro": ("PF-2026-10-0003", "38.01"),  # 99.00 x 10/31 = 31.94 + 19 %
        "d-api": ("PF-2026-10-0004", "3.57"),  # 6 M x 0.50 = 3.00 + 19 %
    }
    assert {(i.issue_date, i.due_date) for i in again.invoices[2:]} == {(date(2026, 11, 10), date(2026, 12, 10))}
    # Once: another re-run creates nothing; November bills c-api's late October usage, once.
    assert not run_billing(catalog, "2026-10", BOOK, now=utc("2026-11-11T00:00Z")).created
    november = run(catalog, "2026-11")
    assert lines_of(november, "c-api") == [("late_usage", "2.00")]
    assert "d-api" not in totals(november)
    assert [lines_of(november, a) for a in ("a-pro", "b-pro")] == [[("subscription", "99.00")]] * 2


def test_a_month_that_has_not_ended_is_refused(catalog):
    with pytest.raises(BillingError, match="has not ended"):
        run_billing(catalog, "2099-01", BOOK, now=utc("2027-06-01T00:00Z"))
    with pytest.raises(BillingError, match="has not ended"):
        run_billing(catalog, "2026-10", BOOK, now=utc("2026-10-31T23:59:59Z"))
    assert run_billing(catalog, "2026-10", BOOK, now=utc("2026-11-01T00:00:00Z")).created


def test_two_runs_at_the_same_time_create_one_set_of_invoices(catalog, database_url):
    for n in range(30):
        add_account(catalog, f"acct{n:02d}")
    results = []
    errors = []
    barrier = threading.Barrier(2)

    def race() -> None:
        own = Catalog(database_url)  # each run its own engine, as two processes would
        try:
            barrier.wait()
            results.append(run(own, "2026-10"))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)
        finally:
            own.dispose()

    threads = [threading.Thread(target=race) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(r.created for r in results) == [False, True]
    assert [i.to_dict() for i in results[0].invoices] == [i.to_dict() for i in results[1].invoices]
    with catalog.session() as session:
        assert session.scalar(select(func.count()).select_from(Invoice)) == 30


def test_usage_price_follows_effective_dates_in_the_run(catalog):
    book = make_pricebook(
        '\n  api:\n    price_per_million_points: "0.50"\n    changes: [{effective_from: 2026-10-16, price_per_million_points: "0.60"}]\n'
    )
    add_account(catalog, "api1", plan="api")
    usage(
        catalog,
        job("old", "api1", "2026-10-15T23:59:59Z", 10_000_000),
        job("new", "api1", "2026-10-16T00:00:00Z", 10_000_000),
    )
    assert lines_of(run(catalog, "2026-10", book), "api1") == [("usage", "5.00"), ("usage", "6.00")]


def test_overdue_balance_gets_a_late_fee_on_the_next_invoice(catalog):
    add_account(catalog, "late")
    add_account(catalog, "punctual")
    add_account(catalog, "partial")
    september = run(catalog, "2026-09")  # issued Oct 1, due Oct 31
    numbers = {i.account_id: i.invoice_number for i in september.invoices}
    pay(catalog, "punctual", numbers["punctual"], "117.81", "2026-10-31T23:00Z")
    pay(catalog, "partial", numbers["partial"], "17.81", "2026-10-20T09:00Z")
    october = run(catalog, "2026-10")
    assert lines_of(october, "late") == [("subscription", "99.00"), ("late_fee", "1.77")]  # 1.5 % of 117.81
    assert lines_of(october, "partial") == [("subscription", "99.00"), ("late_fee", "1.50")]  # 1.5 % of 100.00
    assert lines_of(october, "punctual") == [("subscription", "99.00")]
    late = next(i for i in october.invoices if i.account_id == "late")
    assert (late.tax, late.total) == (D("18.81"), D("119.58"))  # the finance charge is not taxed


def late_fees_of(result, account_id: str) -> list[tuple[str, str, str]]:
    """Each finance charge of the account's invoice: amount, the base it is computed on, its text."""
    invoice = next(i for i in result.invoices if i.account_id == account_id)
    return [
        (str(line.amount), str(line.quantity), line.description) for line in invoice.lines if line.kind == "late_fee"
    ]


def unpaid_for_three_months(catalog: Catalog, book=BOOK) -> list:
    """September's invoice (due Oct 31) and every later one left unpaid; September to November invoiced on time."""
    add_account(catalog, "late", started_at="2026-09-01")
    return [run(catalog, month, book) for month in ("2026-09", "2026-10", "2026-11")]


def test_unpaid_finance_charges_bear_no_finance_charge(catalog):
    september, october, november = unpaid_for_three_months(catalog)
    assert [i.total for i in september.invoices] == [D("117.81")]
    # October and November each charge 1.5 % of September's 117.81 (October's is not due before Dec 1).
    first = ("1.77", "117.81", "Finance charge 1.5 % per month on 117.81 EUR overdue since 2026-11-01")
    assert late_fees_of(october, "late") == late_fees_of(november, "late") == [first]
    # On Jan 1 the three invoices are overdue: 117.81 + 119.58 + 119.58 = 356.97, of which 3.54 is the two
    # earlier finance charges. They stay owed, but the charge is 1.5 % of 353.43 = 5.30 (compounded: 5.35 of 356.97).
    december = run(catalog, "2026-12")
    assert late_fees_of(december, "late") == [
        (
            "5.30",
            "353.43",
            "Finance charge 1.5 % per month on 353.43 EUR overdue since 2026-11-01; "
            "not on the earlier finance charges of 3.54 EUR also overdue",
        )
    ]
    assert december.invoices[0].total == D("123.11")  # 99.00 + 19 % + 5.30
    # The overdue notice lists what is owed, the finance charges included.
    balance = overdue_balances(catalog, utc("2027-01-02T00:00Z"))["late"]
    assert (balance.amount, balance.oldest_due_date) == (D("356.97"), date(2026, 10, 31))
    assert [i.open for i in balance.invoices] == [D("117.81"), D("119.58"), D("119.58")]
    # A re-run gives the same invoice.
    assert [i.to_dict() for i in run(catalog, "2026-12").invoices] == [i.to_dict() for i in december.invoices]


def test_a_payment_settles_an_invoice_before_its_finance_charge(catalog):
    add_account(catalog, "late", started_at="2026-09-01")
    run(catalog, "2026-09")
    october = run(catalog, "2026-10")
    assert october.invoices[0].total == D("119.58")  # with a finance charge of 1.77
    # Paid on Nov 20: September's 117.81 and October's 117.81 of charges, not its finance charge.
    pay(catalog, "late", None, "235.62", "2026-11-20T09:00Z")
    assert late_fees_of(run(catalog, "2026-11"), "late") == []  # nothing overdue on Dec 1
    # On Jan 1 October's 1.77 and November's 117.81 are overdue: only the 117.81 bears a charge.
    assert late_fees_of(run(catalog, "2026-12"), "late") == [
        (
            "1.77",
            "117.81",
            "Finance charge 1.5 % per month on 117.81 EUR overdue since 2027-01-01; "
            "not on the earlier finance charges of 1.77 EUR also overdue",
        )
    ]


def test_a_waived_finance_charge_is_no_longer_owed_and_the_rest_still_bears_none(catalog):
    _, october, _ = unpaid_for_three_months(catalog)
    number = october.invoices[0].invoice_number
    with catalog.session() as session:
        position = next(line.position for line in session.get(Invoice, number).lines if line.kind == "late_fee")
    issue_credit_note(catalog, BOOK, number, D("1.77"), "fee waived", date(2026, 12, 10), position)
    # 356.97 less the waived 1.77 is overdue; November's 1.77 is the only finance charge in it.
    december = run(catalog, "2026-12")
    assert [(amount, base) for amount, base, _ in late_fees_of(december, "late")] == [("5.30", "353.43")]
    assert overdue_balances(catalog, utc("2027-01-02T00:00Z"))["late"].amount == D("355.20")


def test_months_issued_before_the_price_book_stopped_compounding_are_drafted_as_issued(catalog):
    compounding_until_december = make_pricebook("finance_charges_compound_before: 2027-01-02\n")
    unpaid_for_three_months(catalog, compounding_until_december)
    # December's invoice is a punctual run's of Jan 1, before the cut-over, even when run late:
    # the finance charge as was charged then, on the whole overdue balance.
    december = run_billing(catalog, "2026-12", compounding_until_december, now=utc("2027-01-10T02:00Z"))
    assert late_fees_of(december, "late") == [
        ("5.35", "356.97", "Finance charge 1.5 % per month on the overdue balance of 356.97 EUR")
    ]
    # A re-run with a price book that no longer compounds gives the invoice issued, unchanged.
    again = run_billing(catalog, "2026-12", BOOK, now=utc("2027-01-11T02:00Z"))
    assert [i.to_dict() for i in again.invoices] == [i.to_dict() for i in december.invoices]
    # January's (Feb 1) does not compound: on Feb 1 September to November are overdue (December's,
    # issued late, is due Feb 9), 356.97 of which 3.54 finance charges: 1.5 % of 353.43.
    january = run(catalog, "2027-01", compounding_until_december)
    assert [(amount, base) for amount, base, _ in late_fees_of(january, "late")] == [("5.30", "353.43")]


def test_a_credit_invoice_lowers_the_overdue_balance_at_once(catalog):
    book = make_pricebook("payment_terms_days: 40\n")
    add_account(catalog, "q", billing_cycle="quarterly", started_at="2026-07-01")
    assert run(catalog, "2026-07", book).invoices[0].total == D("353.43")  # 3 x 99 + 19 %, due Sep 10
    import_outages(catalog, [(1, OutageRecord(utc("2026-08-05T00:00Z"), utc("2026-08-06T00:00Z"), scheduled=False))])
    assert run(catalog, "2026-08", book).invoices[0].total == D("-3.21")  # availability credit 2.70 + tax; due Oct 11
    # On Oct 1 the July invoice is overdue and the August credit, not yet "due", already counts: 1.5 % of 350.22.
    assert lines_of(run(catalog, "2026-09", book), "q") == [("late_fee", "5.25")]


def test_invoice_not_yet_due_gets_no_late_fee(catalog):
    add_account(catalog, "acme")
    run(catalog, "2026-10")  # issued Nov 1, due Dec 1
    november = run(catalog, "2026-11")  # issued Dec 1: not overdue yet
    assert lines_of(november, "acme") == [("subscription", "99.00")]


def test_a_month_invoiced_late_is_dated_and_due_from_the_day_it_is_really_issued(catalog):
    # The monthly DAG catches up: September to November 2026 are invoiced together on 2026-12-15.
    add_account(catalog, "acme", started_at="2026-09-01")
    add_account(catalog, "api1", plan="api", started_at="2026-09-01")
    add_account(catalog, "prepaid", started_at="2026-09-01")
    usage(
        catalog,
        job("sep", "api1", "2026-09-30T23:00Z", 2_000_000),
        job("dec", "api1", "2026-12-05T10:00Z", 8_000_000),  # December's: on no catch-up invoice
    )
    pay(catalog, "prepaid", None, "500.00", "2026-12-10T09:00Z")  # on account, after November ended
    catch_up = utc("2026-12-15T10:00Z")
    months = [run_billing(catalog, month, BOOK, now=catch_up) for month in ("2026-09", "2026-10", "2026-11")]
    for result in months:
        for invoice in result.invoices:
            # Dated the day it is issued, due 30 days later: not the 1st of the month after its month.
            assert (invoice.issue_date, invoice.due_date) == (date(2026, 12, 15), date(2027, 1, 14))
    # Each month bills what a punctual run on the 1st would: 99.00 + 19 % = 117.81, no finance
    # charge on invoices the customer receives that very day (none is due before 2027-01-14), and
    # the payment of Dec 10, made after November ended, is credited on December's invoice.
    for account_id in ("acme", "prepaid"):
        assert [lines_of(result, account_id) for result in months] == [[("subscription", "99.00")]] * 3
        assert [i.total for r in months for i in r.invoices if i.account_id == account_id] == [D("117.81")] * 3
    # api1: September's 2 M points x 0.50 = 1.00; none of December's usage; nothing in Oct and Nov.
    assert lines_of(months[0], "api1") == [("usage", "1.00")]
    assert [[i.account_id for i in result.invoices] for result in months[1:]] == [["acme", "prepaid"]] * 2
    # The dispute window runs from the real issue date: 7 days, to 2026-12-22.
    dispute, created = open_dispute(catalog, BOOK, "PF-2026-09-0001", "seats", at=utc("2026-12-16T09:00Z"))
    assert created and dispute.deadline == date(2026, 12, 22)
    # A re-run, whenever it happens, returns the invoices issued on Dec 15, unchanged.
    again = run_billing(catalog, "2026-10", BOOK, now=utc("2027-03-01T02:00Z"))
    assert not again.created
    assert [i.to_dict() for i in again.invoices] == [i.to_dict() for i in months[1].invoices]
    # December, invoiced on time on 2027-01-01: the three late invoices are not overdue yet.
    december = run_billing(catalog, "2026-12", BOOK, now=utc("2027-01-01T02:00Z"))
    assert lines_of(december, "acme") == [("subscription", "99.00")]
    assert (december.invoices[0].issue_date, december.invoices[0].due_date) == (date(2027, 1, 1), date(2027, 1, 31))
    assert lines_of(december, "api1") == [("usage", "4.00")]  # 8 M points x 0.50
    # 500.00 less 3 x 117.81 = 146.57 of credit, of which 117.81 settles December's invoice.
    assert lines_of(december, "prepaid") == [("subscription", "99.00"), ("credit", "-117.81")]
    # acme pays the late invoices on 2027-01-10 (3 x 117.81 = 353.43). On 2027-02-01 only December's
    # invoice (due Jan 31) is overdue: January's invoice charges 1.5 % of 117.81 = 1.767 -> 1.77.
    pay(catalog, "acme", None, "353.43", "2027-01-10T09:00Z")
    january = run_billing(catalog, "2027-01", BOOK, now=utc("2027-02-01T02:00Z"))
    assert lines_of(january, "acme") == [("subscription", "99.00"), ("late_fee", "1.77")]


def test_payment_after_the_invoice_date_counts_only_for_later_invoices(catalog):
    add_account(catalog, "acme")
    september = run(catalog, "2026-09")
    pay(catalog, "acme", september.invoices[0].invoice_number, "117.81", "2026-11-01T00:00Z")  # too late for Nov 1
    assert lines_of(run(catalog, "2026-10"), "acme")[-1] == ("late_fee", "1.77")


def test_overpayment_is_credited_on_the_next_invoice_and_the_rest_carried(catalog):
    add_account(catalog, "acme")
    september = run(catalog, "2026-09")
    pay(catalog, "acme", september.invoices[0].invoice_number, "300.00", "2026-10-10T12:00Z")  # 182.19 too much
    october = run(catalog, "2026-10")
    assert lines_of(october, "acme") == [("subscription", "99.00"), ("credit", "-117.81")]
    assert (october.invoices[0].tax, october.invoices[0].total) == (D("18.81"), D("0.00"))
    november = run(catalog, "2026-11")
    assert lines_of(november, "acme") == [("subscription", "99.00"), ("credit", "-64.38")]
    assert november.invoices[0].total == D("53.43")


def test_payment_without_invoice_is_credit_on_account(catalog):
    add_account(catalog, "acme")
    pay(catalog, "acme", None, "17.81", "2026-10-02T00:00Z")
    assert run(catalog, "2026-10").invoices[0].total == D("100.00")


def test_availability_credit_from_outages_excludes_announced_maintenance(catalog):
    add_account(catalog, "acme")
    import_outages(
        catalog,
        [
            (1, OutageRecord(utc("2026-10-05T00:00Z"), utc("2026-10-06T00:00Z"), scheduled=False)),
            # Announced 48 h ahead: maintenance, not outage.
            (2, OutageRecord(utc("2026-10-10T00:00Z"), utc("2026-10-12T00:00Z"), True, utc("2026-10-08T00:00Z"))),
        ],
    )
    october = run(catalog, "2026-10")
    assert lines_of(october, "acme") == [("subscription", "99.00"), ("availability_credit", "-2.70")]


def test_maintenance_announced_too_late_counts_as_outage(catalog):
    add_account(catalog, "acme")
    import_outages(
        catalog,
        [(1, OutageRecord(utc("2026-10-05T00:00Z"), utc("2026-10-06T00:00Z"), True, utc("2026-10-04T00:00:01Z")))],
    )
    assert lines_of(run(catalog, "2026-10"), "acme")[-1] == ("availability_credit", "-2.70")


def test_credit_note_references_the_invoice_which_stays_unchanged(catalog):
    add_account(catalog, "acme")
    october = run(catalog, "2026-10")
    number = october.invoices[0].invoice_number
    note, created = issue_credit_note(catalog, BOOK, number, D("10.00"), "wrong storage tier", date(2026, 11, 3))
    assert created and note.to_dict() == {
        "credit_note_number": "PF-CN-2026-11-0001",
        "invoice_number": number,
        "account_id": "acme",
        "issued_on": "2026-11-03",
        "amount": "10.00",
        "tax": "1.90",
        "total": "11.90",
        "reason": "wrong storage tier",
    }
    again, created_again = issue_credit_note(catalog, BOOK, number, D("10"), "wrong storage tier", date(2026, 11, 4))
    assert again == note and not created_again
    second, _ = issue_credit_note(catalog, BOOK, number, D("5.00"), "goodwill", date(2026, 11, 5))
    assert second.credit_note_number == "PF-CN-2026-11-0002"
    statement = invoice_statement(catalog, BOOK, number)
    assert statement.invoice == october.invoices[0]  # never edited
    assert statement.open_amount == D("117.81") - D("11.90") - D("5.95")
    assert run(catalog, "2026-10").invoices == october.invoices


def test_credit_notes_never_exceed_the_invoice(catalog):
    add_account(catalog, "acme")
    number = run(catalog, "2026-10").invoices[0].invoice_number
    issue_credit_note(catalog, BOOK, number, D("90.00"), "outage", date(2026, 11, 3))
    with pytest.raises(BillingError, match="9.00 left to credit"):
        issue_credit_note(catalog, BOOK, number, D("9.01"), "more", date(2026, 11, 3))
    last, _ = issue_credit_note(catalog, BOOK, number, D("9.00"), "rest", date(2026, 11, 3))
    assert last.tax == D("1.71")  # total credited tax 17.10 + 1.71 = the invoice's 18.81
    with pytest.raises(BillingError, match="unknown invoice"):
        issue_credit_note(catalog, BOOK, "PF-1999-01-0001", D("1.00"), "x")
    with pytest.raises(BillingError, match="predate"):
        issue_credit_note(catalog, BOOK, number, D("1.00"), "early", date(2026, 10, 31))


def test_credit_note_on_a_paid_invoice_is_carried_to_the_next_invoice(catalog):
    add_account(catalog, "acme")
    number = run(catalog, "2026-09").invoices[0].invoice_number
    pay(catalog, "acme", number, "117.81", "2026-10-02T00:00Z")
    issue_credit_note(catalog, BOOK, number, D("10.00"), "billing error", date(2026, 10, 5))
    assert lines_of(run(catalog, "2026-10"), "acme") == [("subscription", "99.00"), ("credit", "-11.90")]


def test_disputes_are_accepted_within_their_windows(catalog):
    add_account(catalog, "acme")
    number = run(catalog, "2026-10").invoices[0].invoice_number  # issued 2026-11-01
    dispute, created = open_dispute(catalog, BOOK, number, "seats", at=utc("2026-11-08T23:59:59Z"))
    assert created and dispute.deadline == date(2026, 11, 8)
    with pytest.raises(BillingError, match="until 2026-11-08"):
        open_dispute(catalog, BOOK, number, "too late", at=utc("2026-11-09T00:00:00Z"))
    assert open_dispute(catalog, BOOK, number, "wrong rate", billing_error=True, at=utc("2026-12-31T12:00Z"))[1]
    with pytest.raises(BillingError, match="until 2026-12-31"):
        open_dispute(catalog, BOOK, number, "wrong tax", billing_error=True, at=utc("2027-01-01T00:00Z"))
    assert not open_dispute(catalog, BOOK, number, "seats", at=utc("2026-12-01T00:00Z"))[1]  # replay


def test_seats_extra_storage_and_contract_end_come_from_billing_terms(catalog):
    add_account(catalog, "acme")
    terms = set_billing_terms(catalog, "acme", TermsUpdate(seats=3, extra_storage_gb=2, ended_on=date(2026, 10, 15)))
    assert terms["seats"] == 3 and terms["ended_on"] == "2026-10-15"
    october = run(catalog, "2026-10")
    # 15 of 31 days: 99 -> 47.90, 3 seats x 10 -> 14.52, 2 GB x 49 -> 47.42
    assert lines_of(october, "acme") == [("subscription", "47.90"), ("seats", "14.52"), ("extra_storage", "47.42")]
    assert run(catalog, "2026-11").invoices == []


def test_points_used_in_month_counts_billable_points_by_utc_month(catalog):
    add_account(catalog, "api1", plan="api")
    usage(
        catalog,
        job("a", "api1", "2026-10-01T00:00Z", 100),
        job("b", "api1", "2026-10-31T23:59:59Z", 20, status="aborted"),
        job("c", "api1", "2026-10-15T00:00Z", 5000, status="failed"),
        job("d", "api1", "2026-11-01T00:00Z", 3),
    )
    assert points_used_in_month(catalog, "api1", "2026-10") == 120
    assert points_used_in_month(catalog, "api1", date(2026, 11, 20)) == 3
    assert points_used_in_month(catalog, "nobody", "2026-10") == 0


def test_monthly_points_cap_refuses_jobs_at_admission(catalog):
    book = make_pricebook('\n  api: {price_per_million_points: "0.50", monthly_points_cap: 1000}\n')
    add_account(catalog, "api1", plan="api")
    usage(catalog, job("a", "api1", "2026-10-02T00:00Z", 900))
    check_points_admission(catalog, book, "api1", 100, utc("2026-10-20T00:00Z"))
    with pytest.raises(PointsCapExceededError, match="900 of its 1,000 points"):
        check_points_admission(catalog, book, "api1", 101, utc("2026-10-20T00:00Z"))
    check_points_admission(catalog, book, "api1", 1000, utc("2026-11-01T00:00Z"))  # a new month
    set_billing_terms(catalog, "api1", TermsUpdate(monthly_points_cap=5000))  # agreed otherwise
    check_points_admission(catalog, book, "api1", 4100, utc("2026-10-20T00:00Z"))


def test_usage_daily_aggregates_per_account_and_utc_day(catalog):
    add_account(catalog, "api1", plan="api")
    usage(
        catalog,
        job("a", "api1", "2026-10-01T00:00Z", 100),
        job("b", "api1", "2026-10-01T23:59:59Z", 20, status="aborted"),
        job("c", "api1", "2026-10-01T12:00Z", 5, status="failed"),
        job("d", "api1", "2026-10-02T00:00Z", 3),
        job("e", "api1", "2026-10-03T00:00Z", 7),
    )
    days = usage_daily(catalog, date(2026, 10, 1), date(2026, 10, 2))
    assert [(d.day, d.jobs, d.billable_points, d.failed_points) for d in days] == [
        (date(2026, 10, 1), 3, 120, 5),
        (date(2026, 10, 2), 1, 3, 0),
    ]


def test_billing_migration_downgrades_and_upgrades(catalog, database_url):
    from alembic import command
    from sqlalchemy import inspect

    from pipelines.catalog.db import alembic_config

    with catalog.engine.begin() as connection:
        config = alembic_config(database_url)
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
        assert not inspect(connection).has_table("invoices")
        command.upgrade(config, "head")
        assert {
            "invoices",
            "invoice_lines",
            "payments",
            "outages",
            "credit_notes",
            "disputes",
            "billing_runs",
            "billing_terms",
        } <= set(inspect(connection).get_table_names())


def test_the_upgrade_covers_what_runs_invoiced_and_leaves_only_later_accounts_to_invoice(catalog, database_url):
    from alembic import command
    from sqlalchemy import delete, update

    from pipelines.billing.models import BillingCoverage, UsageBilling
    from pipelines.catalog.db import alembic_config
    from pipelines.catalog.models import Account, UsageEvent

    for account_id, plan in (("api1", "api"), ("free1", "free"), ("pro", "professional")):
        add_account(catalog, account_id, plan=plan)
    usage(
        catalog,
        job("early", "api1", "2026-09-03T10:00Z", 2_000_000),
        job("recent", "api1", "2026-09-30T22:00Z", 4_000_000),
    )
    september = run(catalog, "2026-09")  # on 2026-10-01 02:00
    add_account(catalog, "later", started_at="2026-09-15")
    usage(catalog, job("late-event", "api1", "2026-09-29T10:00Z", 8_000_000))
    with catalog.engine.begin() as connection:
        config = alembic_config(database_url)
        config.attributes["connection"] = connection
        command.downgrade(config, "0019")
    # The catalog as the runs before 0020 left it: stamped by the real clock, and only the events
    # recorded within a day of the run marked.
    with catalog.session() as session:
        created = {"api1": "2026-08-01", "free1": "2026-08-01", "pro": "2026-08-01", "later": "2026-10-20"}
        for account_id, day in created.items():
            session.execute(
                update(Account).where(Account.account_id == account_id).values(created_at=utc(f"{day}T12:00Z"))
            )
        recorded = {"early": "2026-09-03T10:05Z", "recent": "2026-09-30T22:05Z", "late-event": "2026-10-25T08:00Z"}
        for event_id, when in recorded.items():
            session.execute(update(UsageEvent).where(UsageEvent.event_id == event_id).values(recorded_at=utc(when)))
        session.execute(delete(UsageBilling).where(UsageBilling.event_id == "early"))
    with catalog.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    with catalog.session() as session:
        assert session.execute(
            select(BillingCoverage.account_id, BillingCoverage.period).order_by(BillingCoverage.account_id)
        ).tuples().all() == [("api1", "2026-09"), ("free1", "2026-09"), ("pro", "2026-09")]
        assert dict(session.execute(select(UsageBilling.event_id, UsageBilling.period)).tuples().all()) == {
            "early": "2026-09",
            "recent": "2026-09",
        }
    # Only the account September's run never saw is invoiced for September; the rest is as issued.
    again = run_billing(catalog, "2026-09", BOOK, now=utc("2026-12-02T09:00Z"))
    assert again.issued == ("PF-2026-09-0003",)
    assert again.invoices[:2] == september.invoices
    assert lines_of(again, "later") == [("subscription", "52.80")]  # 16 of 30 days
    # October bills the event that arrived late, and neither of those September billed.
    assert [line for line in lines_of(run(catalog, "2026-10"), "api1") if "usage" in line[0]] == [
        ("late_usage", "4.00")
    ]
