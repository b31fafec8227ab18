"""What the monthly billing run delivers once a month is invoiced: each invoice's documents in its
account's area of the object store, one e-mail per invoice, and the usage-per-day report for the UI.

Every step may run again (task retries, manual re-runs, catchup): an invoice's documents are
written once and then left as issued, e-mails go through the sent-messages ledger so each invoice
is mailed once, and the usage report is rebuilt from the catalog.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import select

from pipelines.billing.documents import (
    Buyer,
    DocumentView,
    buyer_of,
    credit_note_document,
    document_html,
    invoice_document,
    invoice_json,
    invoice_lines_csv,
    issued_parties,
)
from pipelines.billing.einvoice import check_facturx, cii_xml, facturx_pdf
from pipelines.billing.invoicing import BillingError, invoice_view, run_invoices
from pipelines.billing.lines import InvoiceView
from pipelines.billing.models import CreditNote, Invoice
from pipelines.billing.periods import Period
from pipelines.billing.pricebook import PriceBook, load_pricebook
from pipelines.billing.terms import Parties
from pipelines.billing.usage import usage_daily
from pipelines.catalog import Catalog, batches
from pipelines.catalog.models import Account, SentMessage
from pipelines.customer_text import Attachment, Mail, render_mail
from pipelines.notify import DeliveryError, Mailer, Message, reply_address, support_address
from pipelines.notify import SentMessage as MailSent
from pipelines.runtime import Runtime
from pipelines.settings import Settings
from pipelines.storage import LINK_LIFETIME, AccountArea, ObjectStore, check_key

log = logging.getLogger(__name__)
ZERO = Decimal("0.00")

# Always published; the e-invoice formats only when the price book names the seller.
BASIC_FORMATS = ("json", "csv", "html")
EINVOICE_FORMATS = ("pdf", "xml")
DOCUMENT_FORMATS = BASIC_FORMATS + EINVOICE_FORMATS
USAGE_DAILY_PREFIX = "service/usage_daily/"
USAGE_DAILY_COLUMNS = ("account_id", "day", "jobs", "billable_points", "failed_points")
# Sent with the e-mail, so the customer has the documents whatever becomes of the links: the
# e-invoice (PDF and XML) when one is made, else the page.
ATTACHED_FORMATS = ("pdf", "xml", "html")
ATTACHMENT_TYPES = {"pdf": "application/pdf", "xml": "application/xml", "html": "text/html"}


class InvoiceEmailError(DeliveryError):
    """Some invoice e-mails were refused after all were tried; the others went out."""


@dataclass(frozen=True)
class MonthlyBilling:
    """What every step of one month's run needs, built from the settings."""

    settings: Settings
    catalog: Catalog
    store: ObjectStore
    pricebook: PriceBook
    period: Period

    @property
    def mailer(self) -> Mailer:
        """The invoice e-mails go out as a job's do: once per key, recorded in this catalog."""
        return Mailer(self.settings, self.catalog, reply_address(self.settings, self.pricebook))

    @classmethod
    def open(cls, settings: Settings, period: str) -> MonthlyBilling:
        runtime = Runtime.from_settings(settings)
        return cls(
            settings, runtime.catalog, runtime.store, load_pricebook(settings.pricebook_path), Period.parse(period)
        )


@dataclass(frozen=True)
class PublishResult:
    written: int
    # Documents an earlier run wrote: an issued invoice's documents are never rewritten.
    kept: int


@dataclass(frozen=True)
class EmailResult:
    sent: tuple[str, ...]
    already_sent: tuple[str, ...]


def document_keys(invoice: InvoiceView) -> dict[str, str]:
    """accounts/<id>/invoices/<number>.json|.csv|.html|.pdf|.xml"""
    area = AccountArea(invoice.account_id)
    return {fmt: area.key("invoices", f"{invoice.invoice_number}.{fmt}") for fmt in DOCUMENT_FORMATS}


def published_formats(pricebook: PriceBook) -> tuple[str, ...]:
    return DOCUMENT_FORMATS if pricebook.seller else BASIC_FORMATS


def usage_daily_keys(period: Period) -> dict[str, str]:
    """Service-wide, not per account: service/usage_daily/<YYYY-MM>.json|.csv"""
    return {fmt: check_key(f"{USAGE_DAILY_PREFIX}{period.label}.{fmt}") for fmt in ("json", "csv")}


