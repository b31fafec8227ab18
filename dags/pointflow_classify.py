"""Classify one customer file: ingest -> validate -> classify (tiled, on Dask) -> export -> meter -> deliver.

Trigger with conf {"account_id": "...", "source": "/path/or/s3://bucket/key.laz"}. Every task
derives the job id from the run, so retries resume the same job instead of starting another; the
ingest task creates the job. Each task runs one step of pipelines/steps/ and imports only it.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, TriggerRule, dag, task


def _run(step, register: dict | None = None, **options):
    """Run one step for this run's job. The first task passes the run's params as `register`: the
    job is created once, by it (a retry finds it)."""
    from airflow.sdk import get_current_context

    from pipelines.dag_tasks import run_task_step, task_runtime
    from pipelines.steps.record import job_id_for

    context = get_current_context()
    runtime = task_runtime()
    job_id = job_id_for(context["dag"].dag_id, context["run_id"])
    if register is not None:
        from pipelines.steps.ingest import create_job

        create_job(runtime, job_id, register["account_id"], register["source"], register["classifier"])
    return run_task_step(job_id, step, runtime, **options)


@dag(
    dag_id="pointflow_classify",
    schedule=None,
    catchup=False,
    # Triggered runs start at once on a fresh deployment (a paused DAG queues them for good).
    is_paused_upon_creation=False,
    tags=["pointflow"],
    default_args={"retries": 2, "retry_delay": timedelta(seconds=20)},
    params={
        "account_id": Param("demo", type="string", description="account that owns the file"),
        "source": Param("", type="string", description="local path, file:// or s3:// URI of a LAS/LAZ file"),
        "classifier": Param("standard", type="string", description="standard, ground, or a trained model id"),
        "export_format": Param("laz", enum=["laz", "las", "copc"], description="laz, las or copc (cloud-optimized)"),
    },
    doc_md=__doc__,
)
def pointflow_classify():
    @task
    def ingest(params: dict | None = None) -> None:
        from pipelines.steps.ingest import ingest_step

        _run(ingest_step, register=params)

    @task
    def validate() -> None:
        from pipelines.steps.validate import validate_step

        _run(validate_step)

    @task
    def classify() -> None:
        from pipelines.steps.classify import classify_step

        _run(classify_step)

    @task
    def export(params: dict | None = None) -> None:
        from pipelines.steps.export import export_step

        _run(export_step, export_format=params["export_format"])

    @task
    def deliver() -> None:
        from pipelines.steps.deliver import deliver_step

        _run(deliver_step)

    @task(trigger_rule=TriggerRule.ALL_DONE, retries=3)
    def meter() -> None:
        """Close the job and meter it once, whatever happened upstream; fail the run if it did not export."""
        from pipelines.dag_tasks import fail_unless_exported
        from pipelines.steps.meter import meter_step

        fail_unless_exported(_run(meter_step))

    # Metered before the ready e-mail: a customer is never told of a job that is not billed.
    ingest() >> validate() >> classify() >> export() >> meter() >> deliver()


classify_dag = pointflow_classify()
