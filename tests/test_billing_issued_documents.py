"""Documents of issued invoices and credit notes stay as issued: a credit note mirrors the VAT of
the lines it reverses, and showing an invoice again gives the parties it was issued to."""

from __future__ import annotations

from datetime import date
from decimal import Decimal as D

import pytest

from pipelines.billing.corrections import TermsUpdate, issue_credit_note, set_billing_terms
from pipelines.billing.delivery import credit_note_of
from pipelines.billing.imports import import_usage
from pipelines.billing.invoicing import BillingError, run_billing
from pipelines.billing.models import Invoice
from pipelines.catalog import Catalog
from tests.test_billing_support import (
    SELLER,
    add_account,
    catalog,
    cli_env,
    database_url,
    job,
    make_pricebook,
    postgres_schema_url,
    utc,
)

__all__ = ["catalog", "cli_env", "database_url", "postgres_schema_url"]  # fixtures used here

BOOK = make_pricebook(SELLER)
NOW = utc("2027-06-01T00:00Z")


def _position(catalog: Catalog, number: str, kind: str) -> int:
    with catalog.session() as session:
        return next(line.position for line in session.get(Invoice, number).lines if line.kind == kind)


def test_waiving_a_finance_charge_credits_no_vat(catalog):
    add_account(catalog, "late")  # 19 %, September never paid
    run_billing(catalog, "2026-09", BOOK, now=NOW)
    october = run_billing(catalog, "2026-10", BOOK, now=NOW).invoices[0]
    assert [(line.kind, line.amount) for line in october.lines] == [
        ("subscription", D("99.00")),
        ("late_fee", D("1.77")),  # 1.5 % of 117.81
    ]
    line = _position(catalog, october.invoice_number, "late_fee")
    note, _ = issue_credit_note(catalog, BOOK, october.invoice_number, D("1.77"), "fee waived", date(2026, 11, 3), line)
    assert (note.amount, note.tax, note.total) == (D("1.77"), D("0.00"), D("1.77"))
    document = credit_note_of(catalog, BOOK, note.credit_note_number)
    assert [(g.category, g.rate, g.base, g.tax) for g in document.vat] == [("FC", D("0"), D("1.77"), D("0.00"))]
    assert [(line.taxable, line.amount) for line in document.lines] == [(False, D("1.77"))]


def test_a_credit_on_an_invoice_with_several_vat_treatments_names_its_line(catalog):
    add_account(catalog, "late")
    run_billing(catalog, "2026-09", BOOK, now=NOW)
    number = run_billing(catalog, "2026-10", BOOK, now=NOW).invoices[0].invoice_number
    with pytest.raises(BillingError, match=r"line 1 subscription 99.00 VAT 19 %.*line 2 late_fee 1.77 no VAT"):
        issue_credit_note(catalog, BOOK, number, D("1.00"), "goodwill", date(2026, 11, 3))
    with pytest.raises(BillingError, match="1.77 left to credit on line 2"):
        issue_credit_note(catalog, BOOK, number, D("1.78"), "fee waived", date(2026, 11, 3), 2)
    with pytest.raises(BillingError, match="no line 3"):
        issue_credit_note(catalog, BOOK, number, D("1.00"), "x", date(2026, 11, 3), 3)
    subscription, _ = issue_credit_note(catalog, BOOK, number, D("10.00"), "goodwill", date(2026, 11, 3), 1)
    assert (subscription.tax, subscription.total) == (D("1.90"), D("11.90"))


def test_crediting_usage_billed_exempt_credits_no_vat(catalog):
    add_account(catalog, "api", plan="api")  # 19 %, exempt until 2026-10-15
    set_billing_terms(catalog, "api", TermsUpdate(tax_exempt=True, exempt_until=date(2026, 10, 15)))
    import_usage(
        catalog,
        [(1, job("a", "api", "2026-10-05T10:00Z", 3_000_000)), (2, job("b", "api", "2026-10-20T10:00Z", 4_000_000))],
    )
    october = run_billing(catalog, "2026-10", BOOK, now=NOW).invoices[0]
    assert october.tax_rate == D("0.19")
    usage = [(line.amount, line.tax_rate, line.tax_category) for line in october.lines]
    assert usage == [(D("1.50"), D("0"), "E"), (D("2.00"), D("0.19"), "S")]
    note, _ = issue_credit_note(catalog, BOOK, october.invoice_number, D("1.50"), "test job", date(2026, 11, 3), 1)
    assert (note.tax, note.total) == (D("0.00"), D("1.50"))
    document = credit_note_of(catalog, BOOK, note.credit_note_number)
    assert [(g.category, g.rate, g.tax) for g in document.vat] == [("E", D("0"), D("0.00"))]


def test_crediting_a_line_billed_before_a_vat_change_credits_its_rate(catalog):
    add_account(catalog, "vat")
    set_billing_terms(catalog, "vat", TermsUpdate(tax_rate=D("0.16"), effective_on=date(2026, 10, 16)))
    october = run_billing(catalog, "2026-10", BOOK, now=NOW).invoices[0]
    assert october.tax_rate == D("0.16")  # the closing day's
    lines = [(line.amount, line.tax_rate) for line in october.lines]
    assert lines == [(D("47.90"), D("0.19")), (D("51.10"), D("0.16"))]  # 99 x 15/31, 99 x 16/31
    note, _ = issue_credit_note(catalog, BOOK, october.invoice_number, D("31.94"), "days", date(2026, 11, 3), 1)
    assert (note.tax, note.total) == (D("6.07"), D("38.01"))  # 31.94 x 19 % = 6.0686
    document = credit_note_of(catalog, BOOK, note.credit_note_number)
    assert [(g.category, g.rate, g.base, g.tax) for g in document.vat] == [("S", D("0.19"), D("31.94"), D("6.07"))]
    # The rest of that line, then more than is left on it
    rest, _ = issue_credit_note(catalog, BOOK, october.invoice_number, D("15.96"), "rest", date(2026, 11, 3), 1)
    assert rest.tax == D("3.03")  # 15.96 x 19 % = 3.0324; 6.07 + 3.03 = the 9.10 of 47.90
    with pytest.raises(BillingError, match="0.00 left to credit on line 1"):
        issue_credit_note(catalog, BOOK, october.invoice_number, D("0.01"), "more", date(2026, 11, 3), 1)
