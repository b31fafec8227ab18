"""What every command shares: settings, the catalog, and turning errors into one clear line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from pipelines.catalog import Catalog
from pipelines.settings import Settings


class CommandError(Exception):
    """An error the user can act on; printed as one line, exit code 2."""


def settings_from_env() -> Settings:
    return Settings.from_env()


def open_catalog(settings: Settings) -> Catalog:
    catalog = Catalog(settings.database_url)
    catalog.migrate()
    return catalog


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def run_handler(args: argparse.Namespace) -> int:
    """Run the chosen command; expected failures become `pointflow: error: ...` without a traceback."""
    from sqlalchemy.exc import DBAPIError

    from pipelines.catalog.db import database_failure
    from pipelines.errors import USER_ERRORS

    try:
        return int(args.handler(args) or 0)
    except (CommandError, *USER_ERRORS) as error:
        print(f"pointflow: error: {error}", file=sys.stderr)
        return 2
    except DBAPIError as error:
        print(f"pointflow: error: {database_failure(settings_from_env().database_url, error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pointflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """The reader of our output left (`pointflow ... | head`): that is its choice, not an error to
    report. What is still buffered for stdout is dropped, so the interpreter's own flush at exit
    does not fail again, and the exit code is the shell's for a process ended by SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE
