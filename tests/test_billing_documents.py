"""Invoice documents an accounts department can book: seller and buyer, VAT per rate, exemption and
reverse-charge wording, credit applied after the taxed total; and the EN 16931 e-invoice as a
Factur-X PDF whose XML validates against the official schema."""

from __future__ import annotations

import io
import json
from datetime import UTC, date
from decimal import Decimal
from pathlib import Path

import pytest
from lxml import etree
from pypdf import PdfReader

from pipelines.accounts import read_accounts_csv, upsert_accounts
from pipelines.billing.corrections import TermsUpdate, issue_credit_note, set_billing_terms
from pipelines.billing.delivery import (
    MonthlyBilling,
    buyer_of,
    document_of,
    email_invoices,
    publish_credit_note,
    publish_documents,
)
from pipelines.billing.documents import document_html
from pipelines.billing.einvoice import EInvoiceUnavailable, check_facturx, cii_xml
from pipelines.billing.imports import (
    import_outages,
    import_payments,
    import_usage,
    read_outages_csv,
    read_payments_csv,
    read_usage_jsonl,
)
from pipelines.billing.invoicing import run_billing
from pipelines.billing.periods import Period
from pipelines.catalog import Catalog
from pipelines.catalog.models import Account
from pipelines.settings import Settings
from pipelines.storage import open_store
from tests.test_billing_support import (
    BASE_PRICEBOOK,
    SELLER,
    add_account,
    bill_on_time,
    catalog,
    check_einvoices,
    cli_env,
    database_url,
    make_pricebook,
    on_time,
    postgres_schema_url,
)

__all__ = ["catalog", "cli_env", "database_url", "postgres_schema_url"]  # fixtures used here

DATA = Path(__file__).parent / "data" / "billing"
BOOK = make_pricebook(SELLER)
CII = {
    "rsm": "urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100",
    "ram": "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100",
}


def scenario(catalog: Catalog, book=BOOK) -> None:
    """tests/data/billing: September and October 2026 invoiced, September's payments between."""
    upsert_accounts(catalog, read_accounts_csv(DATA / "accounts.csv"))
    import_usage(catalog, read_usage_jsonl(DATA / "usage.jsonl"))
    run_billing(catalog, "2026-09", book, now=on_time("2026-09"))
    import_payments(catalog, read_payments_csv(DATA / "payments.csv"))
    import_outages(catalog, read_outages_csv(DATA / "outages.csv"))
    run_billing(catalog, "2026-10", book, now=on_time("2026-10"))


def billing(catalog: Catalog, tmp_path: Path, period: str, book=BOOK) -> MonthlyBilling:
    settings = Settings.from_env({"POINTFLOW_HOME": str(tmp_path / "home")})
    return MonthlyBilling(settings, catalog, open_store((tmp_path / "objects").as_uri()), book, Period.parse(period))


def xpath(xml: bytes, path: str) -> list[str]:
    return [str(value) for value in etree.fromstring(xml).xpath(path, namespaces=CII)]


def test_every_invoice_is_published_as_a_factur_x_pdf_whose_xml_validates(catalog, tmp_path):
    scenario(catalog)
    for period in ("2026-09", "2026-10"):
        month = billing(catalog, tmp_path, period)
        assert publish_documents(month).written == 5 * 3
        assert publish_documents(month).written == 0  # issued documents are never rewritten
    store = month.store
    pdfs = sorted(info.key for info in store.list("accounts/") if info.key.endswith(".pdf"))
    assert len(pdfs) == 6
    for key in pdfs:
        pdf = store.get_bytes(key)
        reader = PdfReader(io.BytesIO(pdf))
        xmp = reader.trailer["/Root"]["/Metadata"].get_object().get_data()
        # PDF/A-3b with the Factur-X EN 16931 profile, declared in its XMP; the XML attached as factur-x.xml.
        assert b"pdfaid:part>3<" in xmp and b"pdfaid:conformance>B<" in xmp and b"fx:ConformanceLevel>EN 16931<" in xmp
        assert list(reader.attachments) == ["factur-x.xml"] and "/AF" in reader.trailer["/Root"]
        xml = check_facturx(pdf)  # raises unless the XML validates against the Factur-X EN 16931 XSD
        assert xml == store.get_bytes(key.replace(".pdf", ".xml"))
        assert xpath(xml, "//rsm:ExchangedDocument/ram:ID/text()") == [Path(key).stem]
    assert check_einvoices(catalog) == 6


