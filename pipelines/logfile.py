"""Quiet by default: a command prints its own summary and progress, while library and Airflow
logging goes to a log file under POINTFLOW_HOME/logs (`pointflow --verbose` shows it all)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_installed: list[logging.Handler] = []  # ours, replaced when a process runs several commands (tests)


class _OwnNotesAndErrors(logging.Filter):
    """On the terminal: pointflow's own notes (report locations, warnings), and only errors of libraries."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "pipelines" or record.name.startswith("pipelines.") or record.levelno >= logging.ERROR


class _Terminal(logging.StreamHandler):
    """Writes to `sys.stderr` as it is when a record comes, not the stream it was when the command
    started: a test's capture that has since closed, or a redirect (`output_to`) that has ended."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass  # logging.StreamHandler's __init__ sets it; the stream is always the current stderr


def configure(log_path: Path | None, verbose: bool) -> None:
    """Everything at INFO into `log_path` (when given); on stderr everything (verbose) or our own notes."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    while _installed:
        handler = _installed.pop()
        root.removeHandler(handler)
        handler.close()
    terminal = _Terminal()
    terminal.setFormatter(logging.Formatter(FORMAT if verbose else "%(message)s"))
    if not verbose:
        terminal.addFilter(_OwnNotesAndErrors())
    root.addHandler(terminal)
    _installed.append(terminal)
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_path)
        to_file.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(to_file)
        _installed.append(to_file)


@contextmanager
def output_to(log_path: Path, enabled: bool = True) -> Iterator[None]:
    """Send this process's stdout and stderr, at the file-descriptor level, to `log_path`: Airflow's
    dag.test() logs through its own handlers and child processes inherit the descriptors, so
    nothing short of this keeps their lines off the terminal."""
    if not enabled:
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log_path, "a", buffering=1) as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            # Python-level writers too, where sys.stdout is not descriptor 1 (a test's capture).
            try:
                with redirect_stdout(log), redirect_stderr(log):
                    yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])
