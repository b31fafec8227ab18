"""What an invoice or credit note looks like outside the database: JSON, a CSV of its lines, the
page a customer reads (HTML, from a Jinja2 template) and the same page as PDF (weasyprint); the
EN 16931 e-invoice is `einvoice`.

The documents show what an accounts department books: seller and buyer with addresses and VAT IDs,
invoice and supply dates, the lines with their VAT, one VAT line per rate, the exemption or
reverse-charge wording where it applies, the taxed total, and only *after* it the credit applied,
payments received and the amount due. An e-invoice needs the seller's identity: without `seller:`
in the price book, none is made, and the page says it is not a valid VAT invoice.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from datetime import date
from decimal import Decimal
from typing import Any

from pipelines.billing.lines import InvoiceView, Line
from pipelines.billing.money import format_money, format_quantity, round_half_up
from pipelines.billing.periods import Period
from pipelines.billing.pricebook import PriceBook, Seller
from pipelines.billing.terms import EXEMPT, OUTSIDE_SCOPE, REVERSE_CHARGE, STANDARD, ZERO_RATED
from pipelines.customer_text import render_page

LINE_COLUMNS = ("kind", "description", "quantity", "unit_price", "amount", "taxable")
ZERO = Decimal("0.00")
# Wording printed with a zero VAT, and the EN 16931 exemption reason codes (VATEX) that go with it.
VAT_NOTES = {
    REVERSE_CHARGE: (
        "Reverse charge: VAT to be accounted for by the recipient (Art. 196 Council Directive 2006/112/EC).",
        "VATEX-EU-AE",
    ),
    EXEMPT: ("Exempt from VAT under the exemption the customer holds.", None),
    OUTSIDE_SCOPE: (
        "Not subject to VAT in the EU: the customer is established outside the EU (Art. 44 Directive 2006/112/EC).",
        "VATEX-EU-O",
    ),
    ZERO_RATED: ("VAT at 0 %.", None),
}
FINANCE_CHARGE_NOTE = "Finance charge on an overdue balance: interest, not a supply; no VAT."


@dataclass(frozen=True)
class Buyer:
    account_id: str
    name: str
    country: str
    email: str
    street: str | None = None
    postcode: str | None = None
    city: str | None = None
    vat_id: str | None = None

    @property
    def address_lines(self) -> tuple[str, ...]:
        town = " ".join(part for part in (self.postcode, self.city) if part)
        return tuple(part for part in (self.street, town, self.country) if part)


def buyer_of(account: Any) -> Buyer:
    """The buyer as the account stands now (an `accounts` row)."""
    return Buyer(
        account.account_id,
        account.name,
        account.country,
        account.email,
        account.street,
        account.postcode,
        account.city,
        account.vat_id,
    )


def parties_json(buyer: Buyer, seller: Seller | None) -> str:
    """Seller and buyer as a document is issued to them, kept with it: an issued document is never
    edited, so a renamed account or another price book's seller does not change it."""
    return json.dumps({"buyer": asdict(buyer), "seller": None if seller is None else asdict(seller)}, sort_keys=True)


def issued_parties(text: str | None) -> tuple[Buyer, Seller | None] | None:
    """The parties kept at issue, or None for a document issued before they were kept."""
    if not text:
        return None
    data = json.loads(text)
    return Buyer(**data["buyer"]), None if data["seller"] is None else Seller(**data["seller"])


@dataclass(frozen=True)
class VatGroup:
    category: str
    rate: Decimal
    base: Decimal
    tax: Decimal

    @property
    def percent(self) -> str:
        return format_quantity(self.rate * 100)

    @property
    def label(self) -> str:
        if self.category == STANDARD:
            return f"VAT {self.percent} %"
        if self.category == "FC":
            return "Finance charge, no VAT"
        return {
            REVERSE_CHARGE: "VAT 0 %, reverse charge",
            EXEMPT: "VAT 0 %, exempt",
            OUTSIDE_SCOPE: "VAT 0 %, not subject",
        }.get(self.category, "VAT 0 %")


