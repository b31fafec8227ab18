"""The job steps as the DAG runs them, in-process: local store and S3, good and bad input, retries."""

from __future__ import annotations

import json
from email import message_from_bytes, policy
from pathlib import Path

import laspy
import numpy as np
import pytest
from sqlalchemy import select

import pipelines.jobs
import pipelines.steps.deliver
from pipelines.accounts import UnknownAccountError
from pipelines.catalog.models import UsageEvent
from pipelines.jobs import run_job
from pipelines.notify import outbox_messages
from pipelines.runtime import Runtime
from pipelines.steps.classify import classify_step
from pipelines.steps.export import export_step
from pipelines.steps.ingest import create_job, ingest_step
from pipelines.steps.meter import meter_step
from pipelines.steps.record import JobRecord, ValidationFailed, job_view
from pipelines.steps.validate import validate_step
from pipelines.storage import file_sha256
from tests.conftest import shared_file


def usage_events(runtime: Runtime, account_id: str) -> list[UsageEvent]:
    with runtime.catalog.session() as session:
        return list(session.scalars(select(UsageEvent).where(UsageEvent.account_id == account_id)))


def objects(runtime: Runtime, prefix: str) -> list[str]:
    return sorted(o.key for o in runtime.store.list(prefix))


def check_exported(runtime: Runtime, job: dict, source: Path, tmp_path: Path) -> dict:
    assert job.state == "exported", job.error
    manifest = json.loads(runtime.store.get_bytes(job.export_prefix + "manifest.json"))
    assert manifest["input"]["sha256"] == file_sha256(source)
    artifact = manifest["artifacts"][0]
    local = tmp_path / "download.laz"
    runtime.store.get_file(artifact["key"], local)
    assert file_sha256(local) == artifact["sha256"]
    data = laspy.read(local)
    assert len(data) == manifest["points"]["input"] == manifest["points"]["output"]
    counts = {str(c): int(n) for c, n in zip(*np.unique(data.classification, return_counts=True))}
    assert counts == manifest["class_counts"]
    assert manifest["classifier"]["name"] == "standard" and manifest["classifier"]["version"]
    assert set(manifest["timings_s"]) == {"scan_s", "classify_s", "write_s"}
    return manifest


