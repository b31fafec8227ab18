"""The monthly billing DAG, run for real with dag.test(): invoices, documents in the object store
(local and S3), e-mail over a real SMTP server on loopback, re-runs, retries and catchup.

The scenario is tests/data/billing (see tests/test_billing_cli.py for the figures checked by
hand): September 2026 gives acme, geo and lidar one invoice each, hobby (free) none.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import urlopen

import pytest
from sqlalchemy import func, select

from pipelines.billing.corrections import list_invoices
from pipelines.billing.models import BillingRun
from pipelines.billing.periods import Period, period_for
from pipelines.catalog import Catalog
from pipelines.catalog.models import Account, SentMessage
from pipelines.cli import main
from pipelines.settings import Settings
from pipelines.storage import ObjectStore, open_store
from tests.test_billing_support import bill_on_time, check_einvoices

DATA = Path(__file__).parent / "data" / "billing"
POINTFLOW = str(Path(sys.executable).with_name("pointflow"))
DAG_ID = "billing_monthly"
# The logical dates of the scheduled runs that invoice September and October 2026.
SEPTEMBER_RUN = datetime(2026, 10, 1, 2, tzinfo=UTC)
OCTOBER_RUN = datetime(2026, 11, 1, 2, tzinfo=UTC)
SEPTEMBER = ["PF-2026-09-0001", "PF-2026-09-0002", "PF-2026-09-0003"]
RECIPIENTS = ["billing@acme.example", "ap@geo.example", "compta@lidar.example"]


@pytest.fixture
def billing_dag(load_test_dag, monkeypatch: pytest.MonkeyPatch):
    # The runs these tests make stand for scheduled runs that fired on time, at their logical date
    # (02:00 UTC on the 1st): their invoices are dated that 1st, whatever day the test runs.
    bill_on_time(monkeypatch, "pipelines.billing.invoicing.run_billing")
    return load_test_dag(DAG_ID)


@pytest.fixture
def scenario(home: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """The accounts and the usage of tests/data/billing in this test's POINTFLOW_HOME; afterwards,
    every invoice the runs left must make a valid e-invoice, as in the other billing tests."""
    cli(capsys, "accounts", "import", str(DATA / "accounts.csv"))
    cli(capsys, "usage", "import", str(DATA / "usage.jsonl"))
    yield
    own = catalog()
    try:
        check_einvoices(own)
    finally:
        own.dispose()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def run(dag, logical_date: datetime, **conf: str):
    return dag.test(logical_date=logical_date, run_conf=conf)


def task_states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def tries(dag_run, task_id: str) -> int:
    [ti] = [ti for ti in dag_run.get_task_instances() if ti.task_id == task_id]
    return ti.try_number


def store() -> ObjectStore:
    return open_store(Settings.from_env().storage_url)


def objects(store: ObjectStore) -> dict[str, bytes]:
    return {info.key: store.get_bytes(info.key) for info in store.list("")}


def catalog() -> Catalog:
    return Catalog(Settings.from_env().database_url)


def expected(period: str) -> list[dict]:
    return json.loads((DATA / f"expected-{period}.json").read_text())


def document_keys(account_id: str, number: str) -> dict[str, str]:
    return {fmt: f"accounts/{account_id}/invoices/{number}.{fmt}" for fmt in ("json", "csv", "html")}


def month_keys(period: str) -> set[str]:
    documents = {key for i in expected(period) for key in document_keys(i["account_id"], i["invoice_number"]).values()}
    return documents | {f"service/usage_daily/{period}.json", f"service/usage_daily/{period}.csv"}


def links(body: str) -> dict[str, str]:
    """The document links of an invoice e-mail, by format (file:// locally, presigned https on S3)."""
    urls = re.findall(r"(?:file|https?)://\S+", body)
    return {Path(urlparse(url).path).suffix.lstrip("."): url for url in urls}


def sent_count() -> int:
    with catalog().session() as session:
        return session.scalar(select(func.count()).select_from(SentMessage))


# --- which month a run invoices ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("logical_date", "period"),
    [
        (datetime(2026, 10, 1, 2, tzinfo=UTC), "2026-09"),
        (datetime(2026, 1, 1, 2, tzinfo=UTC), "2025-12"),
        (datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC), "2026-02"),
        # 01:30 on April 1st in UTC, although it is still March 31st where the clock says 23:30.
        (datetime(2026, 3, 31, 23, 30, tzinfo=timezone(timedelta(hours=-2))), "2026-03"),
    ],
)
def test_period_is_the_month_before_the_logical_date_in_utc(logical_date: datetime, period: str) -> None:
    assert period_for(logical_date) == period