@dataclass(frozen=True)
class DocumentView:
    """Everything an invoice or credit note document shows, computed once for every format."""

    kind: str  # "invoice" or "credit_note"
    number: str
    issue_date: date
    due_date: date | None
    supply_first: date
    supply_last: date
    currency: str
    seller: Seller | None
    buyer: Buyer
    lines: tuple[Line, ...]  # supplies, late fees and credits given; never the credit carried forward
    vat: tuple[VatGroup, ...]
    net_total: Decimal
    tax_total: Decimal
    gross_total: Decimal
    credit_applied: Decimal = ZERO
    credit_remaining: Decimal | None = None
    paid: Decimal = ZERO
    refers_to: str | None = None
    late_fee_rate: Decimal = Decimal("0")
    dispute_days: int = 7
    billing_error_days: int = 60

    @property
    def title(self) -> str:
        return "Invoice" if self.kind == "invoice" else "Credit note"

    @property
    def amount_due(self) -> Decimal:
        return self.gross_total - self.credit_applied - self.paid

    @property
    def notes(self) -> list[str]:
        categories = {group.category for group in self.vat}
        return [VAT_NOTES[c][0] for c in (REVERSE_CHARGE, EXEMPT, OUTSIDE_SCOPE) if c in categories] + (
            [FINANCE_CHARGE_NOTE] if "FC" in categories else []
        )


def vat_groups(lines: tuple[Line, ...], invoice_rate: Decimal, fallback_category: str) -> tuple[VatGroup, ...]:
    """One group per VAT category and rate, tax rounded half-up once per group (as the run did)."""
    bases: dict[tuple[str, Decimal], Decimal] = defaultdict(lambda: ZERO)
    for line in lines:
        if not line.taxable:
            bases["FC", Decimal("0")] += line.amount
            continue
        rate = line.tax_rate if line.tax_rate is not None else invoice_rate
        bases[line.tax_category or (STANDARD if rate else fallback_category), rate] += line.amount
    return tuple(
        VatGroup(category, rate, base, round_half_up(base * rate) if category == STANDARD else ZERO)
        for (category, rate), base in sorted(
            bases.items(), key=lambda item: (item[0][0] == "FC", -item[0][1], item[0][0])
        )
    )


def invoice_document(
    invoice: InvoiceView,
    buyer: Buyer,
    pricebook: PriceBook,
    credit_remaining: Decimal | None = None,
    paid: Decimal = ZERO,
    exempt_category: str = EXEMPT,
) -> DocumentView:
    """An invoice's document. A month whose credits (availability, refunds, corrections of earlier
    months) outweigh its charges has a negative total: that is no invoice but a credit note (EN 16931
    type 381, amounts credited shown positive, nothing to pay, nothing carried forward consumed);
    the run's ledger credits it on the next invoice."""
    lines = tuple(line for line in invoice.lines if line.kind != "credit")
    credit_applied = -sum((line.amount for line in invoice.lines if line.kind == "credit"), ZERO)
    vat = vat_groups(lines, invoice.tax_rate, exempt_category)
    net = sum((line.amount for line in lines), ZERO)
    tax = sum((group.tax for group in vat), ZERO)
    if net + tax < 0:
        return _credit_document(invoice, buyer, pricebook, lines, exempt_category)
    period = Period.parse(invoice.period)
    return DocumentView(
        "invoice",
        invoice.invoice_number,
        invoice.issue_date,
        invoice.due_date,
        period.first_day,
        period.last_day,
        invoice.currency,
        pricebook.seller,
        buyer,
        lines,
        vat,
        net,
        tax,
        net + tax,
        credit_applied,
        credit_remaining,
        paid,
        late_fee_rate=pricebook.late_fee_rate(buyer.country),
        dispute_days=pricebook.dispute_window_days,
        billing_error_days=pricebook.billing_error_dispute_window_days,
    )


def _credit_document(
    invoice: InvoiceView, buyer: Buyer, pricebook: PriceBook, lines: tuple[Line, ...], exempt_category: str
) -> DocumentView:
    """A month's negative invoice as the credit note it is: every line with its sign turned, so
    what is credited reads positive and a charge on it reads negative."""
    lines = tuple(replace(line, quantity=-line.quantity, amount=-line.amount) for line in lines)
    vat = vat_groups(lines, invoice.tax_rate, exempt_category)
    net = sum((line.amount for line in lines), ZERO)
    tax = sum((group.tax for group in vat), ZERO)
    period = Period.parse(invoice.period)
    return DocumentView(
        "credit_note",
        invoice.invoice_number,
        invoice.issue_date,
        None,
        period.first_day,
        period.last_day,
        invoice.currency,
        pricebook.seller,
        buyer,
        lines,
        vat,
        net,
        tax,
        net + tax,
        dispute_days=pricebook.dispute_window_days,
        billing_error_days=pricebook.billing_error_dispute_window_days,
    )


