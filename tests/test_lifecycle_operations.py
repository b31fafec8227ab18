"""Lifecycle operations from the command line (terminate, export-all, delete, audit), the policy
file, loud failure when a deletion leaves objects behind, and the nightly DAG run once."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from sqlalchemy import select

from pipelines.accounts import get_account, upsert_accounts
from pipelines.billing.models import BillingTerms, Invoice
from pipelines.billing.pricebook import load_pricebook
from pipelines.cli import main
from pipelines.lifecycle import PolicyError, is_locked, load_policy, place_hold, release_holds
from pipelines.lifecycle.models import DeletionAudit, LifecycleAction
from pipelines.lifecycle.operations import deletion_plan, paid_term_end, terminate_account
from pipelines.runtime import Runtime
from pipelines.settings import Settings
from tests.conftest import make_account

UTC = UTC


def cli(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0) -> str:
    result = main(list(argv))
    captured = capsys.readouterr()
    assert result == code, captured.err
    return captured.out if code == 0 else captured.err


def seed(runtime: Runtime, account_id: str) -> dict[str, bytes]:
    objects = {
        f"accounts/{account_id}/raw/abc-scan.laz": b"L" * 300,
        f"accounts/{account_id}/exports/job-1/scan.laz": b"E" * 200,
        f"accounts/{account_id}/exports/job-1/manifest.json": b'{"ok": true}',
        f"accounts/{account_id}/models/custom.json": b"{}",
    }
    for key, data in objects.items():
        runtime.store.put_bytes(key, data)
    return objects


def test_export_all_bundles_every_object_with_a_link(runtime: Runtime, capsys) -> None:
    upsert_accounts(runtime.catalog, [make_account("acme")])
    objects = seed(runtime, "acme")
    first = json.loads(cli(capsys, "accounts", "export-all", "acme", "--json"))
    assert (first["objects"], first["bytes"]) == (4, sum(len(d) for d in objects.values()))
    assert first["key"].startswith("accounts/acme/exports/all-data/acme-") and first["key"].endswith(".zip")
    archive = zipfile.ZipFile(io.BytesIO(Path(unquote(urlparse(first["link"]).path)).read_bytes()))
    for key, data in objects.items():
        assert archive.read(key.removeprefix("accounts/acme/")) == data
    manifest = json.loads(archive.read("MANIFEST.json"))
    assert len(manifest["objects"]) == 4
    # A later bundle does not pack the earlier one.
    runtime.store.put_bytes("accounts/acme/raw/def-more.laz", b"M")
    second = json.loads(cli(capsys, "accounts", "export-all", "acme", "--json"))
    assert second["objects"] == 5


def test_export_all_holds_everything_deletion_would_call_the_accounts_data(runtime: Runtime, capsys) -> None:
    upsert_accounts(runtime.catalog, [make_account("dz")])
    objects = seed(runtime, "dz")
    runtime.store.put_bytes("incoming/dz/refused-scan.laz", b"R" * 40)  # refused in the drop zone, still there
    runtime.store.put_bytes("accounts/dz/invoices/PF-2026-10-0001.html", b"<html>invoice</html>")
    runtime.store.put_bytes("incoming/dz2/other.laz", b"O")  # another account's drop zone
    assert "incoming/dz/refused-scan.laz" in [o.key for o in deletion_plan(runtime, "dz").objects]
    bundle = json.loads(cli(capsys, "accounts", "export-all", "dz", "--json"))
    archive = zipfile.ZipFile(io.BytesIO(Path(unquote(urlparse(bundle["link"]).path)).read_bytes()))
    assert archive.read("incoming/refused-scan.laz") == b"R" * 40
    # What deletion keeps (billing records) is the customer's too.
    assert archive.read("invoices/PF-2026-10-0001.html") == b"<html>invoice</html>"
    for key, data in objects.items():
        assert archive.read(key.removeprefix("accounts/dz/")) == data
    assert sorted(archive.namelist()) == sorted(
        [k.removeprefix("accounts/dz/") for k in objects]
        + ["incoming/refused-scan.laz", "invoices/PF-2026-10-0001.html", "MANIFEST.json"]
    )
    manifest = json.loads(archive.read("MANIFEST.json"))
    assert {"path": "incoming/refused-scan.laz", "bytes": 40} in manifest["objects"]
    assert bundle["objects"] == len(objects) + 2


def test_export_all_on_s3_gives_a_presigned_link(
    home: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from urllib.request import urlopen

    monkeypatch.setenv("POINTFLOW_STORAGE_URL", f"s3://{s3_bucket}")
    runtime = Runtime.from_settings(Settings.from_env())
    runtime.store.client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    upsert_accounts(runtime.catalog, [make_account("acme")])
    objects = seed(runtime, "acme")
    runtime.store.put_bytes("accounts/acme/tmp/gone.bin", b"G" * 7)
    runtime.store.client.delete_object(Bucket=s3_bucket, Key="accounts/acme/tmp/gone.bin")  # old version only
    runtime.store.put_bytes("accounts/acme/raw/abc-scan.laz", b"N" * 30)  # a second version: the current one goes
    bundle = json.loads(cli(capsys, "accounts", "export-all", "acme", "--json"))
    archive = zipfile.ZipFile(io.BytesIO(urlopen(bundle["link"]).read()))
    assert sorted(archive.namelist()) == sorted([k.removeprefix("accounts/acme/") for k in objects] + ["MANIFEST.json"])
    assert archive.read("raw/abc-scan.laz") == b"N" * 30
    assert bundle["bytes"] == sum(len(d) for d in objects.values()) - 300 + 30


def test_delete_lists_without_confirm_and_deletes_with_it(runtime: Runtime, capsys) -> None:
    upsert_accounts(runtime.catalog, [make_account("acme"), make_account("other")])
    objects = seed(runtime, "acme")
    seed(runtime, "other")
    err = cli(capsys, "accounts", "delete", "acme", code=2)
    assert "add --confirm" in err
    assert all(runtime.store.exists(k) for k in objects)
    listing = cli(capsys, "accounts", "delete", "acme", "--confirm", "--json")
    result = json.loads(listing)
    assert result["deleted"] is True and sorted(k["key"] for k in result["keys"]) == sorted(objects)
    assert list(runtime.store.list("accounts/acme/")) == [] and len(list(runtime.store.list("accounts/other/"))) == 4
    audit = json.loads(cli(capsys, "lifecycle", "audit", "--account", "acme", "--json"))
    assert [(a["rule"], a["status"], a["objects"], a["bytes"]) for a in audit] == [
        ("customer_request", "completed", 4, sum(len(d) for d in objects.values()))
    ]
    assert get_account(runtime.catalog, "acme").email == "ops@acme.example"  # the account (billing record) stays


def test_deleting_an_account_removes_the_links_and_fifos_of_its_drop_zone_never_their_targets(
    runtime: Runtime, capsys
) -> None:
    import os

    upsert_accounts(runtime.catalog, [make_account("dz"), make_account("other")])
    others = seed(runtime, "other")
    target = "accounts/other/raw/abc-scan.laz"
    root = runtime.store.root
    runtime.store.put_bytes("incoming/dz/scan.laz", b"D" * 10)
    (root / "incoming/dz/sub").mkdir()
    os.symlink(root / target, root / "incoming/dz/stolen.laz")  # a link to another account's object
    os.symlink(root / "accounts/other/raw", root / "incoming/dz/sub/folder")  # a link to another account's folder
    os.mkfifo(root / "incoming/dz/pipe.laz")
    strays = ["incoming/dz/pipe.laz", "incoming/dz/stolen.laz", "incoming/dz/sub/folder"]
    listed = [k["key"] for k in deletion_plan(runtime, "dz").summary()["keys"]]
    assert listed == ["incoming/dz/" + name for name in ("pipe.laz", "scan.laz", "stolen.laz", "sub/folder")]

    result = json.loads(cli(capsys, "accounts", "delete", "dz", "--confirm", "--json"))
    assert result["deleted"] is True
    # The entries themselves are gone, and the drop zone with them; what the links pointed at stays.
    assert not os.path.lexists(root / "incoming/dz")
    for key, data in others.items():
        assert runtime.store.get_bytes(key) == data
    [audit] = json.loads(cli(capsys, "lifecycle", "audit", "--account", "dz", "--json"))
    assert audit["status"] == "completed"
    with runtime.catalog.session() as session:
        [entry] = session.scalars(select(DeletionAudit))
        assert sorted(o["key"] for o in entry.objects) == sorted(["incoming/dz/scan.laz", *strays])


def test_deleting_an_account_whose_drop_zone_is_a_link_removes_the_link_only(runtime: Runtime, capsys) -> None:
    import os

    upsert_accounts(runtime.catalog, [make_account("dz"), make_account("other")])
    others = seed(runtime, "other")
    seed(runtime, "dz")
    root = runtime.store.root
    (root / "incoming").mkdir(exist_ok=True)
    os.symlink(root / "accounts/other/raw", root / "incoming/dz")
    result = json.loads(cli(capsys, "accounts", "delete", "dz", "--confirm", "--json"))
    assert result["deleted"] is True and "incoming/dz" in [k["key"] for k in result["keys"]]
    assert not os.path.lexists(root / "incoming/dz") and list(runtime.store.list("accounts/dz/")) == []
    for key, data in others.items():
        assert runtime.store.get_bytes(key) == data


def test_a_deletion_on_request_is_confirmed_to_the_customer_once(runtime: Runtime, smtp_sink, capsys) -> None:
    upsert_accounts(runtime.catalog, [make_account("cust")])
    objects = seed(runtime, "cust")
    smtp_sink.refusing = True  # the confirmation cannot go out at once: the nightly run sends it
    result = json.loads(cli(capsys, "accounts", "delete", "cust", "--confirm", "--json"))
    assert result["deleted"] is True and list(runtime.store.list("accounts/cust/")) == []
    assert smtp_sink.messages == []
    smtp_sink.refusing = False
    assert json.loads(cli(capsys, "lifecycle", "run", "--as-of", "2026-11-13T03:00:00Z", "--json")) == []
    [mail] = smtp_sink.parsed()
    assert (mail["To"], mail["Subject"]) == (
        "ops@cust.example",
        "pointflow: the data of account cust was deleted at your request",
    )
    body = mail.get_content()
    assert f"{len(objects)} files" in body and f"deletion {result['audit_id']}" in body and "as you asked" in body
    cli(capsys, "lifecycle", "run", "--as-of", "2026-11-14T03:00:00Z")
    # Asking again finds nothing left: nothing deleted, nothing more to confirm.
    cli(capsys, "accounts", "delete", "cust", "--confirm")
    assert len(smtp_sink.messages) == 1

    # Delivered at once when the mail server is up.
    upsert_accounts(runtime.catalog, [make_account("quick")])
    seed(runtime, "quick")
    cli(capsys, "accounts", "delete", "quick", "--confirm")
    assert smtp_sink.parsed()[-1]["Subject"] == "pointflow: the data of account quick was deleted at your request"
    cli(capsys, "lifecycle", "run", "--as-of", "2026-11-15T03:00:00Z")
    assert len(smtp_sink.messages) == 2


def test_a_deletion_that_leaves_objects_behind_fails_loudly(
    runtime: Runtime, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    upsert_accounts(runtime.catalog, [make_account("acme")])
    seed(runtime, "acme")
    real_delete = type(runtime.store).delete

    def delete_but_one(store, key):
        if not key.endswith("manifest.json"):
            real_delete(store, key)

    monkeypatch.setattr(type(runtime.store), "delete", delete_but_one)
    err = cli(capsys, "accounts", "delete", "acme", "--confirm", code=1)
    assert "still present" in err and "accounts/acme/exports/job-1/manifest.json" in err
    with runtime.catalog.session() as session:
        [audit] = session.scalars(select(DeletionAudit))
        assert audit.status == "failed" and "manifest.json" in audit.error

    # In a lifecycle run the other accounts are still processed, then the run fails.
    cli(capsys, "accounts", "terminate", "acme", "--effective", "2027-01-01")
    cli(capsys, "lifecycle", "run", "--as-of", "2027-01-01T03:00:00Z")
    err = cli(capsys, "lifecycle", "run", "--as-of", "2027-02-01T03:00:00Z", code=1)
    assert "lifecycle run incomplete" in err and "manifest.json" in err


def test_terminate_defaults_to_the_end_of_the_paid_term_and_stops_billing(runtime: Runtime, capsys) -> None:
    upsert_accounts(
        runtime.catalog,
        [
            make_account("monthly"),
            replace(make_account("yearly"), billing_cycle="yearly", started_at=date(2026, 3, 15)),
        ],
    )
    assert paid_term_end(runtime.catalog, "monthly", date(2026, 11, 22)) == date(2026, 12, 1)
    assert paid_term_end(runtime.catalog, "yearly", date(2026, 11, 22)) == date(2027, 3, 15)
    assert paid_term_end(runtime.catalog, "yearly", date(2027, 3, 15)) == date(2028, 3, 15)
    out = cli(capsys, "accounts", "terminate", "monthly", "--effective", "2027-02-01")
    assert "last day of service 2027-01-31" in out
    with runtime.catalog.session() as session:
        assert session.get(BillingTerms, "monthly").ended_on == date(2027, 1, 31)
    assert not is_locked(
        runtime.catalog,
        "monthly",
        datetime(2027, 1, 31, 23, 59, tzinfo=UTC),
        pricebook=load_pricebook(runtime.settings.pricebook_path),
    )
    assert is_locked(
        runtime.catalog,
        "monthly",
        datetime(2027, 2, 1, tzinfo=UTC),
        pricebook=load_pricebook(runtime.settings.pricebook_path),
    )
    assert "already terminated" in cli(capsys, "accounts", "terminate", "monthly", code=2)
    assert "unknown account" in cli(capsys, "accounts", "terminate", "ghost", code=2)


def test_terminating_a_prepaid_cycle_keeps_access_to_the_end_of_the_invoiced_cycle(runtime: Runtime, capsys) -> None:
    from pipelines.billing.invoicing import run_billing

    # Monthly from 2026-01-15, yearly from 2026-06-01: the cycle runs from the change, not the start.
    upsert_accounts(runtime.catalog, [replace(make_account("prepaid"), started_at=date(2026, 1, 15))])
    cli(
        capsys,
        "accounts",
        "change-plan",
        "prepaid",
        "--plan",
        "professional",
        "--billing-cycle",
        "yearly",
        "--effective",
        "2026-06-01",
    )
    run_billing(runtime.catalog, "2026-06", load_pricebook(), now=datetime(2026, 7, 1, 1, tzinfo=UTC))
    with runtime.catalog.session() as session:
        [invoice] = session.scalars(select(Invoice).where(Invoice.account_id == "prepaid"))
        assert any("yearly 2026-06-01 to 2027-05-31, in advance" in line.description for line in invoice.lines)
    assert paid_term_end(runtime.catalog, "prepaid", date(2026, 11, 22)) == date(2027, 6, 1)
    view = terminate_account(runtime.catalog, "prepaid", now=datetime(2026, 11, 22, 10, tzinfo=UTC))
    assert (view.last_day_of_service, view.effective_at) == (date(2027, 5, 31), datetime(2027, 6, 1, tzinfo=UTC))
    with runtime.catalog.session() as session:
        assert session.get(BillingTerms, "prepaid").ended_on == date(2027, 5, 31)
    assert not is_locked(
        runtime.catalog,
        "prepaid",
        datetime(2027, 5, 31, 23, 59, tzinfo=UTC),
        pricebook=load_pricebook(runtime.settings.pricebook_path),
    )
    assert is_locked(
        runtime.catalog,
        "prepaid",
        datetime(2027, 6, 1, tzinfo=UTC),
        pricebook=load_pricebook(runtime.settings.pricebook_path),
    )


def test_policy_file_per_plan_and_from_the_environment(
    tmp_path: Path, runtime: Runtime, smtp_sink, capsys, monkeypatch
) -> None:
    default = load_policy()
    assert default.for_plan("free").inactivity_notice_after_months == 12
    assert default.for_plan("professional").inactivity_notice_after_months is None
    assert default.for_plan("trial").grace_months == 1 and default.for_plan("free").reminder_days_before_closure == (
        30,
        7,
    )
    custom = tmp_path / "policy.yaml"
    custom.write_text(
        "defaults:\n  grace_months: 2\nplans:\n  free:\n    inactivity_notice_after_months: 6\n    reminder_days_before_closure: [14]\n"
    )
    monkeypatch.setenv("POINTFLOW_LIFECYCLE_POLICY", str(custom))
    policy = load_policy(Settings.from_env().lifecycle_policy_path)
    assert (policy.for_plan("free").inactivity_notice_after_months, policy.for_plan("free").grace_months) == (6, 2)
    upsert_accounts(
        runtime.catalog, [replace(make_account("short", "free"), last_login_at=datetime(2026, 1, 1, tzinfo=UTC))]
    )
    [notice] = json.loads(cli(capsys, "lifecycle", "run", "--as-of", "2026-07-01T00:00:00Z", "--json"))
    assert notice["detail"]["deletion_at"] == "2026-11-01T00:00:00+00:00"  # closure + 2 months of grace
    for text, message in [
        ("defaults:\n  grace_days: 3\n", "unknown field"),
        ("defaults:\n  reminder_days_before_closure: []\n", "non-empty list"),
        (
            "plans:\n  free:\n    inactivity_notice_after_months: 12\n    reminder_days_before_closure: [90]\n",
            "reminders must come after the notice",
        ),
        ("defaults:\n  grace_months: -1\n", "whole number"),
    ]:
        custom.write_text(text)
        with pytest.raises(PolicyError, match=message):
            load_policy(custom)
    assert "does not exist" in cli(capsys, "lifecycle", "run", "--policy", str(tmp_path / "missing.yaml"), code=2)


def test_nightly_dag_applies_the_rules_as_of_its_logical_date(airflow_home: Path, runtime: Runtime, smtp_sink) -> None:
    from pipelines.airflow_local import load_dag

    dag = load_dag("lifecycle_nightly")
    assert [t.task_id for t in dag.tasks] == ["apply_rules", "deliver_unsent", "close_stale_jobs"]
    upsert_accounts(
        runtime.catalog, [replace(make_account("sleepy", "free"), last_login_at=datetime(2026, 1, 10, 9, tzinfo=UTC))]
    )
    logical = datetime(2027, 1, 11, 3, tzinfo=UTC)
    dag_run = dag.test(logical_date=logical)
    assert str(dag_run.state) == "success"
    with runtime.catalog.session() as session:
        [action] = session.scalars(select(LifecycleAction))
        assert (action.action, action.as_of, action.effective_at) == ("inactivity_notice", logical, logical)
    assert len(smtp_sink.messages) == 1
    # The same night again: nothing new.
    dag.test(logical_date=logical)
    assert len(smtp_sink.messages) == 1


def test_deleting_an_account_removes_the_part_file_of_a_killed_upload(runtime: Runtime, capsys, tmp_path: Path) -> None:
    import signal

    from tests.test_storage import _writer_in_put_file

    upsert_accounts(runtime.catalog, [make_account("acme")])
    seed(runtime, "acme")
    root = runtime.store.root
    process, pipe, part = _writer_in_put_file(root, "accounts/acme/raw/big.las", tmp_path / "big.las")
    process.send_signal(signal.SIGKILL)
    process.wait()
    pipe.close()
    key = part.relative_to(root).as_posix()
    # The dry run lists it, with its bytes; the deletion removes it and says so in its audit entry.
    listed = {k["key"]: k for k in deletion_plan(runtime, "acme").summary()["keys"]}
    assert listed[key]["bytes"] == 8 << 20 and listed[key]["what"]
    result = json.loads(cli(capsys, "accounts", "delete", "acme", "--confirm", "--json"))
    assert result["deleted"] is True
    assert not part.exists() and not (root / "accounts/acme/raw").exists()
    with runtime.catalog.session() as session:
        [entry] = session.scalars(select(DeletionAudit))
        assert key in [o["key"] for o in entry.objects] and entry.status == "completed"


def test_the_nightly_stale_job_sweep_removes_part_files_of_killed_uploads(runtime: Runtime, tmp_path: Path) -> None:
    import os
    import signal
    from datetime import timedelta

    from pipelines.lifecycle.sweeps import close_stale_jobs
    from tests.test_storage import _writer_in_put_file

    root = runtime.store.root
    process, pipe, part = _writer_in_put_file(root, "accounts/acme/raw/big.las", tmp_path / "big.las")
    process.send_signal(signal.SIGKILL)
    process.wait()
    pipe.close()
    close_stale_jobs(runtime)
    assert part.exists()  # a fresh one stays an hour
    old = part.stat().st_mtime - 2 * 3600
    os.utime(part, (old, old))
    upsert_accounts(runtime.catalog, [make_account("acme")])
    place_hold(runtime.catalog, "acme", "litigation")
    close_stale_jobs(runtime, datetime.now(UTC) + timedelta(minutes=1))
    assert part.exists()  # on legal hold: nothing of the account is deleted
    release_holds(runtime.catalog, "acme")
    close_stale_jobs(runtime, datetime.now(UTC) + timedelta(minutes=1))
    assert not part.exists()


def _unfinished_upload(runtime: Runtime, key: str, size: int = 5 << 20) -> str:
    """What a writer killed mid-way through a multipart upload leaves: an upload begun, one part stored."""
    store = runtime.store
    full = store.prefix + key
    upload = store.client.create_multipart_upload(Bucket=store.bucket, Key=full)["UploadId"]
    store.client.upload_part(Bucket=store.bucket, Key=full, UploadId=upload, PartNumber=1, Body=b"P" * size)
    return upload


def _uploads(runtime: Runtime) -> dict[str, str]:
    found = runtime.store.client.list_multipart_uploads(Bucket=runtime.store.bucket).get("Uploads", [])
    return {u["UploadId"]: u["Key"] for u in found}


@pytest.fixture
def s3_runtime(home: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    monkeypatch.setenv("POINTFLOW_STORAGE_URL", f"s3://{s3_bucket}/svc")
    runtime = Runtime.from_settings(Settings.from_env())
    yield runtime
    runtime.catalog.dispose()


def test_deleting_an_account_on_s3_aborts_its_unfinished_multipart_uploads(s3_runtime: Runtime, capsys) -> None:
    runtime = s3_runtime
    upsert_accounts(runtime.catalog, [make_account("acme"), make_account("other")])
    seed(runtime, "acme")
    # The service's own upload killed mid-way (beside the object it would replace), a customer's
    # into the drop zone, and another account's: neither `list` nor the versions listing shows any.
    ours = _unfinished_upload(runtime, "accounts/acme/raw/abc-scan.laz")
    theirs = _unfinished_upload(runtime, "incoming/acme/drop.laz", 6 << 20)
    other = _unfinished_upload(runtime, "accounts/other/raw/big.las")
    listed = [k for k in deletion_plan(runtime, "acme").summary()["keys"] if "upload_id" in k]
    assert [(k["key"], k["bytes"], k["upload_id"]) for k in listed] == [
        ("accounts/acme/raw/abc-scan.laz", 5 << 20, ours),
        ("incoming/acme/drop.laz", 6 << 20, theirs),
    ]
    assert all(k["what"].startswith("an unfinished multipart upload") for k in listed)
    dry = cli(capsys, "accounts", "delete", "acme", code=2)
    assert "add --confirm" in dry
    result = json.loads(cli(capsys, "accounts", "delete", "acme", "--confirm", "--json"))
    assert result["deleted"] is True and result["objects"] == 6
    assert _uploads(runtime) == {other: "svc/accounts/other/raw/big.las"}
    with runtime.catalog.session() as session:
        [entry] = session.scalars(select(DeletionAudit))
        assert entry.status == "completed" and entry.bytes >= 11 << 20
        assert {o["upload_id"] for o in entry.objects if "upload_id" in o} == {ours, theirs}


def test_deleting_a_file_on_s3_aborts_the_unfinished_upload_to_its_key(s3_runtime: Runtime) -> None:
    from pipelines.lifecycle.deletion import execute_deletion, plan_deletion

    runtime = s3_runtime
    upsert_accounts(runtime.catalog, [make_account("acme")])
    seed(runtime, "acme")
    key = "accounts/acme/raw/abc-scan.laz"
    upload = _unfinished_upload(runtime, key)
    longer = _unfinished_upload(runtime, key + ".copy")  # the key is a prefix of it: not this file's
    plan = plan_deletion(runtime.store, [], [key], [])
    audit = execute_deletion(
        runtime.catalog, runtime.store, plan, "acme", "customer_request", "file", datetime.now(UTC)
    )
    assert _uploads(runtime) == {longer: "svc/" + key + ".copy"} and not runtime.store.exists(key)
    assert [(o["key"], o.get("upload_id")) for o in audit.objects] == [(key, None), (key, upload)]


def test_the_nightly_sweep_aborts_unfinished_uploads_by_their_age_on_s3(
    s3_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import timedelta

    from pipelines.lifecycle.sweeps import close_stale_jobs

    runtime = s3_runtime
    upload = _unfinished_upload(runtime, "incoming/acme/drop.laz")
    [info] = runtime.store.unfinished_uploads("")
    initiated = info.modified  # as S3 reports it (moto's is a fixed date)
    close_stale_jobs(runtime, initiated + timedelta(hours=23))
    assert upload in _uploads(runtime)  # a writer may still complete it
    monkeypatch.setenv("POINTFLOW_STALE_UPLOAD_HOURS", "48")
    patient = Runtime.from_settings(Settings.from_env())
    close_stale_jobs(patient, initiated + timedelta(hours=25))
    assert upload in _uploads(runtime)
    patient.catalog.dispose()
    # An account on legal hold keeps even these, until its release.
    upsert_accounts(runtime.catalog, [make_account("held")])
    kept = _unfinished_upload(runtime, "accounts/held/raw/big.laz")
    kept_drop = _unfinished_upload(runtime, "incoming/held/drop.laz")
    place_hold(runtime.catalog, "held", "litigation")
    close_stale_jobs(runtime, initiated + timedelta(hours=25))
    assert _uploads(runtime) == {kept: "svc/accounts/held/raw/big.laz", kept_drop: "svc/incoming/held/drop.laz"}
    release_holds(runtime.catalog, "held")
    close_stale_jobs(runtime, initiated + timedelta(hours=25))
    assert _uploads(runtime) == {}