def test_the_page_shows_seller_buyer_vat_per_rate_and_credit_after_the_total(catalog, tmp_path):
    scenario(catalog)
    month = billing(catalog, tmp_path, "2026-10")
    publish_documents(month)
    html = month.store.get_bytes("accounts/lidar/invoices/PF-2026-10-0003.html").decode()
    for text in (
        "pointflow GmbH",
        "Punktwolkenweg 1",
        "10115 Berlin",
        "VAT ID DE123456789",  # seller
        "Lidar API SAS",
        "12 rue des Capteurs",
        "69002 Lyon",
        "VAT ID FR40303265045",  # buyer
        "<th>Invoice date</th><td>2026-11-01</td>",
        "<td>2026-10-01 to 2026-10-31</td>",
    ):
        assert text in html, text
    # Net 5.00, VAT 20 % 1.00, total 6.00; only then the 6.00 of the 25.92 credit, 19.92 left; nothing due.
    rows = [row for row in html.split("<tr") if "class=n>" in row and "<td colspan=4" in row]
    figures = [(row.split("class=n>")[1].split("<")[0], row.split("class=n>")[-1].split("<")[0]) for row in rows]
    assert figures == [
        ("Subtotal", "5.00"),
        ("VAT 20 % on 5.00", "1.00"),
        ("Total EUR", "6.00"),
        ("Credit applied (earlier overpayments and credit notes); 19.92 remains for later invoices", "-6.00"),
        ("Payments received", "0.00"),
        ("Amount due EUR", "0.00"),
    ]
    assert "Nothing is due on this invoice." in html
    xml = month.store.get_bytes("accounts/lidar/invoices/PF-2026-10-0003.xml")
    assert xpath(xml, "//ram:SpecifiedTradeSettlementHeaderMonetarySummation/*/text()") == [
        "5.00",
        "0.00",
        "0.00",
        "5.00",
        "1.00",
        "6.00",
        "6.00",
        "0.00",
    ]


def test_a_tax_exempt_eu_business_abroad_gets_the_reverse_charge_note(catalog, tmp_path):
    scenario(catalog)
    month = billing(catalog, tmp_path, "2026-09")
    publish_documents(month)
    html = month.store.get_bytes("accounts/geo/invoices/PF-2026-09-0002.html").decode()
    assert "Reverse charge: VAT to be accounted for by the recipient (Art. 196 Council Directive 2006/112/EC)." in html
    assert "VAT 0 %, reverse charge on 79.20" in html and "VAT ID NL004495445B01" in html
    xml = month.store.get_bytes("accounts/geo/invoices/PF-2026-09-0002.xml")
    assert set(xpath(xml, "//ram:CategoryCode/text()")) == {"AE"}
    assert xpath(xml, "//ram:ApplicableTradeTax/ram:ExemptionReasonCode/text()") == ["VATEX-EU-AE"]
    # The invoice says what was issued: a later change of the customer's VAT ID does not rewrite it.
    with catalog.session() as session:
        session.get(Account, "geo").vat_id = None
    geo = next(i for i in month_invoices(catalog, "2026-09") if i.account_id == "geo")
    assert "Reverse charge" in document_html(document_of(catalog, BOOK, geo, buyer_of(_account(catalog, "geo"))))


def test_an_exemption_at_home_is_a_plain_exemption(catalog, tmp_path):
    add_account(catalog, "charity", tax_exempt=True)  # in Germany, like the seller
    run_billing(catalog, "2026-10", BOOK, now=on_time("2026-10"))
    month = billing(catalog, tmp_path, "2026-10")
    publish_documents(month)
    html = month.store.get_bytes("accounts/charity/invoices/PF-2026-10-0001.html").decode()
    assert "Exempt from VAT under the exemption the customer holds." in html and "Reverse charge" not in html
    xml = month.store.get_bytes("accounts/charity/invoices/PF-2026-10-0001.xml")
    assert set(xpath(xml, "//ram:CategoryCode/text()")) == {"E"}


def month_invoices(catalog: Catalog, period: str):
    from pipelines.billing.invoicing import load_invoices

    return load_invoices(catalog, Period.parse(period))


def test_vat_rates_changing_mid_month_get_a_vat_line_each(catalog, tmp_path):
    add_account(catalog, "vat", tax_rate="0.19")
    set_billing_terms(catalog, "vat", TermsUpdate(tax_rate=Decimal("0.16"), effective_on=date(2026, 10, 16)))
    run_billing(catalog, "2026-10", BOOK, now=on_time("2026-10"))
    month = billing(catalog, tmp_path, "2026-10")
    publish_documents(month)
    html = month.store.get_bytes("accounts/vat/invoices/PF-2026-10-0001.html").decode()
    assert "VAT 19 % on 47.90</td><td class=n>9.10" in html and "VAT 16 % on 51.10</td><td class=n>8.18" in html
    xml = month.store.get_bytes("accounts/vat/invoices/PF-2026-10-0001.xml")
    assert xpath(
        xml, "//ram:ApplicableHeaderTradeSettlement/ram:ApplicableTradeTax/ram:RateApplicablePercent/text()"
    ) == ["19.00", "16.00"]


