"""`pointflow invoices|billing ...`: issued invoices and monthly invoicing (imports: `cli.imports`)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

from pipelines.accounts import get_account
from pipelines.billing.corrections import (
    TermsUpdate,
    invoice_statement,
    issue_credit_note,
    list_invoices,
    open_dispute,
    set_billing_terms,
)
from pipelines.billing.delivery import (
    buyer_of,
    credit_note_of,
    document_of,
    email_credit_note,
    publish_credit_note,
    published_document,
    render_documents,
)
from pipelines.billing.invoicing import BillingError, latest_issue_date, run_billing
from pipelines.billing.money import format_money
from pipelines.cli.common import (
    PRICEBOOK_HELP,
    instant_arg,
    month_arg,
    open_catalog,
    pricebook_of,
    print_json,
    settings_from_env,
)
from pipelines.notify import DeliveryError
from pipelines.storage import open_store


def _decimal(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a decimal number") from None
    if not value.is_finite():
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date (YYYY-MM-DD)") from None


def register(commands: argparse._SubParsersAction) -> None:
    _register_invoices(commands)
    _register_billing(commands)


def _register_invoices(commands: argparse._SubParsersAction) -> None:
    invoices = commands.add_parser("invoices", help="list, show, dispute and credit issued invoices")
    sub = invoices.add_subparsers(dest="invoices_command", metavar="ACTION", required=True)

    listing = sub.add_parser("list", help="list issued invoices", description="List issued invoices, oldest first.")
    listing.add_argument("--period", type=month_arg, help="only this month (YYYY-MM)")
    listing.add_argument("--account", help="only this account")
    listing.add_argument("--json", action="store_true", help="print the invoices as a JSON array")
    listing.set_defaults(handler=_invoices_list)

    show = sub.add_parser(
        "show",
        help="one invoice with its payments, credit notes and disputes",
        description=(
            "Show one invoice: as JSON with payments, credit notes, disputes and the open amount; as the CSV of its "
            "lines; as the page sent to the customer (HTML); or as its e-invoice (Factur-X PDF, or the CII XML). The "
            "page and e-invoice are the documents as issued: the ones published in the account's invoices area, "
            "else rendered with the seller and buyer kept at issue (invoices issued before those were kept, or "
            "without a seller, use the account's and price book's current data). Payments received since are in "
            "the JSON."
        ),
    )
    show.add_argument("invoice_number", help="an invoice number, or a credit note's (html, pdf, xml)")
    show.add_argument(
        "--format",
        choices=("json", "csv", "html", "pdf", "xml"),
        default="json",
        help="pdf: the Factur-X PDF (the page with its EN 16931 XML inside); xml: that XML. Both need seller: in the price book",
    )
    show.add_argument(
        "--output", type=Path, metavar="FILE", help="write the document to FILE instead of standard output"
    )
    show.add_argument("--pricebook", type=Path, help=PRICEBOOK_HELP)
    show.set_defaults(handler=_invoices_show)

    credit = sub.add_parser(
        "credit",
        help="issue a credit note against an invoice",
        description=(
            "Issue a credit note referencing an issued invoice (which itself is never changed). --amount is "
            "net of tax. A credit note mirrors what it reverses: --line N credits line N of the invoice (from 1, "
            "in the order of its CSV) with the VAT rate and category that line had (a finance charge: no VAT); "
            "without --line the invoice's lines must all have the same VAT. Tax is never more than the "
            "invoice's at that rate, and all credits on a line or an invoice never exceed what it charged. The credit reduces what the account owes; "
            "anything already paid is carried to the next invoice. Repeating the same invoice, amount and "
            "reason returns the existing credit note. Numbers: PREFIX-CN-YYYY-MM-NNNN by month of issue. Its page "
            "(and, with seller: in the price book, its Factur-X PDF and XML, type 381) is written to the account's "
            "invoices area: accounts/<id>/invoices/<number>.html|.pdf|.xml."
        ),
    )
    credit.add_argument("invoice_number")
    credit.add_argument("--amount", type=_decimal, required=True, help="net amount, e.g. 19.80")
    credit.add_argument("--reason", required=True, help="why, as the customer will read it")
    credit.add_argument("--issued-on", type=_day, help="date of the credit note (default: today, UTC)")
    credit.add_argument(
        "--line", type=int, help="the invoice line credited (its position, from 1); needed when its lines differ in VAT"
    )
    credit.add_argument("--pricebook", type=Path, help=PRICEBOOK_HELP)
    credit.add_argument("--json", action="store_true", help="print the credit note as JSON")
    credit.set_defaults(handler=_invoices_credit)

    dispute = sub.add_parser(
        "dispute",
        help="record a customer's dispute of an invoice",
        description=(
            "Record a dispute. Accepted until dispute_window_days (default 7) after the invoice date, or "
            "billing_error_dispute_window_days (default 60) with --billing-error; later ones are refused. "
            "A dispute is resolved with 'pointflow invoices credit'."
        ),
    )
    dispute.add_argument("invoice_number")
    dispute.add_argument("--reason", required=True, help="what the customer disputes, in their words")
    dispute.add_argument("--billing-error", action="store_true", help="the dispute is about a billing error")
    dispute.add_argument("--at", type=instant_arg, help="when the customer raised it (default: now)")
    dispute.add_argument("--pricebook", type=Path, help=PRICEBOOK_HELP)
    dispute.add_argument("--json", action="store_true", help="print the dispute as JSON")
    dispute.set_defaults(handler=_invoices_dispute)


def _register_billing(commands: argparse._SubParsersAction) -> None:
    billing = commands.add_parser("billing", help="monthly invoicing and per-account billing terms")
    sub = billing.add_subparsers(dest="billing_command", metavar="ACTION", required=True)
    run = sub.add_parser(
        "run",
        help="invoice a month (each account once; a re-run invoices only accounts added since)",
        description=(
            "Invoice every account for a calendar month: subscription (daily proration, start day counted; "
            "quarterly/yearly in full in the month their cycle starts), data-sharing discount, seats and extra "
            "storage, usage of succeeded and aborted jobs priced as on the day it happened, availability "
            "credit, finance charge on overdue balances, tax on the taxable subtotal, and credit carried "
            "forward. Invoices are dated the day they are issued (UTC, the earliest the 1st of the next month), "
            "due and disputable from that date, and numbered PREFIX-YYYY-MM-NNNN in "
            "account order. An account with nothing to charge gets no invoice. Each account is invoiced once "
            "for a month: a re-run (or a concurrent run) prints the stored invoices unchanged, and invoices "
            "only accounts the month's earlier runs did not cover (added since with an earlier start date), "
            "with the next numbers; it does the same for every invoiced month before, and lists those "
            "invoices too. Usage that arrives for an account already invoiced for its month is billed on "
            "that account's next invoice, as usage received late."
        ),
    )
    run.add_argument("--period", type=month_arg, required=True, help="the month, YYYY-MM; it must have ended")
    run.add_argument(
        "--as-of",
        type=instant_arg,
        metavar="DATETIME",
        help=(
            "run as on this moment (ISO 8601, UTC if no offset; default: now): the invoices this run issues "
            "are dated its day, and due and disputable from it. It must be after the month's end, not "
            "in the future and not before the latest invoice or credit note issued. Today is what the due "
            "dates promise customers: use an earlier day only to issue what a failed run should have issued "
            "on that day, e.g. --as-of 2026-10-01"
        ),
    )
    run.add_argument("--pricebook", type=Path, help=PRICEBOOK_HELP)
    run.add_argument(
        "--json", action="store_true", help="print the invoices as a JSON array (those of earlier months first)"
    )
    run.set_defaults(handler=_billing_run)

    terms = sub.add_parser(
        "terms",
        help="set an account's seats, extra storage, agreed prices, VAT or contract end, from a date",
        description=(
            "Record a dated change of an account's billing terms; options not given stay as they are. The "
            "change is in force from --effective (00:00 UTC), by default from the first month not invoiced "
            "yet; a month is charged by the days each value was in force. A date in a month already invoiced "
            "is recorded too: issued invoices are never edited, so the next monthly run corrects those months "
            "on its invoice ('corrects' lists them). --ended-on is the contract end, not dated by --effective; an "
            "end in a month already invoiced is corrected the same way (the days after it credited). Prints the terms "
            "after every recorded change."
        ),
    )
    terms.add_argument("account_id")
    terms.add_argument("--seats", type=int, help="user IDs in the account, billed per seat and month")
    terms.add_argument(
        "--extra-storage-gb", type=int, help="storage bought beyond the plan's limit, billed per GB-month"
    )
    terms.add_argument("--monthly-fee", type=_decimal, help="agreed subscription fee per month instead of the plan's")
    terms.add_argument("--price-per-million-points", type=_decimal, help="agreed usage price instead of the plan's")
    terms.add_argument("--monthly-points-cap", type=int, help="agreed monthly points cap instead of the plan's")
    terms.add_argument("--ended-on", type=_day, help="last day of service (inclusive); the last month is prorated")
    terms.add_argument("--tax-rate", type=_decimal, help="VAT rate as a fraction, e.g. 0.19, from --effective")
    exempt = terms.add_mutually_exclusive_group()
    exempt.add_argument(
        "--tax-exempt",
        dest="tax_exempt",
        action="store_const",
        const=True,
        default=None,
        help="the account holds a VAT exemption from --effective (reverse charge for an EU business with a VAT ID)",
    )
    exempt.add_argument(
        "--no-tax-exempt",
        dest="tax_exempt",
        action="store_const",
        const=False,
        help="the exemption ends: VAT from --effective",
    )
    terms.add_argument(
        "--exempt-until",
        type=_day,
        help="last day the exemption is valid (implies --tax-exempt); VAT from the day after",
    )
    terms.add_argument(
        "--effective", type=_day, help="first day the change is in force (default: the first month not invoiced yet)"
    )
    terms.set_defaults(handler=_billing_terms)


# --- handlers ------------------------------------------------------------------------------------


def _invoices_list(args: argparse.Namespace) -> int:
    invoices = list_invoices(
        open_catalog(settings_from_env()), args.period.label if args.period else None, args.account
    )
    if args.json:
        print_json([invoice.to_dict() for invoice in invoices])
        return 0
    for invoice in invoices:
        print(
            f"{invoice.invoice_number}  {invoice.account_id}  {invoice.period}  {invoice.currency} {format_money(invoice.total)}"
        )
    print(f"{len(invoices)} invoice(s)")
    return 0


def _invoices_show(args: argparse.Namespace) -> int:
    """An issued document as issued: the one published then if it exists, else rendered to the
    seller and buyer kept at issue."""
    settings = settings_from_env()
    catalog = open_catalog(settings)
    pricebook = pricebook_of(args, settings)
    if args.format in ("html", "pdf", "xml") and args.invoice_number.startswith(f"{pricebook.invoice_prefix}-CN-"):
        document = credit_note_of(catalog, pricebook, args.invoice_number)
        stored = _published(settings, document.buyer.account_id, args)
        return _write(args, stored or render_documents(document, None, [args.format])[args.format])
    statement = invoice_statement(catalog, pricebook, args.invoice_number)
    if args.format == "json":
        print_json(statement.to_dict())
        return 0
    if args.format in ("html", "pdf", "xml"):
        stored = _published(settings, statement.invoice.account_id, args)
        if stored is not None:
            return _write(args, stored)
    buyer = buyer_of(get_account(catalog, statement.invoice.account_id))
    document = document_of(catalog, pricebook, statement.invoice, buyer, statement.payments)
    return _write(args, render_documents(document, statement.invoice, [args.format])[args.format])


def _published(settings, account_id: str, args: argparse.Namespace) -> bytes | None:
    store = open_store(settings.storage_url, settings.link_endpoint)
    return published_document(store, account_id, args.invoice_number, args.format)


def _write(args: argparse.Namespace, body: bytes) -> int:
    if args.output:
        args.output.write_bytes(body)
        print(f"{args.invoice_number}: {args.format} written to {args.output} ({len(body):,} bytes)")
    elif args.format == "pdf":
        raise BillingError("a PDF is not for the terminal: add --output FILE.pdf")
    else:
        sys.stdout.write(body.decode("utf-8"))
    return 0


def _invoices_credit(args: argparse.Namespace) -> int:
    settings = settings_from_env()
    note, created = issue_credit_note(
        open_catalog(settings),
        pricebook_of(args, settings),
        args.invoice_number,
        args.amount,
        args.reason,
        args.issued_on,
        args.line,
    )
    catalog, pricebook = open_catalog(settings), pricebook_of(args, settings)
    store = open_store(settings.storage_url, settings.link_endpoint)
    publish_credit_note(catalog, store, pricebook, note.credit_note_number)
    try:
        # Once per credit note: running the same command again sends one the mail server refused.
        email_credit_note(settings, catalog, store, pricebook, note.credit_note_number)
    except DeliveryError as error:
        raise DeliveryError(
            f"credit note {note.credit_note_number} issued, but its e-mail was not sent: {error}; "
            "run the same command again to send it"
        ) from error
    if args.json:
        print_json({**note.to_dict(), "created": created})
    else:
        state = "issued" if created else "already issued"
        print(
            f"credit note {note.credit_note_number} {state} for invoice {note.invoice_number}: {format_money(note.total)} incl. tax"
        )
    return 0


def _invoices_dispute(args: argparse.Namespace) -> int:
    settings = settings_from_env()
    dispute, created = open_dispute(
        open_catalog(settings),
        pricebook_of(args, settings),
        args.invoice_number,
        args.reason,
        args.billing_error,
        args.at,
    )
    if args.json:
        print_json({**dispute.to_dict(), "created": created})
    else:
        print(
            f"dispute of {dispute.invoice_number} {'recorded' if created else 'already recorded'} (window until {dispute.deadline})"
        )
    return 0


def _billing_run(args: argparse.Namespace) -> int:
    settings = settings_from_env()
    pricebook = pricebook_of(args, settings)
    if pricebook.seller is None:
        path = getattr(args, "pricebook", None) or settings.pricebook_path
        source = f"price book {path}" if path else "the shipped default price book"
        print(
            f"pointflow: warning: {source} has no seller: block; invoices issued now are not valid VAT "
            "invoices (no Factur-X PDF or XML) and stay so. Add seller: (name, street, postcode, city, country, "
            "vat_id; see the example in pipelines/data/pricebook.yaml) and set POINTFLOW_PRICEBOOK or --pricebook "
            "before invoicing",
            file=sys.stderr,
        )
    now = datetime.now(UTC)
    if args.as_of is not None and args.as_of > now:
        raise BillingError(
            f"--as-of {args.as_of:%Y-%m-%d %H:%M} UTC is in the future: invoices are issued on a day that has come"
        )
    catalog = open_catalog(settings)
    # (An --as-of before the month's end is refused by run_billing, saying so.)
    latest = latest_issue_date(catalog) if args.as_of is not None and args.as_of >= args.period.end else None
    if latest is not None and args.as_of.astimezone(UTC).date() < latest:
        raise BillingError(
            f"--as-of {args.as_of:%Y-%m-%d} is before {latest}, the day of the latest invoice or credit note "
            "issued: a document numbered after it cannot be dated before it. Leave --as-of out to issue today"
        )
    result = run_billing(catalog, args.period, pricebook, args.as_of or now)
    if args.json:
        print_json([invoice.to_dict() for invoice in [*result.caught_up, *result.invoices]])
        return 0
    for invoice in result.caught_up:
        print(
            f"{invoice.invoice_number}  {invoice.account_id}  {invoice.currency} {format_money(invoice.total)}"
            f"  (for {invoice.period}: not invoiced by its run)"
        )
    for invoice in result.invoices:
        print(f"{invoice.invoice_number}  {invoice.account_id}  {invoice.currency} {format_money(invoice.total)}")
    added = len(result.issued) - len(result.caught_up)
    if not result.created:
        state = "already invoiced, nothing created"
    elif added == len(result.invoices):
        state = "created"
    else:
        state = f"{added} created for accounts not invoiced before"
    print(f"{result.period}: {len(result.invoices)} invoice(s), {state}")
    return 0


def _billing_terms(args: argparse.Namespace) -> int:
    update = TermsUpdate(
        seats=args.seats,
        extra_storage_gb=args.extra_storage_gb,
        monthly_fee=args.monthly_fee,
        price_per_million_points=args.price_per_million_points,
        monthly_points_cap=args.monthly_points_cap,
        ended_on=args.ended_on,
        tax_rate=args.tax_rate,
        tax_exempt=args.tax_exempt,
        exempt_until=args.exempt_until,
        effective_on=args.effective,
    )
    print_json(set_billing_terms(open_catalog(settings_from_env()), args.account_id, update))
    return 0
