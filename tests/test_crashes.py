"""Crash safety: a `pointflow` process SIGKILLed mid-classification leaves no processes behind (its
local Dask cluster ends with it), its scratch folder is swept by the next run and found by account
deletion, and its job is closed as failed, billed nothing, with the cause recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import laspy
import psutil
import pytest
from sqlalchemy import select

from pipelines.accounts import upsert_accounts
from pipelines.catalog.models import UsageEvent, utcnow
from pipelines.cli import main
from pipelines.lifecycle.sweeps import close_stale_jobs
from pipelines.runtime import Runtime
from pipelines.scratch import account_folders, folders
from pipelines.settings import Settings
from pipelines.steps.record import job_view, list_jobs
from tests.conftest import make_account, shared_file

pytestmark = pytest.mark.slow

# Small tiles: the IGN tile becomes a few hundred Dask tasks, so a kill lands mid-classification.
TILING = {"POINTFLOW_TILE_SIZE": "12.5", "POINTFLOW_TILE_BUFFER": "2.5"}


def start(home: Path, *args: str, database_url: str | None = None) -> subprocess.Popen:
    """The installed console script, as a user (or an Airflow task) runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POINTFLOW_")} | {
        "POINTFLOW_HOME": str(home),
        "POINTFLOW_WORKERS": "2",
        **TILING,
    }
    if database_url:
        env["POINTFLOW_DATABASE_URL"] = database_url
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("pointflow")), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    living = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                living.append(process)
        except psutil.NoSuchProcess:
            continue
    return living


def kill_mid_classification(
    process: subprocess.Popen, scratch: Path, signum: signal.Signals = signal.SIGKILL
) -> list[psutil.Process]:
    """Signal the command (SIGKILL unless told) once its cluster's worker processes (the scheduler
    runs inside the command) are started and tiles are on disk; returns the processes it had started."""
    command = psutil.Process(process.pid)
    family: list[psutil.Process] = []

    def classifying() -> bool:
        nonlocal family
        assert process.poll() is None, process.communicate()
        family = command.children(recursive=True)
        return len(family) >= 1 and any(scratch.glob("classify-*/core-*"))

    wait_for(classifying, 180, "the classification to be under way")
    process.send_signal(signum)
    process.wait(timeout=60)
    return family


def test_a_killed_classify_takes_its_cluster_with_it_and_the_next_run_sweeps_its_scratch(
    home: Path, tmp_path: Path
) -> None:
    scratch = home / "scratch"
    family = kill_mid_classification(
        start(home, "classify", str(shared_file("ign_st_barth_100m.laz")), str(tmp_path / "out.laz")), scratch
    )

    wait_for(lambda: not alive(family), 20, f"the orphaned cluster processes to end: {alive(family)}")
    assert not (tmp_path / "out.laz").exists()
    [left] = folders(scratch)  # the killed run's tiles: locked by nobody now
    assert any(left.path.glob("core-*"))

    nxt = start(home, "classify", str(shared_file("isprs/samp21.las")), str(tmp_path / "next.laz"))
    out, err = nxt.communicate(timeout=300)
    assert nxt.returncode == 0, err
    assert folders(scratch) == [] and not left.path.exists()


def test_a_terminated_classify_unwinds_leaving_no_output_no_partial_file_no_processes_no_scratch(
    home: Path, tmp_path: Path
) -> None:
    scratch, outputs = home / "scratch", tmp_path / "outputs"
    outputs.mkdir()
    command = start(home, "classify", str(shared_file("ign_st_barth_100m.laz")), str(outputs / "out.laz"))
    family = kill_mid_classification(command, scratch, signal.SIGTERM)

    assert command.returncode == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM)" in command.stderr.read().decode()
    wait_for(lambda: not alive(family), 20, f"the cluster's processes to end: {alive(family)}")
    assert list(outputs.iterdir()) == []  # neither out.laz nor .out.laz.partial
    assert folders(scratch) == []