def test_period_needs_an_aware_logical_date() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        period_for(datetime(2026, 10, 1, 2))


def test_scheduled_runs_invoice_the_month_that_has_just_ended(billing_dag) -> None:
    """Asks the DAG's own timetable, as the scheduler would, for its first two runs."""
    from airflow.serialization.encoders import coerce_to_core_timetable
    from airflow.timetables.base import TimeRestriction

    timetable = coerce_to_core_timetable(billing_dag.timetable)
    restriction = TimeRestriction(earliest=billing_dag.start_date, latest=None, catchup=True)
    first = timetable.next_dagrun_info(last_automated_data_interval=None, restriction=restriction)
    second = timetable.next_dagrun_info(last_automated_data_interval=first.data_interval, restriction=restriction)
    assert (first.logical_date, second.logical_date) == (SEPTEMBER_RUN, OCTOBER_RUN)
    assert (first.run_after, second.run_after) == (SEPTEMBER_RUN, OCTOBER_RUN)
    assert [period_for(first.logical_date), period_for(second.logical_date)] == ["2026-09", "2026-10"]


def test_dag_is_a_thin_table_of_contents(billing_dag) -> None:
    assert [t.task_id for t in billing_dag.topological_sort()] == ["invoice", "publish", "email", "usage_daily"]
    # Catchup invoices one month at a time, and not past a month whose invoicing failed.
    assert billing_dag.catchup and billing_dag.max_active_runs == 1
    assert billing_dag.get_task("invoice").depends_on_past
    assert len((Path(billing_dag.fileloc)).read_text().splitlines()) < 100


# --- one month end to end ------------------------------------------------------------------------


def test_month_is_invoiced_published_and_mailed(billing_dag, scenario, smtp_sink) -> None:
    dag_run = run(billing_dag, SEPTEMBER_RUN)
    assert str(dag_run.state) == "success", task_states(dag_run)

    september = expected("2026-09")
    # The command in a process of its own: after dag.test() Airflow's logging shares this stdout.
    command = subprocess.run(
        [POINTFLOW, "billing", "run", "--period", "2026-09", "--json"], capture_output=True, text=True, check=True
    )
    assert json.loads(command.stdout) == september
    objects_store = store()
    assert {info.key for info in objects_store.list("")} == month_keys("2026-09")
    for invoice in september:
        keys = document_keys(invoice["account_id"], invoice["invoice_number"])
        assert json.loads(objects_store.get_bytes(keys["json"])) == invoice
        rows = list(csv.DictReader(io.StringIO(objects_store.get_bytes(keys["csv"]).decode())))
        assert [
            (r["invoice_number"], r["kind"], r["description"], r["quantity"], r["unit_price"], r["amount"])
            for r in rows
        ] == [
            (
                invoice["invoice_number"],
                line["kind"],
                line["description"],
                line["quantity"],
                line["unit_price"],
                line["amount"],
            )
            for line in invoice["lines"]
        ]
        html = objects_store.get_bytes(keys["html"]).decode()
        assert f"<h1>Invoice {invoice['invoice_number']}</h1>" in html
        assert f"Subtotal</td><td class=n>{invoice['subtotal']}</td>" in html
        assert f"Total EUR</td><td class=n>{invoice['total']}</td>" in html

    messages = smtp_sink.parsed()
    assert [(m["To"], m["Subject"]) for m in messages] == [
        ("billing@acme.example", "Invoice PF-2026-09-0001 for 2026-09: EUR 62.83"),
        ("ap@geo.example", "Invoice PF-2026-09-0002 for 2026-09: EUR 79.20"),
        ("compta@lidar.example", "Invoice PF-2026-09-0003 for 2026-09: EUR 74.08"),
    ]
    for message, invoice in zip(messages, september, strict=True):
        body = message.get_body(("plain",)).get_content()
        assert f"{invoice['subtotal']}  Subtotal" in body and f"{invoice['tax']}  Tax" in body
        assert f"Please pay EUR {invoice['total']} by 2026-10-31." in body
        document_links = links(body)
        keys = document_keys(invoice["account_id"], invoice["invoice_number"])
        assert set(document_links) == set(keys)
        for fmt, url in document_links.items():
            with urlopen(url) as response:
                assert response.read() == objects_store.get_bytes(keys[fmt])
    assert sent_count() == 3

    usage = json.loads(objects_store.get_bytes("service/usage_daily/2026-09.json"))
    assert usage == {
        "period": "2026-09",
        "days": [
            {"account_id": "hobby", "day": "2026-09-20", "jobs": 1, "billable_points": 1000000, "failed_points": 0},
            {"account_id": "lidar", "day": "2026-09-10", "jobs": 1, "billable_points": 120000000, "failed_points": 0},
            {"account_id": "lidar", "day": "2026-09-12", "jobs": 1, "billable_points": 0, "failed_points": 50000000},
            {"account_id": "lidar", "day": "2026-09-30", "jobs": 1, "billable_points": 3456789, "failed_points": 0},
        ],
    }
    usage_csv = list(csv.DictReader(io.StringIO(objects_store.get_bytes("service/usage_daily/2026-09.csv").decode())))
    assert usage_csv == [{k: str(v) for k, v in day.items()} for day in usage["days"]]