def test_the_email_links_the_e_invoice(catalog, tmp_path, smtp_sink, monkeypatch):
    monkeypatch.setenv("POINTFLOW_SMTP_URL", smtp_sink.url)
    scenario(catalog)
    month = billing(catalog, tmp_path, "2026-09")
    month = MonthlyBilling(
        Settings.from_env({"POINTFLOW_HOME": str(tmp_path / "home"), "POINTFLOW_SMTP_URL": smtp_sink.url}),
        catalog,
        month.store,
        BOOK,
        month.period,
    )
    publish_documents(month)
    email_invoices(month)
    [message] = [m for m in smtp_sink.parsed() if "PF-2026-09-0001" in m["Subject"]]
    # The documents themselves travel with the e-mail: the customer has them whatever becomes of the links.
    attached = {part.get_filename(): part.get_content() for part in message.iter_attachments()}
    assert attached == {
        "PF-2026-09-0001.pdf": month.store.get_bytes("accounts/acme/invoices/PF-2026-09-0001.pdf"),
        "PF-2026-09-0001.xml": month.store.get_bytes("accounts/acme/invoices/PF-2026-09-0001.xml"),
    }
    body = message.get_body(("plain",)).get_content()
    assert (
        "Attached: PF-2026-09-0001.pdf (the invoice, a Factur-X e-invoice), PF-2026-09-0001.xml (its EN 16931 XML)."
        in " ".join(body.split())
    )
    assert "PDF e-invoice (Factur-X):" in body and ".pdf" in body and "E-invoice XML (EN 16931):" in body
    assert (
        "Please pay EUR 62.83 by 2026-10-31. Bank transfer to IBAN DE02120300000000202051 (BIC BYLADEM1001), quoting PF-2026-09-0001."
        in body
    )


def test_credit_notes_are_e_invoices_too(catalog, tmp_path):
    scenario(catalog)
    note, _ = issue_credit_note(catalog, BOOK, "PF-2026-09-0001", Decimal("2.80"), "onboarding days", date(2026, 10, 3))
    store = open_store((tmp_path / "objects").as_uri())
    keys = publish_credit_note(catalog, store, BOOK, note.credit_note_number)
    assert set(keys) == {"html", "pdf", "xml"}
    xml = check_facturx(store.get_bytes(keys["pdf"]))
    assert xpath(xml, "//rsm:ExchangedDocument/ram:TypeCode/text()") == ["381"]
    assert xpath(xml, "//ram:DuePayableAmount/text()") == ["3.33"]
    assert "Corrects invoice PF-2026-09-0001" in store.get_bytes(keys["html"]).decode()
    # The heading keeps the number whole: "Credit note PF-" then "CN-2026-10-0001" was the PDF's first line.
    lines = PdfReader(io.BytesIO(store.get_bytes(keys["pdf"]))).pages[0].extract_text().splitlines()
    assert f"Credit note {note.credit_note_number}" in lines, lines[:5]


def test_without_a_seller_the_page_says_it_is_no_vat_invoice_and_no_e_invoice_is_made(catalog, tmp_path):
    scenario(catalog, make_pricebook())
    month = billing(catalog, tmp_path, "2026-09", make_pricebook())
    assert publish_documents(month).written == 3 * 3
    html = month.store.get_bytes("accounts/acme/invoices/PF-2026-09-0001.html").decode()
    assert "not a valid VAT invoice" in html
    invoice = month_invoices(catalog, "2026-09")[0]
    with pytest.raises(EInvoiceUnavailable, match="seller"):
        cii_xml(document_of(catalog, make_pricebook(), invoice, buyer_of(_account(catalog, "acme"))))


def _account(catalog: Catalog, account_id: str) -> Account:
    with catalog.session() as session:
        account = session.get(Account, account_id)
        session.expunge(account)
        return account


