"""Quiet by default: libraries log to the file, pointflow's own notes reach the terminal."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from pipelines import logfile


@pytest.fixture
def dask_logging_unset():
    """Dask configures its loggers when first imported in a process (its own stderr handler, no
    propagation, WARNING once a command set DASK_LOGGING__DISTRIBUTED=warning), so whether an earlier
    test imported it would decide this one. What is tested is where records go once they propagate."""
    logger = logging.getLogger("distributed")
    saved = logger.level, logger.propagate, logger.handlers[:]
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
    logger.handlers[:] = []
    yield
    logger.setLevel(saved[0])
    logger.propagate, logger.handlers[:] = saved[1], saved[2]


@pytest.fixture(autouse=True)
def root_handlers_unset():
    """An earlier test that ran a DAG leaves Airflow's own root handlers, bound to that test's
    captured stream, now closed: their "Logging error" output would land in these tests' stderr."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = []
    yield
    root.handlers[:] = saved


def test_libraries_go_to_the_file_and_our_notes_to_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture, dask_logging_unset: None
) -> None:
    log_path = tmp_path / "logs" / "pointflow.log"
    try:
        logfile.configure(log_path, verbose=False)
        logging.getLogger("distributed.deploy.subprocess").info("python -m dask spec --spec {}")
        logging.getLogger("pipelines.jobs").info("validation report: somewhere")
        logging.getLogger("airflow.task").error("a library's error")
        terminal = capsys.readouterr().err
        assert "dask spec" not in terminal
        assert "validation report: somewhere" in terminal and "a library's error" in terminal
        assert "dask spec" in log_path.read_text() and "validation report" in log_path.read_text()
        logfile.configure(log_path, verbose=True)  # replaces its handlers: each line once
        logging.getLogger("distributed.deploy.subprocess").info("now shown")
        assert capsys.readouterr().err.count("now shown") == 1
    finally:
        logfile.configure(None, verbose=True)
        for handler in list(logfile._installed):
            logging.getLogger().removeHandler(handler)
        logfile._installed.clear()


def test_output_to_takes_child_processes_output_too(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    log_path = tmp_path / "demo.log"
    with logfile.output_to(log_path):
        print("from this process")
        subprocess.run(
            [sys.executable, "-c", "import sys; print('from a child'); print('child err', file=sys.stderr)"], check=True
        )
    print("after")
    captured = capfd.readouterr()
    assert captured.out == "after\n" and captured.err == ""
    assert log_path.read_text().split() == ["from", "this", "process", "from", "a", "child", "child", "err"]


def test_the_terminal_is_stderr_as_it_is_when_a_record_comes(tmp_path: Path) -> None:
    """A command's terminal handler outlives the stream it started with (a redirect that ended, a
    test's capture that closed): records then go to the stderr of the moment, with no logging error."""
    started_with = io.StringIO()
    try:
        with redirect_stderr(started_with):
            logfile.configure(None, verbose=False)
        started_with.close()
        now = io.StringIO()
        with redirect_stderr(now):
            logging.getLogger("aiosmtpd.mail.log").error("an error after the command's stream closed")
        assert now.getvalue() == "an error after the command's stream closed\n"
    finally:
        for handler in list(logfile._installed):
            logging.getLogger().removeHandler(handler)
        logfile._installed.clear()