def test_a_killed_ingest_run_is_closed_as_failed_and_deleting_the_account_finds_its_points(
    home: Path, database_url: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POINTFLOW_DATABASE_URL", database_url)
    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [make_account("acme")])
    scratch = runtime.settings.scratch_dir
    command = start(
        home,
        "ingest",
        str(shared_file("ign_st_barth_100m.laz")),
        "--account",
        "acme",
        "--run",
        database_url=database_url,
    )
    family = kill_mid_classification(command, scratch)
    wait_for(lambda: not alive(family), 20, "the orphaned cluster processes to end")

    [job] = list_jobs(runtime, "acme")
    assert job.state == "classifying"
    left = set(account_folders(scratch, "acme"))
    assert left
    # While the job is open, the account's data is not deleted: nothing tells a killed run from a slow one.
    assert main(["accounts", "delete", "acme", "--confirm", "--json"]) == 2
    assert f"job {job.job_id} is still classifying" in capsys.readouterr().err

    # A day later the nightly run closes the job: failed, the cause on record, nothing billed.
    [closed] = close_stale_jobs(runtime, utcnow() + timedelta(hours=runtime.settings.stale_job_hours, minutes=1)).closed
    assert closed.job_id == job.job_id and closed.state == "failed"
    assert "no progress" in closed.error and "classifying" in closed.error
    with runtime.catalog.session() as session:
        events = session.scalars(select(UsageEvent).where(UsageEvent.job_id == job.job_id)).all()
        assert [(e.status, e.points) for e in events] == [("failed", 0)]
    assert close_stale_jobs(runtime, utcnow() + timedelta(days=30)).closed == []

    # The killed run's tiles and working copy are the account's points: deletion finds and removes them.
    assert main(["accounts", "delete", "acme", "--confirm", "--json"]) == 0
    deleted = json.loads(capsys.readouterr().out)
    assert {Path(p["path"]) for p in deleted["local_paths"]} >= left
    assert account_folders(scratch, "acme") == []
    assert main(["jobs", "show", job.job_id]) == 0
    assert "no progress" in capsys.readouterr().out
    assert job_view(runtime, job.job_id).finished_at is not None


