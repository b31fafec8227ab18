"""The `pointflow` command. Each command group lives in its own module with a `register` function."""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from pipelines import __version__, logfile
from pipelines.cli.common import CommandError, run_handler, stop_cleanly_on_termination

COMMAND_MODULES = (
    "pipelines.cli.classify",
    "pipelines.cli.models",
    "pipelines.cli.accounts",
    "pipelines.cli.files",
    "pipelines.cli.intake",
    "pipelines.cli.jobs",
    "pipelines.cli.db",
    "pipelines.cli.airflow",
    "pipelines.cli.imports",
    "pipelines.cli.billing",
    "pipelines.cli.lifecycle",
)
# Developer tooling (the demo, the local multi-service stack) is a package of its own that a
# deployed service does not ship; its commands appear where it is installed.
DEV_COMMAND_MODULES = ("pointflow_dev.cli_demo", "pointflow_dev.cli_stack")


# `pointflow classify …` builds a parser of that one command, so it imports only what classifying
# needs: the other commands' modules import the catalog, billing and Airflow helpers, a second or
# more of a classification's start.
SINGLE_COMMANDS = {"classify": "pipelines.cli.classify"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or only `command`'s when it is one of SINGLE_COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="pointflow",
        description=(
            "Classify LAS/LAZ point clouds and run the service around it: accounts, ingest, usage, billing. "
            "Settings come from POINTFLOW_* environment variables (see README); with none set, everything "
            "runs locally under ~/.pointflow."
        ),
    )
    parser.add_argument("--version", action="version", version=f"pointflow {__version__}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show library and Airflow logging here too (by default it goes to $POINTFLOW_HOME/logs/pointflow.log)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in [SINGLE_COMMANDS[command]] if command in SINGLE_COMMANDS else COMMAND_MODULES + _dev_commands():
        importlib.import_module(name).register(commands)
    return parser


def _dev_commands() -> tuple[str, ...]:
    return DEV_COMMAND_MODULES if importlib.util.find_spec("pointflow_dev") else ()


def command() -> NoReturn:
    """The `pointflow` command: `main`, then the process's exit without the interpreter's last full
    garbage collection. That collection walked and freed every cycle a run left behind (Dask's
    futures and messages with their arrays): half a second after a 10 M point classification had
    printed its summary. Frozen, they go with the process; exit handlers still run (log files are
    flushed, every output was closed before)."""
    code = main()
    gc.freeze()
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    # Our own progress notes (report locations, the Dask dashboard link) go to stderr; libraries'
    # logging to the log file, Dask's included (its cluster's start-up notes, also in the local
    # cluster's processes, which log to their own stderr).
    if not args.verbose:
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logfile.configure(_log_path(), args.verbose)
    stop_cleanly_on_termination()
    return run_handler(args)


def _log_path():
    """Where library logging goes; none when the settings are wrong (the command then says so)."""
    from pipelines.settings import Settings, SettingsError

    try:
        return Settings.from_env().logs_dir / "pointflow.log"
    except SettingsError:
        return None


__all__ = ["CommandError", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
