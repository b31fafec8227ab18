"""The EN 16931 e-invoice of an invoice or credit note: CII XML (drafthorse) embedded in a Factur-X
PDF/A-3 (factur-x), and checked against the official schema before it is published."""

from __future__ import annotations

from decimal import Decimal

from pipelines.billing.documents import FINANCE_CHARGE_NOTE, VAT_NOTES, ZERO, DocumentView, VatGroup, document_pdf
from pipelines.billing.lines import Line
from pipelines.billing.terms import EXEMPT, OUTSIDE_SCOPE, STANDARD
from pipelines.errors import UserError

FACTURX_LEVEL = "en16931"
GUIDELINE = "urn:cen.eu:en16931:2017"
UNIT_CODES = {"usage": "C62", "late_usage": "C62", "seats": "C62", "extra_storage": "C62"}  # C62 = one (unit)


class EInvoiceUnavailable(UserError, ValueError):
    """No e-invoice can be made: the seller's identity is missing from the price book."""


def cii_xml(document: DocumentView) -> bytes:
    """The EN 16931 CII XML of an invoice (type 380) or credit note (381), checked against the
    Factur-X EN 16931 schema before it is returned."""
    from drafthorse.models.accounting import ApplicableTradeTax
    from drafthorse.models.document import Document
    from drafthorse.models.note import IncludedNote
    from drafthorse.models.party import TaxRegistration
    from drafthorse.models.payment import PaymentTerms
    from drafthorse.models.tradelines import LineItem

    seller = document.seller
    if seller is None:
        raise EInvoiceUnavailable(
            "no e-invoice without the seller's name, address and VAT ID: add seller: to the price book"
        )
    # Not subject to VAT (a customer outside the EU): EN 16931 allows no other VAT breakdown beside
    # it (BR-O-11, BR-O-12), so a finance charge on such an invoice is not subject to VAT either, no
    # item VAT rate (BR-O-05), and neither the seller's nor the buyer's VAT identifier (BR-O-02).
    outside = _outside_scope(document.vat)
    vat = (VatGroup(OUTSIDE_SCOPE, Decimal("0"), document.net_total, ZERO),) if outside else document.vat
    doc = Document()
    doc.context.guideline_parameter.id = GUIDELINE
    doc.header.id = document.number
    doc.header.type_code = "380" if document.kind == "invoice" else "381"
    doc.header.issue_date_time = document.issue_date
    for note in document.notes:
        doc.header.notes.add(IncludedNote(content=note))

    agreement = doc.trade.agreement
    agreement.buyer_reference = document.buyer.account_id
    agreement.seller.name = seller.name
    agreement.seller.address.line_one = seller.street
    agreement.seller.address.postcode = seller.postcode
    agreement.seller.address.city_name = seller.city
    agreement.seller.address.country_id = seller.country
    if not outside:
        agreement.seller.tax_registrations.add(TaxRegistration(id=("VA", seller.vat_id)))
    elif seller.registration:
        # The seller is still identified (BR-CO-26): by its legal registration (BT-30).
        agreement.seller.legal_organization.id = seller.registration
    else:
        agreement.seller.id = seller.vat_id  # Seller identifier (BT-29)
    if seller.email:
        agreement.seller.electronic_address.uri_ID = ("EM", seller.email)
    buyer = document.buyer
    agreement.buyer.name = buyer.name
    agreement.buyer.id = buyer.account_id
    if buyer.street:
        agreement.buyer.address.line_one = buyer.street
    if buyer.postcode:
        agreement.buyer.address.postcode = buyer.postcode
    if buyer.city:
        agreement.buyer.address.city_name = buyer.city
    agreement.buyer.address.country_id = buyer.country
    if buyer.vat_id and not outside:
        agreement.buyer.tax_registrations.add(TaxRegistration(id=("VA", buyer.vat_id)))
    if document.refers_to:
        agreement.buyer_order.issuer_assigned_id = document.refers_to

    doc.trade.delivery.event.occurrence = document.supply_last
    settlement = doc.trade.settlement
    settlement.currency_code = document.currency
    settlement.period.start = document.supply_first
    settlement.period.end = document.supply_last
    if seller.iban and document.kind == "invoice":
        from drafthorse.models.payment import PaymentMeans

        means = PaymentMeans()
        means.type_code = "58"  # SEPA credit transfer
        means.payee_account.iban = seller.iban
        settlement.payment_means.add(means)
    if document.due_date:
        terms = PaymentTerms()
        terms.description = f"Due {document.due_date.isoformat()}"
        terms.due = document.due_date
        settlement.terms.add(terms)

    for position, line in enumerate(document.lines, start=1):
        item = LineItem()
        item.document.line_id = str(position)
        item.product.name = line.description
        quantity = line.quantity if line.kind not in ("late_fee", "credit_note") else Decimal(1)
        unit_price = line.unit_price if line.kind not in ("late_fee", "credit_note") else line.amount
        if quantity == 0:
            quantity, unit_price = Decimal(1), line.amount
        # EN 16931 prices are never negative: a credit is a negative quantity at a positive price.
        if unit_price < 0:
            quantity, unit_price = -quantity, -unit_price
        item.agreement.net.amount = unit_price
        unit = UNIT_CODES.get(line.kind, "C62")
        if line.base_quantity != 1 and line.kind not in ("late_fee", "credit_note") and line.quantity:
            # Part of a month: days (seat-days) at a price per month of that many days (BT-149, BT-150),
            # so quantity x net price / base quantity is the line amount before rounding to the cent.
            unit = "DAY"
            item.agreement.net.basis_quantity = (line.base_quantity, unit)
        item.delivery.billed_quantity = (quantity, unit)
        group = vat[0] if outside else _group_of(line, document.vat)
        item.settlement.trade_tax.type_code = "VAT"
        item.settlement.trade_tax.category_code = _cii_category(group)
        if group.category != OUTSIDE_SCOPE:
            item.settlement.trade_tax.rate_applicable_percent = group.rate * 100
        item.settlement.monetary_summation.total_amount = line.amount
        doc.trade.items.add(item)

    for group in vat:
        tax = ApplicableTradeTax()
        tax.calculated_amount = group.tax
        tax.basis_amount = group.base
        tax.type_code = "VAT"
        tax.category_code = _cii_category(group)
        if group.category != OUTSIDE_SCOPE:
            tax.rate_applicable_percent = group.rate * 100
        if group.category != STANDARD:
            text, code = VAT_NOTES.get(group.category, (FINANCE_CHARGE_NOTE, None))
            tax.exemption_reason = text
            if code:
                tax.exemption_reason_code = code
        settlement.trade_tax.add(tax)

    totals = settlement.monetary_summation
    totals.line_total = document.net_total
    totals.charge_total = ZERO
    totals.allowance_total = ZERO
    totals.tax_basis_total = document.net_total
    totals.tax_total = (document.tax_total, document.currency)
    totals.grand_total = document.gross_total
    totals.prepaid_total = document.credit_applied + document.paid
    totals.due_amount = document.amount_due
    return doc.serialize(schema="FACTUR-X_EN16931")


