"""Usage records are kept after the data is deleted for the policy's usage_retention_years, then
the nightly lifecycle run deletes them: never one an invoice (or a credit note correcting it)
issued within the retention still needs, never under legal hold, always audited. SQLite and
PostgreSQL."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select

from pipelines.accounts import upsert_accounts
from pipelines.billing.models import BillingRun, CreditNote, Invoice, UsageBilling
from pipelines.catalog.models import IntakeClaim, Job, MessageClaim, SentMessage, UsageEvent
from pipelines.cli import main
from pipelines.lifecycle.deletion import FAILED_JOB_RULE
from pipelines.lifecycle.models import DeletionAudit
from pipelines.lifecycle.policy import PolicyError, load_policy
from pipelines.metering import UsageRecord, record_usage
from pipelines.runtime import Runtime
from pipelines.settings import Settings
from tests.conftest import make_account

ZERO = Decimal("0.00")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def catalog_runtime(home: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    monkeypatch.setenv("POINTFLOW_DATABASE_URL", database_url)
    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [replace(make_account("acme", "api"), started_at=date(2015, 1, 1))])
    yield runtime
    runtime.catalog.dispose()


def lifecycle(capsys: pytest.CaptureFixture[str], as_of: str, *extra: str) -> list[dict]:
    code = main(["lifecycle", "run", "--as-of", as_of, "--json", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def event(event_id: str, occurred: str, kind: str = "classification") -> UsageRecord:
    if kind == "login":
        return UsageRecord(event_id, "acme", "login", at(occurred))
    return UsageRecord(
        event_id, "acme", kind, at(occurred), 100, "succeeded", "standard", "1", "scan.laz", event_id.split(":")[0]
    )


def invoice(runtime: Runtime, period: str, issued: date, events: list[str], credited: date | None = None) -> None:
    """The invoice of `period` as a billing run leaves it: its run, its marks, its document."""
    number = f"PF-{period}-0001"
    with runtime.catalog.session() as session:
        session.add(BillingRun(period=period, pricebook_sha256="x", invoice_count=1))
        session.flush()
        session.add_all(UsageBilling(event_id=e, period=period) for e in events)
        session.add(
            Invoice(
                invoice_number=number,
                account_id="acme",
                period=period,
                sequence=1,
                currency="EUR",
                issue_date=issued,
                due_date=issued,
                tax_rate=ZERO,
                subtotal=ZERO,
                taxable_subtotal=ZERO,
                tax=ZERO,
                total=ZERO,
                credit_applied=ZERO,
            )
        )
        if credited is not None:
            session.flush()
            session.add(
                CreditNote(
                    credit_note_number=f"PF-CN-{period}",
                    invoice_number=number,
                    account_id="acme",
                    issued_on=credited,
                    amount=ZERO,
                    tax=ZERO,
                    total=ZERO,
                    reason="billing error",
                )
            )


def remaining(runtime: Runtime) -> list[str]:
    with runtime.catalog.session() as session:
        return sorted(session.scalars(select(UsageEvent.event_id)))


def recorded(runtime: Runtime, records: list[UsageRecord], when: str) -> None:
    """Record the events as if at `when` (the recording moment counts for the retention too)."""
    record_usage(runtime.catalog, records)
    with runtime.catalog.session() as session:
        for r in records:
            session.get(UsageEvent, r.event_id).recorded_at = at(when)


def test_usage_records_go_after_ten_years_unless_an_invoice_still_needs_them(
    catalog_runtime: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime = catalog_runtime
    recorded(runtime, [event("login-1", "2015-06-01T08:00:00", "login")], "2015-06-01T08:00:01")
    recorded(runtime, [event("j-feb:classification", "2016-02-10T10:00:00")], "2016-02-10T10:00:01")
    recorded(runtime, [event("j-mar:classification", "2016-03-10T10:00:00")], "2016-03-10T10:00:01")
    recorded(runtime, [event("j-apr:classification", "2016-04-10T10:00:00")], "2016-04-10T10:00:01")
    # Happened in January 2016, recorded (metered late) in June 2017.
    recorded(runtime, [event("j-late:classification", "2016-01-20T10:00:00")], "2017-06-01T00:00:00")
    recorded(runtime, [event("j-new:classification", "2020-05-05T10:00:00")], "2020-05-05T10:00:01")
    invoice(runtime, "2016-02", date(2016, 3, 1), ["j-feb:classification"], credited=date(2019, 9, 1))
    invoice(runtime, "2016-03", date(2016, 4, 1), ["j-mar:classification"])
    # April's invoice was issued late, in May: its usage is kept ten years from then.
    invoice(runtime, "2016-04", date(2016, 5, 20), ["j-apr:classification"])

    [action] = lifecycle(capsys, "2026-04-02T03:00:00Z")
    assert action["action"] == "usage_records_deleted"
    assert {k: action["detail"][k] for k in ("status", "rule", "retention_years", "records")} == {
        "status": "deleted",
        "rule": "usage_retention",
        "retention_years": 10,
        "records": 2,
    }
    # The February event stays with its invoice, corrected in 2019; April's invoice was issued in
    # May 2016; the late one was recorded in 2017; 2020's is recent.
    assert remaining(runtime) == [
        "j-apr:classification",
        "j-feb:classification",
        "j-late:classification",
        "j-new:classification",
    ]
    with runtime.catalog.session() as session:
        assert sorted(session.scalars(select(UsageBilling.event_id))) == [
            "j-apr:classification",
            "j-feb:classification",
        ]
        # The accounting records themselves stay.
        assert len(session.scalars(select(Invoice)).all()) == 3 and len(session.scalars(select(CreditNote)).all()) == 1
        [audit] = session.scalars(select(DeletionAudit))
        assert (audit.rule, audit.status, audit.object_count, audit.id) == (
            "usage_retention",
            "completed",
            2,
            action["detail"]["audit_id"],
        )
        assert [o["key"] for o in audit.objects] == ["usage_events/login-1", "usage_events/j-mar:classification"]
        assert "scan.laz" not in json.dumps(audit.objects)  # which records went, never what they held
    assert lifecycle(capsys, "2026-04-02T03:00:00Z") == []  # done once

    assert [a["detail"]["records"] for a in lifecycle(capsys, "2026-05-21T03:00:00Z")] == [1]  # April's
    assert [a["detail"]["records"] for a in lifecycle(capsys, "2027-06-02T03:00:00Z")] == [1]  # the late one
    assert remaining(runtime) == ["j-feb:classification", "j-new:classification"]
    assert [a["detail"]["records"] for a in lifecycle(capsys, "2029-09-02T03:00:00Z")] == [1]  # the credit note's
    assert remaining(runtime) == ["j-new:classification"]


def test_usage_records_are_kept_under_legal_hold_and_go_after_its_release(
    catalog_runtime: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime = catalog_runtime
    recorded(runtime, [event("j-old:classification", "2016-03-10T10:00:00")], "2016-03-10T10:00:01")
    assert main(["accounts", "hold", "acme", "--reason", "case 2026-9"]) == 0
    capsys.readouterr()
    [blocked] = lifecycle(capsys, "2026-04-02T03:00:00Z")
    assert blocked["action"] == "usage_records_deleted" and blocked["detail"]["status"] == "blocked"
    assert blocked["detail"]["due_at"] == "2026-03-10T10:00:01+00:00"
    assert lifecycle(capsys, "2026-04-03T03:00:00Z") == []  # reported once
    assert remaining(runtime) == ["j-old:classification"]
    with runtime.catalog.session() as session:
        assert session.scalars(select(DeletionAudit)).all() == []
    assert main(["accounts", "unhold", "acme"]) == 0
    capsys.readouterr()
    [dry] = lifecycle(capsys, "2026-04-05T03:00:00Z", "--dry-run")
    assert (dry["detail"]["status"], dry["detail"]["records"]) == ("dry_run", 1)
    assert remaining(runtime) == ["j-old:classification"]
    [deleted] = lifecycle(capsys, "2026-04-05T03:00:00Z")
    assert (deleted["detail"]["status"], deleted["detail"]["records"]) == ("deleted", 1)
    assert remaining(runtime) == []


def test_the_retention_is_a_policy_setting(tmp_path: Path) -> None:
    assert load_policy().usage_retention_years == 10
    custom = tmp_path / "policy.yaml"
    custom.write_text("defaults:\n  grace_months: 2\n")  # written before the setting existed
    assert load_policy(custom).usage_retention_years == 10
    custom.write_text("usage_retention_years: 7\n")
    assert load_policy(custom).usage_retention_years == 7
    custom.write_text("usage_retention_years: null\n")
    assert load_policy(custom).usage_retention_years is None
    for value in ("0", "'10'", "2.5"):
        custom.write_text(f"usage_retention_years: {value}\n")
        with pytest.raises(PolicyError, match="usage_retention_years"):
            load_policy(custom)


def test_a_longer_retention_keeps_the_records(
    catalog_runtime: Runtime, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    runtime = catalog_runtime
    recorded(runtime, [event("j-old:classification", "2016-03-10T10:00:00")], "2016-03-10T10:00:01")
    custom = tmp_path / "policy.yaml"
    custom.write_text("usage_retention_years: 12\n")
    assert lifecycle(capsys, "2026-04-02T03:00:00Z", "--policy", str(custom)) == []
    assert remaining(runtime) == ["j-old:classification"]


def test_an_event_older_than_the_retention_is_refused_at_import(
    catalog_runtime: Runtime, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Billed in its time, then deleted after ten years: imported again it would be new to billing
    (usage received late) and billed twice."""
    old = {"event_id": "j-2012", "account_id": "acme", "occurred_at": "2012-05-01T10:00:00Z", "kind": "login"}
    new = {**old, "event_id": "j-2026", "occurred_at": "2026-05-01T10:00:00Z"}
    usage = tmp_path / "usage.jsonl"
    usage.write_text(json.dumps(new) + "\n" + json.dumps(old) + "\n")
    assert main(["usage", "import", str(usage)]) == 2
    assert "line 2: happened 2012-05-01T10:00:00+00:00" in capsys.readouterr().err
    assert remaining(catalog_runtime) == []
    usage.write_text(json.dumps(new) + "\n")
    assert main(["usage", "import", str(usage)]) == 0
    assert remaining(catalog_runtime) == ["j-2026"]


