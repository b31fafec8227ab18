"""`pointflow accounts ...`"""

from __future__ import annotations

import argparse
from datetime import date, timedelta
from pathlib import Path

from pipelines.accounts import make_record, read_accounts_csv, upsert_accounts
from pipelines.catalog.models import BillingCycle, Plan
from pipelines.cli.common import open_catalog, read_import_file, settings_from_env, when


def register(commands: argparse._SubParsersAction) -> None:
    accounts = commands.add_parser(
        "accounts",
        help="create, update, hold, terminate, export or delete customer accounts (import, add, change-plan, hold, unhold, terminate, export-all, delete)",
    )
    sub = accounts.add_subparsers(dest="accounts_command", metavar="ACTION", required=True)

    importer = sub.add_parser(
        "import",
        help="upsert accounts from a CSV file",
        description=(
            "Insert or update accounts from CSV with columns account_id,name,email,country,plan,started_at,"
            "tax_rate,tax_exempt,last_login_at (optional: billing_cycle = monthly|quarterly|yearly; "
            "plan_effective = the ISO date a changed plan or cycle takes effect, default today UTC; street, "
            "postcode, city, vat_id = the buyer's address and VAT ID printed on invoices). "
            "An account whose plan or cycle differs gets a dated plan change, as with 'accounts change-plan': "
            "the months before keep the old plan. All rows are checked first; if any is bad, each bad row is "
            "reported with its line number and nothing is imported."
        ),
    )
    importer.add_argument("file", type=Path, help="CSV file")
    importer.set_defaults(handler=_import)

    add = sub.add_parser(
        "add", help="add or update one account", description="Add one account (updates it if the id exists)."
    )
    add.add_argument("account_id", help="1-64 letters, digits, '_' or '-'")
    add.add_argument("--name", required=True, help="the customer's name as invoices print it")
    add.add_argument("--email", required=True, help="where results, invoices and notices are e-mailed")
    add.add_argument("--country", required=True, help="two-letter ISO code, e.g. DE")
    add.add_argument("--plan", required=True, choices=[p.value for p in Plan])
    add.add_argument("--started-at", default=None, help="ISO date the contract started (default: today, UTC)")
    add.add_argument("--tax-rate", default="0", help="VAT rate as a fraction, e.g. 0.19 (default 0)")
    add.add_argument("--tax-exempt", action="store_true", help="the account holds a valid tax exemption")
    add.add_argument("--billing-cycle", default=BillingCycle.MONTHLY.value, choices=[c.value for c in BillingCycle])
    add.add_argument(
        "--plan-effective",
        type=date.fromisoformat,
        default=None,
        metavar="DATE",
        help="for an existing account whose plan or cycle changes: the ISO date it takes effect (default: today, UTC)",
    )
    add.add_argument("--street", help="street and number, as invoices print them")
    add.add_argument("--postcode")
    add.add_argument("--city")
    add.add_argument(
        "--vat-id",
        help="the customer's VAT ID, e.g. FR40303265045 (with --tax-exempt, an EU business abroad gets reverse charge)",
    )
    add.set_defaults(handler=_add)

    change = sub.add_parser(
        "change-plan",
        help="record a dated plan change (upgrade, downgrade, trial conversion)",
        description=(
            "Record that the account moves to PLAN from --effective (00:00 UTC; the change day belongs to "
            "the new plan). Monthly invoices charge each plan for its own days; a quarterly or yearly plan "
            "starts a new cycle on that day, invoiced in full in that month; the unused part of a prepaid "
            "cycle is refunded only if the price book says refund_unused_prepaid: true. The new plan's "
            "limits (storage, files, points) apply to uploads from that day. A date in a month that is "
            "already invoiced is recorded too: issued invoices are never edited, so the next monthly run "
            "corrects the invoiced months on its invoice (lines 'Correction of YYYY-MM: ...', charging the new "
            "terms and crediting the old ones for the days concerned). PLAN may be any plan of the price book."
        ),
    )
    change.add_argument("account_id", metavar="ACCOUNT")
    change.add_argument("--plan", required=True, help="the new plan, as named in the price book")
    change.add_argument(
        "--effective",
        required=True,
        type=date.fromisoformat,
        metavar="DATE",
        help="ISO date of the first day on the new plan",
    )
    change.add_argument(
        "--billing-cycle",
        choices=[c.value for c in BillingCycle],
        default=None,
        help="the new billing cycle (default: keep the current one)",
    )
    change.add_argument(
        "--pricebook",
        type=Path,
        default=None,
        metavar="FILE",
        help="price book YAML (default: $POINTFLOW_PRICEBOOK, else the one shipped with pointflow)",
    )
    change.add_argument("--json", action="store_true", help="print the change as JSON")
    change.set_defaults(handler=_change_plan)
    _register_lifecycle(sub)


