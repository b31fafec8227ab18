"""The drop zone: every minute, each new file in incoming/<account>/ becomes one classification job.

`sweep` registers a job per new complete file version (what `pointflow intake run` does; see
pipelines.intake), then each job runs as its own mapped group of the classification steps, retried
and metered like a `pointflow_classify` run. A sensing DAG rather than an asset watcher: Airflow's
watchers need an event trigger (a message queue; nothing watches an S3 prefix or a folder), events
arriving together can start one run for several files, and an event lost while the triggerer is down
is a file never classified. A sweep re-reads the drop zones, the source of truth, every minute, and
the catalog's claims make overlapping runs and retried sweeps register each file version once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import TriggerRule, dag, task, task_group


@dag(
    dag_id="pointflow_intake",
    schedule=timedelta(minutes=1),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    # A long classification must not hold back files dropped meanwhile; the claims keep
    # overlapping runs from registering a file twice.
    max_active_runs=4,
    is_paused_upon_creation=False,
    tags=["pointflow"],
    default_args={"retries": 2, "retry_delay": timedelta(seconds=20)},
    doc_md=__doc__,
)
def pointflow_intake():
    @task
    def sweep() -> list[str]:
        """Register the new files' jobs; a retry (same run) hands on the jobs it registered before."""
        from airflow.sdk import get_current_context

        from pipelines.dag_tasks import task_runtime
        from pipelines.intake import IntakeError, sweep

        context = get_current_context()
        result = sweep(task_runtime(), owner=f"{context['dag'].dag_id}:{context['run_id']}")
        if result.errors:
            # The registered jobs run once the retry (same owner) hands them on with the rest.
            raise IntakeError(
                f"{len(result.errors)} file(s) not registered: "
                + "; ".join(f"{k}: {v}" for k, v in result.errors.items())
            )
        return result.job_ids

    @task_group
    def classify_file(job_id: str):
        @task
        def validate(job_id: str) -> None:
            from pipelines.dag_tasks import run_task_step
            from pipelines.steps.validate import validate_step

            run_task_step(job_id, validate_step)

        @task
        def classify(job_id: str) -> None:
            from pipelines.dag_tasks import run_task_step
            from pipelines.steps.classify import classify_step

            run_task_step(job_id, classify_step)

        @task
        def export(job_id: str) -> None:
            from pipelines.dag_tasks import run_task_step
            from pipelines.steps.export import export_step

            run_task_step(job_id, export_step)

        @task
        def deliver(job_id: str) -> None:
            from pipelines.dag_tasks import run_task_step
            from pipelines.steps.deliver import deliver_step

            run_task_step(job_id, deliver_step)

        @task(trigger_rule=TriggerRule.ALL_DONE, retries=3)
        def meter(job_id: str) -> None:
            """Close the job and meter it once, whatever happened upstream."""
            from pipelines.dag_tasks import fail_unless_exported, run_task_step
            from pipelines.steps.meter import meter_step

            fail_unless_exported(run_task_step(job_id, meter_step))

        # Metered before the ready e-mail, as in pointflow_classify: the job is metered once, by meter.
        validate(job_id) >> classify(job_id) >> export(job_id) >> meter(job_id) >> deliver(job_id)

    classify_file.expand(job_id=sweep())


intake_dag = pointflow_intake()