@pytest.fixture
def jobs_runtime(home: Path, database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Runtime:
    """A professional account (its results are not deleted after days, as under `api`) that is
    never closed for inactivity: only the retention acts on it."""
    monkeypatch.setenv("POINTFLOW_DATABASE_URL", database_url)
    policy = tmp_path / "lifecycle.yaml"
    policy.write_text("defaults:\n  inactivity_notice_after_months: null\n")
    monkeypatch.setenv("POINTFLOW_LIFECYCLE_POLICY", str(policy))
    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [replace(make_account("acme", "professional"), started_at=date(2015, 1, 1))])
    yield runtime
    runtime.catalog.dispose()


SOURCE = "s3://drop/incoming/acme/secret-site.laz"


def finished_job(runtime: Runtime, job_id: str, finished: str, **values: object) -> None:
    """A job as it is once finished and metered, and its data deleted (outputs forgotten), with the
    records of its e-mail and its drop-zone claim."""
    row = {
        "job_id": job_id,
        "account_id": "acme",
        "source": SOURCE,
        "state": "exported",
        "classifier": "standard",
        "points_processed": 100,
        "summary": {"class_counts": {"2": 60, "6": 40}},
        "abort_requested_at": None,
        "created_at": at(finished),
        "finished_at": at(finished),
        "metered_at": at(finished),
        **values,
    }
    with runtime.catalog.session() as session:
        session.add(Job(**row))
        session.add(
            SentMessage(
                key=f"export:{job_id}",
                account_id="acme",
                kind="export_ready",
                recipient="ops@acme.example",
                subject="pointflow: secret-site.laz is ready",
                message_id=f"<{job_id}@pointflow>",
            )
        )
        session.add(
            IntakeClaim(
                source_key="incoming/acme/secret-site.laz",
                version=job_id,
                account_id="acme",
                job_id=job_id,
                state="registered",
                owner="sweep",
            )
        )