def test_rerunning_a_month_creates_and_sends_nothing_new(billing_dag, scenario, smtp_sink) -> None:
    assert str(run(billing_dag, SEPTEMBER_RUN).state) == "success"
    published = objects(store())
    # Renaming the customer after the fact must not rewrite the documents already issued.
    with catalog().session() as session:
        session.get(Account, "acme").name = "Acme Renamed Ltd"

    again = run(billing_dag, SEPTEMBER_RUN)  # the same scheduled run, cleared and run again
    # A manual run weeks later, told which month: without the param it would invoice October.
    manual = run(billing_dag, datetime(2026, 11, 22, 9, tzinfo=UTC), period="2026-09")

    for dag_run in (again, manual):
        assert str(dag_run.state) == "success", task_states(dag_run)
    assert objects(store()) == published
    assert "Acme Surveying GmbH" in published["accounts/acme/invoices/PF-2026-09-0001.html"].decode()
    assert [i.invoice_number for i in list_invoices(catalog())] == SEPTEMBER
    with catalog().session() as session:
        assert session.scalars(select(BillingRun.period)).all() == ["2026-09"]
    assert [m["To"] for m in smtp_sink.parsed()] == RECIPIENTS
    assert sent_count() == 3


def test_a_month_that_has_not_ended_is_refused_without_retrying(billing_dag, scenario, smtp_sink) -> None:
    now = datetime.now(UTC)
    dag_run = run(billing_dag, now, period=Period.of(now.date()).label)

    assert str(dag_run.state) == "failed"
    assert task_states(dag_run)["invoice"] == "failed" and tries(dag_run, "invoice") == 1
    assert list_invoices(catalog()) == [] and smtp_sink.messages == []


def test_a_malformed_period_is_refused_when_triggered(billing_dag) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match="2026-13"):
        run(billing_dag, SEPTEMBER_RUN, period="2026-13")


# --- refused e-mail ------------------------------------------------------------------------------


def test_a_refused_email_is_retried_alone(billing_dag, scenario, smtp_sink) -> None:
    accept = smtp_sink.handle_DATA
    refused: list[str] = []

    async def refuse_geo_once(server, session, envelope):
        if envelope.rcpt_tos == ["ap@geo.example"] and not refused:
            refused.extend(envelope.rcpt_tos)
            return "451 4.3.0 mailbox temporarily unavailable"
        return await accept(server, session, envelope)

    smtp_sink.handle_DATA = refuse_geo_once  # aiosmtpd looks the hook up per connection
    dag_run = run(billing_dag, SEPTEMBER_RUN)

    assert str(dag_run.state) == "success", task_states(dag_run)
    assert refused == ["ap@geo.example"] and tries(dag_run, "email") == 2
    # lidar's e-mail went out on the first try, after geo's refusal; the retry sent geo's only.
    assert [m["To"] for m in smtp_sink.parsed()] == ["billing@acme.example", "compta@lidar.example", "ap@geo.example"]
    assert sent_count() == 3


def test_mail_refused_on_every_try_fails_the_run_and_a_rerun_sends_them(billing_dag, scenario, smtp_sink) -> None:
    smtp_sink.refusing = True
    failed = run(billing_dag, SEPTEMBER_RUN)

    assert str(failed.state) == "failed"
    assert task_states(failed) == {
        "invoice": "success",
        "publish": "success",
        "email": "failed",
        "usage_daily": "upstream_failed",
    }
    assert tries(failed, "email") == 1 + billing_dag.get_task("email").retries
    # The invoices and their documents stay; only the e-mails are missing.
    assert [i.invoice_number for i in list_invoices(catalog())] == SEPTEMBER
    assert {document_keys(a, n)["html"] for a, n in zip(["acme", "geo", "lidar"], SEPTEMBER, strict=True)} <= set(
        objects(store())
    )
    assert smtp_sink.messages == [] and sent_count() == 0

    smtp_sink.refusing = False
    rerun = run(billing_dag, SEPTEMBER_RUN)
    assert str(rerun.state) == "success", task_states(rerun)
    assert [m["To"] for m in smtp_sink.parsed()] == RECIPIENTS
    assert [i.invoice_number for i in list_invoices(catalog())] == SEPTEMBER


