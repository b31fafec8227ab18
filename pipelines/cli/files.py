"""`pointflow ingest`, `pointflow files list` and `pointflow files delete`"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.cli.common import CommandError, print_deletion, print_json, settings_from_env


def register(commands: argparse._SubParsersAction) -> None:
    ingest = commands.add_parser(
        "ingest",
        help="store a file for an account (and optionally run the pipeline)",
        description=(
            "Copy FILE into the account's raw area of the object store, checksum it and register it in "
            "the catalog. The same bytes ingested twice are stored once. Nothing else happens unless "
            "--run is given: then validation, classification, export and metering run in this process, "
            "exactly as the pointflow_classify DAG runs them."
        ),
    )
    ingest.add_argument("file", type=Path, help="LAS/LAZ file")
    ingest.add_argument("--account", required=True, metavar="ID", help="the owning account (must exist)")
    ingest.add_argument("--run", action="store_true", help="also validate, classify, export and meter it now")
    ingest.add_argument("--classifier", default="standard", help="with --run: standard or ground")
    ingest.add_argument(
        "--format",
        dest="export_format",
        default="laz",
        choices=["laz", "las", "copc"],
        help="with --run: format of the exported points: laz (default), las, or copc (cloud-optimized LAZ)",
    )
    ingest.add_argument("--json", action="store_true", help="print the stored file (or the finished job) as JSON")
    ingest.set_defaults(handler=_ingest)

    files = commands.add_parser("files", help="list or delete an account's stored files (list, delete)")
    sub = files.add_subparsers(dest="files_command", metavar="ACTION", required=True)
    listing = sub.add_parser(
        "list", help="list stored files", description="List the account's files: key, size, sha256, points, state."
    )
    listing.add_argument("--account", required=True, metavar="ID", help="the account whose files to list")
    listing.add_argument("--json", action="store_true", help="print a JSON array ([] when there are none)")
    listing.set_defaults(handler=_list)
    remove = sub.add_parser(
        "delete",
        help="delete one stored file",
        description=(
            "Delete one of the account's stored input files (KEY as 'files list' shows it), every version of its "
            "object, so that it no longer counts against the plan's stored files and points. The deletion is "
            "audited ('pointflow lifecycle audit'); it is refused while the account is on legal hold or a job "
            "still works on the file. The file's jobs, their results and its usage records stay."
        ),
    )
    remove.add_argument("key", metavar="KEY")
    remove.add_argument("--account", required=True, metavar="ID")
    remove.add_argument("--json", action="store_true", help="print the audit entry as JSON")
    remove.set_defaults(handler=_delete)


def _ingest(args: argparse.Namespace) -> int:
    from pipelines.jobs import run_job
    from pipelines.runtime import Runtime
    from pipelines.sources import check_source
    from pipelines.steps.ingest import upload

    given = str(args.file)
    if given.startswith("s3:"):  # the Path has folded s3://bucket/key to s3:/bucket/key
        url = "s3://" + given[len("s3:") :].lstrip("/")
        raise CommandError(
            f"ingest takes a local LAS/LAZ file, not {url}: give an S3 object as the source of the pointflow_classify "
            f'DAG (-c \'{{"account_id": "{args.account}", "source": "{url}"}}\'), put it in the account\'s drop zone '
            f"(incoming/{args.account}/ in the object store), or download it first (aws s3 cp {url} .)"
        )
    if not args.file.is_file():
        raise FileNotFoundError(f"no such file: {args.file}")
    # The file named here is an allowed source, wherever it is, except among the service's own files.
    runtime = Runtime.from_settings(settings_from_env().allowing(args.file))
    check_source(runtime.settings, runtime.store, args.account, str(args.file))
    if args.run:
        job = run_job(
            runtime,
            args.account,
            str(args.file.resolve()),
            classifier=args.classifier,
            export_format=args.export_format,
        )
        if args.json:
            print_json(job.to_dict())
        else:
            print(f"job {job.job_id}: {job.state}" + (f" ({job.error})" if job.error else ""))
            if job.export_prefix:
                print(f"export: {runtime.store.location(job.export_prefix)}")
        return 0 if job.state == "exported" else 1
    stored = upload(runtime, args.account, args.file)
    if args.json:
        print_json(stored.to_public())
    else:
        print(
            f"{'stored' if stored.created else 'already stored'}: {stored.key} ({stored.size:,} bytes, sha256 {stored.sha256[:12]}…)"
        )
    return 0


def _list(args: argparse.Namespace) -> int:
    from pipelines.ingest import list_files
    from pipelines.runtime import Runtime

    files = list_files(Runtime.from_settings(settings_from_env()).catalog, args.account)
    if args.json:
        print_json([f.to_public() for f in files])
        return 0
    if not files:
        print(f"account {args.account} has no stored files")
    for f in files:
        print(f"{f.state:12} {f.size:>12,} B {f.points or 0:>12,} pts  {f.key}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    from pipelines.lifecycle.operations import delete_stored_file
    from pipelines.runtime import Runtime

    audit = delete_stored_file(Runtime.from_settings(settings_from_env()), args.account, args.key)
    print_deletion(audit, args.json, f"deleted {args.key}")
    return 0
