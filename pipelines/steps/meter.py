"""The meter step: close the job and record its one usage event, whatever happened upstream."""

from __future__ import annotations

from pipelines.catalog.models import TERMINAL_JOB_STATES, Job, JobState, utcnow
from pipelines.errors import PointflowError
from pipelines.metering import UsageRecord, write_usage
from pipelines.runtime import Runtime
from pipelines.steps.record import JobRecord, job_file_name, job_row, job_view, set_state


def meter_step(runtime: Runtime, job_id: str) -> JobRecord:
    """Close the job and meter it exactly once, whatever happened upstream."""
    with runtime.catalog.session() as session:
        job = job_row(session, job_id)
        state = JobState(job.state)
        if state not in TERMINAL_JOB_STATES:
            job.error = job.error or f"pipeline stopped while {state.value}"
            set_state(job, JobState.FAILED)
        # A job already metered keeps its one event: it may since have been deleted at the end of
        # the usage records' retention, and must not come back as new usage. The mark and the
        # event commit together: the sweep meters exactly the jobs without it.
        if job.metered_at is None:
            write_usage(session, [_event(job)])
            job.metered_at = utcnow()
    return job_view(runtime, job_id)


def _event(job: Job) -> UsageRecord:
    status = (
        "succeeded"
        if job.state == JobState.EXPORTED.value
        else "aborted"
        if job.state == JobState.ABORTED.value
        else "failed"
    )
    return UsageRecord(
        event_id=f"{job.job_id}:classification",
        account_id=job.account_id,
        kind="classification",
        occurred_at=job.finished_at,
        points=job.points_processed,
        status=status,
        classifier=job.classifier,
        classifier_version=job.classifier_version or _known_version(job.classifier),
        filename=job_file_name(job.source) or None,
        job_id=job.job_id,
    )


def _known_version(classifier: str) -> str | None:
    """A built-in classifier's version, known before it ran (a job that failed earlier); None for
    a name that is not a built-in one (a trained model records its version when it classifies)."""
    from pipelines.classifiers import describe_classifier

    try:
        return describe_classifier(classifier).version
    except PointflowError:
        return None