def test_job_runs_end_to_end_and_meters_once(
    runtime: Runtime, account: str, scene_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metered: list[str] = []

    def counted_meter_step(runtime: Runtime, job_id: str) -> JobRecord:
        metered.append(job_id)
        return meter_step(runtime, job_id)

    monkeypatch.setattr(pipelines.jobs, "meter_step", counted_meter_step)
    monkeypatch.setattr(pipelines.steps.deliver, "meter_step", counted_meter_step)
    job = run_job(runtime, account, str(scene_path), workers=2)
    # Metered once, by the run, before the ready e-mail: the deliver step does not meter it again.
    assert metered == [job.job_id]
    assert len(outbox_messages(runtime.settings)) == 1
    manifest = check_exported(runtime, job, scene_path, tmp_path)
    labels = laspy.read(scene_path).classification
    assert abs(manifest["class_counts"].get("2", 0) - int(np.sum(labels == 2))) < 0.05 * len(labels)
    events = usage_events(runtime, account)
    assert [(e.status, e.points, e.filename) for e in events] == [("succeeded", len(labels), "scene.laz")]


def test_retried_steps_do_not_redo_work_or_double_bill(
    runtime: Runtime, account: str, scene_path: Path, tmp_path: Path
) -> None:
    job = run_job(runtime, account, str(scene_path), job_id="job-retry", workers=2)
    before = {o.key: runtime.store.sha256(o.key) for o in runtime.store.list(f"accounts/{account}/")}
    ingest_step(runtime, "job-retry")
    validate_step(runtime, "job-retry")
    classify_step(runtime, "job-retry")
    export_step(runtime, "job-retry")
    meter_step(runtime, "job-retry")
    meter_step(runtime, "job-retry")
    after = {o.key: runtime.store.sha256(o.key) for o in runtime.store.list(f"accounts/{account}/")}
    assert before == after
    assert job_view(runtime, "job-retry").state == "exported"
    assert len(usage_events(runtime, account)) == 1
    assert job.finished_at == job_view(runtime, "job-retry").finished_at


def test_classification_interrupted_midway_is_redone_cleanly(
    runtime: Runtime, account: str, scene_path: Path, tmp_path: Path
) -> None:
    create_job(runtime, "job-crash", account, str(scene_path), "standard")
    ingest_step(runtime, "job-crash")
    validate_step(runtime, "job-crash")
    with runtime.catalog.session() as session:
        from pipelines.catalog.models import Job

        session.get(Job, "job-crash").state = "classifying"  # as left by a worker that died
    classify_step(runtime, "job-crash", workers=1)
    export_step(runtime, "job-crash")
    job = meter_step(runtime, "job-crash")
    check_exported(runtime, job, scene_path, tmp_path)


@pytest.mark.parametrize("kind", ["truncated_laz", "text_as_las"])
def test_bad_input_is_quarantined_with_report_and_notice(
    runtime: Runtime, account: str, tmp_path: Path, kind: str
) -> None:
    if kind == "truncated_laz":
        source = tmp_path / "survey.laz"
        source.write_bytes(shared_file("lidr_megaplot.laz").read_bytes()[:150_000])
        expected = "corrupt or truncated"
    else:
        source = tmp_path / "survey.las"
        source.write_text("x y z\n1 2 3\n")
        expected = "not a LAS/LAZ file"
    job = run_job(runtime, account, str(source))
    assert job.state == "quarantined" and expected in job.error
    assert objects(runtime, f"accounts/{account}/raw/") == []
    quarantined = objects(runtime, f"accounts/{account}/quarantine/")
    assert any(k.endswith("survey" + source.suffix) for k in quarantined) and any(
        k.endswith(".report.html") for k in quarantined
    )
    assert objects(runtime, f"accounts/{account}/exports/") == []
    assert objects(runtime, f"accounts/{account}/classified/") == []
    report = json.loads(runtime.store.get_bytes(job.report_key))
    assert report["ok"] is False and expected in report["reason"]
    [mail] = outbox_messages(runtime.settings)
    message = message_from_bytes(mail.read_bytes(), policy=policy.default)
    body = message.get_content()
    assert message["To"] == "ops@acme.example" and expected in body and "What to do" in body
    # The file is named once: the reason's own "<name>: " is not repeated after it.
    sentence = " ".join(body.split("\n\n")[1].split())
    assert sentence.startswith(f"we could not process {source.name}: ") and sentence.count(source.name) == 1, sentence
    assert not sentence.endswith(".."), sentence
    assert [(e.status, e.points) for e in usage_events(runtime, account)] == [("failed", 0)]
    with pytest.raises(ValidationFailed):
        validate_step(runtime, job.job_id)
    assert len(outbox_messages(runtime.settings)) == 1


def test_the_same_bad_file_again_is_refused_without_rework(runtime: Runtime, account: str, tmp_path: Path) -> None:
    source = tmp_path / "bad.las"
    source.write_text("nope")
    first = run_job(runtime, account, str(source))
    second = run_job(runtime, account, str(source))
    assert first.state == second.state == "quarantined"
    assert "refused before" in second.error


def test_unknown_account_is_a_clear_error(runtime: Runtime, scene_path: Path) -> None:
    with pytest.raises(UnknownAccountError, match="nobody"):
        run_job(runtime, "nobody", str(scene_path))


def test_job_on_s3_storage(
    home: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, scene_path: Path, tmp_path: Path
) -> None:
    from pipelines.accounts import upsert_accounts
    from pipelines.settings import Settings
    from tests.conftest import make_account

    monkeypatch.setenv("POINTFLOW_STORAGE_URL", f"s3://{s3_bucket}/service")
    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [make_account()])
    job = run_job(runtime, "acme", str(scene_path), workers=2)
    check_exported(runtime, job, scene_path, tmp_path)
    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert all(k.startswith("service/accounts/acme/") for k in keys)
    assert any(k.endswith("manifest.json") for k in keys)