def month_invoices(catalog: Catalog, period: Period) -> list[InvoiceView]:
    """What the month's run delivers: the invoices its runs issued, the month's own and those of
    earlier months they caught up (accounts added after those months' runs)."""
    invoices = run_invoices(catalog, period)
    if invoices is None:
        raise BillingError(f"{period} has not been invoiced: run 'pointflow billing run --period {period}' first")
    return invoices


def _buyers(catalog: Catalog, invoices: list[InvoiceView]) -> dict[str, Buyer]:
    """Name, address and VAT ID of every account of `invoices`, a query per batch of accounts."""
    ids = sorted({invoice.account_id for invoice in invoices})
    found: dict[str, Buyer] = {}
    with catalog.session() as session:
        for chunk in batches(ids):
            accounts = session.scalars(select(Account).where(Account.account_id.in_(chunk)))
            found.update((account.account_id, buyer_of(account)) for account in accounts)
    return found


def exempt_category(pricebook: PriceBook, buyer: Buyer) -> str:
    return Parties(pricebook.seller_country, buyer.country, buyer.vat_id).exempt_category()


def document_of(
    catalog: Catalog, pricebook: PriceBook, invoice: InvoiceView, buyer: Buyer, paid: Decimal = ZERO
) -> DocumentView:
    """An invoice's document, to the seller and buyer it was issued to (`buyer` and the price book's
    seller only for an invoice issued before they were kept, or issued without a seller)."""
    with catalog.session() as session:
        remaining, parties = session.execute(
            select(Invoice.credit_remaining, Invoice.parties).where(Invoice.invoice_number == invoice.invoice_number)
        ).one()
    pricebook, buyer = as_issued(pricebook, buyer, parties)
    return invoice_document(invoice, buyer, pricebook, remaining, paid, exempt_category(pricebook, buyer))


def as_issued(pricebook: PriceBook, buyer: Buyer, parties: str | None) -> tuple[PriceBook, Buyer]:
    """The price book with the seller, and the buyer, a document was issued to, when they were kept."""
    issued = issued_parties(parties)
    if issued is None:
        return pricebook, buyer
    buyer, seller = issued
    return (pricebook if seller is None else replace(pricebook, seller=seller)), buyer


def publish_documents(billing: MonthlyBilling) -> PublishResult:
    """Write each invoice's (of `month_invoices`) JSON, CSV of lines and HTML page, and, when the price book names the
    seller, its PDF (Factur-X: the page with the EN 16931 XML inside) and the XML alone, unless an
    earlier run already did.

    The documents are what was issued: a later run must not re-render them with a renamed
    account or another price book's wording. Each write is atomic, so an object that exists
    is complete.
    """
    invoices = month_invoices(billing.catalog, billing.period)
    buyers = _buyers(billing.catalog, invoices)
    formats = published_formats(billing.pricebook)
    written = kept = 0
    for invoice in invoices:
        keys = {fmt: key for fmt, key in document_keys(invoice).items() if fmt in formats}
        missing = [fmt for fmt, key in keys.items() if not billing.store.exists(key)]
        kept += len(keys) - len(missing)
        if not missing:
            continue
        rendered = render_documents(
            document_of(billing.catalog, billing.pricebook, invoice, buyers[invoice.account_id]), invoice, missing
        )
        for fmt in missing:
            billing.store.put_bytes(keys[fmt], rendered[fmt])
            written += 1
    log.info("%s: %d invoice document(s) written, %d already published", billing.period, written, kept)
    return PublishResult(written, kept)


def render_documents(document: DocumentView, invoice: InvoiceView | None, formats: Iterable[str]) -> dict[str, bytes]:
    """The asked formats of one document; the PDF carries the same XML that is published beside it."""
    formats = list(formats)
    rendered: dict[str, bytes] = {}
    if invoice is not None and "json" in formats:
        rendered["json"] = invoice_json(invoice).encode("utf-8")
    if invoice is not None and "csv" in formats:
        rendered["csv"] = invoice_lines_csv(invoice).encode("utf-8")
    if "html" in formats:
        rendered["html"] = document_html(document).encode("utf-8")
    if "pdf" in formats:
        rendered["pdf"] = facturx_pdf(document)
    if "xml" in formats:
        rendered["xml"] = check_facturx(rendered["pdf"]) if "pdf" in rendered else cii_xml(document)
    return rendered


