"""What an Airflow task of the classification DAGs does with a job step: run it in a runtime from
the environment, fail the task for good (no retries) when the input was refused, and fail the run
when the metered job did not export. Airflow is imported only when a task runs this."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipelines.steps.record import AdmissionRefusedJob, JobAborted, JobRecord, ValidationFailed, run_step


def task_runtime():
    from pipelines.runtime import Runtime
    from pipelines.settings import Settings

    return Runtime.from_settings(Settings.from_env())


def run_task_step(job_id: str, step: Callable[..., JobRecord], runtime=None, **options: Any) -> JobRecord:
    """Run one step for the job; a refused input or an aborted job fails the task at once, without retries."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        return run_step(runtime or task_runtime(), job_id, step, **options)
    except (AdmissionRefusedJob, ValidationFailed, JobAborted) as refused:
        raise AirflowFailException(str(refused)) from None


def fail_unless_exported(job: JobRecord) -> None:
    """The meter task's verdict: the run fails when its job ended without an export."""
    from airflow.sdk.exceptions import AirflowFailException

    if job.state != "exported":
        raise AirflowFailException(f"job {job.job_id} ended {job.state}: {job.error}")
