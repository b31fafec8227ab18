"""Exactly once under concurrency, on SQLite and PostgreSQL: commands started together on a new
catalog, the same bytes ingested at once, two lifecycle runs at once, a crash between claiming a
notice and sending it; and one bad account that must not stop the nightly run for the others."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipelines.accounts import upsert_accounts
from pipelines.catalog import Catalog
from pipelines.catalog.models import Account, MessageClaim, StoredFile, UsageEvent
from pipelines.customer_text import Mail
from pipelines.lifecycle.models import LifecycleDeliveryFailure, LifecycleNotice
from pipelines.notify import DeliveryInProgress, Message, send_once
from pipelines.settings import Settings
from tests.conftest import make_account, shared_file

CONSOLE = Path(sys.executable).with_name("pointflow")


def together(commands: list[list[str]], env: dict[str, str], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Start every command at once (each a `pointflow` process), then wait for all."""
    processes = [
        subprocess.Popen([str(CONSOLE), *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    results = []
    for command, process in zip(commands, processes):
        out, err = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return results


@pytest.fixture
def environment(home: Path, database_url: str) -> dict[str, str]:
    return {**os.environ, "POINTFLOW_DATABASE_URL": database_url, "POINTFLOW_WORKERS": "1"}


def add_account(account_id: str, plan: str = "professional", email: str | None = None) -> list[str]:
    return [
        "accounts",
        "add",
        account_id,
        "--name",
        f"{account_id} Ltd",
        "--email",
        email or f"ops@{account_id}.example",
        "--country",
        "DE",
        "--plan",
        plan,
        "--started-at",
        "2025-01-01",
    ]


def accounts(database_url: str, *account_ids: str, plan: str = "professional") -> None:
    """Set-up without a process per account: the accounts, in a migrated catalog."""
    catalog = Catalog(database_url)
    catalog.migrate()
    upsert_accounts(catalog, [replace(make_account(a, plan), started_at=date(2025, 1, 1)) for a in account_ids])
    catalog.dispose()


@pytest.fixture(scope="module")
def dask_cluster():
    """One Dask cluster for the commands of a test: the cost under test is the catalog's, not
    five local clusters starting at once."""
    from tests.faults import DaskProcesses

    cluster = DaskProcesses(workers=2)
    yield cluster.address
    cluster.close()


def clean(results: list[subprocess.CompletedProcess]) -> None:
    for result in results:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr and "already exists" not in result.stderr, result.stderr


def test_commands_started_together_on_a_new_catalog_all_succeed(environment: dict[str, str], database_url: str) -> None:
    clean(together([add_account(f"acct{n}") for n in range(5)], environment))
    catalog = Catalog(database_url)
    with catalog.session() as session:
        assert session.scalar(select(func.count()).select_from(Account)) == 5
    catalog.dispose()


def test_the_same_bytes_ingested_at_once_are_stored_and_registered_once(
    environment: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    accounts(database_url, "acme")
    source = shared_file("isprs/samp21.las")
    renamed = tmp_path / "same-bytes-other-name.las"
    renamed.write_bytes(source.read_bytes())
    clean(
        together(
            [["ingest", str(source), "--account", "acme"]] * 4 + [["ingest", str(renamed), "--account", "acme"]],
            environment,
        )
    )
    catalog = Catalog(database_url)
    with catalog.session() as session:
        [stored] = session.scalars(select(StoredFile))
    catalog.dispose()
    raw = sorted(
        p.name for p in (Path(environment["POINTFLOW_HOME"]) / "objects" / "accounts" / "acme" / "raw").iterdir()
    )
    assert raw == [stored.key.rsplit("/", 1)[1]]


@pytest.mark.slow
def test_the_same_bytes_ingested_and_run_at_once_are_as_many_jobs_on_one_file(
    environment: dict[str, str], database_url: str, dask_cluster: str, tmp_path: Path
) -> None:
    """The whole pipeline three times at once (the race itself is the ingest's, above, with five)."""
    import laspy

    accounts(database_url, "acme")
    source = laspy.read(shared_file("isprs/samp21.las"))
    small = laspy.LasData(source.header)
    small.points = source.points[:2000]
    small.write(tmp_path / "small.las")
    results = together(
        [["ingest", str(tmp_path / "small.las"), "--account", "acme", "--run"]] * 3,
        {**environment, "POINTFLOW_DASK_ADDRESS": dask_cluster},
    )
    clean(results)
    assert all(r.stdout.startswith("job ") and ": exported" in r.stdout for r in results)
    catalog = Catalog(database_url)
    with catalog.session() as session:
        assert session.scalar(select(func.count()).select_from(StoredFile)) == 1
        assert sorted(e.status for e in session.scalars(select(UsageEvent))) == ["succeeded"] * 3
    catalog.dispose()


def test_two_lifecycle_runs_at_once_mail_each_customer_once(
    environment: dict[str, str], database_url: str, smtp_sink
) -> None:
    environment = {**environment, "POINTFLOW_SMTP_URL": smtp_sink.url}
    accounts(database_url, *(f"sleepy{n}" for n in range(4)), plan="free")
    # Never logged in since 2025-01-01: the inactivity notice is due on 2026-01-01.
    runs = together([["lifecycle", "run", "--as-of", "2026-01-02T03:00:00Z"]] * 2, environment)
    clean(runs)
    recipients = sorted(m["To"] for m in smtp_sink.parsed())
    assert recipients == [f"ops@sleepy{n}.example" for n in range(4)]
    # Between them the two runs reported each notice once.
    assert sum(r.stdout.count("inactivity_notice") for r in runs) == 4
    catalog = Catalog(database_url)
    with catalog.session() as session:
        assert session.scalar(select(func.count()).select_from(LifecycleNotice)) == 4
        assert session.scalar(select(func.count()).select_from(MessageClaim)) == 0
    catalog.dispose()


def test_a_claim_left_by_a_crash_is_sent_once_by_the_next_run_and_a_live_one_is_left_alone(
    home: Path, database_url: str, smtp_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POINTFLOW_DATABASE_URL", database_url)
    settings = Settings.from_env()
    catalog = Catalog(settings.database_url)
    catalog.migrate()
    # A run claimed these notices and died before sending: one an hour ago, one just now (still sending).
    stale, live = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC)
    with catalog.session() as session:
        for key, claimed in (("notice:stale", stale), ("notice:live", live)):
            session.add(
                MessageClaim(
                    key=key,
                    account_id="acme",
                    message_id=f"<{key.replace(':', '.')}@pointflow.invalid>",
                    claimed_at=claimed,
                )
            )
    sent = send_once(
        settings,
        catalog,
        Message("notice:stale", "acme", "test", "ops@acme.example", Mail("subject", "body")),
        reply_to=None,
    )
    assert sent.message_id == "<notice.stale@pointflow.invalid>"  # the claim's id: a resend is recognisable
    with pytest.raises(DeliveryInProgress):
        send_once(
            settings,
            catalog,
            Message("notice:live", "acme", "test", "ops@acme.example", Mail("subject", "body")),
            reply_to=None,
        )
    assert (
        send_once(
            settings,
            catalog,
            Message("notice:stale", "acme", "test", "ops@acme.example", Mail("subject", "body")),
            reply_to=None,
        ).location
        == "already sent"
    )
    assert [m["Message-ID"] for m in smtp_sink.parsed()] == ["<notice.stale@pointflow.invalid>"]
    with catalog.session() as session:
        assert [c.key for c in session.scalars(select(MessageClaim))] == ["notice:live"]
    catalog.dispose()


def test_a_refused_delivery_releases_its_claim(
    home: Path, database_url: str, smtp_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.notify import DeliveryError

    monkeypatch.setenv("POINTFLOW_DATABASE_URL", database_url)
    settings = Settings.from_env()
    catalog = Catalog(settings.database_url)
    catalog.migrate()
    smtp_sink.refusing = True
    with pytest.raises(DeliveryError):
        send_once(
            settings,
            catalog,
            Message("notice:x", "acme", "test", "ops@acme.example", Mail("subject", "body")),
            reply_to=None,
        )
    with catalog.session() as session:
        assert session.scalar(select(func.count()).select_from(MessageClaim)) == 0
    smtp_sink.refusing = False
    send_once(
        settings,
        catalog,
        Message("notice:x", "acme", "test", "ops@acme.example", Mail("subject", "body")),
        reply_to=None,
    )
    assert len(smtp_sink.messages) == 1
    catalog.dispose()


def test_a_bad_stored_address_is_reported_and_the_others_are_mailed(
    environment: dict[str, str], database_url: str, smtp_sink
) -> None:
    environment = {**environment, "POINTFLOW_SMTP_URL": smtp_sink.url}
    hostile = "x@e.example\nBcc: everyone@victim.example"
    refused = together([add_account("hostile", plan="free", email=hostile)], environment)[0]
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "e-mail address" in refused.stderr
    accounts(database_url, "sleepy0", "sleepy1", plan="free")
    # As if stored before addresses were checked: written straight into the catalog.
    catalog = Catalog(database_url)
    with catalog.session() as session:
        session.add(
            Account(
                account_id="legacy",
                name="Legacy",
                email=hostile,
                country="DE",
                plan="free",
                started_at=date(2025, 1, 1),
            )
        )
    [run] = together([["lifecycle", "run", "--as-of", "2026-01-02T03:00:00Z"]], environment)
    # Like any refused delivery: reported, retried next run, and no clock moves for that account.
    assert run.returncode == 0 and "Traceback" not in run.stderr
    [warning] = [line for line in run.stderr.splitlines() if "legacy" in line]
    assert "not delivered" in warning and "e-mail address" in warning
    assert sorted(m["To"] for m in smtp_sink.parsed()) == ["ops@sleepy0.example", "ops@sleepy1.example"]
    assert all("victim" not in m.as_string() for m in smtp_sink.parsed())
    with catalog.session() as session:
        assert [f.account_id for f in session.scalars(select(LifecycleDeliveryFailure))] == ["legacy"]
        assert {n.account_id for n in session.scalars(select(LifecycleNotice))} == {"sleepy0", "sleepy1"}
    catalog.dispose()


def test_an_account_whose_rules_fail_is_named_and_the_others_are_done(
    home: Path, database_url: str, smtp_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.lifecycle import LifecycleRunError, notices, run_lifecycle
    from pipelines.runtime import Runtime

    monkeypatch.setenv("POINTFLOW_DATABASE_URL", database_url)
    accounts(database_url, "sleepy0", "sleepy1", plan="free")
    draft = notices.inactivity_notice

    def broken_for_sleepy0(account, *args, **kwargs):
        if account.account_id == "sleepy0":
            raise RuntimeError("the notice template is broken")
        return draft(account, *args, **kwargs)

    monkeypatch.setattr(notices, "inactivity_notice", broken_for_sleepy0)
    runtime = Runtime.from_settings(Settings.from_env())
    with pytest.raises(LifecycleRunError) as failed:
        run_lifecycle(runtime, datetime(2026, 1, 2, 3, tzinfo=UTC))
    assert failed.value.failures == ["account sleepy0: the notice template is broken"]
    assert [(a.account_id, a.action) for a in failed.value.actions] == [("sleepy1", "inactivity_notice")]
    assert [m["To"] for m in smtp_sink.parsed()] == ["ops@sleepy1.example"]
    runtime.catalog.dispose()