# --- catchup and S3 ------------------------------------------------------------------------------


def test_catchup_gives_each_month_its_own_invoices(billing_dag, scenario, smtp_sink, capsys) -> None:
    september = run(billing_dag, SEPTEMBER_RUN)
    # What October's invoices depend on arrives during October: payments of September's invoices,
    # and an outage.
    cli(capsys, "payments", "import", str(DATA / "payments.csv"))
    cli(capsys, "outages", "import", str(DATA / "outages.csv"))
    october = run(billing_dag, OCTOBER_RUN)

    for dag_run in (september, october):
        assert str(dag_run.state) == "success", task_states(dag_run)
    published = objects(store())
    assert set(published) == month_keys("2026-09") | month_keys("2026-10")
    for period in ("2026-09", "2026-10"):
        for invoice in expected(period):
            # October's late fee and carried credit show that September was invoiced first.
            assert (
                json.loads(published[document_keys(invoice["account_id"], invoice["invoice_number"])["json"]])
                == invoice
            )
    numbers = [invoice["invoice_number"] for period in ("2026-09", "2026-10") for invoice in expected(period)]
    assert [m["Subject"].split()[1] for m in smtp_sink.parsed()] == numbers
    assert json.loads(published["service/usage_daily/2026-10.json"])["days"] == [
        {"account_id": "lidar", "day": "2026-10-01", "jobs": 1, "billable_points": 10000000, "failed_points": 0}
    ]


def test_on_s3(billing_dag, home, s3_bucket, smtp_sink, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("POINTFLOW_STORAGE_URL", f"s3://{s3_bucket}/billing")
    cli(capsys, "accounts", "import", str(DATA / "accounts.csv"))
    cli(capsys, "usage", "import", str(DATA / "usage.jsonl"))

    dag_run = run(billing_dag, SEPTEMBER_RUN)

    assert str(dag_run.state) == "success", task_states(dag_run)
    s3 = store()
    assert s3.url == f"s3://{s3_bucket}/billing/"
    published = objects(s3)
    assert set(published) == month_keys("2026-09")
    for invoice in expected("2026-09"):
        assert json.loads(published[document_keys(invoice["account_id"], invoice["invoice_number"])["json"]]) == invoice
    [acme, *_] = smtp_sink.parsed()
    html_link = links(acme.get_body(("plain",)).get_content())["html"]
    # A presigned link to the S3 endpoint that a customer can open without credentials.
    assert html_link.startswith(f"{s3.client.meta.endpoint_url}/{s3_bucket}/billing/accounts/acme/invoices/")
    assert "X-Amz-Signature=" in html_link
    with urlopen(html_link) as response:
        assert response.read() == published["accounts/acme/invoices/PF-2026-09-0001.html"]


def test_an_account_added_after_its_months_run_is_invoiced_published_and_mailed_by_the_next(
    billing_dag, scenario, smtp_sink, capsys
) -> None:
    assert str(run(billing_dag, SEPTEMBER_RUN).state) == "success"
    # Imported during October with a start in September: September's run never saw it.
    cli(
        capsys,
        "accounts",
        "add",
        "newco",
        "--name",
        "New Co",
        "--email",
        "ap@newco.example",
        "--country",
        "DE",
        "--plan",
        "professional",
        "--started-at",
        "2026-09-10",
        "--tax-rate",
        "0.19",
    )
    october = run(billing_dag, OCTOBER_RUN)
    assert str(october.state) == "success", task_states(october)

    # Its own September invoice, after September's numbers (99.00 x 21/30 = 69.30 + 19 %), and its October one.
    numbers = {i.invoice_number: str(i.total) for i in list_invoices(catalog(), account_id="newco")}
    assert numbers == {"PF-2026-09-0004": "82.47", "PF-2026-10-0004": "117.81"}
    published = objects(store())
    for number in numbers:
        assert set(document_keys("newco", number).values()) <= set(published)
    assert json.loads(published["accounts/newco/invoices/PF-2026-09-0004.json"])["period"] == "2026-09"
    subjects = [m["Subject"] for m in smtp_sink.parsed() if m["To"] == "ap@newco.example"]
    assert subjects == [
        "Invoice PF-2026-09-0004 for 2026-09: EUR 82.47",
        "Invoice PF-2026-10-0004 for 2026-10: EUR 117.81",
    ]
    # Once: running either month again issues and sends nothing more.
    sent = sent_count()
    for logical_date in (SEPTEMBER_RUN, OCTOBER_RUN):
        assert str(run(billing_dag, logical_date).state) == "success"
    assert sent_count() == sent
    assert len(list_invoices(catalog())) == 8
