"""Aborting a job on request (`pointflow jobs abort`, pipelines.abort): before classification it ends
aborted with 0 points; mid-classification the running `ingest --run` stops between tiles, publishes
nothing, leaves no processes or scratch, and is metered and billed for the tiles it classified; a
job that has ended is not changed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

from pipelines.accounts import upsert_accounts
from pipelines.billing.invoicing import run_billing
from pipelines.catalog.models import JobState, UsageEvent
from pipelines.cli import main
from pipelines.ingest import list_files
from pipelines.jobs import run_steps
from pipelines.runtime import Runtime
from pipelines.scratch import folders
from pipelines.settings import Settings
from pipelines.steps.export import export_step
from pipelines.steps.ingest import create_job
from pipelines.steps.meter import meter_step
from pipelines.steps.record import JobAborted, job_row, job_view, list_jobs, refuse_job, run_step, set_state
from tests.conftest import make_account, shared_file
from tests.test_billing_support import make_pricebook, on_time
from tests.test_crashes import TILING, alive, wait_for

# 848,942 points; 12.5 m tiles: 416 tiles, about 9 s of classification on one worker, so the
# abort lands mid-classification.
FILE, FILE_POINTS = "corpus/AHN3_delft_3dfier.laz", 848_942


def start(home: Path, *args: str) -> subprocess.Popen:
    """The installed console script, with one Dask worker: the file's classification lasts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POINTFLOW_")}
    env |= {"POINTFLOW_HOME": str(home), "POINTFLOW_WORKERS": "1", **TILING}
    env |= {"POINTFLOW_DATABASE_URL": os.environ["POINTFLOW_DATABASE_URL"]}  # the test's catalog
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("pointflow")), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def events(runtime: Runtime, job_id: str) -> list[tuple[str, int]]:
    with runtime.catalog.session() as session:
        rows = session.scalars(select(UsageEvent).where(UsageEvent.job_id == job_id)).all()
        return [(row.status, row.points) for row in rows]


@pytest.fixture
def acme(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    """SQLite and PostgreSQL (where reachable): the request is one conditional UPDATE on either."""
    monkeypatch.setenv("POINTFLOW_DATABASE_URL", database_url)
    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [make_account("acme", plan="api"), make_account("other")])
    yield runtime
    runtime.catalog.dispose()


def test_a_job_aborted_before_classification_ends_aborted_with_0_points_and_runs_no_step(
    acme: Runtime, capsys: pytest.CaptureFixture
) -> None:
    runtime = acme
    job_id = "job-abort-before-start"
    create_job(runtime, job_id, "acme", str(shared_file("isprs/samp21.las")), "standard")

    # Another account's job is unknown to a customer's request.
    assert main(["jobs", "abort", job_id, "--account", "other"]) == 2
    assert f"unknown job '{job_id}' of account other" in capsys.readouterr().err
    assert job_view(runtime, job_id).state == "received"

    assert main(["jobs", "abort", job_id, "--account", "acme"]) == 0
    assert f"job {job_id}: aborted, 0 points metered" in capsys.readouterr().out
    job = job_view(runtime, job_id)
    assert job.state == "aborted" and job.points_processed == 0 and job.finished_at is not None
    assert "before classification started" in job.error
    assert events(runtime, job_id) == [("aborted", 0)]

    # The process that was to run it stops at its first step: nothing stored, metered once.
    assert run_steps(runtime, job_id).state == "aborted"
    assert list_files(runtime.catalog, "acme") == []
    assert events(runtime, job_id) == [("aborted", 0)]

    # Ended: a second request changes nothing.
    assert main(["jobs", "abort", job_id]) == 2
    assert f"job {job_id} has already ended aborted: nothing to abort" in capsys.readouterr().err

    # `jobs show` gives its times as people read them, to the second; --json keeps them whole.
    assert main(["jobs", "show", job_id]) == 0
    shown = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    for name, instant in (
        ("created", job.created_at),
        ("finished", job.finished_at),
        ("abort asked", job.abort_requested_at),
    ):
        assert shown[name].strip() == instant.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"), shown


def test_a_job_that_has_ended_is_not_aborted(acme: Runtime, capsys: pytest.CaptureFixture) -> None:
    runtime = acme
    create_job(runtime, "job-refused", "acme", "/nowhere/x.las", "standard")
    with pytest.raises(Exception, match="too large"):
        refuse_job(runtime, "job-refused", "too large")
    assert main(["jobs", "abort", "job-refused"]) == 2
    assert "job job-refused has already ended failed: nothing to abort, nothing changed" in capsys.readouterr().err
    job = job_view(runtime, "job-refused")
    assert job.state == "failed" and job.error == "too large"


def test_a_classified_job_aborted_before_its_export_exports_nothing_and_bills_its_points(
    acme: Runtime, capsys: pytest.CaptureFixture
) -> None:
    runtime = acme
    create_job(runtime, "job-classified", "acme", "/nowhere/x.las", "standard")
    with runtime.catalog.session() as session:
        job = job_row(session, "job-classified")
        for state in (JobState.VALIDATED, JobState.CLASSIFYING, JobState.CLASSIFIED):
            set_state(job, state)
        job.points_processed = 1234

    assert main(["jobs", "abort", "job-classified", "--account", "acme"]) == 0
    assert "abort requested" in capsys.readouterr().out
    assert job_view(runtime, "job-classified").state == "classified"  # the running process ends it
    with pytest.raises(JobAborted):
        run_step(runtime, "job-classified", export_step)
    job = meter_step(runtime, "job-classified")
    assert job.state == "aborted" and job.export_prefix is None and "while classified" in job.error
    assert events(runtime, "job-classified") == [("aborted", 1234)]


