"""A deletion killed mid-way that no later deletion covers (a deletion on the customer's request) is
finished by the nightly lifecycle run: its entry closed as `interrupted`, what it listed deleted
unless written since, the catalog updated, the customer told. SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from pipelines.catalog.models import Job, JobState, StoredFile
from pipelines.cli import main
from pipelines.lifecycle.models import DeletionAudit
from pipelines.runtime import Runtime
from tests.test_lifecycle import faulty

KEYS = [f"accounts/acme/raw/scan-{n}.laz" for n in range(5)]


def lifecycle(capsys: pytest.CaptureFixture[str]) -> list[dict]:
    code = main(["lifecycle", "run", "--as-of", datetime.now(UTC).isoformat(), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def killed_request(runtime: Runtime) -> DeletionAudit:
    """`accounts delete acme` killed as it deletes the third of five objects, one a stored file."""
    for key in KEYS:
        runtime.store.put_bytes(key, b"P" * 100)
    with runtime.catalog.session() as session:
        stored = StoredFile(account_id="acme", key=KEYS[4], original_name="scan-4.laz", size=100, sha256="4" * 64)
        session.add(stored)
        session.flush()
        session.add(
            Job(
                job_id="job-1",
                account_id="acme",
                file_id=stored.id,
                source="scan-4.laz",
                classifier="standard",
                state=JobState.EXPORTED.value,
                classified_key=KEYS[2],
                export_prefix="accounts/acme/raw/",
            )
        )
    killed = faulty("kill:3", "accounts", "delete", "acme", "--confirm")
    assert killed.wait(60) == -9, killed.communicate()
    assert [runtime.store.exists(k) for k in KEYS] == [False, False, True, True, True]
    with runtime.catalog.session() as session:
        [entry] = session.scalars(select(DeletionAudit))
        session.expunge(entry)
    assert (entry.status, entry.rule, entry.subject) == ("started", "customer_request", "account")
    return entry


def test_a_killed_deletion_on_request_is_finished_by_the_nightly_run(
    catalog_runtime: Runtime, smtp_sink, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime = catalog_runtime
    entry = killed_request(runtime)
    # Since then the customer uploaded again: a new file, and new bytes under one of the listed keys.
    runtime.store.put_bytes("accounts/acme/raw/new.laz", b"N" * 10)
    runtime.store.put_bytes(KEYS[3], b"R" * 10)

    [resumed] = lifecycle(capsys)
    assert resumed["action"] == "deletion_resumed" and resumed["detail"]["status"] == "deleted"
    assert (resumed["detail"]["interrupted"], resumed["detail"]["kept"]) == (entry.id, [KEYS[3]])
    assert [runtime.store.exists(k) for k in KEYS] == [False, False, False, True, False]
    assert runtime.store.get_bytes(KEYS[3]) == b"R" * 10 and runtime.store.exists("accounts/acme/raw/new.laz")
    with runtime.catalog.session() as session:
        first, second = session.scalars(select(DeletionAudit).order_by(DeletionAudit.id))
        assert (first.status, second.status, second.rule, second.subject) == (
            "interrupted",
            "completed",
            "customer_request",
            "account",
        )
        assert f"finished by #{second.id}" in first.error and "1 object(s) written since" in first.error
        assert sorted(o["key"] for o in second.objects) == [KEYS[2], KEYS[4]]
        # The catalog forgets the deleted file, and the job's outputs.
        assert session.scalars(select(StoredFile)).all() == []
        job = session.get(Job, "job-1")
        assert (job.file_id, job.classified_key, job.export_prefix) == (None, None, None)
    # The customer gets the confirmation the killed request never sent.
    [mail] = smtp_sink.parsed()
    assert mail["To"] == "ops@acme.example" and f"deletion {second.id})" in mail.get_body().get_content()
    assert lifecycle(capsys) == []  # done once


def test_a_killed_deletion_waits_for_the_release_of_a_legal_hold(
    catalog_runtime: Runtime, smtp_sink, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime = catalog_runtime
    entry = killed_request(runtime)
    assert main(["accounts", "hold", "acme", "--reason", "case 2027-8"]) == 0
    capsys.readouterr()
    [blocked] = lifecycle(capsys)
    assert (blocked["action"], blocked["detail"]["status"]) == ("deletion_resumed", "blocked")
    assert [runtime.store.exists(k) for k in KEYS] == [False, False, True, True, True]
    assert main(["accounts", "unhold", "acme"]) == 0
    capsys.readouterr()
    [resumed] = lifecycle(capsys)
    assert (resumed["detail"]["status"], resumed["detail"]["interrupted"]) == ("deleted", entry.id)
    assert not any(runtime.store.exists(k) for k in KEYS)
    with runtime.catalog.session() as session:
        first, second = session.scalars(select(DeletionAudit).order_by(DeletionAudit.id))
        # Nothing kept: the new entry takes the killed one over, and lists what it had deleted.
        assert (first.status, second.status) == ("interrupted", "completed")
        assert f"taken over by #{second.id}" in first.error
        assert [(o["key"], o.get("deleted_by")) for o in second.objects] == [
            (k, first.id if n < 2 else None) for n, k in enumerate(KEYS)
        ]
