"""The nightly job sweeps (`close_stale_jobs`) on SQLite and PostgreSQL: every finished job is
metered once however old, and a failed job's working objects kept under a legal hold go once it
is released."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select

from pipelines.catalog.models import Job, JobState, UsageEvent, utcnow
from pipelines.lifecycle.models import DeletionAudit
from pipelines.lifecycle.operations import place_hold, release_holds
from pipelines.lifecycle.sweeps import FAILED_JOB_RULE, close_stale_jobs
from pipelines.runtime import Runtime
from pipelines.steps.meter import meter_step


def add_job(runtime: Runtime, job_id: str, state: JobState, finished_at: datetime | None, points: int = 0) -> None:
    with runtime.catalog.session() as session:
        session.add(
            Job(
                job_id=job_id,
                account_id="acme",
                source=f"/data/{job_id}.laz",
                classifier="standard",
                classifier_version="1",
                state=state.value,
                points_processed=points,
                finished_at=finished_at,
            )
        )


def events(runtime: Runtime, job_id: str) -> list[UsageEvent]:
    with runtime.catalog.session() as session:
        found = list(session.scalars(select(UsageEvent).where(UsageEvent.job_id == job_id)))
        session.expunge_all()
        return found


def test_a_job_finished_long_ago_without_a_usage_event_is_metered_once_with_its_true_timestamps(
    catalog_runtime: Runtime,
) -> None:
    runtime = catalog_runtime
    now = utcnow()
    finished = now - timedelta(days=400)
    add_job(runtime, "job-old", JobState.EXPORTED, finished, points=1234)
    add_job(runtime, "job-recent", JobState.FAILED, now - timedelta(days=2), points=7)

    report = close_stale_jobs(runtime, now)
    assert sorted(j.job_id for j in report.metered) == ["job-old", "job-recent"]
    [event] = events(runtime, "job-old")
    # Recorded now, as happening when the job finished: billing sees it as usage received late.
    assert (event.status, event.points, event.occurred_at) == ("succeeded", 1234, finished)
    assert event.recorded_at >= now - timedelta(minutes=1)
    assert close_stale_jobs(runtime, now + timedelta(days=1)).metered == []

    # Usage records are deleted after their retention (usage_retention_years): a job whose event is
    # gone is not metered, and so billed, again.
    with runtime.catalog.session() as session:
        session.execute(delete(UsageEvent).where(UsageEvent.job_id == "job-old"))
    assert close_stale_jobs(runtime, now + timedelta(days=2)).metered == []
    meter_step(runtime, "job-old")  # a meter task run again, a ready e-mail retried
    assert events(runtime, "job-old") == []


def test_the_sweep_finds_unmetered_jobs_through_an_index(catalog_runtime: Runtime) -> None:
    """The nightly query reads the few jobs not metered yet, not every job ever run."""
    from sqlalchemy import inspect

    with catalog_runtime.catalog.engine.connect() as connection:
        indexes = {i["name"]: i for i in inspect(connection).get_indexes("jobs")}
    assert "ix_jobs_unmetered" in indexes


def working_objects(runtime: Runtime, job_id: str) -> list[str]:
    area = "accounts/acme/"
    keys = [
        f"{area}classified/{job_id}/out.laz",
        f"{area}exports/{job_id}/out.laz",
        f"{area}tmp/exports/{job_id}/a.laz",
    ]
    for key in keys:
        runtime.store.put_bytes(key, b"p" * 10)
    return sorted(keys)


def test_a_job_closed_under_legal_hold_loses_its_working_objects_the_first_night_after_the_release(
    catalog_runtime: Runtime,
) -> None:
    runtime = catalog_runtime
    keys = working_objects(runtime, "job-killed")
    add_job(runtime, "job-killed", JobState.CLASSIFIED, None, points=50)
    place_hold(runtime.catalog, "acme", "case 2027-1")
    night = utcnow() + timedelta(hours=runtime.settings.stale_job_hours, minutes=1)

    report = close_stale_jobs(runtime, night)
    assert [j.job_id for j in report.closed] == ["job-killed"] and report.held == ["job-killed"]
    assert all(runtime.store.exists(k) for k in keys)
    # Still held the next night: kept, and nothing audited.
    assert close_stale_jobs(runtime, night + timedelta(days=1)).removed == {}
    assert all(runtime.store.exists(k) for k in keys)

    release_holds(runtime.catalog, "acme")
    after = close_stale_jobs(runtime, night + timedelta(days=2))
    assert after.closed == [] and sorted(after.removed["job-killed"]) == keys
    assert not any(runtime.store.exists(k) for k in keys)
    with runtime.catalog.session() as session:
        [audit] = session.scalars(select(DeletionAudit).where(DeletionAudit.rule == FAILED_JOB_RULE))
        assert (audit.status, audit.subject) == ("completed", "job job-killed")
        assert sorted(o["key"] for o in audit.objects) == keys
    # Done once: the next night finds nothing more to do.
    assert close_stale_jobs(runtime, night + timedelta(days=3)).removed == {}
    with runtime.catalog.session() as session:
        assert len(list(session.scalars(select(DeletionAudit)))) == 1


def test_the_migration_marks_the_jobs_metered_before_it(catalog_runtime: Runtime, database_url: str) -> None:
    from alembic import command

    from pipelines.catalog.db import alembic_config

    runtime = catalog_runtime
    now = utcnow()
    add_job(runtime, "job-metered", JobState.EXPORTED, now - timedelta(days=200), points=5)
    meter_step(runtime, "job-metered")
    add_job(runtime, "job-lost", JobState.EXPORTED, now - timedelta(days=200), points=9)
    # Closed under a legal hold by the sweep of before the marks, which said so in its error only.
    keys = working_objects(runtime, "job-held")
    add_job(runtime, "job-held", JobState.FAILED, now - timedelta(days=30))
    meter_step(runtime, "job-held")
    with runtime.catalog.session() as session:
        session.get(
            Job, "job-held"
        ).error = "no progress since ...: closed after 6 h, nothing billed; its working objects are kept: the account is on legal hold"
    with runtime.catalog.engine.begin() as connection:  # as a catalog of before the marks
        config = alembic_config(database_url)
        config.attributes["connection"] = connection
        command.downgrade(config, "0020")
        command.upgrade(config, "head")
    with runtime.catalog.session() as session:
        event = session.get(UsageEvent, "job-metered:classification")
        assert session.get(Job, "job-metered").metered_at == event.recorded_at
        assert session.get(Job, "job-lost").metered_at is None
        assert session.get(Job, "job-held").working_objects_held_at is not None
    report = close_stale_jobs(runtime, now)
    assert [j.job_id for j in report.metered] == ["job-lost"]
    assert sorted(report.removed["job-held"]) == keys
    assert [(e.points, e.status) for e in events(runtime, "job-lost")] == [(9, "succeeded")]
