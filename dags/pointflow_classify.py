"""Classify one customer file: ingest -> validate -> classify (tiled, on Dask) -> export -> meter.

Trigger with conf {"account_id": "...", "source": "/path/or/s3://bucket/key.laz"}. Every task
derives the job id from the run, so retries resume the same job instead of starting another.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, TriggerRule, dag, task


def _job():
    """The runtime and this run's job id (creating the job record the first time)."""
    from airflow.sdk import get_current_context

    from pipelines.jobs import Runtime, create_job, job_id_for
    from pipelines.settings import Settings

    context = get_current_context()
    params = context["params"]
    runtime = Runtime.from_settings(Settings.from_env())
    job_id = job_id_for(context["dag"].dag_id, context["run_id"])
    create_job(runtime, job_id, params["account_id"], params["source"], params["classifier"])
    return runtime, job_id


@dag(
    dag_id="pointflow_classify",
    schedule=None,
    catchup=False,
    tags=["pointflow"],
    default_args={"retries": 2, "retry_delay": timedelta(seconds=20)},
    params={
        "account_id": Param("demo", type="string", description="account that owns the file"),
        "source": Param("", type="string", description="local path, file:// or s3:// URI of a LAS/LAZ file"),
        "classifier": Param("standard", type="string", description="standard, ground, or a trained model id"),
    },
    doc_md=__doc__,
)
def pointflow_classify():
    @task
    def ingest() -> None:
        from pipelines.jobs import ingest_step

        ingest_step(*_job())

    @task
    def validate() -> None:
        from airflow.sdk.exceptions import AirflowFailException

        from pipelines.jobs import ValidationFailed, validate_step

        try:
            validate_step(*_job())
        except ValidationFailed as refused:
            # Retrying cannot fix the file: fail now, with the reason, and let meter close the job.
            raise AirflowFailException(f"{refused} (report: {refused.report_key})") from None

    @task
    def classify() -> None:
        from pipelines.jobs import classify_step

        classify_step(*_job())

    @task
    def export() -> None:
        from pipelines.jobs import export_step

        export_step(*_job())

    @task(trigger_rule=TriggerRule.ALL_DONE, retries=3)
    def meter() -> None:
        from airflow.sdk.exceptions import AirflowFailException

        from pipelines.jobs import finish_step

        job = finish_step(*_job())
        if job["state"] != "exported":
            raise AirflowFailException(f"job {job['job_id']} ended {job['state']}: {job['error']}")

    ingest() >> validate() >> classify() >> export() >> meter()


classify_dag = pointflow_classify()
