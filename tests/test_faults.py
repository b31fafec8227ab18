"""Proof under faults: a Dask worker killed mid-classification, the S3 endpoint down, the catalog's
PostgreSQL server restarted, the mail server down. Each fault is real (a SIGKILLed process, a
closed port, a restarted server); each test checks that the job ends with one export and one
usage event, or fails cleanly and finishes when rerun as an Airflow retry would.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from urllib.parse import urlparse

import pytest
from sqlalchemy import select

from pipelines.accounts import upsert_accounts
from pipelines.catalog.models import SentMessage, UsageEvent
from pipelines.classify import classify_file
from pipelines.export import (
    ExportNotReady,
    artifact_link,
    download_links,
    published_exports,
)
from pipelines.jobs import run_job
from pipelines.links import LinkSigner
from pipelines.runtime import Runtime
from pipelines.settings import Settings
from pipelines.steps.classify import classify_step
from pipelines.steps.deliver import deliver_step
from pipelines.steps.export import export_step
from pipelines.steps.ingest import create_job, ingest_step
from pipelines.steps.meter import meter_step
from pipelines.steps.record import job_id_for, job_view
from pipelines.steps.validate import validate_step
from pipelines.storage import S3Store, StorageError
from tests.conftest import make_account, shared_file
from tests.faults import DaskProcesses, PrivatePostgres, TcpOutage, smtp_back_up

IGN = "ign_st_barth_100m.laz"
# 12.5 m tiles cut a 50 m quarter of the IGN tile into 16 Dask tasks, so a kill lands mid-run.
TILING = {"POINTFLOW_TILE_SIZE": "12.5", "POINTFLOW_TILE_BUFFER": "2.5"}
TILES = 16


def usage(runtime: Runtime) -> list[tuple[str, str, int]]:
    with runtime.catalog.session() as session:
        return [(e.job_id, e.status, e.points) for e in session.scalars(select(UsageEvent))]


def manifests(store, account_id: str) -> list[str]:
    return [o.key for o in store.list(f"accounts/{account_id}/exports/") if o.key.endswith("/manifest.json")]


# --- Dask: a worker killed mid-classification -------------------------------------------------


@pytest.fixture(scope="module")
def ign_quarter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The south-west 50 m x 50 m of the IGN tile (real points, a quarter of the work)."""
    import laspy

    data = laspy.read(shared_file(IGN))
    keep = (data.x < data.header.mins[0] + 50) & (data.y < data.header.mins[1] + 50)
    quarter = laspy.LasData(data.header)
    quarter.points = data.points[keep]
    path = tmp_path_factory.mktemp("ign") / "st_barth_sw.laz"
    quarter.write(path)
    return path