def _group_of(line: Line, groups: tuple[VatGroup, ...]) -> VatGroup:
    if not line.taxable:
        return next(g for g in groups if g.category == "FC")
    return next(
        g
        for g in groups
        if g.rate == (line.tax_rate if line.tax_rate is not None else g.rate)
        and (line.tax_category is None or g.category == line.tax_category)
    )


def _outside_scope(groups: tuple[VatGroup, ...]) -> bool:
    """Every supply of the document is not subject to VAT (finance charges aside, which are no supply)."""
    supplies = {group.category for group in groups if group.category != "FC"}
    return supplies == {OUTSIDE_SCOPE}


def _cii_category(group: VatGroup) -> str:
    # A finance charge is no supply; EN 16931 has no category of its own for it, and "exempt" is the
    # one that may stand beside standard-rated lines on the same invoice.
    return EXEMPT if group.category == "FC" else group.category


def facturx_pdf(document: DocumentView) -> bytes:
    """The PDF/A-3 page with its CII XML embedded as factur-x.xml: one file for people and for
    accounting software."""
    from facturx import generate_from_binary

    xml = cii_xml(document)
    metadata = {
        "author": document.seller.name if document.seller else "pointflow",
        "keywords": "Factur-X, e-invoice",
        "title": f"{document.title} {document.number}",
        "subject": f"{document.title} {document.number} of {document.seller.name if document.seller else 'pointflow'}",
    }
    return generate_from_binary(
        document_pdf(document),
        xml,
        flavor="factur-x",
        level=FACTURX_LEVEL,
        check_xsd=True,
        pdf_metadata=metadata,
        lang="en-GB",
    )


def check_facturx(pdf: bytes) -> bytes:
    """The CII XML embedded in a Factur-X PDF, after checking it against the official EN 16931
    schema (raises if it does not validate)."""
    from facturx import get_xml_from_pdf, xml_check_xsd

    _, xml = get_xml_from_pdf(pdf, check_xsd=False)
    xml_check_xsd(xml, flavor="factur-x", level=FACTURX_LEVEL)
    return xml
