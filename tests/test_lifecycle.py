"""The data lifecycle walked with `--as-of`: a real SMTP server and a versioned S3 bucket on loopback."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipelines.accounts import upsert_accounts
from pipelines.billing.models import Invoice
from pipelines.billing.pricebook import load_pricebook
from pipelines.catalog.models import Job, JobState, SentMessage, StoredFile, UsageEvent
from pipelines.cli import main
from pipelines.dashboard import build_dashboard
from pipelines.ingest import ingest_file
from pipelines.lifecycle import is_locked
from pipelines.lifecycle.deletion import account_deletion_plan, execute_deletion
from pipelines.lifecycle.models import DeletionAudit, LegalHold, LifecycleDeliveryFailure, Termination
from pipelines.lifecycle.operations import AccountLocked, ensure_active, export_bundles
from pipelines.metering import UsageRecord, record_usage
from pipelines.runtime import Runtime
from pipelines.settings import Settings
from pipelines.steps.ingest import create_job, ingest_step
from tests.conftest import abandoned_work_dir, make_account, shared_file

UTC = UTC


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def lifecycle(capsys: pytest.CaptureFixture[str], as_of: str, *extra: str) -> list[dict]:
    """`pointflow lifecycle run --as-of AS_OF --json`, parsed."""
    code = main(["lifecycle", "run", "--as-of", as_of, "--json", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def free_account(account_id: str, last_login: str | None, started: date = date(2025, 6, 1)):
    record = replace(make_account(account_id, "free"), started_at=started)
    return replace(record, last_login_at=at(last_login)) if last_login else record


@pytest.fixture
def versioned_s3(home: Path, s3_bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).put_bucket_versioning(
        Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    monkeypatch.setenv("POINTFLOW_STORAGE_URL", f"s3://{s3_bucket}")
    runtime = Runtime.from_settings(Settings.from_env())
    yield runtime
    runtime.catalog.dispose()


def all_versions(runtime: Runtime, prefix: str) -> list[tuple[str, int]]:
    """(key, size) of every version and delete marker under the prefix, straight from S3."""
    client, bucket = runtime.store.client, runtime.store.bucket
    found = []
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        found += [(v["Key"], v["Size"]) for v in page.get("Versions", [])]
        found += [(m["Key"], 0) for m in page.get("DeleteMarkers", [])]
    return sorted(found)


def seed_account_data(runtime: Runtime, account_id: str) -> Path:
    """Objects in every area, an overwritten object (two versions), a deleted one (old version
    behind a delete marker), a job with a scratch folder (returned) that a killed run left, and
    billing evidence that must stay."""
    store = runtime.store
    prefix = f"accounts/{account_id}/"
    store.put_bytes(prefix + "raw/abc-scan.laz", b"L" * 1000)
    store.put_bytes(prefix + "raw/abc-scan.laz", b"L" * 1200)  # second version
    store.put_bytes(prefix + "exports/job-1/scan.laz", b"E" * 500)
    store.put_bytes(prefix + "exports/job-1/manifest.json", b"{}")
    store.put_bytes(prefix + "reports/job-1-validation.json", b"{}" * 10)
    store.put_bytes(prefix + "models/custom.json", b"M" * 30)
    store.put_bytes(prefix + "invoices/PF-2026-10-0001.html", b"<html>invoice</html>")  # a billing record: kept
    store.put_bytes(prefix + "tmp/gone.bin", b"G" * 70)
    store.client.delete_object(Bucket=store.bucket, Key=prefix + "tmp/gone.bin")  # leaves a version + marker
    with runtime.catalog.session() as session:
        session.add(
            Job(
                job_id=f"{account_id}-job-1",
                account_id=account_id,
                source="s3://x/scan.laz",
                classifier="standard",
                state=JobState.EXPORTED.value,
                finished_at=at("2026-01-05T00:00:00"),
            )
        )
    scratch = abandoned_work_dir(
        runtime.settings.scratch_dir, "job", account_id, f"{account_id}-job-1", {"partial.laz": b"S" * 40}
    )
    record_usage(
        runtime.catalog,
        [
            UsageRecord(
                f"{account_id}-job-1:classification",
                account_id,
                "classification",
                at("2026-01-05T00:00:00"),
                points=1000,
                status="succeeded",
                classifier="standard",
                filename="scan.laz",
            )
        ],
    )
    return scratch


def sent(smtp_sink) -> list:
    return smtp_sink.parsed()


def test_free_account_walks_notice_reminders_closure_lock_and_deletion(
    versioned_s3: Runtime, smtp_sink, capsys
) -> None:
    runtime = versioned_s3
    upsert_accounts(
        runtime.catalog, [free_account("sleepy", "2026-01-10T09:00:00"), replace(make_account("busy", "professional"))]
    )
    scratch = seed_account_data(runtime, "sleepy")
    runtime.store.put_bytes("accounts/busy/raw/keep.laz", b"K" * 10)
    runtime.store.put_bytes("accounts/sleepy2/raw/not-sleepy.laz", b"N" * 10)  # same prefix letters, other account

    # Twelve months without a login end on 2027-01-10 09:00: nothing before.
    assert lifecycle(capsys, "2027-01-10T03:00:00Z") == []
    notice = lifecycle(capsys, "2027-01-11T03:00:00Z")
    [mail] = sent(smtp_sink)
    cycle = "2026-01-10T09:00:00+00:00"
    assert notice == [
        {
            "account_id": "sleepy",
            "action": "inactivity_notice",
            "effective_at": "2027-01-11T03:00:00+00:00",
            "detail": {
                "cycle": cycle,
                "last_login_at": cycle,
                "closure_at": "2027-03-11T03:00:00+00:00",
                "deletion_at": "2027-04-11T03:00:00+00:00",
                "message_id": mail["Message-ID"],
            },
        }
    ]
    assert mail["To"] == "ops@sleepy.example"
    body = mail.get_content()
    assert "11 March 2027, 03:00 UTC" in body and "11 April 2027, 03:00 UTC" in body and "log in before" in body
    with runtime.catalog.session() as session:
        assert session.get(SentMessage, f"lifecycle:inactivity_notice:sleepy:{cycle}").message_id == mail["Message-ID"]

    # The same moment again: nothing new, no second e-mail.
    assert lifecycle(capsys, "2027-01-11T03:00:00Z") == []
    assert len(sent(smtp_sink)) == 1

    assert lifecycle(capsys, "2027-02-08T03:00:00Z") == []
    [reminder30] = lifecycle(capsys, "2027-02-09T03:00:00Z")
    assert (reminder30["action"], reminder30["detail"]["days_before_closure"]) == ("inactivity_reminder", 30)
    assert reminder30["detail"]["closure_at"] == "2027-03-11T03:00:00+00:00"
    assert lifecycle(capsys, "2027-02-20T03:00:00Z") == []
    [reminder7] = lifecycle(capsys, "2027-03-04T03:00:00Z")
    assert (
        reminder7["detail"]["days_before_closure"] == 7
        and reminder7["detail"]["message_id"] == sent(smtp_sink)[-1]["Message-ID"]
    )
    assert "11 March 2027" in sent(smtp_sink)[-1]["Subject"]

    assert lifecycle(capsys, "2027-03-11T02:59:59Z") == []
    assert not is_locked(
        runtime.catalog, "sleepy", at("2027-03-11T02:59:59"), pricebook=load_pricebook(runtime.settings.pricebook_path)
    )
    closure = lifecycle(capsys, "2027-03-11T03:00:00Z")
    lock_mail = sent(smtp_sink)[-1]
    assert closure == [
        {
            "account_id": "sleepy",
            "action": "terminated",
            "effective_at": "2027-03-11T03:00:00+00:00",
            "detail": {"reason": "inactivity"},
        },
        {
            "account_id": "sleepy",
            "action": "data_locked",
            "effective_at": "2027-03-11T03:00:00+00:00",
            "detail": {
                "reason": "inactivity",
                "locked_at": "2027-03-11T03:00:00+00:00",
                "deletion_at": "2027-04-11T03:00:00+00:00",
                "notice": {"status": "sent", "message_id": lock_mail["Message-ID"]},
            },
        },
    ]
    assert "11 April 2027" in lock_mail["Subject"] and "export" in lock_mail.get_content()
    assert is_locked(runtime.catalog, "sleepy", pricebook=load_pricebook(runtime.settings.pricebook_path))
    assert not is_locked(runtime.catalog, "busy", pricebook=load_pricebook(runtime.settings.pricebook_path))

    # Deletion is due one month after the announcement. The dry run lists, the real run deletes the same.
    invoice = [("accounts/sleepy/invoices/PF-2026-10-0001.html", 20)]
    before = [v for v in all_versions(runtime, "accounts/sleepy/") if v not in invoice]
    assert lifecycle(capsys, "2027-04-11T02:00:00Z") == []
    [dry] = lifecycle(capsys, "2027-04-11T03:00:00Z", "--dry-run")
    assert all_versions(runtime, "accounts/sleepy/") == sorted(before + invoice)
    assert dry["detail"]["status"] == "dry_run"
    expected_keys = sorted({k for k, _ in before})
    assert [k["key"] for k in dry["detail"]["keys"]] == expected_keys
    # 6 keys: raw has two versions, tmp/gone.bin an old version behind a delete marker.
    assert (dry["detail"]["objects"], dry["detail"]["versions"], len(before)) == (6, 8, 8)
    assert dry["detail"]["local_paths"] == [{"path": str(scratch), "bytes": 40}]
    assert dry["detail"]["bytes"] == sum(size for _, size in before) + 40

    [deleted] = lifecycle(capsys, "2027-04-11T03:00:00Z")
    assert deleted["action"] == "data_deleted" and deleted["detail"]["status"] == "deleted"
    assert {k: v for k, v in deleted["detail"].items() if k not in ("status", "audit_id")} == {
        k: v for k, v in dry["detail"].items() if k != "status"
    }
    assert all_versions(runtime, "accounts/sleepy/") == invoice
    assert not scratch.exists()
    assert [o.key for o in runtime.store.list("accounts/")] == [
        "accounts/busy/raw/keep.laz",
        "accounts/sleepy/invoices/PF-2026-10-0001.html",
        "accounts/sleepy2/raw/not-sleepy.laz",
    ]
    with runtime.catalog.session() as session:
        audit = session.get(DeletionAudit, deleted["detail"]["audit_id"])
        assert (audit.account_id, audit.rule, audit.status, audit.object_count, audit.bytes) == (
            "sleepy",
            "termination:inactivity",
            "completed",
            6,
            dry["detail"]["bytes"],
        )
        assert (
            session.scalar(select(func.count()).select_from(UsageEvent).where(UsageEvent.account_id == "sleepy")) == 1
        )
        assert session.get(Termination, "sleepy").deleted_at == at("2027-04-11T03:00:00")
    assert lifecycle(capsys, "2027-04-11T03:00:00Z") == []
    assert lifecycle(capsys, "2027-06-01T03:00:00Z") == []
    assert len(sent(smtp_sink)) == 4


def test_a_login_during_the_notice_period_averts_the_closure(runtime: Runtime, smtp_sink, capsys) -> None:
    upsert_accounts(runtime.catalog, [free_account("back", None, started=date(2026, 2, 1))])
    # Never logged in: inactive since the start of the contract.
    [notice] = lifecycle(capsys, "2027-02-01T03:00:00Z")
    assert notice["detail"]["cycle"] == "2026-02-01T00:00:00+00:00" and notice["detail"]["last_login_at"] is None
    record_usage(runtime.catalog, [UsageRecord("login-1", "back", "login", at("2027-02-20T08:15:00"))])
    assert lifecycle(capsys, "2027-02-21T03:00:00Z") == [
        {
            "account_id": "back",
            "action": "closure_averted",
            "effective_at": "2027-02-20T08:15:00+00:00",
            "detail": {
                "cycle": "2026-02-01T00:00:00+00:00",
                "notice_sent_at": "2027-02-01T03:00:00+00:00",
                "login_at": "2027-02-20T08:15:00+00:00",
            },
        }
    ]
    # The old closure date passes without a closure; the next notice comes 12 months after the login.
    assert lifecycle(capsys, "2027-04-01T03:00:00Z") == []
    assert lifecycle(capsys, "2028-02-20T03:00:00Z") == []
    [again] = lifecycle(capsys, "2028-02-21T03:00:00Z")
    assert again["action"] == "inactivity_notice" and again["detail"]["cycle"] == "2027-02-20T08:15:00+00:00"
    assert not is_locked(runtime.catalog, "back", pricebook=load_pricebook(runtime.settings.pricebook_path))


def test_a_notice_from_before_a_paid_period_does_not_close_the_account_after_it(
    runtime: Runtime, smtp_sink, capsys
) -> None:
    from pipelines.billing.history import record_plan_change

    upsert_accounts(runtime.catalog, [free_account("yoyo", "2025-01-01T00:00:00", started=date(2024, 6, 1))])
    [first] = lifecycle(capsys, "2026-01-02T03:00:00Z")
    assert (first["action"], first["detail"]["closure_at"]) == ("inactivity_notice", "2026-03-02T03:00:00+00:00")
    # Upgraded before the closure: a professional account has no inactivity rule.
    record_plan_change(runtime.catalog, None, "yoyo", "professional", date(2026, 1, 15))
    assert [lifecycle(capsys, day) for day in ("2026-01-15T03:00:00Z", "2026-03-02T03:00:00Z")] == [[], []]
    # Back to free eight months later: the old notice announced a period that is over. The
    # customer gets a fresh notice with the full 2 months, and both reminders.
    record_plan_change(runtime.catalog, None, "yoyo", "free", date(2026, 9, 1))
    [fresh] = lifecycle(capsys, "2026-09-01T03:00:00Z")
    assert fresh["action"] == "inactivity_notice"
    assert (fresh["detail"]["last_login_at"], fresh["detail"]["closure_at"]) == (
        "2025-01-01T00:00:00+00:00",
        "2026-11-01T03:00:00+00:00",
    )
    assert "1 November 2026" in sent(smtp_sink)[-1]["Subject"]
    assert lifecycle(capsys, "2026-09-08T03:00:00Z") == []
    assert not is_locked(
        runtime.catalog, "yoyo", at("2026-09-08T03:00:00"), pricebook=load_pricebook(runtime.settings.pricebook_path)
    )
    [r30] = lifecycle(capsys, "2026-10-02T03:00:00Z")
    [r7] = lifecycle(capsys, "2026-10-25T03:00:00Z")
    assert [(r["action"], r["detail"]["days_before_closure"]) for r in (r30, r7)] == [
        ("inactivity_reminder", 30),
        ("inactivity_reminder", 7),
    ]
    assert lifecycle(capsys, "2026-11-01T02:59:59Z") == []
    [terminated, _locked] = lifecycle(capsys, "2026-11-01T03:00:00Z")
    assert (terminated["action"], terminated["effective_at"]) == ("terminated", "2026-11-01T03:00:00+00:00")
    # No login happened: nothing was averted, and each e-mail went out once.
    assert len(sent(smtp_sink)) == 5


def test_a_login_from_the_account_import_counts_too(runtime: Runtime, smtp_sink, capsys) -> None:
    upsert_accounts(runtime.catalog, [free_account("csv", "2026-01-10T09:00:00")])
    record_usage(runtime.catalog, [UsageRecord("login-old", "csv", "login", at("2025-12-01T00:00:00"))])
    assert lifecycle(capsys, "2027-01-10T08:59:00Z") == []
    [notice] = lifecycle(capsys, "2027-01-10T09:00:00Z")
    assert notice["detail"]["last_login_at"] == "2026-01-10T09:00:00+00:00"


def test_an_smtp_outage_delays_the_timeline_and_skips_no_notice(runtime: Runtime, smtp_sink, capsys) -> None:
    upsert_accounts(runtime.catalog, [free_account("late", "2026-01-10T09:00:00")])
    smtp_sink.refusing = True
    assert lifecycle(capsys, "2027-01-11T03:00:00Z") == []
    assert lifecycle(capsys, "2027-01-12T03:00:00Z") == []
    with runtime.catalog.session() as session:
        failures = list(session.scalars(select(LifecycleDeliveryFailure).order_by(LifecycleDeliveryFailure.id)))
        assert [(f.kind, f.attempted_at) for f in failures] == [
            ("inactivity_notice", at("2027-01-11T03:00:00")),
            ("inactivity_notice", at("2027-01-12T03:00:00")),
        ]
        assert session.scalar(select(func.count()).select_from(SentMessage)) == 0
    smtp_sink.refusing = False
    [notice] = lifecycle(capsys, "2027-01-15T03:00:00Z")
    # The closure clock starts from the real delivery, four days late.
    assert notice["detail"]["closure_at"] == "2027-03-15T03:00:00+00:00"
    [r30] = lifecycle(capsys, "2027-02-13T03:00:00Z")
    assert r30["detail"]["days_before_closure"] == 30
    # The mail server is down from before the 7-day reminder until after the closure date.
    smtp_sink.refusing = True
    assert lifecycle(capsys, "2027-03-08T03:00:00Z") == []
    assert lifecycle(capsys, "2027-03-15T03:00:00Z") == []
    assert lifecycle(capsys, "2027-03-16T03:00:00Z") == []
    assert not is_locked(
        runtime.catalog, "late", at("2027-03-16T03:00:00"), pricebook=load_pricebook(runtime.settings.pricebook_path)
    )
    smtp_sink.refusing = False
    [r7] = lifecycle(capsys, "2027-03-17T03:00:00Z")
    # The customer still gets 7 days from the reminder that really went out.
    assert (r7["detail"]["days_before_closure"], r7["detail"]["closure_at"]) == (7, "2027-03-24T03:00:00+00:00")
    assert lifecycle(capsys, "2027-03-23T03:00:00Z") == []
    # The lock announcement fails too: locked at once, but the grace month waits for the e-mail.
    smtp_sink.refusing = True
    [terminated, locked] = lifecycle(capsys, "2027-03-24T03:00:00Z")
    assert terminated["action"] == "terminated" and locked["detail"]["deletion_at"] is None
    assert locked["detail"]["notice"] == {"status": "not delivered, retried next run"}
    assert is_locked(runtime.catalog, "late", pricebook=load_pricebook(runtime.settings.pricebook_path))
    assert lifecycle(capsys, "2027-03-25T03:00:00Z") == []
    smtp_sink.refusing = False
    [announced] = lifecycle(capsys, "2027-03-26T03:00:00Z")
    assert (announced["action"], announced["detail"]["deletion_at"]) == ("data_locked", "2027-04-26T03:00:00+00:00")
    assert lifecycle(capsys, "2027-04-25T03:00:00Z") == []
    [deleted] = lifecycle(capsys, "2027-04-26T03:00:00Z")
    assert deleted["action"] == "data_deleted"
    subjects = [m["Subject"] for m in sent(smtp_sink)]
    assert (
        len(subjects) == 4
        and "15 March 2027" in subjects[0]
        and "24 March 2027" in subjects[2]
        and "26 April 2027" in subjects[3]
    )


def test_legal_hold_blocks_deletion_until_released(runtime: Runtime, smtp_sink, capsys) -> None:
    upsert_accounts(runtime.catalog, [make_account("held", "professional")])
    runtime.store.put_bytes("accounts/held/raw/evidence.laz", b"E" * 100)
    assert main(["accounts", "terminate", "held", "--effective", "2027-01-01"]) == 0
    assert main(["accounts", "hold", "held", "--reason", "case 2026-17"]) == 0
    capsys.readouterr()
    [terminated, locked] = lifecycle(capsys, "2027-01-01T03:00:00Z")
    assert (terminated["detail"], locked["detail"]["deletion_at"]) == (
        {"reason": "customer"},
        "2027-02-01T03:00:00+00:00",
    )
    [blocked] = lifecycle(capsys, "2027-02-01T03:00:00Z")
    assert blocked["action"] == "data_deleted" and blocked["detail"]["status"] == "blocked"
    assert blocked["detail"]["reason"] == "legal hold: case 2026-17"
    assert lifecycle(capsys, "2027-02-02T03:00:00Z") == []  # reported once, still blocked
    assert runtime.store.exists("accounts/held/raw/evidence.laz")
    # A deletion request is refused too.
    assert main(["accounts", "delete", "held", "--confirm"]) == 2
    assert "legal hold" in capsys.readouterr().err
    assert runtime.store.exists("accounts/held/raw/evidence.laz")
    assert main(["accounts", "unhold", "held"]) == 0
    capsys.readouterr()
    [deleted] = lifecycle(capsys, "2027-02-03T03:00:00Z")
    assert deleted["detail"]["status"] == "deleted" and deleted["detail"]["keys"] == [
        {"key": "accounts/held/raw/evidence.laz", "bytes": 100, "versions": 1}
    ]
    assert not runtime.store.exists("accounts/held/raw/evidence.laz")


def faulty(fault: str, *args: str) -> subprocess.Popen:
    """`pointflow ARGS` in a process of its own, with a fault in its deletion (tests/lifecycle_faults.py)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.lifecycle_faults", fault, *args],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def waiting_for_a_lock(pid: int) -> bool:
    """True while the process waits for a file lock (an SQLite catalog's `Catalog.lock`)."""
    return any(line.split()[1] == "->" and line.split()[5] == str(pid) for line in Path("/proc/locks").open())