@pytest.fixture(scope="module")
def ign_reference(ign_quarter: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Class counts of the quarter classified without any fault, with the same tiling."""
    home = tmp_path_factory.mktemp("reference")
    settings = Settings.from_env({"POINTFLOW_HOME": str(home), "POINTFLOW_WORKERS": "2", **TILING})
    result = classify_file(ign_quarter, home / "out.laz", settings)
    assert result.tiles == TILES
    return {str(k): v for k, v in result.class_counts.items()}


@pytest.fixture
def tiled(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TILING.items():
        monkeypatch.setenv(name, value)


class WorkerKiller(threading.Thread):
    """Watches the scheduler; once `after` classify tasks are done, SIGKILLs a worker that is running one."""

    def __init__(self, cluster: DaskProcesses, after: int = 3) -> None:
        super().__init__(daemon=True)
        self.cluster, self.after = cluster, after
        self.killed: dict | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        from distributed import Client

        def progress(dask_scheduler) -> tuple[int, dict[str, int]]:
            """Classify tasks done, and those running per worker, read in one go on the scheduler's
            event loop (asked in two calls, a task could finish between them)."""
            # state_counts counts the tasks that ever reached a state: a finished task the client
            # has since released is in "memory" and in "forgotten", so "memory" alone counts it once.
            prefix = dask_scheduler.task_prefixes.get("classify_tile")
            done = prefix.state_counts["memory"] if prefix else 0
            running = {
                address: sum(task.prefix.name == "classify_tile" for task in worker.processing)
                for address, worker in dask_scheduler.workers.items()
            }
            return done, {address: n for address, n in running.items() if n}

        with Client(self.cluster.address, timeout="30s") as client:
            pids = client.run(os.getpid)
            while not self.stop.is_set():
                done, busy = client.run_on_scheduler(progress)
                if done >= self.after and busy:
                    address, running = next(iter(busy.items()))
                    os.kill(pids[address], signal.SIGKILL)
                    self.killed = {"address": address, "pid": pids[address], "tasks_done": done, "running": running}
                    return
                time.sleep(0.02)


@pytest.fixture
def dask_processes(request: pytest.FixtureRequest):
    scheduler_env = getattr(request, "param", None)
    cluster = DaskProcesses(workers=2, scheduler_env=scheduler_env)
    from distributed import Client

    with Client(cluster.address, timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
    yield cluster
    cluster.close()


def killed_process(cluster: DaskProcesses, pid: int) -> int | None:
    [process] = [p for p in cluster.workers if p.pid == pid]
    return process.wait(timeout=10)


@pytest.mark.slow
def test_a_killed_dask_worker_costs_one_retried_tile_not_the_job(
    tiled, dask_processes: DaskProcesses, ign_quarter: Path, ign_reference: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POINTFLOW_DASK_ADDRESS", dask_processes.address)
    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [make_account("acme")])
    killer = WorkerKiller(dask_processes)
    killer.start()
    try:
        job = run_job(runtime, "acme", str(ign_quarter))
    finally:
        killer.stop.set()
        killer.join()

    assert killer.killed is not None, "no worker was killed: the run ended before the fault"
    assert killed_process(dask_processes, killer.killed["pid"]) == -signal.SIGKILL
    assert job.state == "exported", job.error
    # Killed mid-run, while it ran a tile of this job, which the scheduler then gave to the survivor.
    assert job.summary["tiles"] == TILES and killer.killed["tasks_done"] < TILES and killer.killed["running"] >= 1
    # The scheduler moved the killed worker's tiles to the survivor; the result is the same.
    assert job.summary["class_counts"] == ign_reference
    assert job.points_processed == sum(ign_reference.values())
    [manifest_key] = manifests(runtime.store, "acme")
    assert json.loads(runtime.store.get_bytes(manifest_key))["class_counts"] == ign_reference
    assert usage(runtime) == [(job.job_id, "succeeded", job.points_processed)]


@pytest.mark.slow
@pytest.mark.parametrize("dask_processes", [{"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}], indirect=True)
def test_a_tile_dask_gives_up_on_fails_the_task_and_the_airflow_retry_finishes(
    tiled,
    dask_processes: DaskProcesses,
    ign_quarter: Path,
    ign_reference: dict,
    load_test_dag,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no failures allowed per task, the kill is a KilledWorker error for the classify task."""
    monkeypatch.setenv("POINTFLOW_DASK_ADDRESS", dask_processes.address)
    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [make_account("acme")])
    dag = load_test_dag("pointflow_classify")
    killer = WorkerKiller(dask_processes)
    killer.start()
    try:
        dag_run = dag.test(run_conf={"account_id": "acme", "source": str(ign_quarter), "classifier": "standard"})
    finally:
        killer.stop.set()
        killer.join()

    assert killer.killed is not None
    assert killed_process(dask_processes, killer.killed["pid"]) == -signal.SIGKILL
    tries = {ti.task_id: (str(ti.state), ti.try_number) for ti in dag_run.get_task_instances()}
    assert str(dag_run.state) == "success", tries
    assert tries["classify"] == ("success", 2) and tries["export"] == ("success", 1)
    job = job_view(runtime, job_id_for("pointflow_classify", dag_run.run_id))
    assert job.state == "exported" and job.summary["class_counts"] == ign_reference
    assert len(manifests(runtime.store, "acme")) == 1
    assert usage(runtime) == [(job.job_id, "succeeded", sum(ign_reference.values()))]


# --- S3: the endpoint goes down ----------------------------------------------------------------


