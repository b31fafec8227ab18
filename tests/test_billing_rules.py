"""The invoicing rules one by one, on `draft_invoice` (one account, one month, no database)."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest

from pipelines.billing.drafting import draft_invoice
from pipelines.billing.ledger import Ledger
from pipelines.billing.lines import AccountFacts, UsageSlice, availability_percent, prorate
from pipelines.billing.money import format_rate, round_half_up
from pipelines.billing.periods import Period, add_months
from pipelines.billing.pricebook import PriceBookError, load_pricebook, parse_pricebook, plan_limits
from tests.test_billing_support import make_pricebook, utc

OCTOBER = Period(2026, 10)
FULL = Fraction(100)
D = Decimal


def facts(plan: str = "professional", started_at: date = date(2026, 1, 1), **extra) -> AccountFacts:
    values = {"country": "DE", "billing_cycle": "monthly", "tax_rate": D("0.19"), "tax_exempt": False, **extra}
    return AccountFacts("acme", plan=plan, started_at=started_at, **values)


def draft(account: AccountFacts, period: Period = OCTOBER, usage=(), availability=FULL, ledger=None, pricebook=None):
    return draft_invoice(pricebook or make_pricebook(), period, account, list(usage), availability, ledger or Ledger())


def amounts(result) -> dict[str, str]:
    return {line.kind: str(line.amount) for line in result.lines}


def month_usage(points: int, period: Period = OCTOBER) -> list[UsageSlice]:
    return [UsageSlice(period.first_day, period.last_day, points)]


# --- subscriptions ------------------------------------------------------------------------------


def test_full_month_is_charged_the_fee():
    result = draft(facts())
    assert amounts(result) == {"subscription": "99.00"}
    assert (result.subtotal, result.tax, result.total) == (D("99.00"), D("18.81"), D("117.81"))


def test_proration_counts_the_start_day():
    # Started Oct 15: 15..31 is 17 active days of 31 -> 99 x 17 / 31 = 54.290.. -> 54.29
    result = draft(facts(started_at=date(2026, 10, 15)))
    line = result.lines[0]
    # 17 days of a price per 31 days: quantity x unit price / base quantity is the amount exactly
    assert (line.amount, line.quantity, line.unit_price, line.base_quantity) == (D("54.29"), 17, D("99.00"), 31)
    assert "17 of 31 days" in line.description
    # Started on the last day: one day is charged, not zero.
    assert draft(facts(started_at=date(2026, 10, 31))).lines[0].amount == D("3.19")


def test_proration_of_a_subscription_ending_mid_month_counts_the_last_day():
    # Ended Oct 10 (inclusive): 10 of 31 days -> 31.935.. -> 31.94
    assert draft(facts(ended_on=date(2026, 10, 10))).lines[0].amount == D("31.94")


def test_proration_uses_the_days_of_the_month():
    february = Period(2027, 2)
    assert draft(facts(started_at=date(2027, 2, 15)), period=february).lines[0].amount == D("49.50")  # 14/28


def test_account_not_active_in_the_month_gets_nothing():
    assert draft(facts(ended_on=date(2026, 9, 30))) is None


def test_sharing_plan_gets_its_discount_as_a_line():
    result = draft(facts(plan="professional_sharing"))
    assert [(line.kind, str(line.amount)) for line in result.lines] == [
        ("subscription", "99.00"),
        ("discount", "-19.80"),
    ]
    assert (result.subtotal, result.tax, result.total) == (D("79.20"), D("15.05"), D("94.25"))


def test_quarterly_cycle_is_invoiced_in_full_in_advance_in_its_start_month():
    account = facts(billing_cycle="quarterly", started_at=date(2026, 8, 10))
    august = draft(account, period=Period(2026, 8))
    assert amounts(august) == {"subscription": "297.00"}
    assert "2026-08-10 to 2026-11-09, in advance" in august.lines[0].description
    assert draft(account, period=Period(2026, 9)) is None
    assert draft(account, period=Period(2026, 10)) is None
    assert amounts(draft(account, period=Period(2026, 11))) == {"subscription": "297.00"}


def test_yearly_cycle_is_invoiced_once_a_year():
    account = facts(billing_cycle="yearly", started_at=date(2026, 3, 31))
    invoiced = [p for p in (Period.of(add_months(date(2026, 3, 1), k)) for k in range(24)) if draft(account, period=p)]
    assert invoiced == [Period(2026, 3), Period(2027, 3)]
    assert draft(account, period=Period(2026, 3)).lines[0].amount == D("1188.00")


def test_cycle_that_ended_before_its_start_is_not_invoiced():
    account = facts(billing_cycle="quarterly", started_at=date(2026, 8, 10), ended_on=date(2026, 11, 1))
    assert draft(account, period=Period(2026, 11)) is None


# --- prices by effective date ---------------------------------------------------------------------

PRICE_CHANGES = """
  professional:
    monthly_fee: "99.00"
    seat_fee: "10.00"
    changes:
      - {effective_from: 2026-10-15, monthly_fee: "109.00"}
  api:
    monthly_fee: "0.00"
    price_per_million_points: "0.50"
    changes:
      - {effective_from: 2026-10-16, price_per_million_points: "0.60"}
