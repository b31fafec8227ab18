"""Documents of issued invoices and credit notes stay as issued: a credit note mirrors the VAT of
the lines it reverses, and showing an invoice again gives the parties it was issued to."""

from __future__ import annotations

from datetime import date
from decimal import Decimal as D
from pathlib import Path

import pytest

from pipelines.accounts import read_accounts_csv, upsert_accounts
from pipelines.billing.corrections import TermsUpdate, issue_credit_note, set_billing_terms
from pipelines.billing.delivery import credit_note_of
from pipelines.billing.imports import import_usage, read_usage_jsonl
from pipelines.billing.invoicing import BillingError, run_billing
from pipelines.billing.models import Invoice
from pipelines.catalog import Catalog
from tests.test_billing_support import (
    BASE_PRICEBOOK,
    SELLER,
    add_account,
    catalog,
    cli_env,
    database_url,
    job,
    make_pricebook,
    on_time,
    postgres_schema_url,
)

__all__ = ["catalog", "cli_env", "database_url", "postgres_schema_url"]  # fixtures used here

DATA = Path(__file__).parent / "data" / "billing"
BOOK = make_pricebook(SELLER)


def _position(catalog: Catalog, number: str, kind: str) -> int:
    with catalog.session() as session:
        return next(line.position for line in session.get(Invoice, number).lines if line.kind == kind)


def test_waiving_a_finance_charge_credits_no_vat(catalog):
    add_account(catalog, "late")  # 19 %, September never paid
    run_billing(catalog, "2026-09", BOOK, now=on_time("2026-09"))
    october = run_billing(catalog, "2026-10", BOOK, now=on_time("2026-10")).invoices[0]
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
    run_billing(catalog, "2026-09", BOOK, now=on_time("2026-09"))
    number = run_billing(catalog, "2026-10", BOOK, now=on_time("2026-10")).invoices[0].invoice_number
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
    october = run_billing(catalog, "2026-10", BOOK, now=on_time("2026-10")).invoices[0]
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
    october = run_billing(catalog, "2026-10", BOOK, now=on_time("2026-10")).invoices[0]
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


RENAMED = (
    "account_id,name,email,country,plan,started_at,tax_rate,tax_exempt,last_login_at,street,postcode,city,vat_id\n"
    "acme,Acme Holding AG,billing@acme.example,DE,professional,2026-09-15,0.19,false,,Neue Allee 1,10117,Berlin,"
    "DE999999999\n"
)
OTHER_SELLER = SELLER.replace("pointflow GmbH", "pointflow SE").replace("DE123456789", "DE987654321")