def _import(args: argparse.Namespace) -> int:
    records = read_import_file(read_accounts_csv, args.file)
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
            "plan_effective": args.plan_effective.isoformat() if args.plan_effective else "",
            "street": args.street or "",
            "postcode": args.postcode or "",
            "city": args.city or "",
            "vat_id": args.vat_id or "",
        }
    )
    result = upsert_accounts(open_catalog(settings_from_env()), [record])
    print(f"account {record.account_id} {'created' if result.created else 'updated'}")
    return 0


def _change_plan(args: argparse.Namespace) -> int:
    from pipelines.billing.history import correction_note, record_plan_change
    from pipelines.cli.common import pricebook_of, print_json

    settings = settings_from_env()
    pricebook = pricebook_of(args, settings)
    change = record_plan_change(
        open_catalog(settings), pricebook, args.account_id, args.plan, args.effective, args.billing_cycle
    )
    if args.json:
        print_json(change.to_dict())
    elif change.recorded:
        print(
            f"account {change.account_id}: {change.previous_plan} ({change.previous_billing_cycle}) until "
            f"{(change.effective_on - timedelta(days=1)).isoformat()}, "
            f"{change.plan} ({change.billing_cycle}) from {change.effective_on.isoformat()}"
        )
        if change.corrects:
            print(correction_note(change.corrects))
    else:
        print(
            f"account {change.account_id} is already on {change.plan} ({change.billing_cycle}) on "
            f"{change.effective_on.isoformat()}: nothing recorded"
        )
    return 0


def _register_lifecycle(sub: argparse._SubParsersAction) -> None:
    hold = sub.add_parser(
        "hold",
        help="put an account on legal hold (nothing of it is deleted)",
        description=(
            "Put the account on legal hold: no rule and no request deletes any of its data while the hold "
            "lasts; the lifecycle run reports such deletions as blocked. Notices, closure and the data "
            "lock still happen. Release with 'pointflow accounts unhold'."
        ),
    )
    hold.add_argument("account_id", metavar="ACCOUNT")
    hold.add_argument(
        "--reason", required=True, metavar="TEXT", help="why, e.g. the case or request reference (kept with the hold)"
    )
    hold.set_defaults(handler=_hold)

    unhold = sub.add_parser(
        "unhold",
        help="release an account's legal hold",
        description="Release every active legal hold of the account. Deletions that fell due meanwhile happen on the next lifecycle run.",
    )
    unhold.add_argument("account_id", metavar="ACCOUNT")
    unhold.set_defaults(handler=_unhold)

    terminate = sub.add_parser(
        "terminate",
        help="end an account's contract (data locked, then deleted after the grace period)",
        description=(
            "End the account's contract. Access continues until --effective (default: the end of the "
            "paid term: the next 1st of the month for monthly billing, the next cycle anniversary for "
            "quarterly/yearly). From then on the data is locked; it is deleted after the plan's grace "
            "period (lifecycle policy), counted from the e-mail that announces it. Billing ends on the "
            "day before --effective. A terminated account cannot be terminated again. For non_payment, the "
            "account must be overdue at --effective and have been delivered the overdue notice for that balance "
            "at least the policy's overdue_notice_days before --effective (and --effective not before the stop date it states)."
        ),
    )
    terminate.add_argument("account_id", metavar="ACCOUNT")
    terminate.add_argument(
        "--effective",
        type=date.fromisoformat,
        default=None,
        metavar="DATE",
        help="ISO date access ends, at 00:00 UTC (default: end of the paid term)",
    )
    terminate.add_argument(
        "--reason", default="customer", choices=["customer", "non_payment"], help="who ended it (default: customer)"
    )
    terminate.set_defaults(handler=_terminate)

    export = sub.add_parser(
        "export-all",
        help="bundle all of an account's data into one zip with a download link",
        description=(
            "Pack every object of the account (inputs, results, exports, reports, models) into one zip "
            "with a MANIFEST.json, store it in the account's exports area (exports/all-data/) and print "
            "a download link (valid for the policy's export_link_days; at most 7 days on S3). Works "
            "while the account is locked: the grace period is the customer's retrieval window."
        ),
    )
    export.add_argument("account_id", metavar="ACCOUNT")
    export.add_argument(
        "--policy",
        type=Path,
        default=None,
        metavar="FILE",
        help="lifecycle policy YAML (default: $POINTFLOW_LIFECYCLE_POLICY or the shipped one)",
    )
    export.add_argument("--json", action="store_true", help="print the bundle (key, link, objects, bytes) as JSON")
    export.set_defaults(handler=_export_all)

    delete = sub.add_parser(
        "delete",
        help="delete all of an account's data now, on the customer's request",
        description=(
            "Delete every object of the account (every version on a versioned bucket) and its local "
            "caches, now. Usage events, invoices and the account record are kept (billing records). "
            "Without --confirm, only lists what would be deleted. Refused while the account is on legal "
            "hold. Writes an audit entry ('pointflow lifecycle audit'); fails loudly if anything remains."
        ),
    )
    delete.add_argument("account_id", metavar="ACCOUNT")
    delete.add_argument("--confirm", action="store_true", help="really delete (without it: list only)")
    delete.add_argument("--json", action="store_true", help="print the objects and the result as JSON")
    delete.set_defaults(handler=_delete)