def faulty_run(fault: str, *args: str) -> subprocess.CompletedProcess:
    """`pointflow ARGS` in a process of its own that SIGKILLs itself at `fault` (tests/job_faults.py)."""
    return subprocess.run(
        [sys.executable, "-m", "tests.job_faults", fault, *args],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("first", ["close_stale_jobs", "deliver_unsent"])
def test_a_run_killed_after_export_is_metered_by_the_nightly_sweep_before_its_ready_e_mail(
    runtime: Runtime, account: str, scene_path: Path, first: str
) -> None:
    from pipelines.lifecycle.sweeps import UNSENT_SETTLE_TIME, deliver_unsent
    from pipelines.notify import outbox_messages

    killed = faulty_run("kill:after-export", "ingest", str(scene_path), "--account", account, "--run")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [job] = list_jobs(runtime, account)
    assert job.state == "exported" and job.points_processed > 0
    assert runtime.store.exists(job.export_prefix + "manifest.json")
    with runtime.catalog.session() as session:
        assert session.scalars(select(UsageEvent).where(UsageEvent.job_id == job.job_id)).all() == []
    assert outbox_messages(runtime.settings) == []

    # The nightly run's two sweeps run side by side: whichever comes first meters the job, and the
    # ready e-mail never goes out for a job that is not metered.
    night = job.finished_at + UNSENT_SETTLE_TIME + timedelta(hours=3)
    if first == "close_stale_jobs":
        report = close_stale_jobs(runtime, night)
        assert report.closed == [] and [j.job_id for j in report.metered] == [job.job_id]
        assert outbox_messages(runtime.settings) == []
        assert deliver_unsent(runtime, night).sent == [job.job_id]
    else:
        assert deliver_unsent(runtime, night).sent == [job.job_id]
        assert close_stale_jobs(runtime, night).metered == []
    with runtime.catalog.session() as session:
        events = session.scalars(select(UsageEvent).where(UsageEvent.job_id == job.job_id)).all()
        assert [(e.event_id, e.status, e.points) for e in events] == [
            (f"{job.job_id}:classification", "succeeded", job.points_processed)
        ]
    assert len(outbox_messages(runtime.settings)) == 1

    # The next nights: nothing more billed, nothing more sent.
    later = night + timedelta(days=1)
    assert close_stale_jobs(runtime, later).metered == []
    assert deliver_unsent(runtime, later).sent == []
    with runtime.catalog.session() as session:
        assert len(session.scalars(select(UsageEvent).where(UsageEvent.job_id == job.job_id)).all()) == 1
    assert len(outbox_messages(runtime.settings)) == 1


@pytest.mark.parametrize("hold", [False, True])
def test_a_run_killed_mid_export_leaves_no_customer_points_once_closed_as_failed(
    runtime: Runtime, account: str, scene_path: Path, hold: bool
) -> None:
    from pipelines.lifecycle.operations import deletion_audit, place_hold
    from pipelines.lifecycle.sweeps import FAILED_JOB_RULE

    killed = faulty_run("kill:before-manifest", "ingest", str(scene_path), "--account", account, "--run")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [job] = list_jobs(runtime, account)
    assert job.state == "classified"
    area = f"accounts/{account}/"

    def keys(prefix: str) -> list[str]:
        return sorted(o.key for o in runtime.store.list(area + prefix))

    working = keys(f"classified/{job.job_id}/") + keys(f"exports/{job.job_id}/") + keys(f"tmp/exports/{job.job_id}/")
    assert len(keys(f"exports/{job.job_id}/")) == 6 and keys(f"classified/{job.job_id}/")
    assert not runtime.store.exists(f"{area}exports/{job.job_id}/manifest.json")
    raw = keys("raw/")
    assert raw
    if hold:
        place_hold(runtime.catalog, account, "litigation")

    night = utcnow() + timedelta(hours=runtime.settings.stale_job_hours, minutes=1)
    report = close_stale_jobs(runtime, night)
    [closed] = report.closed
    assert closed.job_id == job.job_id and closed.state == "failed"
    with runtime.catalog.session() as session:
        events = session.scalars(select(UsageEvent).where(UsageEvent.job_id == job.job_id)).all()
        assert [(e.status, e.points) for e in events] == [("failed", job.points_processed)]
    if hold:
        # Nothing of an account on legal hold is deleted: the objects stay, and the report says so.
        assert report.held == [job.job_id] and report.removed == {}
        assert "legal hold" in closed.error
        assert (
            keys(f"classified/{job.job_id}/") + keys(f"exports/{job.job_id}/") + keys(f"tmp/exports/{job.job_id}/")
            == working
        )
        assert [a for a in deletion_audit(runtime.catalog, account) if a.rule == FAILED_JOB_RULE] == []
        return
    assert report.held == [] and sorted(report.removed[job.job_id]) == working
    assert f"{len(working)} working object(s) removed" in closed.error
    assert (
        keys(f"classified/{job.job_id}/") == keys(f"exports/{job.job_id}/") == keys(f"tmp/exports/{job.job_id}/") == []
    )
    assert keys("raw/") == raw  # the input stays: other jobs may use the same stored file
    [audit] = [a for a in deletion_audit(runtime.catalog, account) if a.rule == FAILED_JOB_RULE]
    assert audit.status == "completed" and audit.subject == f"job {job.job_id}"
    assert sorted(o["key"] for o in audit.objects) == working
    # Run again: nothing more closed, removed or audited.
    again = close_stale_jobs(runtime, night + timedelta(days=1))
    assert again.closed == [] and again.removed == {}
    assert len([a for a in deletion_audit(runtime.catalog, account) if a.rule == FAILED_JOB_RULE]) == 1


def test_the_next_classify_to_the_same_output_removes_a_killed_runs_partial_never_a_live_ones(
    home: Path, tmp_path: Path
) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    output = outputs / "delft.las"
    # 0.85 M points: its partial output exists for seconds (from the end of the scan to the rename).
    source = str(shared_file("corpus/AHN3_delft_3dfier.laz"))

    def partials() -> list[Path]:
        return sorted(outputs.glob(".delft.las*.partial"))

    killed = start(home, "classify", source, str(output))
    wait_for(lambda: bool(partials()), 180, "the killed run to open its partial output")
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    [stale] = partials()  # left behind, until...

    live = start(home, "classify", source, str(output))
    wait_for(lambda: any(p != stale for p in partials()), 180, "the next run to open its partial output")
    assert not stale.exists()  # ...the next run to the same output removes it
    [ongoing] = partials()
    from pipelines.tile_io import sweep_partials

    # What a third run to the same output does first leaves the live run's partial alone.
    assert live.poll() is None, "the run finished: no live writer was tested"
    assert sweep_partials(output) == [] and ongoing.exists()

    out, err = live.communicate(timeout=300)
    assert live.returncode == 0, err
    assert partials() == [] and len(laspy.read(output).points) == 848_942