def invoice_email(
    document: DocumentView,
    links: dict[str, str],
    links_expire: datetime,
    support: str | None = None,
    attached: tuple[str, ...] = (),
) -> tuple[str, str]:
    """Subject and plain-text body: the lines, VAT per rate, total, credit applied, amount due,
    links to the published documents, and where to send questions (`support`, see notify.support_address)."""
    mail = render_mail(
        "mail/invoice.txt.j2", d=document, links=links, links_expire=links_expire, support=support, attached=attached
    )
    return mail.subject, mail.body


def attached_files(store: ObjectStore, keys: dict[str, str]) -> dict[str, bytes]:
    """The published documents an e-mail carries: the e-invoice (PDF and XML) when one was made, else the page."""
    published = {fmt: key for fmt, key in keys.items() if fmt in ATTACHED_FORMATS and store.exists(key)}
    wanted = ("pdf", "xml") if "pdf" in published else ("html",)
    return {fmt: store.get_bytes(published[fmt]) for fmt in wanted if fmt in published}


def mail_document(
    mailer: Mailer,
    pricebook: PriceBook,
    key: str,
    kind: str,
    to: str,
    document: DocumentView,
    links: dict[str, str],
    link_lifetime: timedelta = LINK_LIFETIME,
    files: dict[str, bytes] | None = None,
) -> MailSent:
    """Mail an invoice or credit note to `to` (the account's address now) once (idempotency key
    `key`), with links to its published documents: what every invoice and credit note e-mail goes through."""
    attachments = tuple(
        Attachment(f"{document.number}.{fmt}", ATTACHMENT_TYPES[fmt], files[fmt])
        for fmt in ATTACHED_FORMATS
        if files and fmt in files
    )
    subject, body = invoice_email(
        document,
        links,
        datetime.now(UTC) + link_lifetime,
        support_address(mailer.settings, pricebook),
        tuple(a.filename for a in attachments),
    )
    message = Message(key, document.buyer.account_id, kind, to, Mail(subject, body, attachments))
    return mailer.send_once(message)


def _already_mailed(catalog: Catalog, keys: list[str]) -> set[str]:
    found: set[str] = set()
    with catalog.session() as session:
        for chunk in batches(keys):
            found.update(session.scalars(select(SentMessage.key).where(SentMessage.key.in_(chunk))))
    return found


def email_invoices(billing: MonthlyBilling, link_lifetime: timedelta = LINK_LIFETIME) -> EmailResult:
    """Mail every invoice the month's runs issued (`month_invoices`) that was not mailed yet, each
    once (key `invoice:<number>`).

    A refused delivery does not stop the others: all are tried, then InvoiceEmailError names the
    refused ones, and running this again sends only those.
    """
    invoices = month_invoices(billing.catalog, billing.period)
    buyers = _buyers(billing.catalog, invoices)
    formats = published_formats(billing.pricebook)
    mailed = _already_mailed(billing.catalog, [f"invoice:{invoice.invoice_number}" for invoice in invoices])
    sent: list[str] = []
    already: list[str] = []
    refused: list[str] = []
    for invoice in invoices:
        key = f"invoice:{invoice.invoice_number}"
        if key in mailed:
            # Skipped before signing links: a re-run of a month does no work per invoice.
            already.append(invoice.invoice_number)
            continue
        buyer = buyers[invoice.account_id]
        keys = {fmt: k for fmt, k in document_keys(invoice).items() if fmt in formats}
        links = {fmt: billing.store.link(k, link_lifetime) for fmt, k in keys.items()}
        document = document_of(billing.catalog, billing.pricebook, invoice, buyer)
        try:
            mail_document(
                billing.mailer,
                billing.pricebook,
                key,
                "invoice",
                buyer.email,
                document,
                links,
                link_lifetime,
                attached_files(billing.store, keys),
            )
        except DeliveryError as error:
            refused.append(f"{invoice.invoice_number}: {error}")
            continue
        sent.append(invoice.invoice_number)
    log.info(
        "%s: %d invoice e-mail(s) sent, %d sent earlier, %d refused",
        billing.period,
        len(sent),
        len(already),
        len(refused),
    )
    if refused:
        raise InvoiceEmailError(
            f"{len(refused)} of {len(invoices)} invoice e-mail(s) for {billing.period} not sent "
            f"({len(sent)} sent now, {len(already)} earlier); running again sends only these: " + "; ".join(refused)
        )
    return EmailResult(tuple(sent), tuple(already))