def jobs_left(runtime: Runtime) -> list[str]:
    with runtime.catalog.session() as session:
        return sorted(session.scalars(select(Job.job_id)))


def test_job_rows_go_with_their_usage_records_and_not_before(
    jobs_runtime: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime = jobs_runtime
    finished_job(runtime, "j-old", "2016-03-10T10:00:00", state="quarantined", error="secret-site.laz: bad header")
    recorded(runtime, [event("j-old:classification", "2016-03-10T10:00:00")], "2016-03-10T10:00:01")
    with runtime.catalog.session() as session:
        session.add(
            MessageClaim(
                key="quarantine:j-old", account_id="acme", message_id="<m>", claimed_at=at("2016-03-10T10:00:00")
            )
        )
        # An invoice's e-mail is not the job's.
        session.add(
            SentMessage(
                key="invoice:PF-2016-02-0001",
                account_id="acme",
                kind="invoice",
                recipient="a@b",
                subject="s",
                message_id="<i>",
            )
        )
    # Its usage record is kept with the invoice that billed it, corrected in 2019.
    finished_job(runtime, "j-feb", "2016-02-10T10:00:00")
    recorded(runtime, [event("j-feb:classification", "2016-02-10T10:00:00")], "2016-02-10T10:00:01")
    invoice(runtime, "2016-02", date(2016, 3, 1), ["j-feb:classification"], credited=date(2019, 9, 1))
    # Metered late: its record is kept ten years from then.
    finished_job(runtime, "j-late", "2016-01-20T10:00:00", metered_at=at("2017-06-01T00:00:00"))
    recorded(runtime, [event("j-late:classification", "2016-01-20T10:00:00")], "2017-06-01T00:00:00")
    # Not metered yet: its record is still to come.
    finished_job(runtime, "j-unmetered", "2016-01-05T10:00:00", state="failed", metered_at=None)
    # Its results are still stored: the customer's data, found through its row.
    finished_job(runtime, "j-stored", "2016-01-06T10:00:00", export_prefix="accounts/acme/exports/j-stored/")
    recorded(runtime, [event("j-stored:classification", "2016-01-06T10:00:00")], "2016-01-06T10:00:01")
    # Its working objects were kept by a legal hold, for the sweep after the release.
    finished_job(
        runtime, "j-held", "2016-01-07T10:00:00", state="failed", working_objects_held_at=at("2016-01-07T10:00:00")
    )
    finished_job(runtime, "j-new", "2020-05-05T10:00:00")
    recorded(runtime, [event("j-new:classification", "2020-05-05T10:00:00")], "2020-05-05T10:00:01")

    actions = lifecycle(capsys, "2026-04-02T03:00:00Z")
    assert [a["action"] for a in actions] == ["usage_records_deleted", "job_records_deleted"]
    jobs = actions[1]["detail"]
    assert {k: jobs[k] for k in ("status", "rule", "retention_years", "jobs", "due_at")} == {
        "status": "deleted",
        "rule": "job_retention",
        "retention_years": 10,
        "jobs": 1,
        "due_at": "2026-03-10T10:00:00+00:00",
    }
    assert jobs_left(runtime) == ["j-feb", "j-held", "j-late", "j-new", "j-stored", "j-unmetered"]
    with runtime.catalog.session() as session:
        assert sorted(session.scalars(select(SentMessage.key))) == [
            "export:j-feb",
            "export:j-held",
            "export:j-late",
            "export:j-new",
            "export:j-stored",
            "export:j-unmetered",
            "invoice:PF-2016-02-0001",
        ]
        assert session.scalars(select(MessageClaim)).all() == []
        assert "j-old" not in set(session.scalars(select(IntakeClaim.job_id)))
        audit = session.get(DeletionAudit, jobs["audit_id"])
        assert (audit.rule, audit.status, audit.object_count) == ("job_retention", "completed", 1)
        assert [o["key"] for o in audit.objects] == ["jobs/j-old"]
        assert "1 e-mail record(s) and 1 drop-zone claim(s)" in audit.objects[0]["what"]
        assert "secret-site" not in json.dumps(audit.objects) + audit.subject  # which jobs went, never what they held
    assert lifecycle(capsys, "2026-04-02T03:00:00Z") == []  # done once

    # The late one's record goes in June 2027, and its job with it.
    [usage, late] = lifecycle(capsys, "2027-06-02T03:00:00Z")
    assert (usage["detail"]["records"], late["detail"]["jobs"]) == (1, 1)
    assert jobs_left(runtime) == ["j-feb", "j-held", "j-new", "j-stored", "j-unmetered"]
    [usage, feb] = lifecycle(capsys, "2029-09-02T03:00:00Z")  # the credit note's
    assert (usage["detail"]["records"], feb["detail"]["jobs"]) == (1, 1)
    assert jobs_left(runtime) == ["j-held", "j-new", "j-stored", "j-unmetered"]


def test_job_rows_are_kept_under_legal_hold_and_go_after_its_release(
    jobs_runtime: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime = jobs_runtime
    finished_job(runtime, "j-old", "2016-03-10T10:00:00")
    recorded(runtime, [event("j-old:classification", "2016-03-10T10:00:00")], "2016-03-10T10:00:01")
    assert main(["accounts", "hold", "acme", "--reason", "case 2026-9"]) == 0
    capsys.readouterr()
    blocked = lifecycle(capsys, "2026-04-02T03:00:00Z")
    assert [(a["action"], a["detail"]["status"]) for a in blocked] == [
        ("usage_records_deleted", "blocked"),
        ("job_records_deleted", "blocked"),
    ]
    assert blocked[1]["detail"]["due_at"] == "2026-03-10T10:00:00+00:00"
    assert lifecycle(capsys, "2026-04-03T03:00:00Z") == []  # reported once
    assert jobs_left(runtime) == ["j-old"]
    with runtime.catalog.session() as session:
        assert session.scalars(select(DeletionAudit)).all() == []
        assert session.scalars(select(SentMessage.key)).all() == ["export:j-old"]
    assert main(["accounts", "unhold", "acme"]) == 0
    capsys.readouterr()
    # Its usage record is still there in a dry run: the job is reported as going with it.
    dry = lifecycle(capsys, "2026-04-05T03:00:00Z", "--dry-run")
    assert [(a["action"], a["detail"]["status"]) for a in dry] == [
        ("usage_records_deleted", "dry_run"),
        ("job_records_deleted", "dry_run"),
    ]
    assert jobs_left(runtime) == ["j-old"] and remaining(runtime) == ["j-old:classification"]
    [_, deleted] = lifecycle(capsys, "2026-04-05T03:00:00Z")
    assert (deleted["detail"]["status"], deleted["detail"]["jobs"]) == ("deleted", 1)
    assert jobs_left(runtime) == [] and remaining(runtime) == []
    with runtime.catalog.session() as session:
        assert session.scalars(select(SentMessage)).all() == [] and session.scalars(select(IntakeClaim)).all() == []


def test_a_longer_retention_keeps_the_job_rows_as_long_as_the_records(
    jobs_runtime: Runtime, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    runtime = jobs_runtime
    finished_job(runtime, "j-old", "2016-03-10T10:00:00")
    recorded(runtime, [event("j-old:classification", "2016-03-10T10:00:00")], "2016-03-10T10:00:01")
    custom = tmp_path / "policy.yaml"
    custom.write_text("defaults:\n  inactivity_notice_after_months: null\nusage_retention_years: null\n")
    assert lifecycle(capsys, "2036-04-02T03:00:00Z", "--policy", str(custom)) == []  # for ever
    custom.write_text("defaults:\n  inactivity_notice_after_months: null\nusage_retention_years: 12\n")
    assert lifecycle(capsys, "2028-03-10T03:00:00Z", "--policy", str(custom)) == []
    assert jobs_left(runtime) == ["j-old"]
    [_, jobs] = lifecycle(capsys, "2028-03-11T03:00:00Z", "--policy", str(custom))
    assert (jobs["action"], jobs["detail"]["retention_years"], jobs["detail"]["jobs"]) == ("job_records_deleted", 12, 1)
    assert jobs_left(runtime) == []


def test_a_job_whose_deletion_was_interrupted_goes_once_it_is_finished(
    jobs_runtime: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run resumes a killed deletion of a failed job's working objects by the job's row."""
    runtime = jobs_runtime
    finished_job(runtime, "j-old", "2016-03-10T10:00:00", state="failed")
    with runtime.catalog.session() as session:
        session.add(
            DeletionAudit(
                account_id="acme",
                rule=FAILED_JOB_RULE,
                subject="job j-old",
                as_of=at("2016-03-10T10:00:00"),
                status="started",
                object_count=0,
                version_count=0,
                bytes=0,
                objects=[],
                local_paths=[],
            )
        )
    assert [a["action"] for a in lifecycle(capsys, "2026-04-02T03:00:00Z")] == ["deletion_resumed"]
    assert jobs_left(runtime) == ["j-old"]
    [jobs] = lifecycle(capsys, "2026-04-03T03:00:00Z")
    assert (jobs["action"], jobs["detail"]["jobs"]) == ("job_records_deleted", 1)
    assert jobs_left(runtime) == []
