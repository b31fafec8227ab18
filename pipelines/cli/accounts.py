"""`pointflow accounts ...`"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

from pipelines.accounts import make_record, read_accounts_csv, upsert_accounts
from pipelines.catalog.models import BillingCycle, Plan
from pipelines.cli.common import open_catalog, settings_from_env


def register(commands: argparse._SubParsersAction) -> None:
    accounts = commands.add_parser("accounts", help="create and update customer accounts")
    sub = accounts.add_subparsers(dest="accounts_command", metavar="ACTION", required=True)

    importer = sub.add_parser(
        "import",
        help="upsert accounts from a CSV file",
        description=(
            "Insert or update accounts from CSV with columns account_id,name,email,country,plan,started_at,"
            "tax_rate,tax_exempt,last_login_at (optional: billing_cycle = monthly|quarterly|yearly). "
            "All rows are checked first; if any is bad, each bad row is reported with its line number and "
            "nothing is imported."
        ),
    )
    importer.add_argument("file", type=Path, help="CSV file")
    importer.set_defaults(handler=_import)

    add = sub.add_parser("add", help="add or update one account", description="Add one account (updates it if the id exists).")
    add.add_argument("account_id", help="1-64 letters, digits, '_' or '-'")
    add.add_argument("--name", required=True)
    add.add_argument("--email", required=True)
    add.add_argument("--country", required=True, help="two-letter ISO code, e.g. DE")
    add.add_argument("--plan", required=True, choices=[p.value for p in Plan])
    add.add_argument("--started-at", default=None, help="ISO date the contract started (default: today, UTC)")
    add.add_argument("--tax-rate", default="0", help="VAT rate as a fraction, e.g. 0.19 (default 0)")
    add.add_argument("--tax-exempt", action="store_true", help="the account holds a valid tax exemption")
    add.add_argument("--billing-cycle", default=BillingCycle.MONTHLY.value, choices=[c.value for c in BillingCycle])
    add.set_defaults(handler=_add)


def _import(args: argparse.Namespace) -> int:
    records = read_accounts_csv(args.file)
    result = upsert_accounts(open_catalog(settings_from_env()), records)
    print(f"accounts: {result.created} created, {result.updated} updated")
    return 0


def _add(args: argparse.Namespace) -> int:
    record = make_record(
        {
            "account_id": args.account_id,
            "name": args.name,
            "email": args.email,
            "country": args.country,
            "plan": args.plan,
            "started_at": args.started_at or date.today().isoformat(),
            "tax_rate": args.tax_rate,
            "tax_exempt": "true" if args.tax_exempt else "false",
            "last_login_at": "",
            "billing_cycle": args.billing_cycle,
        }
    )
    result = upsert_accounts(open_catalog(settings_from_env()), [record])
    print(f"account {record.account_id} {'created' if result.created else 'updated'}")
    return 0