def publish_usage_daily(billing: MonthlyBilling) -> dict[str, str]:
    """Write the month's classification usage per account and UTC day as JSON and CSV.

    Rewritten on every run: usage imported after the month was invoiced is on no invoice, but it
    was used, and the UI shows it.
    """
    rows = [
        {**asdict(day), "day": day.day.isoformat()}
        for day in usage_daily(billing.catalog, billing.period.first_day, billing.period.last_day)
    ]
    keys = usage_daily_keys(billing.period)
    document = {"period": billing.period.label, "days": rows}
    billing.store.put_bytes(keys["json"], (json.dumps(document, indent=2) + "\n").encode("utf-8"))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=USAGE_DAILY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    billing.store.put_bytes(keys["csv"], buffer.getvalue().encode("utf-8"))
    log.info("%s: usage per day, %d row(s), written to %s", billing.period, len(rows), keys["json"])
    return keys


def published_document(store: ObjectStore, account_id: str, number: str, fmt: str) -> bytes | None:
    """An invoice's or credit note's document as published when it was issued, if it was."""
    key = AccountArea(account_id).key("invoices", f"{number}.{fmt}")
    return store.get_bytes(key) if store.exists(key) else None


def credit_note_keys(account_id: str, number: str, pricebook: PriceBook) -> dict[str, str]:
    """accounts/<id>/invoices/<credit note number>.html (and .pdf, .xml with a seller)"""
    area = AccountArea(account_id)
    return {
        fmt: area.key("invoices", f"{number}.{fmt}")
        for fmt in ("html", *(EINVOICE_FORMATS if pricebook.seller else ()))
    }


def credit_note_of(catalog: Catalog, pricebook: PriceBook, number: str) -> DocumentView:
    """The document of an issued credit note, with the invoice it corrects."""
    with catalog.session() as session:
        note = session.get(CreditNote, number)
        if note is None:
            raise BillingError(f"unknown credit note {number!r}")
        invoice = invoice_view(session.get(Invoice, note.invoice_number))
        pricebook, buyer = as_issued(pricebook, buyer_of(session.get(Account, note.account_id)), note.parties)
    return credit_note_document(note, invoice, buyer, pricebook, exempt_category(pricebook, buyer))


def email_credit_note(
    settings: Settings,
    catalog: Catalog,
    store: ObjectStore,
    pricebook: PriceBook,
    number: str,
    link_lifetime: timedelta = LINK_LIFETIME,
) -> MailSent:
    """Mail an issued credit note (published by `publish_credit_note`) to its buyer, as invoices are
    mailed: once (key `credit_note:<number>`); a refused delivery raises DeliveryError and sending
    again later sends it."""
    document = credit_note_of(catalog, pricebook, number)
    keys = credit_note_keys(document.buyer.account_id, number, pricebook)
    links = {fmt: store.link(key, link_lifetime) for fmt, key in keys.items() if store.exists(key)}
    with catalog.session() as session:
        to = session.get(Account, document.buyer.account_id).email
    return mail_document(
        Mailer(settings, catalog, reply_address(settings, pricebook)),
        pricebook,
        f"credit_note:{number}",
        "credit_note",
        to,
        document,
        links,
        link_lifetime,
        attached_files(store, keys),
    )


def publish_credit_note(catalog: Catalog, store: ObjectStore, pricebook: PriceBook, number: str) -> dict[str, str]:
    """Write a credit note's page (and e-invoice) into its account's invoices area, once."""
    document = credit_note_of(catalog, pricebook, number)
    keys = credit_note_keys(document.buyer.account_id, number, pricebook)
    missing = [fmt for fmt, key in keys.items() if not store.exists(key)]
    for fmt, body in render_documents(document, None, missing).items():
        store.put_bytes(keys[fmt], body)
    return keys