def test_the_validation_log_line_says_where_the_report_is(
    runtime: Runtime, account: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "notes.las"
    source.write_text("not a point cloud")
    with caplog.at_level("INFO", logger="pipelines.steps.validate"):
        job = run_job(runtime, account, str(source))
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation of notes.las")]
    link = line.split("report: ", 1)[1]
    assert link.startswith("file://") and link.endswith(job.report_key.replace(".json", ".html"))
    assert Path(link[len("file://") :]).read_text().count("refused (quarantined)") == 1


def test_a_refused_quarantine_notice_is_sent_when_the_step_reruns(home: Path, smtp_sink, tmp_path: Path) -> None:
    from pipelines.accounts import upsert_accounts
    from pipelines.settings import Settings
    from tests.conftest import make_account

    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [make_account()])
    source = tmp_path / "bad.las"
    source.write_text("not a point cloud")
    smtp_sink.refusing = True
    job = run_job(runtime, "acme", str(source))
    assert job.state == "quarantined" and smtp_sink.messages == []
    smtp_sink.refusing = False
    for _ in range(2):
        with pytest.raises(ValidationFailed):
            validate_step(runtime, job.job_id)
    [message] = smtp_sink.parsed()
    assert message["To"] == "ops@acme.example" and "not a LAS/LAZ file" in message.get_content()


def test_the_job_record_has_every_catalog_column_in_order() -> None:
    """`jobs show --json` prints the record: one key per column of the jobs table, as before it was typed."""
    from dataclasses import fields

    from pipelines.catalog.models import Job
    from pipelines.steps.record import JobRecord

    assert [field.name for field in fields(JobRecord)] == [column.name for column in Job.__table__.columns]


