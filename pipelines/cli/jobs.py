"""`pointflow jobs list|show|abort|close-stale`"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from pipelines.catalog.models import JobState
from pipelines.cli.common import print_json, settings_from_env, when

if TYPE_CHECKING:
    from pipelines.steps.record import JobRecord


def register(commands: argparse._SubParsersAction) -> None:
    jobs = commands.add_parser("jobs", help="classification jobs: their state and why one failed")
    sub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)

    listing = sub.add_parser(
        "list",
        help="list jobs, of one account or all",
        description="List jobs oldest first: id, account, state, points, when, and the cause of a failure.",
    )
    listing.add_argument("--account", metavar="ID", help="only this account's jobs (default: every account's)")
    listing.add_argument("--state", choices=[state.value for state in JobState], help="only jobs in this state")
    listing.add_argument("--json", action="store_true", help="print a JSON array ([] when there are none)")
    listing.set_defaults(handler=_list)

    show = sub.add_parser(
        "show",
        help="show one job, with the cause of a failure",
        description=(
            "Show one job: account, source, state, classifier, points, times, the validation report and the "
            "export, and for a job that did not export, what stopped it (a refused input, a failed step, or "
            "a run that was killed and closed as stale)."
        ),
    )
    show.add_argument("job_id", metavar="JOB")
    show.add_argument("--json", action="store_true", help="print the job as JSON")
    show.set_defaults(handler=_show)

    abort = sub.add_parser(
        "abort",
        help="abort a job on the customer's or an operator's request",
        description=(
            "Abort a job. One not classifying yet ends aborted at once, metered with 0 points. A classifying job "
            "stops between tiles (within seconds of the request, once its current tiles are done): no more tiles "
            "are classified, nothing is exported or linked, its working files are removed, and it ends aborted, "
            "metered with the points classified before it stopped, which are billed. A job that has ended "
            "(exported, failed, quarantined, aborted) is not changed: exit code 2."
        ),
    )
    abort.add_argument("job_id", metavar="JOB")
    abort.add_argument("--account", metavar="ID", help="the job must be this account's (a customer's request)")
    abort.add_argument("--json", action="store_true", help="print the job as JSON")
    abort.set_defaults(handler=_abort)

    stale = sub.add_parser(
        "close-stale",
        help="close jobs whose run was killed or lost",
        description=(
            "Close as failed every job that made no progress for POINTFLOW_STALE_JOB_HOURS (default 24): its "
            "process was killed or its DAG run lost. Each is metered once as failed, so nothing is billed. "
            "It also removes what killed uploads left: a local store's part files no process holds, unchanged "
            "for an hour; on S3, unfinished multipart uploads initiated more than POINTFLOW_STALE_UPLOAD_HOURS "
            "(default 24) ago. The nightly lifecycle DAG does this too."
        ),
    )
    stale.add_argument("--json", action="store_true", help="print the closed jobs as JSON")
    stale.set_defaults(handler=_close_stale)


def _runtime():
    from pipelines.runtime import Runtime

    return Runtime.from_settings(settings_from_env())


def _line(job: JobRecord) -> str:
    reason = f"  {job.error}" if job.error and job.state != "exported" else ""
    return f"{job.job_id}  {job.account_id}  {job.state:<12} {job.points_processed:>12,} pts  {job.created_at:%Y-%m-%d %H:%M}{reason}"


def _list(args: argparse.Namespace) -> int:
    from pipelines.accounts import get_account
    from pipelines.steps.record import list_jobs

    runtime = _runtime()
    if args.account is not None:
        get_account(runtime.catalog, args.account)
    state = JobState(args.state) if args.state else None
    jobs = list_jobs(runtime, args.account, state)
    if args.json:
        print_json([job.to_dict() for job in jobs])
        return 0
    if not jobs:
        whose = f"account {args.account}" if args.account else "no account"
        print(f"{whose} has no jobs" + (f" in state {args.state}" if args.state else ""))
    for job in jobs:
        print(_line(job))
    return 0


def _show(args: argparse.Namespace) -> int:
    from pipelines.steps.record import job_view

    runtime = _runtime()
    job = job_view(runtime, args.job_id)
    if args.json:
        print_json(job.to_dict())
        return 0
    rows = {
        "job": job.job_id,
        "account": job.account_id,
        "source": job.source,
        "state": job.state,
        "classifier": " ".join(str(v) for v in (job.classifier, job.classifier_version) if v),
        "points": f"{job.points_processed:,}",
        "created": when(job.created_at),
        "finished": when(job.finished_at) if job.finished_at else "-",
        **({"abort asked": when(job.abort_requested_at)} if job.abort_requested_at else {}),
        "report": runtime.store.location(job.report_key) if job.report_key else "-",
        "export": runtime.store.location(job.export_prefix) if job.export_prefix else "-",
        "cause" if job.state != "exported" else "note": job.error or "-",
    }
    for name, value in rows.items():
        print(f"{name + ':':<12}{value}")
    return 0


def _abort(args: argparse.Namespace) -> int:
    from pipelines.abort import request_abort

    job = request_abort(_runtime(), args.job_id, args.account)
    if args.json:
        print_json(job.to_dict())
    elif job.state == JobState.ABORTED.value:
        print(f"job {job.job_id}: aborted, {job.points_processed:,} points metered")
    else:
        print(f"job {job.job_id}: abort requested; it stops between tiles and ends aborted ('pointflow jobs show')")
    return 0


def _close_stale(args: argparse.Namespace) -> int:
    from pipelines.lifecycle.sweeps import close_stale_jobs

    report = close_stale_jobs(_runtime())
    if args.json:
        print_json(
            {"closed": [job.to_dict() for job in report.closed], "metered": [job.to_dict() for job in report.metered]}
        )
        return 0
    for job in report.closed:
        print(_line(job))
    print(f"{len(report.closed)} stale job(s) closed")
    for job in report.metered:
        print(_line(job))
    if report.metered:
        print(f"{len(report.metered)} finished job(s) without a usage event metered")
    for job_id, keys in sorted(report.removed.items()):
        print(f"{job_id}: {len(keys)} working object(s) removed")
    for job_id in report.held:
        print(f"{job_id}: working objects kept, the account is on legal hold (removed after its release)")
    return 0
