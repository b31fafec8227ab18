"""What an invoice looks like outside the database: JSON, a CSV of its lines, an HTML page a
customer reads. The monthly DAG writes all three into the account's area and mails the page."""

from __future__ import annotations

import csv
import io
import json
from html import escape

from pipelines.billing.invoicing import InvoiceView
from pipelines.billing.money import format_money
from pipelines.billing.pricebook import PriceBook

LINE_COLUMNS = ("kind", "description", "quantity", "unit_price", "amount", "taxable")


def invoice_json(invoice: InvoiceView) -> str:
    return json.dumps(invoice.to_dict(), indent=2) + "\n"


def invoice_lines_csv(invoice: InvoiceView) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=("invoice_number", *LINE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for line in invoice.to_dict()["lines"]:
        writer.writerow({"invoice_number": invoice.invoice_number, **{k: line[k] for k in LINE_COLUMNS}})
    return buffer.getvalue()


def invoice_html(invoice: InvoiceView, customer_name: str, pricebook: PriceBook, seller: str = "pointflow") -> str:
    """A self-contained page (no external assets) with the lines and totals."""
    data = invoice.to_dict()
    rows = "\n".join(
        f"<tr><td>{escape(line['description'])}</td><td class=n>{escape(line['quantity'])}</td>"
        f"<td class=n>{escape(line['unit_price'])}</td><td class=n>{escape(line['amount'])}</td></tr>"
        for line in data["lines"]
    )
    currency = escape(invoice.currency)
    tax_label = f"Tax ({escape(data['tax_rate'])})" if invoice.tax_rate else "Tax (exempt or 0 %)"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Invoice {escape(invoice.invoice_number)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border-bottom: 1px solid #ccc; padding: .4em; text-align: left; }}
.n {{ text-align: right; white-space: nowrap; }}
tfoot td {{ font-weight: bold; border: none; }}
</style></head>
<body>
<h1>Invoice {escape(invoice.invoice_number)}</h1>
<p>{escape(seller)} &mdash; to {escape(customer_name)} (account {escape(invoice.account_id)})</p>
<p>Period {escape(invoice.period)} &middot; issued {invoice.issue_date.isoformat()} &middot;
payment due {invoice.due_date.isoformat()} &middot; amounts in {currency}, fees exclusive of tax</p>
<table>
<thead><tr><th>Description</th><th class=n>Quantity</th><th class=n>Unit price</th><th class=n>Amount</th></tr></thead>
<tbody>
{rows}
</tbody>
<tfoot>
<tr><td colspan=3 class=n>Subtotal</td><td class=n>{format_money(invoice.subtotal)}</td></tr>
<tr><td colspan=3 class=n>{tax_label}</td><td class=n>{format_money(invoice.tax)}</td></tr>
<tr><td colspan=3 class=n>Total {currency}</td><td class=n>{format_money(invoice.total)}</td></tr>
</tfoot>
</table>
<p>Questions about this invoice? Reply within {pricebook.dispute_window_days} days
({pricebook.billing_error_dispute_window_days} days for billing errors); corrections are
issued as credit notes referencing this invoice.</p>
</body></html>
"""
