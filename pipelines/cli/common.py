"""What every command shares: settings, the catalog, and turning errors into one clear line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipelines.errors import UserError
from pipelines.settings import Settings

if TYPE_CHECKING:
    from pipelines.catalog import Catalog
    from pipelines.lifecycle.models import DeletionAudit


class CommandError(UserError):
    """An error the user can act on; printed as one line, exit code 2."""


T = TypeVar("T")


def read_import_file(reader: Callable[[Path], T], path: Path) -> T:
    """`reader(path)`, with a file that is not UTF-8 text (an Excel export in Latin-1 or
    UTF-16, a binary file) refused in one line that names where and what to do, nothing read."""
    try:
        return reader(path)
    except UnicodeDecodeError:
        raise CommandError(_not_utf8(path)) from None


def _not_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        where = "it"
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        where = f"line {line}, byte {error.start + 1} (0x{data[error.start]:02x})"
    return (
        f"{path}: not UTF-8 text at {where}; nothing imported. Save the file as UTF-8 "
        "(in Excel: 'CSV UTF-8'; a byte order mark is fine) and import it again"
    )


def settings_from_env() -> Settings:
    return Settings.from_env()


def open_catalog(settings: Settings) -> Catalog:
    # Imported here: the catalog is seconds of imports that `pointflow classify` never needs.
    from pipelines.runtime import open_catalog

    return open_catalog(settings)


PRICEBOOK_HELP = "price book YAML (default: $POINTFLOW_PRICEBOOK, else the one shipped with pointflow)"


def pricebook_of(args: argparse.Namespace, settings: Settings):
    """The price book a billing command uses: --pricebook, else the settings'."""
    from pipelines.billing.pricebook import load_pricebook

    return load_pricebook(getattr(args, "pricebook", None) or settings.pricebook_path)


def month_arg(text: str):
    """An argparse type: a calendar month, YYYY-MM."""
    from pipelines.billing.periods import Period

    try:
        return Period.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def instant_arg(text: str):
    """An argparse type: a moment in ISO 8601, UTC-aware (a value without offset is taken as UTC)."""
    from pipelines.accounts import parse_utc_datetime

    try:
        return parse_utc_datetime(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date-time, e.g. 2027-03-01T03:00:00Z") from None


def when(instant: datetime) -> str:
    """An instant as people read it, to the second (`--json` keeps the full ISO form)."""
    return instant.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_deletion(audit: DeletionAudit, as_json: bool, done: str) -> None:
    """A deletion on a customer's request, as `files delete` and `models delete` report it: its
    audit entry as JSON, or the sentence `done` with what went and the entry's number."""
    if as_json:
        print_json(
            {
                "audit_id": audit.id,
                "account_id": audit.account_id,
                "subject": audit.subject,
                "objects": audit.object_count,
                "versions": audit.version_count,
                "bytes": audit.bytes,
                "status": audit.status,
            }
        )
    else:
        print(
            f"{done} ({audit.object_count} object(s), {audit.version_count} version(s), {audit.bytes:,} bytes); audit #{audit.id}"
        )


def run_handler(args: argparse.Namespace) -> int:
    """Run the chosen command; expected failures become `pointflow: error: ...` without a traceback."""
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt as stop:
        stopped_by = signal.Signals.__members__.get(str(stop.args[0]) if stop.args else "", signal.SIGINT)
        print(f"pointflow: interrupted ({stopped_by.name})", file=sys.stderr)
        return 128 + stopped_by
    except Exception as error:
        # What tells the expected failures apart is imported only when one happens: the catalog,
        # the stack and the stores are seconds of imports that `pointflow classify` never needs.
        from sqlalchemy.exc import DBAPIError

        from pipelines.catalog.db import database_failure
        from pipelines.errors import USER_ERRORS

        if isinstance(error, (CommandError, *USER_ERRORS)):
            print(f"pointflow: error: {error}{_what_to_do(error)}", file=sys.stderr)
            return 2
        if isinstance(error, DBAPIError):
            print(f"pointflow: error: {database_failure(settings_from_env().database_url, error)}", file=sys.stderr)
            return 2
        if isinstance(error, BrokenPipeError):
            return _reader_gone()
        raise


def _what_to_do(error: BaseException) -> str:
    """Advice an error's cause calls for that its own message does not give."""
    if type(error.__cause__).__name__ == "NoCredentialsError":  # botocore's, from the S3 store
        return (
            ". Give S3 credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an "
            "instance or pod role (README: AWS S3)"
        )
    return ""


def _reader_gone() -> int:
    """The reader of our output left (`pointflow ... | head`): that is its choice, not an error to
    report. What is still buffered for stdout is dropped, so the interpreter's own flush at exit
    does not fail again, and the exit code is the shell's for a process ended by SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def stop_cleanly_on_termination() -> None:
    """SIGTERM (`kill`, a container or service manager stopping us) and SIGHUP (the terminal
    closed) unwind the command as Ctrl-C does, so every `finally` on the way runs: the output's
    temporary file is removed, the local cluster closed, the scratch folder released. Python's
    default for those signals ends the process on the spot and left `.OUT.partial` behind."""

    def unwind(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        for stopping in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(stopping, unwind)
