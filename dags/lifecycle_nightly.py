"""Apply the data-lifecycle rules every night at 03:00 UTC, as of the run's logical date.

Runs exactly what `pointflow lifecycle run --as-of <logical date>` runs: notices, closure, trial
end, data lock, grace-period deletion, API result retention, overdue notices. Re-running a night
does nothing new; a deletion that leaves objects behind fails the task. Beside it, ready e-mails
that classification runs could not send (mail server down) are sent, once, and jobs whose run was
killed or lost are closed as failed and finished jobs left unmetered are metered
(`pointflow jobs close-stale`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import CronTriggerTimetable, dag, task


def _as_of() -> datetime:
    """The run's logical date in UTC; a manual run may have none: it then means "now", as the CLI does."""
    from airflow.sdk import get_current_context

    context = get_current_context()
    moment = context.get("logical_date") or context["dag_run"].run_after
    return datetime.fromisoformat(moment.isoformat()).astimezone(UTC)


@dag(
    dag_id="lifecycle_nightly",
    # A trigger timetable: the logical date is the firing time (03:00 UTC), which is the moment
    # the rules are applied at, whatever [scheduler] create_cron_data_intervals says.
    schedule=CronTriggerTimetable("0 3 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    # Notices, locks and deletions are due every night from the first one on.
    is_paused_upon_creation=False,
    max_active_runs=1,  # two runs at once would race for the same notices and deletions
    tags=["pointflow"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5)},
    doc_md=__doc__,
)
def lifecycle_nightly():
    @task
    def apply_rules() -> list[dict]:
        from pipelines.lifecycle import run_lifecycle
        from pipelines.runtime import Runtime
        from pipelines.settings import Settings

        actions = run_lifecycle(Runtime.from_settings(Settings.from_env()), _as_of())
        return [a.to_dict() for a in actions]

    @task
    def deliver_unsent() -> dict:
        """Ready e-mails the classification runs could not send (mail server down) go out now."""
        from pipelines.lifecycle.sweeps import deliver_unsent
        from pipelines.runtime import Runtime
        from pipelines.settings import Settings

        report = deliver_unsent(Runtime.from_settings(Settings.from_env()), _as_of())
        return {"sent": report.sent, "failed": report.failed, "skipped_locked": report.skipped_locked}

    @task
    def close_stale_jobs() -> dict:
        """Jobs without progress for POINTFLOW_STALE_JOB_HOURS are closed as failed, metered once, billed
        nothing; finished jobs whose run ended before its meter step are metered as their record says;
        working objects a legal hold kept go once it is released."""
        from pipelines.lifecycle.sweeps import close_stale_jobs
        from pipelines.runtime import Runtime
        from pipelines.settings import Settings

        report = close_stale_jobs(Runtime.from_settings(Settings.from_env()), _as_of())
        return {
            "closed": [job.job_id for job in report.closed],
            "metered": [job.job_id for job in report.metered],
            "removed": report.removed,
            "held": report.held,
        }

    apply_rules()
    deliver_unsent()
    close_stale_jobs()


lifecycle_dag = lifecycle_nightly()