def _hold(args: argparse.Namespace) -> int:
    from pipelines.lifecycle import place_hold

    hold = place_hold(open_catalog(settings_from_env()), args.account_id, args.reason)
    print(f"account {hold.account_id} on legal hold #{hold.hold_id} since {when(hold.placed_at)}: {hold.reason}")
    return 0


def _unhold(args: argparse.Namespace) -> int:
    from pipelines.lifecycle import release_holds

    for hold in release_holds(open_catalog(settings_from_env()), args.account_id):
        print(f"account {hold.account_id}: legal hold #{hold.hold_id} released ({hold.reason})")
    return 0


def _terminate(args: argparse.Namespace) -> int:
    from pipelines.lifecycle import load_policy, terminate_account

    settings = settings_from_env()
    view = terminate_account(
        open_catalog(settings),
        args.account_id,
        args.reason,
        args.effective,
        policy=load_policy(settings.lifecycle_policy_path),
    )
    print(
        f"account {view.account_id} terminated ({view.reason}): last day of service {view.last_day_of_service}, "
        f"data locked from {when(view.effective_at)}"
    )
    return 0


def _export_all(args: argparse.Namespace) -> int:
    from pipelines.cli.common import print_json
    from pipelines.lifecycle import export_all, load_policy
    from pipelines.runtime import Runtime

    settings = settings_from_env()
    policy = load_policy(args.policy or settings.lifecycle_policy_path)
    bundle = export_all(Runtime.from_settings(settings), args.account_id, policy)
    if args.json:
        print_json(
            {
                "account_id": bundle.account_id,
                "key": bundle.key,
                "link": bundle.link,
                "link_expires_at": bundle.link_expires_at.isoformat(),
                "objects": bundle.objects,
                "bytes": bundle.bytes,
            }
        )
    else:
        print(f"bundle: {bundle.key} ({bundle.objects} object(s), {bundle.bytes:,} bytes)")
        print(f"link:   {bundle.link}")
        print(f"valid until {when(bundle.link_expires_at)}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    import sys

    from pipelines.cli.common import print_json
    from pipelines.lifecycle import LifecycleError, delete_account_data
    from pipelines.lifecycle.deletion import DeletionIncomplete
    from pipelines.lifecycle.operations import deletion_plan
    from pipelines.runtime import Runtime

    runtime = Runtime.from_settings(settings_from_env())
    if not args.confirm:
        plan = deletion_plan(runtime, args.account_id)
        if args.json:
            print_json({"account_id": args.account_id, "deleted": False, **plan.summary()})
        else:
            for item in plan.objects:
                what = f"  ({item.what})" if item.what else ""
                print(f"{item.key}  {item.bytes:,} bytes  {item.versions} version(s){what}")
            for local in plan.local_paths:
                print(f"{local.path}  {local.bytes:,} bytes (local cache)")
            print(f"would delete {len(plan.objects)} object(s), {plan.bytes:,} bytes; nothing deleted")
        raise LifecycleError(f"deleting account {args.account_id}'s data cannot be undone: add --confirm to do it")
    try:
        audit = delete_account_data(runtime, args.account_id)
    except DeletionIncomplete as error:
        print(f"pointflow: error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print_json(
            {
                "account_id": args.account_id,
                "deleted": True,
                "audit_id": audit.id,
                "objects": audit.object_count,
                "versions": audit.version_count,
                "bytes": audit.bytes,
                "keys": audit.objects,
                "local_paths": audit.local_paths,
            }
        )
    else:
        print(
            f"account {args.account_id}: deleted {audit.object_count} object(s) ({audit.version_count} version(s)), "
            f"{audit.bytes:,} bytes; audit entry #{audit.id}"
        )
    return 0