def _show(capsys, *argv: str) -> str:
    from pipelines.cli import main

    code = main(["invoices", "show", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_an_issued_invoice_and_credit_note_show_the_parties_they_were_issued_to(cli_env, capsys, tmp_path, monkeypatch):
    from pipelines.cli import main

    book = tmp_path / "pricebook.yaml"
    book.write_text(BASE_PRICEBOOK + SELLER)
    monkeypatch.setenv("POINTFLOW_PRICEBOOK", str(book))
    catalog = Catalog(cli_env)
    try:
        upsert_accounts(catalog, read_accounts_csv(DATA / "accounts.csv"))
        import_usage(catalog, read_usage_jsonl(DATA / "usage.jsonl"))
        run_billing(catalog, "2026-09", make_pricebook(SELLER), now=on_time("2026-09"))
    finally:
        catalog.dispose()
    assert (
        main(
            ["invoices", "credit", "PF-2026-09-0001", "--amount", "2.80", "--reason", "x", "--issued-on", "2026-10-03"]
        )
        == 0
    )
    capsys.readouterr()
    issued = {fmt: _show(capsys, "PF-2026-09-0001", "--format", fmt) for fmt in ("html", "xml")}
    note = {fmt: _show(capsys, "PF-CN-2026-10-0001", "--format", fmt) for fmt in ("html", "xml")}
    for text in (*issued.values(), *note.values()):
        assert "Acme Surveying GmbH" in text and "Vermessungsweg 7" in text and "DE811907980" in text
        assert "pointflow GmbH" in text and "DE123456789" in text

    renamed = tmp_path / "renamed.csv"
    renamed.write_text(RENAMED)
    assert main(["accounts", "import", str(renamed)]) == 0
    book.write_text(BASE_PRICEBOOK + OTHER_SELLER)
    capsys.readouterr()
    assert {fmt: _show(capsys, "PF-2026-09-0001", "--format", fmt) for fmt in ("html", "xml")} == issued
    assert {fmt: _show(capsys, "PF-CN-2026-10-0001", "--format", fmt) for fmt in ("html", "xml")} == note


def test_show_serves_the_document_published_at_issue(cli_env, capsys, tmp_path):
    from pipelines.cli.common import settings_from_env
    from pipelines.storage import open_store

    catalog = Catalog(cli_env)
    try:
        upsert_accounts(catalog, read_accounts_csv(DATA / "accounts.csv"))
        run_billing(catalog, "2026-09", make_pricebook(), now=on_time("2026-09"))
    finally:
        catalog.dispose()
    settings = settings_from_env()
    store = open_store(settings.storage_url, settings.link_endpoint)
    store.put_bytes("accounts/acme/invoices/PF-2026-09-0001.html", b"<p>as published</p>\n")
    assert _show(capsys, "PF-2026-09-0001", "--format", "html") == "<p>as published</p>\n"
    assert "Geo Sharing BV" in _show(capsys, "PF-2026-09-0002", "--format", "html")  # not published: rendered


def test_a_prorated_line_reads_quantity_times_price_equals_amount(catalog):
    from lxml import etree

    from pipelines.billing.delivery import buyer_of, document_of
    from pipelines.billing.documents import document_html, invoice_lines_csv
    from pipelines.billing.einvoice import cii_xml
    from pipelines.catalog.models import Account

    add_account(catalog, "fee", started_at="2026-10-22")
    set_billing_terms(catalog, "fee", TermsUpdate(monthly_fee=D("1500.00"), seats=2))
    october = run_billing(catalog, "2026-10", BOOK, now=on_time("2026-10")).invoices[0]
    # 1500.00 x 10 / 31 = 483.870... -> 483.87; 2 seats x 10.00 x 10 / 31 = 6.451... -> 6.45
    assert [line.to_dict() for line in october.lines] == [
        {
            "kind": "subscription",
            "description": "Professional plan, 2026-10, 10 of 31 days from 2026-10-22",
            "quantity": "10",
            "unit_price": "1500.00",
            "amount": "483.87",
            "taxable": True,
            "base_quantity": "31",
        },
        {
            "kind": "seats",
            "description": "User seats (2), 2026-10, 10 of 31 days",
            "quantity": "20",
            "unit_price": "10.00",
            "amount": "6.45",
            "taxable": True,
            "base_quantity": "31",
        },
    ]
    for line in october.lines:
        assert round(line.quantity * line.unit_price / line.base_quantity, 2) == line.amount
    assert invoice_lines_csv(october).splitlines()[1].endswith(",10,1500.00,483.87,True,31")
    with catalog.session() as session:
        buyer = buyer_of(session.get(Account, "fee"))
    document = document_of(catalog, BOOK, october, buyer)
    assert "<td class=n>10 of 31</td><td class=n>1500.00</td>" in document_html(document)
    xml = etree.fromstring(cii_xml(document))
    ns = {"ram": "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100"}
    item = xml.xpath("//ram:IncludedSupplyChainTradeLineItem", namespaces=ns)[0]
    assert item.xpath("ram:SpecifiedLineTradeDelivery/ram:BilledQuantity/text()", namespaces=ns) == ["10"]
    price = "ram:SpecifiedLineTradeAgreement/ram:NetPriceProductTradePrice/"
    assert item.xpath(price + "ram:ChargeAmount/text()", namespaces=ns) == ["1500.00"]
    assert item.xpath(price + "ram:BasisQuantity/text()", namespaces=ns) == ["31"]
    assert item.xpath(price + "ram:BasisQuantity/@unitCode", namespaces=ns) == ["DAY"]
    total = "ram:SpecifiedLineTradeSettlement/ram:SpecifiedTradeSettlementLineMonetarySummation/ram:LineTotalAmount"
    assert item.xpath(total + "/text()", namespaces=ns) == ["483.87"]


def test_an_invoice_not_subject_to_vat_meets_the_br_o_rules(catalog):
    """A tax-exempt customer outside the EU, one month overdue: its e-invoice against the EN 16931
    BR-O rules, as the Factur-X schematron tests them (CII XPath)."""
    from lxml import etree

    from pipelines.billing.delivery import buyer_of, document_of
    from pipelines.billing.einvoice import cii_xml
    from pipelines.catalog.models import Account

    add_account(catalog, "us", tax_rate="0", tax_exempt=True, country="US")
    with catalog.session() as session:
        session.get(Account, "us").vat_id = "US123456789"
    run_billing(catalog, "2026-09", BOOK, now=on_time("2026-09"))
    october = run_billing(catalog, "2026-10", BOOK, now=on_time("2026-10")).invoices[0]
    assert [(line.kind, line.amount) for line in october.lines] == [
        ("subscription", D("99.00")),
        ("late_fee", D("1.49")),  # 1.5 % of September's 99.00
    ]
    with catalog.session() as session:
        buyer = buyer_of(session.get(Account, "us"))
    xml = etree.fromstring(cii_xml(document_of(catalog, BOOK, october, buyer)))
    ns = {
        "rsm": "urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100",
        "ram": "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100",
    }

    def xp(path: str) -> list:
        return xml.xpath(path, namespaces=ns)

    line_tax = "//ram:IncludedSupplyChainTradeLineItem/ram:SpecifiedLineTradeSettlement/ram:ApplicableTradeTax"
    header_tax = "//ram:ApplicableHeaderTradeSettlement/ram:ApplicableTradeTax"
    agreement = "/rsm:CrossIndustryInvoice/rsm:SupplyChainTradeTransaction/ram:ApplicableHeaderTradeAgreement"
    # Every line, the finance charge too, is "not subject to VAT"; BR-O-12: no line of another category.
    assert xp(line_tax + "/ram:CategoryCode/text()") == ["O", "O"]
    # BR-O-05: an O line has no item VAT rate.
    assert xp(line_tax + "[ram:CategoryCode = 'O']/ram:RateApplicablePercent") == []
    # BR-O-01, BR-O-11: exactly one VAT breakdown, the O one; no other anywhere.
    assert xp(header_tax + "/ram:CategoryCode/text()") == ["O"]
    assert xp("//ram:ApplicableTradeTax[ram:CategoryCode != 'O']") == []
    assert xp("//ram:CategoryTradeTax[ram:CategoryCode != 'O']") == []  # BR-O-13, BR-O-14
    # BR-O-08: its taxable amount is the sum of the O lines' net amounts; BR-O-09: its tax is 0;
    # BR-O-10: it states why (VATEX-EU-O and the wording).
    line_totals = (
        "//ram:IncludedSupplyChainTradeLineItem[ram:SpecifiedLineTradeSettlement/ram:ApplicableTradeTax/"
        "ram:CategoryCode = 'O']/ram:SpecifiedLineTradeSettlement/"
        "ram:SpecifiedTradeSettlementLineMonetarySummation/ram:LineTotalAmount/text()"
    )
    assert sum(D(t) for t in xp(line_totals)) == D(xp(header_tax + "/ram:BasisAmount/text()")[0]) == D("100.49")
    assert D(xp(header_tax + "/ram:CalculatedAmount/text()")[0]) == 0
    assert xp(header_tax + "/ram:ExemptionReasonCode/text()") == ["VATEX-EU-O"]
    assert xp(header_tax + "/ram:ExemptionReason/text()")
    # BR-O-02: neither the seller's, the seller's tax representative's nor the buyer's VAT identifier.
    assert xp(agreement + "/ram:SellerTradeParty/ram:SpecifiedTaxRegistration/ram:ID[@schemeID = 'VA']") == []
    assert xp(agreement + "/ram:SellerTaxRepresentativeTradeParty/ram:SpecifiedTaxRegistration/ram:ID") == []
    assert xp("//ram:BuyerTradeParty/ram:SpecifiedTaxRegistration/ram:ID[@schemeID = 'VA']") == []
    # BR-CO-26: the seller is still identified, by its legal registration (BT-30).
    assert xp(agreement + "/ram:SellerTradeParty/ram:SpecifiedLegalOrganization/ram:ID/text()") == [
        "Amtsgericht Berlin-Charlottenburg HRB 123456"
    ]
    assert xp("//ram:DuePayableAmount/text()") == ["100.49"]