@pytest.fixture
def s3_outage(home: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """The pipeline's S3 endpoint is a forwarder to the moto server that a test can take down."""
    import boto3

    real = urlparse(s3_endpoint)
    outage = TcpOutage(real.hostname, real.port)
    outage.up()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", outage.url)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    bucket = f"pf-outage-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    direct = boto3.client("s3", endpoint_url=s3_endpoint)
    direct.create_bucket(Bucket=bucket)
    monkeypatch.setenv("POINTFLOW_STORAGE_URL", f"s3://{bucket}")
    # What the customer would see, looked at past the outage.
    outage.observer = S3Store(bucket, client=direct)
    yield outage
    outage.down()


class Attempts:
    """Every HTTP attempt botocore makes on a client: (monotonic time, operation)."""

    def __init__(self, client) -> None:
        self.log: list[tuple[float, str]] = []
        client.meta.events.register("before-send.s3.*", self._record)

    def _record(self, event_name: str, **_) -> None:
        self.log.append((time.monotonic(), event_name.rsplit(".", 1)[-1]))

    def since(self, moment: float) -> list[tuple[float, str]]:
        return [a for a in self.log if a[0] >= moment]


def test_a_short_s3_outage_is_ridden_out_by_backoff(s3_outage: TcpOutage, tmp_path: Path) -> None:
    store = S3Store(urlparse(os.environ["POINTFLOW_STORAGE_URL"]).netloc)
    attempts = Attempts(store.client)
    s3_outage.down()
    threading.Timer(0.2, s3_outage.up).start()
    started = time.monotonic()
    store.put_bytes("accounts/acme/reports/r.json", b"{}")
    tries = attempts.since(started)
    assert len(tries) >= 2 and tries[-1][0] - started >= 0.2
    assert s3_outage.observer.get_bytes("accounts/acme/reports/r.json") == b"{}"


def test_s3_down_mid_publish_fails_clearly_shows_nothing_and_the_rerun_publishes_once(
    s3_outage: TcpOutage, scene_path: Path
) -> None:
    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [make_account("acme")])
    job_id = "job-s3-outage"
    create_job(runtime, job_id, "acme", str(scene_path), "standard")
    for step in (ingest_step, validate_step, classify_step):
        step(runtime, job_id)

    attempts = Attempts(runtime.store.client)
    copies: list[float] = []

    def down_at_second_copy(**_) -> None:
        copies.append(time.monotonic())
        if len(copies) == 2:
            s3_outage.down()

    # Artifacts are staged, then copied into the export prefix: the endpoint dies between copies.
    runtime.store.client.meta.events.register("before-call.s3.CopyObject", down_at_second_copy)
    with pytest.raises(StorageError) as failure:
        export_step(runtime, job_id)
    failed_at = time.monotonic()
    message = str(failure.value)
    assert s3_outage.url in message and "Check that it is up" in message and "after 9 attempts" in message
    retried = attempts.since(copies[1])
    assert len(retried) == 9 and {operation for _, operation in retried} == {"CopyObject"}
    delays = [round(b[0] - a[0], 3) for a, b in pairwise(retried)]
    # Standard-mode backoff: attempt i waits rand * 50 ms * 2**i, so at most 12.75 s in all.
    assert failed_at - copies[1] < 12.75 + 5, delays

    # Nothing is visible: no manifest, no listing, no link, even for the artifact already copied.
    assert job_view(runtime, job_id).state == "classified"
    observer = s3_outage.observer
    assert manifests(observer, "acme") == [] and published_exports(observer, "acme") == []
    with pytest.raises(ExportNotReady):
        download_links(
            observer,
            LinkSigner.from_settings(runtime.settings),
            "acme",
            job_id,
            True,
            datetime.now(UTC) + timedelta(hours=1),
        )
    [copied] = [o.key for o in observer.list(f"accounts/acme/exports/{job_id}/")]
    with pytest.raises(ExportNotReady):
        artifact_link(
            observer,
            LinkSigner.from_settings(runtime.settings),
            "acme",
            copied,
            True,
            datetime.now(UTC) + timedelta(hours=1),
        )
    assert usage(runtime) == []

    # S3 is back: the retried task publishes once; metering twice bills once.
    s3_outage.up()
    export_step(runtime, job_id)
    deliver_step(runtime, job_id)
    meter_step(runtime, job_id)
    meter_step(runtime, job_id)
    job = job_view(runtime, job_id)
    assert job.state == "exported"
    [manifest_key] = manifests(observer, "acme")
    manifest = json.loads(observer.get_bytes(manifest_key))
    assert all(observer.sha256(a["key"]) == a["sha256"] for a in manifest["artifacts"])
    assert list(observer.list("accounts/acme/tmp/")) == []
    assert usage(runtime) == [(job_id, "succeeded", job.points_processed)]


# --- PostgreSQL: the catalog's server restarts mid-run -------------------------------------------


@pytest.fixture(scope="module")
def private_postgres():
    """A PostgreSQL server of this module's own, so it can be stopped and restarted."""
    reason = PrivatePostgres.available()
    if reason:
        pytest.skip(f"cannot run a private PostgreSQL server: {reason}")
    server = PrivatePostgres()
    server.start()
    yield server
    server.close()


@pytest.fixture
def catalog_on_private_postgres(
    private_postgres: PrivatePostgres, home: Path, monkeypatch: pytest.MonkeyPatch
) -> Runtime:
    from sqlalchemy import create_engine, text

    name = f"pointflow_{time.monotonic_ns() % 10**12}"
    admin = create_engine(private_postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    monkeypatch.setenv("POINTFLOW_DATABASE_URL", private_postgres.url.rsplit("/", 1)[0] + "/" + name)
    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [make_account("acme")])
    yield runtime
    runtime.catalog.dispose()


