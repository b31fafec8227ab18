"""Plan and service limits, each at, just below and just above its value; refusals cost nothing."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from pipelines.accounts import upsert_accounts
from pipelines.admission import GB, AdmissionRefused, Candidate, check_admission
from pipelines.billing.corrections import TermsUpdate, set_billing_terms
from pipelines.catalog.models import StoredFile
from pipelines.jobs import run_job
from pipelines.metering import UsageRecord, record_usage
from pipelines.runtime import Runtime
from pipelines.settings import Settings
from tests.conftest import make_account

AT = datetime(2026, 10, 15, 12, tzinfo=UTC)


def store_files(
    runtime: Runtime, account_id: str, *files: tuple[int, int], created: datetime = AT, state: str = "validated"
) -> None:
    with runtime.catalog.session() as session:
        for n, (size, points) in enumerate(files):
            digest = f"{account_id}-{n}-{size}-{points}-{created.isoformat()}".ljust(64, "0")[:64]
            session.add(
                StoredFile(
                    account_id=account_id,
                    key=f"accounts/{account_id}/raw/{digest}",
                    original_name="f.laz",
                    size=size,
                    sha256=digest,
                    point_count=points,
                    state=state,
                    created_at=created,
                )
            )


@pytest.fixture
def admit(runtime: Runtime):
    def check(account_id: str, size: int = 1000, points: int = 1000) -> None:
        check_admission(runtime.settings, runtime.catalog, account_id, Candidate(size, points), AT)

    return check


@pytest.mark.parametrize("stored,allowed", [(1, True), (2, True), (3, False)])
def test_free_plan_file_count(runtime: Runtime, admit, stored: int, allowed: bool) -> None:
    upsert_accounts(runtime.catalog, [make_account("f", plan="free")])
    store_files(runtime, "f", *[(100, 10)] * stored)
    if allowed:
        admit("f")
    else:
        with pytest.raises(AdmissionRefused, match=r"stored files limit: 4 files with this file, the limit is 3 files"):
            admit("f")


@pytest.mark.parametrize("points,allowed", [(44_999_999, True), (45_000_000, True), (45_000_001, False)])
def test_free_plan_stored_points(runtime: Runtime, admit, points: int, allowed: bool) -> None:
    upsert_accounts(runtime.catalog, [make_account("f", plan="free")])
    store_files(runtime, "f", (100, 20_000_000))
    if allowed:
        admit("f", points=points - 20_000_000)
    else:
        with pytest.raises(AdmissionRefused, match=r"stored points limit: 45,000,001 points .* limit is 45,000,000"):
            admit("f", points=points - 20_000_000)


@pytest.mark.parametrize("total,allowed", [(500_000_000 - 1, True), (500_000_000, True), (500_000_001, False)])
def test_api_monthly_points_cap_counts_usage(runtime: Runtime, admit, total: int, allowed: bool) -> None:
    upsert_accounts(runtime.catalog, [make_account("api1", plan="api")])
    record_usage(
        runtime.catalog,
        [
            UsageRecord("e1", "api1", "classification", AT.replace(day=2), 300_000_000, "succeeded"),
            UsageRecord(
                "e2", "api1", "classification", AT.replace(day=3), 999_000_000, "failed"
            ),  # not billed, not counted
            UsageRecord("e3", "api1", "classification", AT.replace(month=9), 400_000_000, "succeeded"),  # last month
        ],
    )
    if allowed:
        admit("api1", points=total - 300_000_000)
    else:
        with pytest.raises(AdmissionRefused, match=r"monthly points limit: 500,000,001 points .* 500,000,000"):
            admit("api1", points=total - 300_000_000)


@pytest.mark.parametrize("extra,allowed", [(-1, True), (0, True), (1, False)])
def test_professional_storage_limit(runtime: Runtime, admit, extra: int, allowed: bool) -> None:
    upsert_accounts(runtime.catalog, [make_account("p", plan="professional")])
    store_files(runtime, "p", (99 * GB, 1000), created=AT.replace(month=8))
    if allowed:
        admit("p", size=GB + extra)
    else:
        with pytest.raises(AdmissionRefused, match=r"professional plan's storage limit"):
            admit("p", size=GB + extra)


def test_extra_storage_bought_as_a_dated_term_raises_the_storage_limit_from_its_date(runtime: Runtime) -> None:
    upsert_accounts(runtime.catalog, [make_account("x", plan="professional")])
    set_billing_terms(runtime.catalog, "x", TermsUpdate(extra_storage_gb=50, effective_on=date(2026, 10, 16)))
    store_files(runtime, "x", (120 * GB, 1000), created=AT.replace(month=8))
    store_files(runtime, "x", (26 * GB, 1000), created=AT.replace(day=16))
    day_before, change_day = datetime(2026, 10, 15, 23, 59, tzinfo=UTC), datetime(2026, 10, 16, 13, tzinfo=UTC)
    # The day before, the plan's 100 GB is the limit.
    with pytest.raises(
        AdmissionRefused,
        match=r"storage limit: 146,000,000,001 bytes with this file, the limit is 100,000,000,000 bytes",
    ):
        check_admission(runtime.settings, runtime.catalog, "x", Candidate(1, 10), day_before)
    # From the term's date: 100 + 50 GB.
    check_admission(runtime.settings, runtime.catalog, "x", Candidate(4 * GB, 10), change_day)
    with pytest.raises(
        AdmissionRefused,
        match=r"storage limit: 150,000,000,001 bytes with this file, the limit is 150,000,000,000 bytes",
    ):
        check_admission(runtime.settings, runtime.catalog, "x", Candidate(4 * GB + 1, 10), change_day)


@pytest.mark.parametrize("extra,allowed", [(-1, True), (0, True), (1, False)])
def test_professional_monthly_upload_limit(runtime: Runtime, admit, extra: int, allowed: bool) -> None:
    upsert_accounts(runtime.catalog, [make_account("p", plan="professional")])
    # Uploaded this month and since deleted: no longer stored, still uploaded.
    store_files(runtime, "p", (99 * GB, 1000), created=AT.replace(day=1, hour=0), state="deleted")
    if allowed:
        admit("p", size=GB + extra)
    else:
        with pytest.raises(AdmissionRefused, match=r"monthly upload limit"):
            admit("p", size=GB + extra)


def test_service_limits_from_settings(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POINTFLOW_MAX_FILE_BYTES", "5000")
    monkeypatch.setenv("POINTFLOW_MAX_POINTS", "100")
    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [make_account("p")])
    check_admission(runtime.settings, runtime.catalog, "p", Candidate(5000, 100), AT)
    with pytest.raises(AdmissionRefused, match="maximum file size limit: 5,001 bytes"):
        check_admission(runtime.settings, runtime.catalog, "p", Candidate(5001, 100), AT)
    with pytest.raises(AdmissionRefused, match="maximum points per file limit: 101 points"):
        check_admission(runtime.settings, runtime.catalog, "p", Candidate(10, 101), AT)


def test_a_refused_job_stores_nothing_and_costs_nothing(runtime: Runtime, scene_path: Path) -> None:
    upsert_accounts(runtime.catalog, [make_account("f", plan="free")])
    store_files(runtime, "f", (100, 10), (100, 10), (100, 10))
    job = run_job(runtime, "f", str(scene_path))
    assert job.state == "failed" and "stored files limit" in job.error
    assert list(runtime.store.list("accounts/f/")) == []
    from sqlalchemy import select

    from pipelines.catalog.models import UsageEvent

    with runtime.catalog.session() as session:
        assert [(e.status, e.points) for e in session.scalars(select(UsageEvent))] == [("failed", 0)]


def test_a_closed_account_can_neither_upload_nor_start_jobs_nor_get_links(runtime: Runtime, scene_path: Path) -> None:
    from datetime import date

    from pipelines.lifecycle.operations import AccountLocked, terminate_account
    from pipelines.steps.deliver import delivery_terms

    upsert_accounts(runtime.catalog, [make_account("gone", plan="professional")])
    terminate_account(runtime.catalog, "gone", effective=date(2026, 1, 31))
    with pytest.raises(AccountLocked, match="export-all"):
        run_job(runtime, "gone", str(scene_path))
    with pytest.raises(AccountLocked):
        check_admission(runtime.settings, runtime.catalog, "gone", Candidate(10, 10), AT)
    with pytest.raises(AccountLocked):
        delivery_terms(runtime, "gone")
    assert list(runtime.store.list("accounts/gone/")) == []


@pytest.mark.parametrize("check", ["admission", "delivery terms"])
def test_one_check_reads_the_accounts_plan_history_once(runtime: Runtime, admit, check: str) -> None:
    from sqlalchemy import event

    from pipelines.steps.deliver import delivery_terms

    upsert_accounts(runtime.catalog, [make_account("f", plan="free")])
    statements: list[str] = []

    def seen(conn, cursor, statement: str, *args) -> None:  # noqa: ANN001 (SQLAlchemy's event signature)
        statements.append(statement)

    event.listen(runtime.catalog.engine, "before_cursor_execute", seen)
    try:
        admit("f") if check == "admission" else delivery_terms(runtime, "f", AT)
    finally:
        event.remove(runtime.catalog.engine, "before_cursor_execute", seen)
    # The lock check and the plan's limits both need the history: read once, for both.
    assert sum("FROM plan_changes" in s for s in statements) == 1
    assert sum("FROM term_changes" in s for s in statements) == 1
