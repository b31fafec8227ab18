"""Invoice last month: invoice -> publish (JSON, CSV, HTML per invoice) -> email -> usage_daily.

Runs at 02:00 UTC on the 1st and invoices the calendar month before the run's logical date; a
manual run can name the month with the `period` param. An account added since an earlier month's
run, with a start in it, gets that month's invoice too, published and mailed with this month's.
Every task is safe to repeat: each account is invoiced once per month, documents are written once,
each invoice is mailed once (a retry after a refused e-mail sends only the missing ones), and the
usage report is rebuilt.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime, timedelta

from airflow.sdk import CronTriggerTimetable, Param, dag, task


def _billing():
    """This run's month (the `period` param, else the month before the logical date), opened."""
    from airflow.sdk import get_current_context

    from pipelines.billing.delivery import MonthlyBilling
    from pipelines.billing.periods import period_for
    from pipelines.settings import Settings

    context = get_current_context()
    # An Airflow 3 manual run may have no logical date: it invoices the month before it runs.
    when = context.get("logical_date") or context["dag_run"].run_after
    return MonthlyBilling.open(Settings.from_env(), context["params"]["period"] or period_for(when))


@dag(
    dag_id="billing_monthly",
    # A trigger timetable, not the bare cron string: its logical date is the firing time (the 1st,
    # 02:00 UTC) whatever [scheduler] create_cron_data_intervals says, so "the month before the
    # logical date" is always the month that has just ended.
    schedule=CronTriggerTimetable("0 2 1 * *", timezone="UTC"),
    # The first scheduled run (2026-10-01) invoices September 2026.
    start_date=datetime(2026, 10, 1, tzinfo=UTC),
    # Missed months are invoiced one at a time, oldest first: a month's late fees and carried
    # credit depend on the invoices of the months before it (hence also depends_on_past below).
    catchup=True,
    # Paused on creation, unlike the other service DAGs: unpaused, it invoices every month since
    # start_date at once, which only the operator can say is wanted (README, Quick start).
    is_paused_upon_creation=True,
    max_active_runs=1,
    tags=["pointflow", "billing"],
    # Retries are for the mail server and the object store coming back.
    default_args={"retries": 3, "retry_delay": timedelta(minutes=10)},
    params={
        "period": Param(
            "",
            type="string",
            pattern=r"^(\d{4}-(0[1-9]|1[0-2]))?$",
            description="YYYY-MM to invoice; empty: the month before the logical date",
        ),
    },
    doc_md=__doc__,
)
def billing_monthly():
    @task(depends_on_past=True)
    def invoice() -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from pipelines.billing.invoicing import BillingError, run_billing

        billing = _billing()
        try:
            result = run_billing(billing.catalog, billing.period, billing.pricebook)
        except BillingError as refused:
            # A month that has not ended yet: retrying cannot help.
            raise AirflowFailException(str(refused)) from None
        return {"period": result.period, "created": result.created, "issued": list(result.issued)}

    @task
    def publish() -> dict:
        from pipelines.billing.delivery import publish_documents

        return asdict(publish_documents(_billing()))

    @task
    def email() -> dict:
        from pipelines.billing.delivery import email_invoices

        return asdict(email_invoices(_billing()))

    @task
    def usage_daily() -> dict:
        from pipelines.billing.delivery import publish_usage_daily

        return publish_usage_daily(_billing())

    invoice() >> publish() >> email() >> usage_daily()


billing_dag = billing_monthly()
