"""`pointflow intake run`: one sweep of the drop zones, what the pointflow_intake DAG does every minute."""

from __future__ import annotations

import argparse
import os
import uuid

from pipelines.cli.common import print_json, settings_from_env


def register(commands: argparse._SubParsersAction) -> None:
    intake = commands.add_parser("intake", help="the drop zones incoming/<account>/: turn new files into jobs")
    sub = intake.add_subparsers(dest="intake_command", metavar="ACTION", required=True)
    run = sub.add_parser(
        "run",
        help="one sweep of the drop zones",
        description=(
            "Register one classification job for every new complete file in incoming/<account>/ of the object "
            "store, as the pointflow_intake DAG does every minute: the file is stored in the account's raw area "
            "and removed from the drop zone; a refused one (closed account, a limit) stays there and the customer "
            "is told. Each file version is registered once, however many sweeps run. Without --run the jobs are "
            "left for the DAG; with --run they are validated, classified, exported and metered in this process."
        ),
    )
    run.add_argument("--run", action="store_true", help="also run each registered job now, in this process")
    run.add_argument("--json", action="store_true", help="print the sweep (and the finished jobs) as JSON")
    run.set_defaults(handler=_run)
    policy = sub.add_parser(
        "policy",
        help="the S3 policy that limits a customer's credentials to its drop zone",
        description=(
            "Print the policy (JSON) for the customer's own S3 credentials on the configured store "
            "(POINTFLOW_STORAGE_URL): write, read, list and delete under incoming/ID/ only. Attach it to the "
            "customer's MinIO user (mc admin policy create/attach) or AWS IAM user or role; see README."
        ),
    )
    policy.add_argument("--account", required=True, metavar="ID")
    policy.set_defaults(handler=_policy)


def _run(args: argparse.Namespace) -> int:
    from pipelines.intake import sweep
    from pipelines.jobs import run_steps
    from pipelines.runtime import Runtime

    runtime = Runtime.from_settings(settings_from_env())
    # Unique per process: a CLI sweep resumes nobody else's claims before their lease ends.
    result = sweep(runtime, owner=f"cli:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    finished = [run_steps(runtime, job_id) for job_id in result.job_ids] if args.run else []
    if args.json:
        print_json(
            {
                "files": [o.to_public() for o in result.outcomes],
                "errors": result.errors,
                "jobs": [job.to_dict() for job in finished] if args.run else result.job_ids,
            }
        )
    else:
        for outcome in result.outcomes:
            print(
                f"{outcome.outcome:<10} {outcome.key}"
                + (f" -> {outcome.job_id}" if outcome.outcome == "registered" else f": {outcome.reason}")
            )
        for key, error in result.errors.items():
            print(f"{'not yet':<10} {key}: {error}")
        for job in finished:
            print(f"job {job.job_id}: {job.state}" + (f" ({job.error})" if job.error else ""))
        if not result.outcomes and not result.errors:
            print("no new files in the drop zones")
    return 1 if result.errors or any(job.state != "exported" for job in finished) else 0


def _policy(args: argparse.Namespace) -> int:
    from pipelines.intake import customer_policy

    print_json(customer_policy(settings_from_env().storage_url, args.account))
    return 0