def credit_note_document(
    note: Any, invoice: InvoiceView, buyer: Buyer, pricebook: PriceBook, exempt_category: str = EXEMPT
) -> DocumentView:
    """A credit note: its lines, each with the VAT rate and category of the invoice line it reverses
    (a finance charge: none). A credit note issued before its lines were kept has one line at the
    invoice's rate."""
    rows = list(getattr(note, "lines", None) or ())
    if rows:
        lines = tuple(
            Line(
                "credit_note",
                row.description,
                Decimal(1),
                row.amount,
                row.amount,
                row.taxable,
                row.tax_rate,
                row.tax_category,
            )
            for row in rows
        )
        # The tax as issued (computed per rate, never more than the invoice's): one group per VAT.
        groups = vat_groups(lines, invoice.tax_rate, exempt_category)
        if len(groups) == 1:
            groups = (replace(groups[0], tax=note.tax),)
    else:
        category = STANDARD if invoice.tax_rate else exempt_category
        lines = (
            Line(
                "credit_note",
                f"Credit on invoice {invoice.invoice_number}: {note.reason}",
                Decimal(1),
                note.amount,
                note.amount,
                True,
                invoice.tax_rate,
                category,
            ),
        )
        groups = (VatGroup(category, invoice.tax_rate, note.amount, note.tax),)
    period = Period.parse(invoice.period)
    return DocumentView(
        "credit_note",
        note.credit_note_number,
        note.issued_on,
        None,
        period.first_day,
        period.last_day,
        invoice.currency,
        pricebook.seller,
        buyer,
        lines,
        groups,
        note.amount,
        note.tax,
        note.total,
        refers_to=invoice.invoice_number,
    )


# --- the formats --------------------------------------------------------------------------------


def invoice_json(invoice: InvoiceView) -> str:
    return json.dumps(invoice.to_dict(), indent=2) + "\n"


def invoice_lines_csv(invoice: InvoiceView) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=("invoice_number", *LINE_COLUMNS, "base_quantity"), lineterminator="\n")
    writer.writeheader()
    for line in invoice.to_dict()["lines"]:
        writer.writerow(
            {
                "invoice_number": invoice.invoice_number,
                **{k: line[k] for k in LINE_COLUMNS},
                "base_quantity": line.get("base_quantity", "1"),
            }
        )
    return buffer.getvalue()


def _line_row(line: Line) -> dict[str, str]:
    data = line.to_dict()
    if not line.taxable:
        vat = "none"
    elif line.tax_category in (None, STANDARD) and line.tax_rate:
        vat = f"{format_quantity(line.tax_rate * 100)} %"
    else:
        vat = "0 %"
    return {
        "description": data["description"],
        # 16 of 30 (days) x the month's 99.00: quantity x unit price / base quantity = amount.
        "quantity": data["quantity"] + (f" of {data['base_quantity']}" if "base_quantity" in data else ""),
        "unit_price": data["unit_price"],
        "amount": data["amount"],
        "vat": vat,
    }


def document_html(document: DocumentView) -> str:
    """A self-contained page (no external assets), also the source of the PDF."""
    money = {
        name: format_money(getattr(document, name))
        for name in ("net_total", "gross_total", "credit_applied", "paid", "amount_due")
    }
    context = {
        "title": document.title,
        "number": document.number,
        "kind": document.kind,
        "refers_to": document.refers_to,
        "issue_date": document.issue_date.isoformat(),
        "due_date": document.due_date.isoformat() if document.due_date else None,
        "supply_first": document.supply_first.isoformat(),
        "supply_last": document.supply_last.isoformat(),
        "currency": document.currency,
        "seller": document.seller,
        "buyer": document.buyer,
        "lines": [_line_row(line) for line in document.lines],
        "vat": [{"label": g.label, "base": format_money(g.base), "tax": format_money(g.tax)} for g in document.vat],
        "credit_remaining": None if document.credit_remaining is None else format_money(document.credit_remaining),
        "amount_due_positive": document.amount_due > 0,
        "notes": document.notes,
        "late_fee_percent": format_quantity(document.late_fee_rate * 100),
        "dispute_days": document.dispute_days,
        "billing_error_days": document.billing_error_days,
        **money,
    }
    return render_page("invoice.html.j2", d=context)


def document_pdf(document: DocumentView) -> bytes:
    """The page as a PDF/A-3b (fonts embedded), ready to carry the e-invoice XML."""
    from weasyprint import HTML

    return HTML(string=document_html(document)).write_pdf(pdf_variant="pdf/a-3b", uncompressed_pdf=False)


def invoice_html(
    invoice: InvoiceView,
    buyer: Buyer,
    pricebook: PriceBook,
    credit_remaining: Decimal | None = None,
    paid: Decimal = ZERO,
) -> str:
    return document_html(invoice_document(invoice, buyer, pricebook, credit_remaining, paid))


# --- the e-invoice (EN 16931, Factur-X) ---------------------------------------------------------