def test_the_seller_block_is_checked():
    from pipelines.billing.pricebook import PriceBookError

    with pytest.raises(PriceBookError, match="seller.vat_id: must be a non-empty text"):
        make_pricebook("seller: {name: x, street: y, postcode: '1', city: z, country: DE}\n", base=BASE_PRICEBOOK)
    with pytest.raises(PriceBookError, match="seller.country: 'Germany' is not a two-letter ISO code"):
        make_pricebook("seller: {name: x, street: y, postcode: '1', city: z, country: Germany, vat_id: DE1}\n")
    assert json.dumps(BOOK.seller.address_lines) == '["Punktwolkenweg 1", "10115 Berlin", "DE"]'


def test_the_documents_from_the_command_line(cli_env, capsys, tmp_path, monkeypatch):
    from pipelines.cli import main

    bill_on_time(monkeypatch)
    book = tmp_path / "book.yaml"
    book.write_text(BASE_PRICEBOOK + SELLER)
    monkeypatch.setenv("POINTFLOW_PRICEBOOK", str(book))
    for argv in (
        ["accounts", "import", str(DATA / "accounts.csv")],
        ["usage", "import", str(DATA / "usage.jsonl")],
        ["billing", "run", "--period", "2026-09"],
        [
            "invoices",
            "credit",
            "PF-2026-09-0001",
            "--amount",
            "2.80",
            "--reason",
            "onboarding",
            "--issued-on",
            "2026-10-03",
        ],
    ):
        assert main(argv) == 0
    capsys.readouterr()
    assert main(["invoices", "show", "PF-2026-09-0001", "--format", "pdf"]) == 2
    assert "add --output FILE.pdf" in capsys.readouterr().err
    assert main(["invoices", "show", "PF-2026-09-0001", "--format", "pdf", "--output", str(tmp_path / "i.pdf")]) == 0
    assert "PF-2026-09-0001: pdf written to" in capsys.readouterr().out
    assert xpath(check_facturx((tmp_path / "i.pdf").read_bytes()), "//ram:GrandTotalAmount/text()") == ["62.83"]
    assert main(["invoices", "show", "PF-CN-2026-10-0001", "--format", "xml"]) == 0
    assert xpath(capsys.readouterr().out.encode(), "//ram:TypeCode/text()")[0] == "381"
    published = tmp_path / "home" / "objects" / "accounts" / "acme" / "invoices"
    assert sorted(p.name for p in published.iterdir()) == [
        "PF-CN-2026-10-0001.html",
        "PF-CN-2026-10-0001.pdf",
        "PF-CN-2026-10-0001.xml",
    ]


def test_a_month_whose_credits_outweigh_its_charges_is_a_credit_note(catalog, tmp_path):
    from datetime import datetime

    from pipelines.billing.delivery import invoice_email
    from pipelines.billing.history import record_plan_change

    book = make_pricebook(SELLER + "refund_unused_prepaid: true\n")
    add_account(catalog, "q", billing_cycle="quarterly", started_at="2026-08-01")
    record_plan_change(catalog, book, "q", "free", date(2026, 9, 16), "monthly")
    run_billing(catalog, "2026-08", book, now=on_time("2026-08"))
    [september] = run_billing(catalog, "2026-09", book, now=on_time("2026-09")).invoices
    # 46 of the 92 prepaid days unused: 297.00 x 46/92 refunded, with its VAT.
    assert (september.subtotal, september.tax, september.total) == (
        Decimal("-148.50"),
        Decimal("-28.22"),
        Decimal("-176.72"),
    )
    month = billing(catalog, tmp_path, "2026-09", book)
    publish_documents(month)
    html = month.store.get_bytes("accounts/q/invoices/PF-2026-09-0001.html").decode()
    assert "<h1>Credit note PF-2026-09-0001</h1>" in html and "Please pay" not in html and "Payment due" not in html
    assert "VAT 19 % on 148.50</td><td class=n>28.22" in html and "Total EUR</td><td class=n>176.72" in html
    xml = check_facturx(month.store.get_bytes("accounts/q/invoices/PF-2026-09-0001.pdf"))
    assert xpath(xml, "//rsm:ExchangedDocument/ram:TypeCode/text()") == ["381"]
    assert xpath(xml, "//ram:GrandTotalAmount/text()") == ["176.72"] and xpath(xml, "//ram:LineTotalAmount/text()") == [
        "148.50",
        "148.50",
    ]
    document = document_of(catalog, book, september, buyer_of(_account(catalog, "q")))
    subject, body = invoice_email(document, {}, datetime(2026, 10, 8, tzinfo=UTC))
    assert subject == "Credit note PF-2026-09-0001 for 2026-09: EUR 176.72"
    assert (
        "Nothing is due: this credit of EUR 176.72 is deducted from your next invoice." in body
        and "Please pay" not in body
    )