def server_started_at(runtime: Runtime):
    from sqlalchemy import text

    with runtime.catalog.engine.connect() as connection:
        return connection.execute(text("SELECT pg_postmaster_start_time()")).scalar_one()


@pytest.mark.postgres
def test_a_database_restart_between_tasks_is_invisible_to_the_run(
    catalog_on_private_postgres: Runtime, private_postgres: PrivatePostgres, scene_path: Path
) -> None:
    runtime = catalog_on_private_postgres
    create_job(runtime, "job-db-restart", "acme", str(scene_path), "standard")
    ingest_step(runtime, "job-db-restart")
    validate_step(runtime, "job-db-restart")
    before = server_started_at(runtime)
    pooled = runtime.catalog.engine.pool.checkedin()
    private_postgres.stop()
    private_postgres.start()
    # Every pooled connection died with the old server; pre-ping replaces them on checkout.
    assert pooled >= 1
    classify_step(runtime, "job-db-restart", workers=1)
    export_step(runtime, "job-db-restart")
    job = meter_step(runtime, "job-db-restart")
    assert server_started_at(runtime) > before
    assert job.state == "exported"
    assert len(manifests(runtime.store, "acme")) == 1
    assert usage(runtime) == [("job-db-restart", "succeeded", job.points_processed)]


@pytest.mark.postgres
@pytest.mark.slow
def test_the_database_down_while_classifying_fails_the_step_cleanly_and_the_retry_finishes(
    catalog_on_private_postgres: Runtime, private_postgres: PrivatePostgres, tiled, ign_quarter: Path
) -> None:
    from sqlalchemy.exc import OperationalError

    runtime = catalog_on_private_postgres
    job_id = "job-db-down"
    create_job(runtime, job_id, "acme", str(ign_quarter), "standard")
    ingest_step(runtime, job_id)
    validate_step(runtime, job_id)
    scratch = runtime.settings.scratch_dir
    stopped = threading.Event()

    def stop_once_classifying() -> None:
        # The tile folder appears once the step has recorded `classifying` and the scan has begun.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(scratch.glob("classify-*")):
            time.sleep(0.01)
        private_postgres.stop()
        stopped.set()

    watcher = threading.Thread(target=stop_once_classifying, daemon=True)
    watcher.start()
    try:
        with pytest.raises(OperationalError, match="Connection refused|could not connect|server closed"):
            classify_step(runtime, job_id, workers=2)
    finally:
        watcher.join()
        private_postgres.start()
    assert stopped.is_set()
    # The failed step recorded nothing past `classifying`; its scratch space is gone.
    job = job_view(runtime, job_id)
    assert job.state == "classifying" and job.classified_key is None
    assert list(scratch.glob("classify-*")) == [] and not (scratch / job_id).exists()
    assert usage(runtime) == []

    # The Airflow retry of classify, then the rest of the run.
    classify_step(runtime, job_id, workers=2)
    export_step(runtime, job_id)
    job = meter_step(runtime, job_id)
    assert job.state == "exported"
    assert len(manifests(runtime.store, "acme")) == 1
    assert usage(runtime) == [(job_id, "succeeded", job.points_processed)]


# --- SMTP: the mail server is down -------------------------------------------------------------
# tests/test_lifecycle.py::test_an_smtp_outage_delays_the_timeline_and_skips_no_notice walks the
# lifecycle clock through refused deliveries with the CLI; here the server is gone entirely
# (connection refused), for the nightly DAG and for a job's ready notice.


