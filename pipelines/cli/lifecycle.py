"""`pointflow lifecycle run|audit`: apply the data-lifecycle rules, show the deletion audit."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from pipelines.cli.common import instant_arg, open_catalog, print_json, settings_from_env

POLICY_HELP = "lifecycle policy YAML (default: $POINTFLOW_LIFECYCLE_POLICY, else the one shipped with pointflow)"


def register(commands: argparse._SubParsersAction) -> None:
    lifecycle = commands.add_parser("lifecycle", help="apply the data-lifecycle rules (notices, closure, deletion)")
    sub = lifecycle.add_subparsers(dest="lifecycle_command", metavar="ACTION", required=True)

    run = sub.add_parser(
        "run",
        help="apply every lifecycle rule as of a moment",
        description=(
            "Apply every data-lifecycle rule to every account as of --as-of (default: now): inactivity "
            "notices and reminders for free accounts, closure, trial end, data lock after a termination, "
            "deletion after the grace period, API result retention, overdue notices. State is kept in the "
            "catalog, so runs with increasing --as-of walk the timeline, and running the same moment "
            "again does nothing new. An account on legal hold is never deleted (reported as blocked). "
            "Notices are e-mailed; a refused e-mail is recorded and retried next run, and the clocks "
            "that depend on it wait. Exit code 1 if an account could not be done (a deletion left objects behind, "
            "an unexpected error): it is named, and the other accounts are done all the same."
        ),
    )
    run.add_argument(
        "--as-of",
        type=instant_arg,
        default=None,
        metavar="ISO_DATETIME",
        help="the moment to apply the rules at, e.g. 2027-03-01T03:00:00Z (no offset: UTC; default: now)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="change nothing and send nothing; list the actions, and every object and byte a real run would delete",
    )
    run.add_argument(
        "--json", action="store_true", help="print a JSON array of {account_id, action, effective_at, detail}"
    )
    run.add_argument("--policy", type=Path, default=None, metavar="FILE", help=POLICY_HELP)
    run.set_defaults(handler=_run)

    audit = sub.add_parser(
        "audit",
        help="list deletion audit entries",
        description=(
            "Every deletion the service made: account, rule, objects, versions, bytes, time, status (started, "
            "completed, failed, or interrupted: its process ended mid-way and a later entry, named, finished it "
            "and lists what it had removed). Kept after the data is gone."
        ),
    )
    audit.add_argument("--account", metavar="ID", default=None, help="only this account")
    audit.add_argument("--json", action="store_true", help="print a JSON array")
    audit.set_defaults(handler=_audit)


def _run(args: argparse.Namespace) -> int:
    from pipelines.lifecycle import (
        LifecycleRunError,
        load_policy,
        run_lifecycle,
    )
    from pipelines.runtime import Runtime

    settings = settings_from_env()
    policy = load_policy(args.policy or settings.lifecycle_policy_path)
    runtime = Runtime.from_settings(settings)
    failed: LifecycleRunError | None = None
    try:
        actions = run_lifecycle(runtime, args.as_of, dry_run=args.dry_run, policy=policy)
    except LifecycleRunError as error:
        actions, failed = error.actions, error
    if args.json:
        print_json([a.to_dict() for a in actions])
    else:
        for action in actions:
            print(f"{action.effective_at.isoformat()}  {action.account_id}  {action.action}  {_summary(action.detail)}")
        print(f"{len(actions)} action(s){' (dry run: nothing changed, nothing sent)' if args.dry_run else ''}")
    if failed is not None:
        print(f"pointflow: error: {failed}", file=sys.stderr)
        return 1
    return 0


def _summary(detail: dict) -> str:
    shown = {k: v for k, v in detail.items() if k not in ("keys", "local_paths")}
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in shown.items())


def _audit(args: argparse.Namespace) -> int:
    from pipelines.lifecycle.operations import deletion_audit

    rows = deletion_audit(open_catalog(settings_from_env()), args.account)
    view = [
        {
            "id": r.id,
            "account_id": r.account_id,
            "rule": r.rule,
            "subject": r.subject,
            "as_of": r.as_of.isoformat(),
            "status": r.status,
            "objects": r.object_count,
            "versions": r.version_count,
            "bytes": r.bytes,
            "keys": r.objects,
            "local_paths": r.local_paths,
            "error": r.error,
            "started_at": r.started_at.isoformat(),
            "finished_at": r.finished_at.isoformat() if r.finished_at else None,
        }
        for r in rows
    ]
    if args.json:
        print_json(view)
    else:
        for r in view:
            note = ""
            if r["status"] == "interrupted":
                note = f"  ({r['error']})"
            elif earlier := Counter(o["deleted_by"] for o in r["keys"] if "deleted_by" in o):
                note = f"  ({', '.join(f'{n} deleted by #{e} before it stopped' for e, n in sorted(earlier.items()))})"
            print(
                f"#{r['id']}  {r['as_of']}  {r['account_id']}  {r['rule']}  {r['status']}  {r['objects']} object(s), {r['versions']} version(s), {r['bytes']:,} bytes{note}"
            )
        if not view:
            print("no deletions")
    return 0
