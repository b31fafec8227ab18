"""The meter step: close the job and record its one usage event, whatever happened upstream."""

from __future__ import annotations

from pipelines.catalog.models import TERMINAL_JOB_STATES, JobState, StoredFile
from pipelines.metering import UsageRecord, record_usage
from pipelines.runtime import Runtime
from pipelines.steps.record import JobRecord, job_row, job_view, set_state


def meter_step(runtime: Runtime, job_id: str) -> JobRecord:
    """Close the job and meter it exactly once, whatever happened upstream."""
    with runtime.catalog.session() as session:
        job = job_row(session, job_id)
        state = JobState(job.state)
        if state not in TERMINAL_JOB_STATES:
            job.error = job.error or f"pipeline stopped while {state.value}"
            set_state(job, JobState.FAILED)
        stored = session.get(StoredFile, job.file_id) if job.file_id else None
        status = (
            "succeeded"
            if job.state == JobState.EXPORTED.value
            else "aborted"
            if job.state == JobState.ABORTED.value
            else "failed"
        )
        event = UsageRecord(
            event_id=f"{job_id}:classification",
            account_id=job.account_id,
            kind="classification",
            occurred_at=job.finished_at,
            points=job.points_processed,
            status=status,
            classifier=job.classifier,
            classifier_version=job.classifier_version,
            filename=stored.original_name if stored else None,
            job_id=job_id,
        )
    record_usage(runtime.catalog, [event])
    return job_view(runtime, job_id)
