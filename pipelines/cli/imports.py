"""`pointflow usage|payments|outages`: metered usage, payments received and service outages, imported
from files (idempotent), and an account's billable points in a month."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from pipelines.billing.imports import (
    import_outages,
    import_payments,
    import_usage,
    read_outages_csv,
    read_payments_csv,
    read_usage_jsonl,
)
from pipelines.billing.usage import monthly_points_cap, points_used_in_month
from pipelines.cli.common import (
    PRICEBOOK_HELP,
    month_arg,
    open_catalog,
    pricebook_of,
    print_json,
    read_import_file,
    settings_from_env,
)
from pipelines.lifecycle.policy import load_policy


def register(commands: argparse._SubParsersAction) -> None:
    _register_usage(commands)
    _register_imports(commands)


def _register_usage(commands: argparse._SubParsersAction) -> None:
    usage = commands.add_parser("usage", help="import and inspect metered usage")
    sub = usage.add_subparsers(dest="usage_command", metavar="ACTION", required=True)
    importer = sub.add_parser(
        "import",
        help="record usage events from a JSONL file",
        description=(
            "Record usage events, one JSON object per line: "
            '{"event_id", "account_id", "occurred_at", "kind": "classification", "points", '
            '"status": "succeeded"|"failed"|"aborted", "classifier", "filename"} or '
            '{"event_id", "account_id", "occurred_at", "kind": "login"} '
            "(optional: classifier_version, job_id). occurred_at is ISO 8601; without an offset it is UTC. "
            "Idempotent by event_id: known events are counted, not recorded again. Every line is checked "
            "first; if any is bad (or names an unknown account) nothing is recorded. Failed jobs are kept "
            "as evidence but not billed; aborted jobs are billed for the points they processed."
        ),
    )
    importer.add_argument("file", type=Path, help="JSONL file")
    importer.add_argument("--json", action="store_true", help="print the counts as JSON")
    importer.set_defaults(handler=_usage_import)

    points = sub.add_parser(
        "points",
        help="billable points an account used in a month, and its cap",
        description="Billable points (succeeded and aborted jobs) of one account in a calendar month (UTC), with its monthly cap.",
    )
    points.add_argument("account_id")
    points.add_argument("--month", type=month_arg, required=True, help="YYYY-MM")
    points.add_argument("--pricebook", type=Path, help=PRICEBOOK_HELP)
    points.set_defaults(handler=_usage_points)


def _register_imports(commands: argparse._SubParsersAction) -> None:
    payments = commands.add_parser("payments", help="record payments received")
    sub = payments.add_subparsers(dest="payments_command", metavar="ACTION", required=True)
    importer = sub.add_parser(
        "import",
        help="record payments from a CSV file",
        description=(
            "Record payments from CSV with columns account_id,invoice_number,amount,paid_at (optional: "
            "payment_id). amount is a decimal with at most two decimals; invoice_number may be empty for a "
            "payment on account; paid_at is ISO 8601 (UTC without an offset). A row is known by its "
            "payment_id, else by all four values: importing a file again records nothing new. Payments "
            "beyond what is owed are credited on the next invoice."
        ),
    )
    importer.add_argument("file", type=Path, help="CSV file")
    importer.add_argument("--json", action="store_true", help="print the counts as JSON")
    importer.set_defaults(handler=_payments_import)

    outages = commands.add_parser("outages", help="record service outages (availability credits)")
    sub = outages.add_subparsers(dest="outages_command", metavar="ACTION", required=True)
    importer = sub.add_parser(
        "import",
        help="record outages from a CSV file",
        description=(
            "Record service-wide outages from CSV with columns started_at,ended_at,scheduled (optional: "
            "announced_at). scheduled=true marks maintenance; it does not count against availability if it "
            "was announced at least the price book's maintenance_notice_hours (default 24) ahead: with "
            "announced_at given that is checked, without it scheduled=true asserts it. An outage is known by "
            "its start and end: importing a file again records nothing new."
        ),
    )
    importer.add_argument("file", type=Path, help="CSV file")
    importer.add_argument("--json", action="store_true", help="print the counts as JSON")
    importer.set_defaults(handler=_outages_import)


def _print_import(args: argparse.Namespace, what: str, result) -> int:
    if args.json:
        print_json({"new": result.new, "known": result.known, "closed_periods": list(result.closed_periods)})
    else:
        print(result.summary(what))
    return 0


def _usage_import(args: argparse.Namespace) -> int:
    settings = settings_from_env()
    records = read_import_file(read_usage_jsonl, args.file)
    kept_since = load_policy(settings.lifecycle_policy_path).usage_kept_since(datetime.now(UTC))
    result = import_usage(open_catalog(settings), records, str(args.file), kept_since)
    return _print_import(args, "usage events", result)


def _usage_points(args: argparse.Namespace) -> int:
    settings = settings_from_env()
    catalog = open_catalog(settings)
    used = points_used_in_month(catalog, args.account_id, args.month.label)
    cap = monthly_points_cap(catalog, pricebook_of(args, settings), args.account_id, args.month.first_day)
    print_json(
        {"account_id": args.account_id, "month": args.month.label, "points_used": used, "monthly_points_cap": cap}
    )
    return 0


def _payments_import(args: argparse.Namespace) -> int:
    records = read_import_file(read_payments_csv, args.file)
    result = import_payments(open_catalog(settings_from_env()), records, str(args.file))
    return _print_import(args, "payments", result)


def _outages_import(args: argparse.Namespace) -> int:
    records = read_import_file(read_outages_csv, args.file)
    result = import_outages(open_catalog(settings_from_env()), records)
    return _print_import(args, "outages", result)