def test_a_failed_step_records_its_cause_and_jobs_show_prints_it(
    catalog_runtime: Runtime, scene_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.cli import main
    from pipelines.steps import classify
    from pipelines.steps.record import run_step

    runtime = catalog_runtime
    create_job(runtime, "job-cause", "acme", str(scene_path), "standard")
    run_step(runtime, "job-cause", ingest_step)
    run_step(runtime, "job-cause", validate_step)

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(classify, "classify_file", broken)
    with pytest.raises(OSError):
        run_step(runtime, "job-cause", classify_step)
    job = meter_step(runtime, "job-cause")
    assert job.state == "failed" and job.error == "classify: OSError: No space left on device"
    assert main(["jobs", "show", "job-cause"]) == 0
    assert "cause:      classify: OSError: No space left on device" in capsys.readouterr().out
    assert main(["jobs", "list", "--account", "acme"]) == 0
    assert "job-cause" in capsys.readouterr().out
    create_job(runtime, "job-waiting", "acme", str(scene_path), "standard")
    assert main(["jobs", "list", "--state", "failed", "--json"]) == 0
    assert [job["job_id"] for job in json.loads(capsys.readouterr().out)] == ["job-cause"]
    assert main(["jobs", "list"]) == 0  # every account's
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["job-cause", "job-waiting"]
    assert main(["jobs", "list", "--account", "acme", "--state", "exported"]) == 0
    assert capsys.readouterr().out == "account acme has no jobs in state exported\n"


def test_stale_jobs_are_closed_once_as_failed_and_billed_nothing(catalog_runtime: Runtime, scene_path: Path) -> None:
    from datetime import timedelta

    from pipelines.catalog.models import utcnow
    from pipelines.lifecycle.sweeps import StaleReport, close_stale_jobs

    runtime = catalog_runtime
    create_job(runtime, "job-stale", "acme", str(scene_path), "standard")
    ingest_step(runtime, "job-stale")
    create_job(runtime, "job-fresh", "acme", str(scene_path), "standard")
    hours = runtime.settings.stale_job_hours
    # Not yet stale: nothing happens.
    assert close_stale_jobs(runtime, utcnow() + timedelta(hours=hours - 1)).closed == []
    closed = close_stale_jobs(runtime, utcnow() + timedelta(hours=hours, minutes=5)).closed
    assert sorted(j.job_id for j in closed) == ["job-fresh", "job-stale"]
    assert all(j.state == "failed" and "no progress since" in j.error and "nothing billed" in j.error for j in closed)
    assert sorted((e.job_id, e.status, e.points) for e in usage_events(runtime, "acme")) == [
        ("job-fresh", "failed", 0),
        ("job-stale", "failed", 0),
    ]
    # A second run, or the meter task of a DAG run coming back late, adds nothing.
    assert close_stale_jobs(runtime, utcnow() + timedelta(days=10)) == StaleReport([], [])
    meter_step(runtime, "job-stale")
    assert len(usage_events(runtime, "acme")) == 2
    assert outbox_messages(runtime.settings) == []


def test_points_the_validation_sample_missed_quarantine_the_file_while_classifying(
    runtime: Runtime, account: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation reads 20 windows of a large file; a bad point outside them is found by the scan."""
    import pipelines.validate as validate
    from tests.lasfiles import write_points

    source = write_points(tmp_path / "late-bad-point.las", n=5000)
    data = laspy.read(source)
    data.return_number[4990:] = 7  # past every sampled window
    data.number_of_returns[4990:] = 2
    data.write(source)
    monkeypatch.setattr(validate, "FULL_READ_MAX_POINTS", 1000)
    monkeypatch.setattr(validate, "SAMPLE_WINDOWS", 2)
    monkeypatch.setattr(validate, "SAMPLE_WINDOW_POINTS", 100)
    job = run_job(runtime, account, str(source), job_id="job-late")
    assert job.state == "quarantined" and "return number" in job.error
    assert objects(runtime, f"accounts/{account}/raw/") == [] and objects(runtime, f"accounts/{account}/exports/") == []
    assert any(k.endswith("late-bad-point.las") for k in objects(runtime, f"accounts/{account}/quarantine/"))
    report = json.loads(runtime.store.get_bytes(job.report_key))
    assert report["ok"] is False and "return number" in report["reason"]
    [mail] = outbox_messages(runtime.settings)
    assert "return number" in message_from_bytes(mail.read_bytes(), policy=policy.default).get_content()
    assert [(e.status, e.points) for e in usage_events(runtime, account)] == [("failed", 0)]


def test_usage_and_export_carry_the_jobs_own_file_name_and_a_failed_job_its_classifier_version(
    runtime: Runtime, account: str, tmp_path: Path
) -> None:
    import shutil

    from pipelines.classifiers import describe_classifier

    first = tmp_path / "samp11.las"
    shutil.copyfile(shared_file("isprs/samp11.las"), first)
    copy = tmp_path / "copyA.las"
    shutil.copyfile(first, copy)
    run_job(runtime, account, str(first), job_id="job-first")
    job = run_job(runtime, account, str(copy), job_id="job-copy")  # the same bytes, stored once
    assert job.state == "exported", job.error
    events = {e.job_id: e for e in usage_events(runtime, account)}
    assert events["job-copy"].filename == "copyA.las" and events["job-first"].filename == "samp11.las"
    names = objects(runtime, job.export_prefix)
    assert any(n.endswith("/copyA.laz") for n in names) and not any("samp11" in n for n in names)
    manifest = json.loads(runtime.store.get_bytes(job.export_prefix + "manifest.json"))
    assert manifest["input"]["name"] == "copyA.las"

    # A job that fails before classifying still records the classifier's version.
    create_job(runtime, "job-failed", account, str(copy), "standard")
    ingest_step(runtime, "job-failed")
    meter_step(runtime, "job-failed")
    failed = {e.job_id: e for e in usage_events(runtime, account)}["job-failed"]
    assert failed.status == "failed" and failed.filename == "copyA.las"
    assert failed.classifier_version == describe_classifier("standard").version