def wait_until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def terminated_with_data(runtime: Runtime, capsys, account_id: str) -> list[str]:
    """An account terminated on 2027-01-01 and locked (deletion due 2027-02-01 03:00), with five objects."""
    upsert_accounts(runtime.catalog, [make_account(account_id, "professional")])
    keys = [f"accounts/{account_id}/raw/scan-{n}.laz" for n in range(5)]
    for key in keys:
        runtime.store.put_bytes(key, b"P" * 100)
    assert main(["accounts", "terminate", account_id, "--effective", "2027-01-01"]) == 0
    capsys.readouterr()
    lifecycle(capsys, "2027-01-01T03:00:00Z")
    return keys


@pytest.mark.parametrize(
    "command",
    [["lifecycle", "run", "--as-of", "2027-02-01T03:00:00Z"], ["accounts", "delete", "held", "--confirm"]],
    ids=["lifecycle-run", "customer-request"],
)
def test_a_hold_placed_while_a_deletion_is_under_way_waits_for_it(
    runtime: Runtime, smtp_sink, capsys, tmp_path: Path, command: list[str]
) -> None:
    keys = terminated_with_data(runtime, capsys, "held")
    ready, go = tmp_path / "inventoried", tmp_path / "go"
    deleting = faulty(f"pause:{ready}:{go}", *command)
    wait_until(lambda: ready.exists() or deleting.poll() is not None, "the deletion's inventory")
    assert deleting.poll() is None, deleting.communicate()
    # The deletion has taken its inventory and not deleted yet: a legal hold is asked for now.
    holding = subprocess.Popen(
        [str(Path(sys.executable).with_name("pointflow")), "accounts", "hold", "held", "--reason", "case 2027-3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(
        lambda: holding.poll() is not None or waiting_for_a_lock(holding.pid), "the hold to be placed or to wait"
    )
    # It waits for the deletion under way: it is not committed while the deletion may still act on its inventory.
    assert holding.poll() is None, f"the hold was placed during the deletion: {holding.communicate()}"
    go.touch()
    assert deleting.wait(60) == 0, deleting.communicate()
    assert holding.wait(60) == 0, holding.communicate()
    assert not any(runtime.store.exists(k) for k in keys)
    with runtime.catalog.session() as session:
        [audit] = session.scalars(select(DeletionAudit))
        [hold] = session.scalars(select(LegalHold))
        assert (audit.status, audit.object_count) == ("completed", 5)
        assert hold.placed_at >= audit.finished_at


def test_a_deletion_refuses_a_hold_committed_after_its_plan_was_made(runtime: Runtime, smtp_sink, capsys) -> None:
    keys = terminated_with_data(runtime, capsys, "held")
    plan = account_deletion_plan(runtime.store, runtime.settings.scratch_dir, "held")
    with runtime.catalog.session() as session:
        session.add(LegalHold(account_id="held", reason="case 2027-4", placed_at=at("2027-01-31T12:00:00")))
    with pytest.raises(Exception, match="legal hold") as refused:
        execute_deletion(
            runtime.catalog, runtime.store, plan, "held", "customer_request", "account", at("2027-02-01T03:00:00")
        )
    assert "case 2027-4" in str(refused.value)
    assert all(runtime.store.exists(k) for k in keys)
    with runtime.catalog.session() as session:
        assert session.scalar(select(func.count()).select_from(DeletionAudit)) == 0
    # The nightly run reports the deletion as blocked, and nothing goes.
    [blocked] = lifecycle(capsys, "2027-02-01T03:00:00Z")
    assert blocked["detail"]["status"] == "blocked" and all(runtime.store.exists(k) for k in keys)


def test_a_deletion_killed_midway_is_closed_by_the_rerun_which_accounts_for_every_object(
    runtime: Runtime, smtp_sink, capsys
) -> None:
    keys = terminated_with_data(runtime, capsys, "gone")
    killed = faulty("kill:3", "lifecycle", "run", "--as-of", "2027-02-01T03:00:00Z")
    assert killed.wait(60) == -9, killed.communicate()
    assert [runtime.store.exists(k) for k in keys] == [False, False, True, True, True]
    [deleted] = lifecycle(capsys, "2027-02-01T03:00:00Z")
    assert deleted["action"] == "data_deleted" and not any(runtime.store.exists(k) for k in keys)
    with runtime.catalog.session() as session:
        first, second = session.scalars(select(DeletionAudit).order_by(DeletionAudit.id))
        assert (first.status, first.object_count, second.status) == ("interrupted", 5, "completed")
        assert f"#{second.id}" in first.error and first.finished_at is not None
        # The finished entry lists all five: three it deleted, two the killed run had.
        assert (second.object_count, second.version_count, second.bytes) == (5, 5, 500)
        assert [(o["key"], o.get("deleted_by")) for o in second.objects] == [
            (k, first.id if n < 2 else None) for n, k in enumerate(keys)
        ]
    assert main(["lifecycle", "audit", "--account", "gone"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "interrupted" in lines[0] and f"taken over by #{second.id}" in lines[0]
    assert "completed" in lines[1] and f"2 deleted by #{first.id} before it stopped" in lines[1]


def test_a_deletion_on_request_waits_for_the_accounts_running_jobs(runtime: Runtime, capsys) -> None:
    upsert_accounts(runtime.catalog, [make_account("busy", "professional")])
    runtime.store.put_bytes("accounts/busy/raw/scan.laz", b"P" * 100)
    with runtime.catalog.session() as session:
        session.add(
            Job(job_id="busy-job-1", account_id="busy", source="scan.laz", classifier="standard", state="classifying")
        )
    assert main(["accounts", "delete", "busy", "--confirm"]) == 2
    err = capsys.readouterr().err
    assert "job busy-job-1 is still classifying" in err and "once it has finished" in err
    assert runtime.store.exists("accounts/busy/raw/scan.laz")
    with runtime.catalog.session() as session:
        session.get(Job, "busy-job-1").state = JobState.FAILED.value
    assert main(["accounts", "delete", "busy", "--confirm"]) == 0
    assert not runtime.store.exists("accounts/busy/raw/scan.laz")


def test_the_nightly_deletion_waits_for_the_accounts_running_jobs(runtime: Runtime, smtp_sink, capsys) -> None:
    keys = terminated_with_data(runtime, capsys, "busy")
    with runtime.catalog.session() as session:
        session.add(
            Job(job_id="busy-job-1", account_id="busy", source="scan.laz", classifier="standard", state="classifying")
        )
    [deferred] = lifecycle(capsys, "2027-02-01T03:00:00Z")
    assert (deferred["action"], deferred["detail"]["status"], deferred["detail"]["job_id"]) == (
        "data_deleted",
        "deferred",
        "busy-job-1",
    )
    assert "job busy-job-1 is still classifying" in deferred["detail"]["reason"]
    assert lifecycle(capsys, "2027-02-02T03:00:00Z") == []  # reported once, still deferred
    assert all(runtime.store.exists(k) for k in keys)
    with runtime.catalog.session() as session:
        assert session.scalar(select(func.count()).select_from(DeletionAudit)) == 0
        session.get(Job, "busy-job-1").state = JobState.FAILED.value
    [deleted] = lifecycle(capsys, "2027-02-03T03:00:00Z")
    assert (deleted["action"], deleted["detail"]["status"]) == ("data_deleted", "deleted")
    assert not any(runtime.store.exists(k) for k in keys)


def test_no_job_is_created_while_a_deletion_of_the_account_is_under_way(
    runtime: Runtime, smtp_sink, capsys, tmp_path: Path, scene_path: Path
) -> None:
    upsert_accounts(runtime.catalog, [make_account("racer", "professional")])
    runtime.store.put_bytes("accounts/racer/raw/scan.laz", b"P" * 100)
    ready, go = tmp_path / "inventoried", tmp_path / "go"
    deleting = faulty(f"pause:{ready}:{go}", "accounts", "delete", "racer", "--confirm")
    wait_until(lambda: ready.exists() or deleting.poll() is not None, "the deletion's inventory")
    assert deleting.poll() is None, deleting.communicate()
    # The deletion found no job of the account and has not deleted yet: a job is asked for now.
    creating = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pipelines.runtime import Runtime; from pipelines.settings import Settings; "
            "from pipelines.steps.ingest import create_job; "
            "create_job(Runtime.from_settings(Settings.from_env()), 'racer-job-1', 'racer', sys.argv[1], 'standard')",
            str(scene_path),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def job_exists() -> bool:
        with runtime.catalog.session() as session:
            return session.get(Job, "racer-job-1") is not None

    wait_until(
        lambda: creating.poll() is not None or job_exists() or waiting_for_a_lock(creating.pid),
        "the job to be created or to wait",
    )
    # It waits for the deletion: a job created now would work on data the deletion is removing.
    assert creating.poll() is None and not job_exists(), (
        f"a job was created during the deletion: {creating.communicate()}"
    )
    go.touch()
    assert deleting.wait(60) == 0, deleting.communicate()
    assert creating.wait(60) == 0, creating.communicate()
    assert not runtime.store.exists("accounts/racer/raw/scan.laz")
    with runtime.catalog.session() as session:
        [audit] = session.scalars(select(DeletionAudit))
        assert audit.status == "completed"
        assert session.get(Job, "racer-job-1").created_at >= audit.finished_at


def api_job(runtime: Runtime, account_id: str, job_id: str, finished: str, file_id: int) -> None:
    area = f"accounts/{account_id}/"
    for key in (
        f"classified/{job_id}/out.laz",
        f"exports/{job_id}/out.laz",
        f"exports/{job_id}/manifest.json",
        f"reports/{job_id}-validation.json",
        f"tmp/exports/{job_id}/staged.laz",
    ):
        runtime.store.put_bytes(area + key, b"x" * 10)
    with runtime.catalog.session() as session:
        session.add(
            Job(
                job_id=job_id,
                account_id=account_id,
                source="in.laz",
                classifier="standard",
                state=JobState.EXPORTED.value,
                file_id=file_id,
                classified_key=area + f"classified/{job_id}/out.laz",
                export_prefix=area + f"exports/{job_id}/",
                finished_at=at(finished),
            )
        )


def test_api_results_are_deleted_ten_days_after_the_job(runtime: Runtime, smtp_sink, capsys) -> None:
    upsert_accounts(runtime.catalog, [make_account("robot", "api")])
    with runtime.catalog.session() as session:
        for name in ("a", "b"):
            session.add(
                StoredFile(
                    account_id="robot",
                    key=f"accounts/robot/raw/{name}.laz",
                    original_name=f"{name}.laz",
                    size=5,
                    sha256=name * 64,
                )
            )
    runtime.store.put_bytes("accounts/robot/raw/a.laz", b"a" * 5)
    runtime.store.put_bytes("accounts/robot/raw/b.laz", b"b" * 5)
    with runtime.catalog.session() as session:
        file_a, file_b = (
            session.scalars(select(StoredFile.id).where(StoredFile.key == f"accounts/robot/raw/{n}.laz")).one()
            for n in "ab"
        )
    api_job(runtime, "robot", "job-one", "2027-01-01T12:00:00", file_a)
    api_job(runtime, "robot", "job-two", "2027-01-05T12:00:00", file_a)  # the same input again
    api_job(runtime, "robot", "job-three", "2027-01-03T12:00:00", file_b)
    assert lifecycle(capsys, "2027-01-11T11:59:59Z") == []
    [one] = lifecycle(capsys, "2027-01-11T12:00:00Z")
    # The shared input stays while job-two's results may still be downloaded.
    assert (one["action"], one["detail"]["job_id"]) == ("api_results_deleted", "job-one")
    assert [k["key"] for k in one["detail"]["keys"]] == [
        "accounts/robot/classified/job-one/out.laz",
        "accounts/robot/exports/job-one/manifest.json",
        "accounts/robot/exports/job-one/out.laz",
        "accounts/robot/reports/job-one-validation.json",
        "accounts/robot/tmp/exports/job-one/staged.laz",
    ]
    assert runtime.store.exists("accounts/robot/raw/a.laz") and runtime.store.exists(
        "accounts/robot/exports/job-two/out.laz"
    )
    [three] = lifecycle(capsys, "2027-01-13T12:00:00Z")
    assert three["detail"]["job_id"] == "job-three" and "accounts/robot/raw/b.laz" in [
        k["key"] for k in three["detail"]["keys"]
    ]
    [two] = lifecycle(capsys, "2027-01-15T12:00:00Z")
    assert two["detail"]["job_id"] == "job-two" and "accounts/robot/raw/a.laz" in [
        k["key"] for k in two["detail"]["keys"]
    ]
    assert list(runtime.store.list("accounts/robot/")) == []
    assert lifecycle(capsys, "2027-01-20T12:00:00Z") == []
    with runtime.catalog.session() as session:
        assert session.scalar(select(func.count()).select_from(StoredFile)) == 0
        assert [j.classified_key for j in session.scalars(select(Job))] == [None, None, None]
        assert [a.rule for a in session.scalars(select(DeletionAudit).order_by(DeletionAudit.id))] == [
            "api_results"
        ] * 3
    # Each run that deleted results announced them, once.
    assert [m["Subject"] for m in sent(smtp_sink)] == [
        "pointflow: the results of 1 job of account robot were deleted"
    ] * 3


def test_api_result_deletions_are_announced_once_per_run(
    runtime: Runtime, smtp_sink, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.lifecycle.rules

    listed: list[str] = []

    def counted_export_bundles(store, account_id: str) -> list[str]:  # noqa: ANN001 (any store)
        listed.append(account_id)
        return export_bundles(store, account_id)

    monkeypatch.setattr(pipelines.lifecycle.rules, "export_bundles", counted_export_bundles)
    upsert_accounts(runtime.catalog, [make_account("told", "api")])
    with runtime.catalog.session() as session:
        stored = StoredFile(
            account_id="told", key="accounts/told/raw/in.laz", original_name="in.laz", size=5, sha256="d" * 64
        )
        session.add(stored)
        session.flush()
        file_id = stored.id
    runtime.store.put_bytes("accounts/told/raw/in.laz", b"i" * 5)
    api_job(runtime, "told", "job-a", "2026-11-01T10:00:00", file_id)
    api_job(runtime, "told", "job-b", "2026-11-02T02:00:00", file_id)
    api_job(runtime, "told", "job-c", "2026-11-05T00:00:00", None)
    actions = lifecycle(capsys, "2026-11-12T03:00:00Z")
    assert [(a["action"], a["detail"]["job_id"]) for a in actions] == [
        ("api_results_deleted", "job-a"),
        ("api_results_deleted", "job-b"),
    ]
    assert listed == ["told"], "the account's export-all bundles are listed once per run"
    # One notice for the run, listing both jobs: what, when, under which rule.
    [mail] = sent(smtp_sink)
    assert mail["To"] == "ops@told.example"
    assert mail["Subject"] == "pointflow: the results of 2 jobs of account told were deleted"
    body = mail.get_content()
    assert "job-a" in body and "job-b" in body and "job-c" not in body
    assert "12 November 2026, 03:00 UTC" in body and "10 days after" in body
    assert "01 November 2026, 10:00 UTC" in body  # job-a finished
    assert lifecycle(capsys, "2026-11-12T03:00:00Z") == []
    assert len(sent(smtp_sink)) == 1
    # The mail server refuses the next announcement: the deletion goes on, the notice follows.
    smtp_sink.refusing = True
    [c] = lifecycle(capsys, "2026-11-15T03:00:00Z")
    assert c["detail"]["job_id"] == "job-c" and c["detail"]["status"] == "deleted"
    smtp_sink.refusing = False
    assert lifecycle(capsys, "2026-11-16T03:00:00Z") == []
    late = sent(smtp_sink)[-1]
    assert (
        len(sent(smtp_sink)) == 2 and late["Subject"] == "pointflow: the results of 1 job of account told were deleted"
    )
    assert "job-c" in late.get_content() and "15 November 2026, 03:00 UTC" in late.get_content()
    assert lifecycle(capsys, "2026-11-17T03:00:00Z") == []
    assert len(sent(smtp_sink)) == 2


def test_api_retention_deletes_the_export_all_bundles_holding_copies(runtime: Runtime, smtp_sink, capsys) -> None:
    upsert_accounts(runtime.catalog, [make_account("apix", "api")])
    with runtime.catalog.session() as session:
        stored = StoredFile(
            account_id="apix", key="accounts/apix/raw/in.laz", original_name="in.laz", size=5, sha256="c" * 64
        )
        session.add(stored)
        session.flush()
        file_id = stored.id
    runtime.store.put_bytes("accounts/apix/raw/in.laz", b"i" * 5)
    api_job(runtime, "apix", "job-x", "2026-05-02T03:00:00", file_id)
    assert main(["accounts", "export-all", "apix", "--json"]) == 0
    bundle = json.loads(capsys.readouterr().out)["key"]
    assert runtime.store.exists(bundle)
    assert lifecycle(capsys, "2026-05-12T02:59:59Z") == []
    [deleted] = lifecycle(capsys, "2026-05-12T03:00:00Z")
    assert deleted["action"] == "api_results_deleted"
    # The bundle held the classified output, the export and the input: it goes with them, audited.
    assert bundle in [k["key"] for k in deleted["detail"]["keys"]]
    assert list(runtime.store.list("accounts/apix/")) == []
    with runtime.catalog.session() as session:
        [audit] = session.scalars(select(DeletionAudit))
        assert bundle in [o["key"] for o in audit.objects]


def test_api_retention_does_not_wait_for_a_job_not_yet_ingested(runtime: Runtime, smtp_sink, capsys) -> None:
    """A job created, not yet ingested, used to hold back the deletion of a due job's input (it
    might bring the same bytes): an API account with a job always arriving kept its data for ever.
    Now only a job using the input does; a new job takes stored bytes under the account's lock."""
    upsert_accounts(runtime.catalog, [make_account("apid", "api")])
    source = shared_file("isprs/samp11.las")
    stored = ingest_file(runtime.catalog, runtime.store, "apid", source)
    api_job(runtime, "apid", "job-x", "2026-05-02T03:00:00", stored.id)
    create_job(runtime, "job-new", "apid", str(source), "standard")
    [deleted] = lifecycle(capsys, "2026-05-12T03:00:00Z")
    assert (deleted["detail"]["job_id"], deleted["detail"]["status"]) == ("job-x", "deleted")
    assert stored.key in [k["key"] for k in deleted["detail"]["keys"]]
    assert list(runtime.store.list("accounts/apid/")) == []
    assert len(sent(smtp_sink)) == 1
    # The new job stores the same bytes again, for itself.
    ingest_step(runtime, "job-new")
    assert_job_input_stored(runtime, "job-new", stored.sha256)


def test_api_retention_keeps_an_input_a_later_job_uses(runtime: Runtime, smtp_sink, capsys) -> None:
    upsert_accounts(runtime.catalog, [make_account("apid", "api")])
    source = shared_file("isprs/samp11.las")
    stored = ingest_file(runtime.catalog, runtime.store, "apid", source)
    api_job(runtime, "apid", "job-x", "2026-05-02T03:00:00", stored.id)
    create_job(runtime, "job-new", "apid", str(source), "standard")
    ingest_step(runtime, "job-new")  # the same bytes again: job-x's input is job-new's too
    [deleted] = lifecycle(capsys, "2026-05-12T03:00:00Z")
    # job-x's results go; the input stays while job-new runs, and until job-new is due itself.
    assert (deleted["detail"]["job_id"], deleted["detail"]["status"]) == ("job-x", "deleted")
    assert stored.key not in [k["key"] for k in deleted["detail"]["keys"]]
    assert [o.key for o in runtime.store.list("accounts/apid/")] == [stored.key]
    with runtime.catalog.session() as session:
        job = session.get(Job, "job-new")
        job.state, job.finished_at = JobState.FAILED.value, at("2026-05-12T05:00:00")
    assert lifecycle(capsys, "2026-05-22T04:59:59Z") == []
    [deleted] = lifecycle(capsys, "2026-05-22T05:00:00Z")
    assert (deleted["detail"]["job_id"], deleted["detail"]["status"]) == ("job-new", "deleted")
    assert list(runtime.store.list("accounts/apid/")) == []


def test_an_ingest_whose_stored_bytes_are_deleted_before_it_takes_them_stores_them_again(
    runtime: Runtime, smtp_sink, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the rule above no longer waits out: the ingest finds the bytes stored, the nightly
    deletion removes them, then the ingest attaches them to its job."""
    upsert_accounts(runtime.catalog, [make_account("apid", "api")])
    source = shared_file("isprs/samp11.las")
    stored = ingest_file(runtime.catalog, runtime.store, "apid", source)
    api_job(runtime, "apid", "job-x", "2026-05-02T03:00:00", stored.id)
    create_job(runtime, "job-new", "apid", str(source), "standard")
    deletions = []

    def found_then_deleted(*args, **kwargs):
        found = ingest_file(*args, **kwargs)
        if not deletions:
            assert found.id == stored.id and not found.created
            deletions.extend(lifecycle(capsys, "2026-05-12T03:00:00Z"))
        return found

    monkeypatch.setattr("pipelines.steps.ingest.ingest_file", found_then_deleted)
    ingest_step(runtime, "job-new")
    assert [(d["detail"]["job_id"], d["detail"]["status"]) for d in deletions] == [("job-x", "deleted")]
    assert_job_input_stored(runtime, "job-new", stored.sha256)


def assert_job_input_stored(runtime: Runtime, job_id: str, sha256: str) -> None:
    with runtime.catalog.session() as session:
        record = session.get(StoredFile, session.get(Job, job_id).file_id)
        assert record is not None and record.sha256 == sha256
        assert runtime.store.exists(record.key)


def test_a_trial_ends_fourteen_days_after_start(runtime: Runtime, smtp_sink, capsys) -> None:
    upsert_accounts(
        runtime.catalog,
        [
            replace(make_account("tryout", "trial"), started_at=date(2027, 1, 1)),
            replace(make_account("converted", "professional"), started_at=date(2027, 1, 1)),
        ],
    )
    assert lifecycle(capsys, "2027-01-14T23:59:59Z") == []
    actions = lifecycle(capsys, "2027-01-15T03:00:00Z")
    assert [(a["account_id"], a["action"], a["effective_at"]) for a in actions] == [
        ("tryout", "trial_ended", "2027-01-15T00:00:00+00:00"),
        ("tryout", "terminated", "2027-01-15T00:00:00+00:00"),
        ("tryout", "data_locked", "2027-01-15T00:00:00+00:00"),
    ]
    assert actions[0]["detail"] == {"started_on": "2027-01-01", "trial_days": 14}
    assert actions[2]["detail"]["deletion_at"] == "2027-02-15T03:00:00+00:00"
    assert "your trial ended" in sent(smtp_sink)[0].get_content()
    assert is_locked(
        runtime.catalog, "tryout", pricebook=load_pricebook(runtime.settings.pricebook_path)
    ) and not is_locked(runtime.catalog, "converted", pricebook=load_pricebook(runtime.settings.pricebook_path))


def change_plan(capsys: pytest.CaptureFixture[str], account_id: str, plan: str, effective: str, *extra: str) -> None:
    """`pointflow accounts change-plan ACCOUNT --plan PLAN --effective DATE`."""
    code = main(["accounts", "change-plan", account_id, "--plan", plan, "--effective", effective, *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err


def stored_file(runtime: Runtime, account_id: str, name: str) -> int:
    key = f"accounts/{account_id}/raw/{name}"
    runtime.store.put_bytes(key, b"i" * 5)
    with runtime.catalog.session() as session:
        stored = StoredFile(account_id=account_id, key=key, original_name=name, size=5, sha256=name[0] * 64)
        session.add(stored)
        session.flush()
        return stored.id


def test_api_results_follow_the_plan_the_job_ran_under(runtime: Runtime, smtp_sink, capsys) -> None:
    # A professional account that moves to api next year, and an api account that moved to professional.
    upsert_accounts(runtime.catalog, [make_account("upgrader", "professional"), make_account("downgrader", "api")])
    change_plan(capsys, "upgrader", "api", "2027-01-01")
    change_plan(capsys, "downgrader", "professional", "2026-09-01")
    api_job(runtime, "upgrader", "pro-job", "2026-03-01T12:00:00", stored_file(runtime, "upgrader", "p.laz"))
    api_job(runtime, "upgrader", "api-job", "2027-01-05T12:00:00", stored_file(runtime, "upgrader", "q.laz"))
    api_job(runtime, "downgrader", "old-api-job", "2026-04-01T12:00:00", stored_file(runtime, "downgrader", "a.laz"))
    api_job(runtime, "downgrader", "new-pro-job", "2026-10-01T12:00:00", stored_file(runtime, "downgrader", "b.laz"))

    # The api job of the downgraded account goes 10 days after it finished, though the account is
    # professional now; the upgraded account's professional job stays.
    [old] = lifecycle(capsys, "2026-05-02T03:00:00Z")
    assert (old["account_id"], old["action"], old["detail"]["job_id"]) == (
        "downgrader",
        "api_results_deleted",
        "old-api-job",
    )
    assert not runtime.store.exists("accounts/downgrader/raw/a.laz")
    # Once the upgrade is in force, only the job run under api goes.
    assert lifecycle(capsys, "2026-11-01T03:00:00Z") == []
    [new] = lifecycle(capsys, "2027-01-15T12:00:00Z")
    assert (new["account_id"], new["detail"]["job_id"]) == ("upgrader", "api-job")
    assert lifecycle(capsys, "2027-06-01T03:00:00Z") == []
    for key in (
        "accounts/upgrader/raw/p.laz",
        "accounts/upgrader/classified/pro-job/out.laz",
        "accounts/upgrader/exports/pro-job/out.laz",
        "accounts/downgrader/raw/b.laz",
        "accounts/downgrader/classified/new-pro-job/out.laz",
    ):
        assert runtime.store.exists(key), key
    assert not runtime.store.exists("accounts/upgrader/raw/q.laz")


def test_inactivity_applies_only_while_the_account_is_free(runtime: Runtime, smtp_sink, capsys) -> None:
    upsert_accounts(
        runtime.catalog,
        [
            replace(
                make_account("lapsing", "professional"),
                started_at=date(2024, 6, 1),
                last_login_at=at("2025-01-01T00:00:00"),
            )
        ],
    )
    change_plan(capsys, "lapsing", "free", "2027-06-01")
    # Still on the paid plan: no notice, no closure.
    assert lifecycle(capsys, "2026-12-02T03:00:00Z") == []
    assert lifecycle(capsys, "2027-02-02T03:00:00Z") == []
    assert not is_locked(
        runtime.catalog, "lapsing", at("2027-02-02T03:00:00"), pricebook=load_pricebook(runtime.settings.pricebook_path)
    )
    # Free from 2027-06-01, and inactive for more than 12 months by then.
    [notice] = lifecycle(capsys, "2027-06-01T03:00:00Z")
    assert notice["action"] == "inactivity_notice" and notice["detail"]["closure_at"] == "2027-08-01T03:00:00+00:00"


def test_a_trial_converted_later_still_ends_after_fourteen_days(runtime: Runtime, smtp_sink, capsys) -> None:
    upsert_accounts(
        runtime.catalog,
        [
            replace(make_account("late", "trial"), started_at=date(2026, 11, 20)),
            replace(make_account("early", "trial"), started_at=date(2026, 11, 20)),
        ],
    )
    change_plan(capsys, "late", "professional", "2027-03-01")
    change_plan(capsys, "early", "professional", "2026-12-01")
    assert lifecycle(capsys, "2026-12-03T03:00:00Z") == []
    actions = lifecycle(capsys, "2026-12-04T03:00:00Z")
    assert [(a["account_id"], a["action"], a["effective_at"]) for a in actions] == [
        ("late", "trial_ended", "2026-12-04T00:00:00+00:00"),
        ("late", "terminated", "2026-12-04T00:00:00+00:00"),
        ("late", "data_locked", "2026-12-04T00:00:00+00:00"),
    ]
    assert is_locked(
        runtime.catalog, "late", pricebook=load_pricebook(runtime.settings.pricebook_path)
    ) and not is_locked(runtime.catalog, "early", pricebook=load_pricebook(runtime.settings.pricebook_path))


def test_a_trial_is_locked_from_its_end_before_any_run_records_it(runtime: Runtime, smtp_sink, capsys) -> None:
    upsert_accounts(
        runtime.catalog,
        [
            replace(make_account("tryout", "trial"), started_at=date(2027, 1, 1)),
            replace(make_account("paying", "trial"), started_at=date(2027, 1, 1)),
        ],
    )
    change_plan(capsys, "paying", "professional", "2027-01-10")
    assert not is_locked(
        runtime.catalog, "tryout", at("2027-01-14T23:59:59"), pricebook=load_pricebook(runtime.settings.pricebook_path)
    )
    ensure_active(
        runtime.catalog, "tryout", at("2027-01-14T23:59:59"), pricebook=load_pricebook(runtime.settings.pricebook_path)
    )
    # The trial ended at 00:00; the nightly run (03:00, or a missed one) has recorded nothing yet.
    for moment in ("2027-01-15T00:00:00", "2027-01-15T02:59:00", "2027-01-20T00:00:00"):
        assert is_locked(
            runtime.catalog, "tryout", at(moment), pricebook=load_pricebook(runtime.settings.pricebook_path)
        ), moment
        with pytest.raises(AccountLocked, match="tryout is closed"):
            ensure_active(
                runtime.catalog, "tryout", at(moment), pricebook=load_pricebook(runtime.settings.pricebook_path)
            )
        assert not is_locked(
            runtime.catalog, "paying", at(moment), pricebook=load_pricebook(runtime.settings.pricebook_path)
        )
    with runtime.catalog.session() as session:
        assert session.get(Termination, "tryout") is None
    [row] = [a for a in build_dashboard(runtime, at("2027-01-15T02:59:00")).accounts if a.account_id == "tryout"]
    assert row.status == ("closed (trial ended), data locked",)


def test_overdue_accounts_get_a_notice_five_days_before_service_stops(runtime: Runtime, smtp_sink, capsys) -> None:
    from pipelines.billing.invoicing import run_billing

    upsert_accounts(runtime.catalog, [make_account("payer", "professional"), make_account("owes", "professional")])
    run_billing(runtime.catalog, "2026-10", load_pricebook(), now=at("2026-11-01T01:00:00"))
    with runtime.catalog.session() as session:
        due = {i.account_id: (i.due_date, i.total) for i in session.scalars(select(Invoice))}
    assert due["owes"][0] == date(2026, 12, 1)
    from pipelines.billing.imports import PaymentRecord, import_payments

    with runtime.catalog.session() as session:
        number = session.scalars(select(Invoice.invoice_number).where(Invoice.account_id == "payer")).one()
    import_payments(runtime.catalog, [(2, PaymentRecord("payer", number, due["payer"][1], at("2026-11-20T00:00:00")))])
    # Services stop 30 days after the due date (2026-12-31); the notice goes 5 days before.
    assert lifecycle(capsys, "2026-12-25T03:00:00Z") == []
    [notice] = lifecycle(capsys, "2026-12-26T00:00:00Z")
    mail = sent(smtp_sink)[0]
    assert notice == {
        "account_id": "owes",
        "action": "overdue_notice",
        "effective_at": "2026-12-26T00:00:00+00:00",
        "detail": {
            "amount": str(due["owes"][1]),
            "currency": "EUR",
            "oldest_due_date": "2026-12-01",
            "service_stops_at": "2026-12-31T00:00:00+00:00",
            "message_id": mail["Message-ID"],
        },
    }
    assert mail["To"] == "ops@owes.example" and "31 December 2026" in mail.get_content()
    assert lifecycle(capsys, "2026-12-27T03:00:00Z") == []


def test_the_overdue_notice_lists_the_invoices_how_to_pay_and_whom_to_tell(runtime: Runtime) -> None:
    """Each overdue invoice with its number, date, due date and what is open of it, the total, the
    seller's bank details, the stop date and the support address, all dates written alike."""
    from email import message_from_bytes, policy

    from pipelines.billing.imports import PaymentRecord, import_payments
    from pipelines.billing.invoicing import run_billing
    from pipelines.billing.money import format_money
    from pipelines.billing.pricebook import Seller
    from pipelines.lifecycle.rules import run_lifecycle
    from pipelines.notify import outbox_messages

    seller = Seller(
        "Acme LiDAR GmbH",
        "Hauptstr. 1",
        "10115",
        "Berlin",
        "DE",
        "DE123456789",
        email="billing@acme.example",
        bank="Berliner Bank",
        iban="DE02120300000000202051",
        bic="BYLADEM1001",
    )
    book = replace(load_pricebook(), seller=seller)
    upsert_accounts(runtime.catalog, [make_account("owes", "professional")])
    run_billing(runtime.catalog, "2026-10", book, now=at("2026-11-01T01:00:00"))
    with runtime.catalog.session() as session:
        invoice = session.scalars(select(Invoice)).one()
        number, total, issued = invoice.invoice_number, invoice.total, invoice.issue_date
    import_payments(runtime.catalog, [(2, PaymentRecord("owes", number, Decimal("10.00"), at("2026-11-20T00:00:00")))])
    run_lifecycle(runtime, at("2026-12-26T00:00:00"), pricebook=book)
    [path] = outbox_messages(runtime.settings)
    message = message_from_bytes(path.read_bytes(), policy=policy.default)
    body = " ".join(message.get_content().split())
    open_amount = format_money(total - Decimal("10.00"))
    assert f"- {number} of {issued:%d %B %Y}, due 01 December 2026: EUR {open_amount} open" in body, body
    assert f"Total overdue: EUR {open_amount}." in body
    assert "Berliner Bank, IBAN DE02120300000000202051, BIC BYLADEM1001, quoting the invoice numbers" in body
    assert "Services stop: 31 December 2026, 00:00 UTC." in body
    assert "pointflow support at billing@acme.example" in body
    assert not re.search(r"\b\d{4}-\d{2}-\d{2}\b", body), "one date format, as the other mails write dates"


def test_services_stop_for_non_payment_only_after_the_overdue_notice(
    runtime: Runtime, smtp_sink, capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.billing.imports import PaymentRecord, import_payments
    from pipelines.billing.invoicing import run_billing

    def terminate(account_id: str, effective: str, code: int) -> str:
        assert main(["accounts", "terminate", account_id, "--reason", "non_payment", "--effective", effective]) == code
        captured = capsys.readouterr()
        return captured.err if code else captured.out

    upsert_accounts(runtime.catalog, [make_account("payer", "professional"), make_account("owes", "professional")])
    run_billing(runtime.catalog, "2026-10", load_pricebook(), now=at("2026-11-01T01:00:00"))
    with runtime.catalog.session() as session:
        payer = session.scalars(select(Invoice).where(Invoice.account_id == "payer")).one()
    import_payments(runtime.catalog, [(2, PaymentRecord("payer", payer.invoice_number, payer.total, at("2026-11-20")))])
    # Nothing overdue: no stop for non-payment.
    err = terminate("payer", "2026-12-02", 2)
    assert "no overdue balance" in err and "--reason customer" in err
    # Overdue since 2026-12-01, but no notice delivered yet.
    assert lifecycle(capsys, "2026-12-25T03:00:00Z") == []
    err = terminate("owes", "2026-12-31", 2)
    assert "no overdue notice" in err and "lifecycle run" in err
    [notice] = lifecycle(capsys, "2026-12-26T00:00:00Z")
    assert notice["detail"]["service_stops_at"] == "2026-12-31T00:00:00+00:00"
    # Earlier than the notice says: refused, with the first date allowed.
    err = terminate("owes", "2026-12-27", 2)
    assert "2026-12-26T00:00:00+00:00" in err and "--effective 2026-12-31 or later" in err
    # The notice period comes from the policy: a longer one pushes the first date allowed.
    policy = tmp_path / "policy.yaml"
    policy.write_text("defaults:\n  overdue_notice_days: 7\n")
    monkeypatch.setenv("POINTFLOW_LIFECYCLE_POLICY", str(policy))
    assert "--effective 2027-01-02 or later" in terminate("owes", "2026-12-31", 2)
    monkeypatch.delenv("POINTFLOW_LIFECYCLE_POLICY")
    assert "last day of service 2026-12-30" in terminate("owes", "2026-12-31", 0)
    assert is_locked(
        runtime.catalog, "owes", at("2026-12-31T00:00:00"), pricebook=load_pricebook(runtime.settings.pricebook_path)
    )


def test_dry_run_changes_nothing_and_sends_nothing(runtime: Runtime, smtp_sink, capsys) -> None:
    upsert_accounts(runtime.catalog, [free_account("quiet", "2026-01-10T09:00:00")])
    [dry] = lifecycle(capsys, "2027-01-11T03:00:00Z", "--dry-run")
    assert dry["action"] == "inactivity_notice" and dry["detail"]["message_id"] is None
    assert sent(smtp_sink) == []
    [real] = lifecycle(capsys, "2027-01-11T03:00:00Z")
    assert {k: v for k, v in real["detail"].items() if k != "message_id"} == {
        k: v for k, v in dry["detail"].items() if k != "message_id"
    }


def test_the_timeline_on_postgresql(
    postgres_url: str, home: Path, monkeypatch: pytest.MonkeyPatch, smtp_sink, capsys
) -> None:
    monkeypatch.setenv("POINTFLOW_DATABASE_URL", postgres_url)
    runtime = Runtime.from_settings(Settings.from_env())
    try:
        upsert_accounts(runtime.catalog, [free_account("pg", "2026-01-10T09:00:00")])
        runtime.store.put_bytes("accounts/pg/raw/a.laz", b"a" * 7)
        steps = [
            "2027-01-11T03:00:00Z",
            "2027-02-09T03:00:00Z",
            "2027-03-04T03:00:00Z",
            "2027-03-11T03:00:00Z",
            "2027-04-11T03:00:00Z",
        ]
        actions = [a["action"] for step in steps for a in lifecycle(capsys, step)]
        assert actions == [
            "inactivity_notice",
            "inactivity_reminder",
            "inactivity_reminder",
            "terminated",
            "data_locked",
            "data_deleted",
        ]
        assert [lifecycle(capsys, step) for step in steps] == [[]] * len(steps)
        assert list(runtime.store.list("accounts/pg/")) == []
    finally:
        runtime.catalog.dispose()


def test_a_termination_asked_for_after_a_trials_end_does_not_lengthen_the_trial(
    runtime: Runtime, smtp_sink, capsys
) -> None:
    upsert_accounts(runtime.catalog, [replace(make_account("leaving", "trial"), started_at=date(2027, 1, 1))])
    assert main(["accounts", "terminate", "leaving", "--effective", "2027-03-01"]) == 0
    capsys.readouterr()
    pricebook = load_pricebook(runtime.settings.pricebook_path)
    assert not is_locked(runtime.catalog, "leaving", at("2027-01-14T23:59:59"), pricebook=pricebook)
    # The trial's 14 days end on 15 January, before the termination asked for: locked from then.
    assert is_locked(runtime.catalog, "leaving", at("2027-01-15T00:00:00"), pricebook=pricebook)
    [row] = [a for a in build_dashboard(runtime, at("2027-01-15T02:59:00")).accounts if a.account_id == "leaving"]
    assert row.status == ("closed (trial ended), data locked",)
    actions = lifecycle(capsys, "2027-01-15T03:00:00Z")
    assert [(a["action"], a["effective_at"]) for a in actions][:2] == [
        ("trial_ended", "2027-01-15T00:00:00+00:00"),
        ("terminated", "2027-01-15T00:00:00+00:00"),
    ]
    with runtime.catalog.session() as session:
        termination = session.get(Termination, "leaving")
        assert (termination.reason, termination.effective_at) == ("trial_ended", at("2027-01-15T00:00:00"))


def test_an_export_of_all_data_waits_for_a_deletion_under_way_and_keeps_no_copy_of_it(
    runtime: Runtime, smtp_sink, capsys, tmp_path: Path
) -> None:
    upsert_accounts(runtime.catalog, [make_account("leaver", "professional")])
    runtime.store.put_bytes("accounts/leaver/raw/scan.laz", b"P" * 100)
    ready, go = tmp_path / "inventoried", tmp_path / "go"
    deleting = faulty(f"pause:{ready}:{go}", "accounts", "delete", "leaver", "--confirm")
    wait_until(lambda: ready.exists() or deleting.poll() is not None, "the deletion's inventory")
    assert deleting.poll() is None, deleting.communicate()
    # The deletion has listed the account's objects and not deleted them yet: an export is asked for now.
    exporting = subprocess.Popen(
        [str(Path(sys.executable).with_name("pointflow")), "accounts", "export-all", "leaver", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(
        lambda: exporting.poll() is not None or waiting_for_a_lock(exporting.pid), "the export to finish or to wait"
    )
    assert exporting.poll() is None, f"the export ran during the deletion: {exporting.communicate()}"
    go.touch()
    assert deleting.wait(60) == 0, deleting.communicate()
    out, err = exporting.communicate(timeout=60)
    assert exporting.returncode == 0, err
    bundle = json.loads(out)["key"]
    with zipfile.ZipFile(io.BytesIO(runtime.store.get_bytes(bundle))) as archive:
        assert "raw/scan.laz" not in archive.namelist()
    assert not runtime.store.exists("accounts/leaver/raw/scan.laz")
