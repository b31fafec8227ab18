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
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from pipelines.billing.documents import invoice_html, invoice_json, invoice_lines_csv
from pipelines.billing.invoicing import BillingError, InvoiceView, load_invoices
from pipelines.billing.models import Invoice
from pipelines.billing.money import format_money
from pipelines.billing.periods import Period
from pipelines.billing.pricebook import PriceBook, load_pricebook
from pipelines.billing.usage import usage_daily
from pipelines.catalog import Catalog
from pipelines.catalog.models import Account, SentMessage
from pipelines.notify import DeliveryError, send_once
from pipelines.settings import Settings
from pipelines.storage import AccountArea, ObjectStore, check_key, open_store

log = logging.getLogger(__name__)

DOCUMENT_FORMATS = ("json", "csv", "html")
# S3 presigned URLs (SigV4) cannot outlive 7 days; the e-mail says until when its links work.
LINK_LIFETIME = timedelta(days=7)
USAGE_DAILY_PREFIX = "service/usage_daily/"
USAGE_DAILY_COLUMNS = ("account_id", "day", "jobs", "billable_points", "failed_points")
# Bounds the IN (...) list of one query, well under every database's parameter limit.
_KEYS_PER_QUERY = 500


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

    @classmethod
    def open(cls, settings: Settings, period: str) -> MonthlyBilling:
        catalog = Catalog(settings.database_url)
        catalog.migrate()
        store = open_store(settings.storage_url, settings.link_endpoint)
        return cls(settings, catalog, store, load_pricebook(settings.pricebook_path), Period.parse(period))


@dataclass(frozen=True)
class Customer:
    name: str
    email: str


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
    """accounts/<id>/invoices/<number>.json|.csv|.html"""
    area = AccountArea(invoice.account_id)
    return {fmt: area.key("invoices", f"{invoice.invoice_number}.{fmt}") for fmt in DOCUMENT_FORMATS}


def usage_daily_keys(period: Period) -> dict[str, str]:
    """Service-wide, not per account: service/usage_daily/<YYYY-MM>.json|.csv"""
    return {fmt: check_key(f"{USAGE_DAILY_PREFIX}{period.label}.{fmt}") for fmt in ("json", "csv")}


def month_invoices(catalog: Catalog, period: Period) -> list[InvoiceView]:
    invoices = load_invoices(catalog, period)
    if invoices is None:
        raise BillingError(f"{period} has not been invoiced: run 'pointflow billing run --period {period}' first")
    return invoices


def _customers(catalog: Catalog, period: Period) -> dict[str, Customer]:
    """Name and address of every account invoiced for the month, in one query."""
    with catalog.session() as session:
        rows = session.execute(
            select(Account.account_id, Account.name, Account.email)
            .join(Invoice, Invoice.account_id == Account.account_id)
            .where(Invoice.period == period.label)
        )
        return {account_id: Customer(name, email) for account_id, name, email in rows}


def publish_documents(billing: MonthlyBilling) -> PublishResult:
    """Write each invoice's JSON, CSV of lines and HTML page, unless an earlier run already did.

    The documents are what was issued: a later run must not re-render them with a renamed
    account or another price book's wording. Each write is atomic, so an object that exists
    is complete.
    """
    customers = _customers(billing.catalog, billing.period)
    written = kept = 0
    for invoice in month_invoices(billing.catalog, billing.period):
        for fmt, key in document_keys(invoice).items():
            if billing.store.exists(key):
                kept += 1
                continue
            billing.store.put_bytes(key, _render(fmt, invoice, customers[invoice.account_id], billing.pricebook).encode("utf-8"))
            written += 1
    log.info("%s: %d invoice document(s) written, %d already published", billing.period, written, kept)
    return PublishResult(written, kept)


def _render(fmt: str, invoice: InvoiceView, customer: Customer, pricebook: PriceBook) -> str:
    if fmt == "json":
        return invoice_json(invoice)
    if fmt == "csv":
        return invoice_lines_csv(invoice)
    return invoice_html(invoice, customer.name, pricebook)


def invoice_email(invoice: InvoiceView, customer: Customer, links: dict[str, str], links_expire: datetime) -> tuple[str, str]:
    """Subject and plain-text body: the lines and totals, and links to the three documents."""
    currency, total = invoice.currency, format_money(invoice.total)
    lines = "\n".join(f"  {format_money(line.amount):>12}  {line.description}" for line in invoice.lines)
    payment = "Nothing is due on this invoice."
    if invoice.total > 0:
        payment = f"Please pay {currency} {total} by {invoice.due_date.isoformat()}."
    body = f"""Hello {customer.name},

your pointflow invoice {invoice.invoice_number} for {invoice.period} (issued {invoice.issue_date.isoformat()}):

{lines}

  {format_money(invoice.subtotal):>12}  Subtotal
  {format_money(invoice.tax):>12}  Tax
  {total:>12}  Total {currency}

{payment}

The invoice and its lines (links valid until {links_expire:%Y-%m-%d %H:%M} UTC):
  Invoice:      {links["html"]}
  Lines (CSV):  {links["csv"]}
  Data (JSON):  {links["json"]}
"""
    return f"Invoice {invoice.invoice_number} for {invoice.period}: {currency} {total}", body


def _already_mailed(catalog: Catalog, keys: list[str]) -> set[str]:
    found: set[str] = set()
    with catalog.session() as session:
        for start in range(0, len(keys), _KEYS_PER_QUERY):
            found.update(session.scalars(select(SentMessage.key).where(SentMessage.key.in_(keys[start:start + _KEYS_PER_QUERY]))))
    return found


def email_invoices(billing: MonthlyBilling, link_lifetime: timedelta = LINK_LIFETIME) -> EmailResult:
    """Mail every invoice of the month that was not mailed yet, each once (key `invoice:<number>`).

    A refused delivery does not stop the others: all are tried, then InvoiceEmailError names the
    refused ones, and running this again sends only those.
    """
    invoices = month_invoices(billing.catalog, billing.period)
    customers = _customers(billing.catalog, billing.period)
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
        customer = customers[invoice.account_id]
        links = {fmt: billing.store.link(k, link_lifetime) for fmt, k in document_keys(invoice).items()}
        subject, body = invoice_email(invoice, customer, links, datetime.now(timezone.utc) + link_lifetime)
        try:
            send_once(billing.settings, billing.catalog, key, invoice.account_id, "invoice", customer.email, subject, body)
        except DeliveryError as error:
            refused.append(f"{invoice.invoice_number}: {error}")
            continue
        sent.append(invoice.invoice_number)
    log.info("%s: %d invoice e-mail(s) sent, %d sent earlier, %d refused", billing.period, len(sent), len(already), len(refused))
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