"""


def test_subscription_price_is_the_one_in_force_when_the_cycle_starts():
    book = make_pricebook(PRICE_CHANGES)
    assert draft(facts(), pricebook=book).lines[0].amount == D("99.00")  # cycle started Oct 1
    assert draft(facts(), period=Period(2026, 11), pricebook=book).lines[0].amount == D("109.00")
    # A customer starting after the change pays the new price for its first days.
    assert draft(facts(started_at=date(2026, 10, 20)), pricebook=book).lines[0].unit_price == D("109.00")


def test_price_change_is_never_retroactive():
    book = make_pricebook(PRICE_CHANGES)
    assert draft(facts(), period=Period(2026, 9), pricebook=book).lines[0].amount == D("99.00")
    quarterly = facts(billing_cycle="quarterly", started_at=date(2026, 8, 1))
    assert draft(quarterly, period=Period(2026, 8), pricebook=book).lines[0].amount == D("297.00")
    assert draft(quarterly, period=Period(2026, 11), pricebook=book).lines[0].amount == D("327.00")


def test_usage_is_priced_as_on_the_day_it_happened():
    book = make_pricebook(PRICE_CHANGES)
    usage = [
        UsageSlice(date(2026, 10, 1), date(2026, 10, 15), 10_000_000),
        UsageSlice(date(2026, 10, 16), date(2026, 10, 31), 10_000_000),
    ]
    result = draft(facts(plan="api"), usage=usage, pricebook=book)
    assert [(line.unit_price, line.amount) for line in result.lines] == [(D("0.50"), D("5.00")), (D("0.60"), D("6.00"))]


def test_usage_slices_with_the_same_price_make_one_line():
    usage = [
        UsageSlice(date(2026, 10, 1), date(2026, 10, 15), 1_000_000),
        UsageSlice(date(2026, 10, 16), date(2026, 10, 31), 2_000_000),
    ]
    result = draft(facts(plan="api"), usage=usage)
    assert [(line.quantity, line.amount) for line in result.lines] == [(D("3"), D("1.50"))]


def test_agreed_custom_prices_replace_the_plan_prices():
    result = draft(
        facts(plan="api", custom_price_per_million_points=D("0.40"), custom_monthly_fee=D("20.00")),
        usage=month_usage(10_000_000),
    )
    assert amounts(result) == {"subscription": "20.00", "usage": "4.00"}


def test_plans_without_a_usage_price_do_not_bill_usage():
    assert amounts(draft(facts(), usage=month_usage(10_000_000))) == {"subscription": "99.00"}


# --- rounding and tax -----------------------------------------------------------------------------


def test_rounding_is_half_up_per_line():
    book = make_pricebook(
        '\n  professional: {monthly_fee: "0.00", seat_fee: "0.125", extra_storage_fee_per_gb: "0.125"}\n'
    )
    result = draft(facts(seats=1, extra_storage_gb=1, tax_rate=D("0")), pricebook=book)
    # Each 0.125 rounds up to 0.13 (half-even would give 0.12); rounding the sum would give 0.25.
    assert amounts(result) == {"seats": "0.13", "extra_storage": "0.13"}
    assert result.total == D("0.26")


def test_tax_is_computed_on_the_subtotal_and_rounded_half_up():
    book = make_pricebook(
        '\n  professional: {monthly_fee: "0.00", seat_fee: "0.05", extra_storage_fee_per_gb: "0.05"}\n'
    )
    result = draft(facts(seats=1, extra_storage_gb=1, tax_rate=D("0.1")), pricebook=book)
    # Per line: 0.005 + 0.005 -> 0.01 + 0.01; on the subtotal: 0.10 x 0.1 = 0.01.
    assert (result.subtotal, result.tax, result.total) == (D("0.10"), D("0.01"), D("0.11"))
    half = draft(facts(tax_rate=D("0.125")), pricebook=make_pricebook('\n  professional: {monthly_fee: "1.00"}\n'))
    assert half.tax == D("0.13")  # 0.125 half-up


def test_tax_exempt_account_pays_no_tax():
    result = draft(facts(tax_exempt=True))
    assert (result.tax, result.total, result.tax_rate) == (D("0.00"), D("99.00"), D("0"))


def test_money_rounding_is_exact_half_up():
    assert round_half_up(Fraction(1, 200)) == D("0.01")
    assert round_half_up(Fraction(-1, 200)) == D("-0.01")
    assert round_half_up(D("2.675")) == D("2.68")  # a float would say 2.67
    assert round_half_up(Fraction(1, 3), 4) == D("0.3333")
    assert format_rate(D("0.5")) == "0.50" and format_rate(D("0.015")) == "0.015"


# --- seats and extra storage ----------------------------------------------------------------------


def test_seats_and_extra_storage_are_monthly_items():
    result = draft(facts(seats=3, extra_storage_gb=2))
    assert amounts(result) == {"subscription": "99.00", "seats": "30.00", "extra_storage": "98.00"}
    prorated = draft(facts(seats=3, started_at=date(2026, 10, 15)))
    assert prorated.lines[1].amount == D("16.45")  # 30 x 17/31 = 16.451..


# --- availability credit --------------------------------------------------------------------------


def test_availability_is_minutes_up_over_minutes_in_month():
    day = [(utc("2026-10-05T00:00Z"), utc("2026-10-06T00:00Z"))]
    assert availability_percent(day, OCTOBER) == Fraction(100 * 30, 31)
    # Overlapping outages count once; parts outside the month do not count.
    overlapping = day + [
        (utc("2026-10-05T12:00Z"), utc("2026-10-06T00:00Z")),
        (utc("2026-09-30T00:00Z"), utc("2026-10-01T00:00Z")),
    ]
    assert availability_percent(overlapping, OCTOBER) == Fraction(100 * 30, 31)
    assert availability_percent([(utc("2026-10-31T23:00Z"), utc("2026-11-01T01:00Z"))], OCTOBER) == 100 - Fraction(
        100 * 60, 31 * 1440
    )


def test_availability_below_target_credits_the_fee_pro_rata():
    availability = Fraction(100 * 30, 31)  # one day down: 96.774 %
    result = draft(facts(), availability=availability)
    # 99 x (99.5 - 96.774..) / 100 = 2.6985.. -> 2.70
    assert amounts(result) == {"subscription": "99.00", "availability_credit": "-2.70"}
    assert result.tax == D("18.30")  # the credit lowers the taxable amount


def test_availability_at_or_above_target_credits_nothing():
    assert amounts(draft(facts(), availability=Fraction(995, 10))) == {"subscription": "99.00"}


def test_availability_credit_refers_to_the_discounted_prorated_fee():
    result = draft(facts(plan="professional_sharing", started_at=date(2026, 10, 15)), availability=Fraction(0))
    # Fee 54.29 less discount 10.86 = 43.43; at 0 % availability 99.5 % of it: 43.21
    assert amounts(result)["availability_credit"] == "-43.21"


def test_availability_credit_is_at_most_the_months_fee():
    book = make_pricebook('availability_target_percent: "100"\n')
    result = draft(facts(), availability=Fraction(0), pricebook=book)
    assert amounts(result) == {"subscription": "99.00", "availability_credit": "-99.00"}
    assert result.total == D("0.00")


def test_quarterly_availability_credit_uses_the_months_share_of_the_cycle_fee():
    account = facts(billing_cycle="quarterly", started_at=date(2026, 9, 1))
    result = draft(account, availability=Fraction(0))
    assert amounts(result) == {"availability_credit": "-98.51"}  # 99 x 99.5 %, credited though no fee is due in October


def test_api_plan_has_no_fee_to_credit():
    assert amounts(draft(facts(plan="api"), usage=month_usage(2_000_000), availability=Fraction(0))) == {
        "usage": "1.00"
    }


# --- balances: late fee and credit carried forward -------------------------------------------------


def test_late_fee_on_the_overdue_balance_is_not_taxed():
    result = draft(facts(), ledger=Ledger(balance=D("117.81"), not_yet_due=D("0.00")))
    late = result.lines[-1]
    assert (late.kind, late.quantity, late.unit_price, late.amount, late.taxable) == (
        "late_fee",
        D("117.81"),
        D("0.015"),
        D("1.77"),
        False,
    )
    assert (result.subtotal, result.tax, result.total) == (D("100.77"), D("18.81"), D("119.58"))


def test_no_late_fee_on_what_is_not_yet_due():
    assert amounts(draft(facts(), ledger=Ledger(balance=D("117.81"), not_yet_due=D("117.81")))) == {
        "subscription": "99.00"
    }
    # Older charges are settled first: with 150 owed of which 100 not yet due, 50 is overdue.
    assert amounts(draft(facts(), ledger=Ledger(balance=D("150.00"), not_yet_due=D("100.00"))))["late_fee"] == "0.75"


def test_late_fee_is_capped_by_a_lower_legal_maximum():
    book = make_pricebook('late_fee_legal_max_monthly_rate: {DE: "0.01"}\n')
    result = draft(facts(), ledger=Ledger(balance=D("100.00")), pricebook=book)
    assert amounts(result)["late_fee"] == "1.00"
    assert amounts(draft(facts(country="FR"), ledger=Ledger(balance=D("100.00")), pricebook=book))["late_fee"] == "1.50"


def test_earlier_finance_charges_bear_no_late_fee():
    # 356.97 overdue, of which 3.54 earlier finance charges: 1.5 % of 353.43 = 5.30145.
    ledger = Ledger(D("356.97"), overdue_finance_charges=D("3.54"), overdue_since=date(2026, 10, 31))
    late = draft(facts(), ledger=ledger).lines[-1]
    assert (late.kind, late.quantity, late.amount) == ("late_fee", D("353.43"), D("5.30"))
    assert late.description == (
        "Finance charge 1.5 % per month on 353.43 EUR overdue since 2026-11-01; "
        "not on the earlier finance charges of 3.54 EUR also overdue"
    )
    # Only finance charges overdue: they stay owed, and bear nothing.
    assert "late_fee" not in amounts(draft(facts(), ledger=Ledger(D("1.77"), overdue_finance_charges=D("1.77"))))
    # A month a punctual run issued before the price book's cut-over (October: Nov 1) compounds, as it was issued.
    book = make_pricebook("finance_charges_compound_before: 2026-11-02\n")
    late = draft(facts(), ledger=ledger, pricebook=book).lines[-1]
    assert (late.quantity, late.amount) == (D("356.97"), D("5.35"))
    assert late.description == "Finance charge 1.5 % per month on the overdue balance of 356.97 EUR"
    assert draft(facts(), Period.parse("2026-11"), ledger=ledger, pricebook=book).lines[-1].amount == D("5.30")


def test_credit_is_carried_forward_after_tax_and_never_below_zero():
    result = draft(facts(), ledger=Ledger(balance=D("-32.19")))
    assert result.lines[-1].kind == "credit" and result.lines[-1].amount == D("-32.19")
    assert (result.tax, result.total, result.credit_applied) == (D("18.81"), D("85.62"), D("32.19"))
    big = draft(facts(), ledger=Ledger(balance=D("-500.00")))
    assert (big.total, big.credit_applied) == (D("0.00"), D("117.81"))


def test_nothing_to_charge_gives_no_invoice():
    assert draft(facts(plan="free")) is None
    assert draft(facts(plan="trial")) is None
    assert draft(facts(plan="api")) is None
    assert draft(facts(plan="api"), ledger=Ledger(balance=D("-10.00"))) is None  # credit alone waits


def test_tiny_usage_rounding_to_zero_gives_no_invoice():
    assert draft(facts(plan="api"), usage=month_usage(9_999)) is None  # 0.0049995 -> 0.00


def test_proration_helper():
    assert prorate(D("99.00"), 31, 31) == D("99.00")
    assert prorate(D("99.00"), 0, 31) == D("0.00")


# --- the price book ---------------------------------------------------------------------------------


def test_default_price_book_has_the_spec_defaults():
    book = load_pricebook()
    on = date(2026, 10, 1)
    assert (book.currency, book.payment_terms_days, book.late_fee_monthly_rate) == ("EUR", 30, D("0.015"))
    assert (book.availability_target_percent, book.maintenance_notice_hours) == (D("99.5"), 24)
    assert (book.dispute_window_days, book.billing_error_dispute_window_days) == (7, 60)
    assert book.terms("professional_sharing", on).discount == D("0.20")
    assert book.terms("professional", on).extra_storage_fee_per_gb == D("49.00")
    assert book.terms("api", on).price_per_million_points == D("0.50")
    free = plan_limits(book, "free", on)
    assert (free.max_files, free.max_stored_points, free.downloads) == (3, 45_000_000, False)
    api = plan_limits(book, "api", on)
    assert (api.monthly_points_cap, api.result_retention_days) == (500_000_000, 10)
    assert book.terms("trial", on).trial_days == 14
    # November's invoices (issued 2026-12-01) compounded finance charges as issued; December's on do not.
    assert (book.finance_charges_compound(date(2026, 12, 1)), book.finance_charges_compound(date(2027, 1, 1))) == (
        True,
        False,
    )


def test_plan_limits_follow_effective_dates():
    book = make_pricebook(
        '\n  api:\n    price_per_million_points: "0.50"\n    monthly_points_cap: 500000000\n'
        "    changes: [{effective_from: 2027-01-01, monthly_points_cap: 800000000}]\n"
    )
    assert plan_limits(book, "api", date(2026, 12, 31)).monthly_points_cap == 500_000_000
    assert plan_limits(book, "api", date(2027, 1, 1)).monthly_points_cap == 800_000_000


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("currency: EUR\npayment_terms_days: 30\nlate_fee_monthly_rate: 0.015\nplans: {free: {}}\n", "quoted strings"),
        (
            'currency: EUR\npayment_terms_days: 30\nlate_fee_monthly_rate: "0.015"\nplans: {free: {monthly_fe: "1"}}\n',
            "unknown field",
        ),
        ('currency: EUR\npayment_terms_days: 30\nlate_fee_monthly_rate: "0.015"\nplans: {}\n', "plans"),
        (
            'currency: EUR\npayment_terms_days: 30\nlate_fee_monthly_rate: "0.015"\nplans: {api: {changes: [{monthly_fee: "1"}]}}\n',
            "effective_from",
        ),
        (
            'currency: EUR\npayment_terms_days: 30\nlate_fee_monthly_rate: "0.015"\nplans: {free: {discount: "1.5"}}\n',
            "fraction",
        ),
        (
            'currency: EUR\npayment_terms_days: 30\nlate_fee_monthly_rate: "0.015"\nplans: {free: {}}\n'
            "finance_charges_compound_before: soon\n",
            "finance_charges_compound_before: 'soon' is not an ISO date",
        ),
    ],
)
def test_bad_price_books_are_refused_with_the_field_named(yaml_text, message):
    with pytest.raises(PriceBookError, match=message):
        parse_pricebook(yaml_text, "book.yaml")


def test_unknown_plan_is_named():
    with pytest.raises(PriceBookError, match="enterprise"):
        draft(facts(plan="enterprise"))


def test_periods_are_utc_calendar_months():
    assert (OCTOBER.start, OCTOBER.end) == (utc("2026-10-01T00:00Z"), utc("2026-11-01T00:00Z"))
    assert Period(2026, 12).next() == Period(2027, 1)
    assert add_months(date(2026, 1, 31), 1) == date(2026, 2, 28)
    with pytest.raises(ValueError, match="YYYY-MM"):
        Period.parse("2026-13")
    assert OCTOBER.last_day - OCTOBER.first_day == timedelta(days=30)
