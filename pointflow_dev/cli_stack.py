"""`pointflow stack up`: every service of the deployment as its own process on this machine."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from pipelines.cli.common import CommandError, settings_from_env


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "stack",
        help="run the multi-service deployment without Docker (Airflow on PostgreSQL, Dask workers)",
        description=(
            "Start the services of docker/compose.yaml as separate processes on loopback: Airflow's api-server, "
            "scheduler, dag-processor and triggerer with the LocalExecutor on PostgreSQL, pointflow's catalog on "
            "the same server, and a Dask scheduler with its workers, which the classification tasks send their "
            "tiles to. Objects and mail follow POINTFLOW_STORAGE_URL and POINTFLOW_SMTP_URL (default: a folder "
            "and an outbox under the stack's folder). Stops everything on Ctrl-C; logs stay in <dir>/logs."
        ),
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = actions.add_parser(
        "up",
        help="start the stack and keep it running until Ctrl-C",
        description=(
            "Start Airflow (api-server, scheduler, dag-processor, triggerer) on PostgreSQL, pointflow's catalog on "
            "the same server, and a Dask scheduler with its workers, as separate processes on loopback; keep them "
            "running until Ctrl-C, which stops everything. Logs stay in <dir>/logs."
        ),
    )
    up.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server; the stack creates <name>_airflow and <name>_catalog on it (default: %(default)s)",
    )
    up.add_argument("--name", default="pointflow_stack", help="prefix of the two databases (default: %(default)s)")
    up.add_argument("--dir", type=Path, default=None, help="folder for homes and logs (default: POINTFLOW_HOME/stack)")
    up.add_argument("--port", type=int, default=8080, help="Airflow api-server port (default: %(default)s)")
    up.add_argument("--dask-port", type=int, default=8786, help="Dask scheduler port (default: %(default)s)")
    up.add_argument("--workers", type=int, default=2, help="Dask worker processes (default: %(default)s)")
    up.set_defaults(handler=_up)


def _up(args: argparse.Namespace) -> int:
    from pointflow_dev.stack import LocalStack
    from pointflow_dev.stack_plan import StackPlan

    if args.workers < 1:
        raise CommandError("--workers must be at least 1")
    base = args.dir or settings_from_env().home / "stack"
    plan = StackPlan(
        base=base.resolve(),
        postgres=args.postgres,
        name=args.name,
        api_port=args.port,
        dask_port=args.dask_port,
        dask_workers=args.workers,
    )
    # Ctrl-C and `kill` both stop the services in order instead of orphaning them (also when a
    # shell started us in the background, with SIGINT ignored).
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.default_int_handler)
    with LocalStack(plan) as stack:
        for line in addresses(plan, stack.passwords_file, stack.environment["POINTFLOW_INPUT_DIRS"]):
            print(line)
        signal.pause()
    return 0


def addresses(plan, passwords_file: Path, inputs: str) -> list[str]:
    """What `stack up` prints once the stack is healthy: no password (the database URL's is masked,
    it is the one given with --postgres; Airflow's is in its file)."""
    from pipelines.catalog.db import shown_url

    catalog = shown_url(plan.database_url("catalog"))
    return [
        f"Airflow UI:  {plan.api_url}  (user {plan.admin_user}; password in {passwords_file})",
        f"Dask:        {plan.dask_address}",
        f"pointflow:   POINTFLOW_HOME={plan.pointflow_home} POINTFLOW_DATABASE_URL={catalog}"
        + ("  (*** stands for the password given with --postgres)" if ":***@" in catalog else ""),
        f"inputs:      {inputs}  (local sources for the DAGs)",
        f"logs:        {plan.logs}",
        "Ctrl-C stops the stack.",
    ]