@pytest.mark.slow
def test_an_ingest_run_aborted_mid_classification_stops_publishes_nothing_and_bills_the_tiles_classified(
    home: Path, acme: Runtime, capsys: pytest.CaptureFixture
) -> None:
    runtime = acme
    command = start(home, "ingest", str(shared_file(FILE)), "--account", "acme", "--run")
    log = home / "logs" / "pointflow.log"
    family: list[psutil.Process] = []

    def tiles_classified() -> bool:
        nonlocal family
        assert command.poll() is None, command.communicate()
        family = psutil.Process(command.pid).children(recursive=True)
        return log.exists() and " tiles classified" in log.read_text()

    wait_for(tiles_classified, 180, "the first tiles to be classified")
    assert family, "the local cluster's worker processes"
    [job] = list_jobs(runtime, "acme")
    assert job.state == "classifying"

    asked = time.monotonic()
    assert main(["jobs", "abort", job.job_id, "--account", "acme"]) == 0
    assert "abort requested" in capsys.readouterr().out
    out, err = command.communicate(timeout=60)
    took = time.monotonic() - asked
    assert command.returncode == 1, err  # `ingest --run` exits 1 for a job that did not export
    assert f"job {job.job_id}: aborted" in out.decode() and "export:" not in out.decode()
    assert took < 30, f"the abort took {took:.1f} s to stop the run"
    wait_for(lambda: not alive(family), 20, f"the cluster's processes to end: {alive(family)}")

    job = job_view(runtime, job.job_id)
    assert job.state == "aborted" and job.export_prefix is None and job.classified_key is None
    assert "aborted on request while classifying" in job.error
    assert 0 < job.points_processed < FILE_POINTS
    assert events(runtime, job.job_id) == [("aborted", job.points_processed)]

    # Nothing published or half-processed: only the stored input and its validation report remain,
    # no work folder, no e-mail.
    area = home / "objects" / "accounts" / "acme"
    assert sorted(p.name for p in area.iterdir()) == ["raw", "reports"]
    assert folders(runtime.settings.scratch_dir) == []
    outbox = home / "outbox"
    assert not outbox.exists() or list(outbox.iterdir()) == []

    # Ended: a second request changes nothing.
    assert main(["jobs", "abort", job.job_id]) == 2
    assert "has already ended aborted" in capsys.readouterr().err
    assert events(runtime, job.job_id) == [("aborted", job.points_processed)]

    # The month's invoice bills the points classified before the abort at the usage price.
    period = f"{job.finished_at:%Y-%m}"
    result = run_billing(runtime.catalog, period, make_pricebook(), now=on_time(period))
    [invoice] = [i for i in result.invoices if i.account_id == "acme"]
    [line] = [line for line in invoice.lines if line.kind == "usage"]
    millions = Decimal(job.points_processed) / Decimal(1_000_000)
    assert line.quantity == millions and line.unit_price == Decimal("0.50")
    assert line.amount == (millions * Decimal("0.50")).quantize(Decimal("0.01"), ROUND_HALF_UP)


def test_a_classification_told_to_stop_cancels_its_tasks_in_flight_and_writes_nothing(settings, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    from pipelines.classify import ClassificationAborted, classify_file

    asked = 0

    def should_stop() -> bool:  # asked after the scan, then after each finished task: stop after two
        nonlocal asked
        asked += 1
        return asked >= 3

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    output = outputs / "out.laz"
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        with pytest.raises(ClassificationAborted) as stopped:
            classify_file(
                shared_file("ign_st_barth_100m.laz"), output, settings, tile_size=12.5, buffer=2.5,
                client=client, should_stop=should_stop,
            )  # fmt: skip

        def classify_tasks(dask_scheduler) -> list[str]:
            return [key for key in dask_scheduler.tasks if str(key).startswith("classify_tile")]

        wait_for(lambda: client.run_on_scheduler(classify_tasks) == [], 10, "the tasks in flight to be cancelled")
    assert asked == 3
    assert 0 < stopped.value.points < 249_120 and 0 < stopped.value.tiles < 78
    assert list(outputs.iterdir()) == []  # neither the output nor its partial file
    assert folders(settings.scratch_dir) == []


def test_a_job_whose_abort_was_asked_for_and_whose_run_died_is_closed_aborted_not_failed(acme: Runtime) -> None:
    from datetime import UTC, datetime, timedelta

    from pipelines.lifecycle.sweeps import close_stale_jobs

    runtime = acme
    job_id = "job-abort-then-killed"
    create_job(runtime, job_id, "acme", str(shared_file("isprs/samp21.las")), "standard")
    with runtime.catalog.session() as session:
        # As a run killed mid-classification leaves it: classifying, abort asked for, nothing recorded since.
        job = job_row(session, job_id)
        job.state, job.abort_requested_at = JobState.CLASSIFYING.value, job.updated_at
    later = datetime.now(UTC) + timedelta(hours=runtime.settings.stale_job_hours + 1)
    report = close_stale_jobs(runtime, later)
    assert [record.job_id for record in report.closed] == [job_id]
    closed = job_view(runtime, job_id)
    assert closed.state == "aborted" and "aborted at request" in closed.error
    assert events(runtime, job_id) == [("aborted", 0)]