def test_smtp_down_for_a_night_the_nightly_dag_sends_the_notice_the_next_night(
    airflow_home: Path, smtp_sink, runtime: Runtime
) -> None:
    from dataclasses import replace
    from datetime import datetime

    from pipelines.airflow_local import load_dag
    from pipelines.lifecycle.models import LifecycleDeliveryFailure, LifecycleNotice

    dag = load_dag("lifecycle_nightly")
    upsert_accounts(
        runtime.catalog, [replace(make_account("sleepy", "free"), last_login_at=datetime(2026, 1, 10, 9, tzinfo=UTC))]
    )
    smtp_sink.controller.stop()
    first = dag.test(logical_date=datetime(2027, 1, 11, 3, tzinfo=UTC))
    # A mail server outage is not the rules' failure: the night completes and says what is owed.
    assert str(first.state) == "success"
    with runtime.catalog.session() as session:
        [failure] = session.scalars(select(LifecycleDeliveryFailure))
        assert failure.kind == "inactivity_notice" and f"127.0.0.1:{smtp_sink.port}" in failure.error
        assert session.scalars(select(LifecycleNotice)).all() == [] and session.scalars(select(SentMessage)).all() == []

    smtp_back_up(smtp_sink)
    second = dag.test(logical_date=datetime(2027, 1, 12, 3, tzinfo=UTC))
    assert str(second.state) == "success"
    [message] = smtp_sink.parsed()
    assert message["To"] == "ops@sleepy.example"
    with runtime.catalog.session() as session:
        [notice] = session.scalars(select(LifecycleNotice))
        # The closure clock starts from the night the notice really went out.
        assert notice.sent_at == datetime(2027, 1, 12, 3, tzinfo=UTC)
    dag.test(logical_date=datetime(2027, 1, 12, 3, tzinfo=UTC))
    assert len(smtp_sink.messages) == 1


def export_with_the_mail_server_down(runtime: Runtime, smtp_sink, account: str, source: Path, job_id: str) -> dict:
    """Run a job to its export, stop the mail server, fail the deliver step, then meter: the job as
    the meter task leaves it."""
    from pipelines.notify import DeliveryError

    assert runtime.settings.smtp_url == smtp_sink.url
    create_job(runtime, job_id, account, str(source), "standard")
    for step in (ingest_step, validate_step, classify_step, export_step):
        step(runtime, job_id)
    smtp_sink.controller.stop()
    with pytest.raises(DeliveryError, match=f"127.0.0.1:{smtp_sink.port}"):
        deliver_step(runtime, job_id)
    return meter_step(runtime, job_id)


def test_smtp_down_the_ready_notice_fails_alone_and_is_sent_once_when_delivery_reruns(
    smtp_sink, runtime: Runtime, account: str, scene_path: Path
) -> None:
    job_id = "job-smtp-down"
    # The meter task runs after export, whatever deliver does: exported, billed once.
    assert export_with_the_mail_server_down(runtime, smtp_sink, account, scene_path, job_id).state == "exported"
    assert usage(runtime) == [(job_id, "succeeded", job_view(runtime, job_id).points_processed)]

    smtp_back_up(smtp_sink)
    deliver_step(runtime, job_id)
    deliver_step(runtime, job_id)
    [message] = smtp_sink.parsed()
    assert message["Subject"] == "pointflow: your classified point cloud is ready"
    assert len(usage(runtime)) == 1


def test_smtp_down_past_the_task_retries_the_nightly_dag_sends_the_ready_notice_once(
    airflow_home: Path, smtp_sink, runtime: Runtime, account: str, scene_path: Path
) -> None:
    from pipelines.airflow_local import load_dag
    from pipelines.lifecycle.sweeps import UNSENT_SETTLE_TIME, deliver_unsent

    exported_at = export_with_the_mail_server_down(
        runtime, smtp_sink, account, scene_path, "job-smtp-night"
    ).finished_at
    dag = load_dag("lifecycle_nightly")

    # Still down at night: the night succeeds, nothing counts as sent.
    first = dag.test(logical_date=exported_at + timedelta(hours=3))
    assert str(first.state) == "success"
    smtp_back_up(smtp_sink)
    # While the run may still be retrying its deliver task, the sweep leaves the job alone.
    assert deliver_unsent(runtime, exported_at + UNSENT_SETTLE_TIME / 2).sent == []
    assert smtp_sink.messages == []

    second = dag.test(logical_date=exported_at + timedelta(days=1, hours=3))
    assert str(second.state) == "success"
    [message] = smtp_sink.parsed()
    assert (
        message["Subject"] == "pointflow: your classified point cloud is ready" and message["To"] == "ops@acme.example"
    )
    dag.test(logical_date=exported_at + timedelta(days=2, hours=3))
    assert len(smtp_sink.messages) == 1
    assert len(usage(runtime)) == 1


def test_smtp_down_the_cli_run_still_exports_and_says_the_e_mail_is_missing(
    smtp_sink, runtime: Runtime, account: str, scene_path: Path, capsys, caplog
) -> None:
    from pipelines.cli import main

    smtp_sink.controller.stop()
    assert main(["ingest", str(scene_path), "--account", account, "--run"]) == 0
    assert ": exported" in capsys.readouterr().out
    assert "the ready e-mail was not sent" in caplog.text and "Connection refused" in caplog.text
    [(job_id, status, _)] = usage(runtime)
    assert status == "succeeded" and job_view(runtime, job_id).state == "exported"
    smtp_back_up(smtp_sink)
