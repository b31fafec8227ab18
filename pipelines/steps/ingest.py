"""Where a job begins: its record (`create_job`), then the ingest step, which stores its source in
the account's raw area if the account's limits admit it (a drop-zone job attaches the file it fetched;
a plain upload stores one with no job)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipelines.accounts import get_account
from pipelines.admission import AdmissionRefused, Candidate, check_admission
from pipelines.billing.pricebook import load_pricebook
from pipelines.catalog import CatalogError
from pipelines.catalog.models import FileState, Job, JobState, StoredFile, utcnow
from pipelines.classifiers import BUILTIN_CLASSIFIERS
from pipelines.ingest import StoredFileInfo, ingest_file
from pipelines.lifecycle.deletion import account_lock
from pipelines.lifecycle.operations import ensure_active
from pipelines.runtime import Runtime
from pipelines.sources import ForeignSource, check_source, local_copy
from pipelines.steps.record import AdmissionRefusedJob, JobRecord, job_row, job_view, refuse_job


def create_job(runtime: Runtime, job_id: str, account_id: str, source: str, classifier: str) -> JobRecord:
    """Record a new job (or return the one already recorded under `job_id`, a task's retry).

    The checks and the insert run holding the account's lifecycle lock (`account_lock`), and only
    they: a deletion of the account's data holds it from its check for unfinished jobs to its end,
    so no job is created in between (this waits for the deletion, then finds the account locked or
    its data gone). Nothing else is held while waiting: the lock is taken before any catalog
    session, as every holder of it does, so it cannot deadlock with a lifecycle run."""
    get_account(runtime.catalog, account_id)
    if _existing_job(runtime, job_id, account_id, source):
        return job_view(runtime, job_id)
    pricebook = load_pricebook(runtime.settings.pricebook_path)
    if classifier not in BUILTIN_CLASSIFIERS:
        # Checking a trained model's name loads training's stack (LightGBM, SciPy, the features):
        # 0.4 CPU-s that every ingest task paid for a built-in name; loaded before the lock.
        from pipelines.training import resolve_classifier
    with account_lock(runtime.catalog, account_id):
        if not _existing_job(runtime, job_id, account_id, source):
            ensure_active(runtime.catalog, account_id, pricebook=pricebook)
            if classifier not in BUILTIN_CLASSIFIERS:
                resolve_classifier(runtime, account_id, classifier)  # a model being deleted waits too
            with runtime.catalog.session() as session:
                session.add(Job(job_id=job_id, account_id=account_id, source=source, classifier=classifier))
    return job_view(runtime, job_id)


def _existing_job(runtime: Runtime, job_id: str, account_id: str, source: str) -> bool:
    with runtime.catalog.session() as session:
        job = session.get(Job, job_id)
        if job is not None and (job.account_id != account_id or job.source != source):
            raise CatalogError(f"job {job_id} exists for another account or source")
        return job is not None


def upload(runtime: Runtime, account_id: str, path: Path) -> StoredFileInfo:
    """Store a local file in the account's raw area, as a customer's upload: the same source
    checks and admission limits as a job's ingest step. What is not LAS/LAZ is refused (the reason
    a job's validation would give), not stored: with no job, no report would ever tell the customer,
    and the file would count against the plan."""
    check_source(runtime.settings, runtime.store, account_id, str(path))
    at = utcnow()

    def admit(candidate: Candidate) -> None:
        check_admission(runtime.settings, runtime.catalog, account_id, candidate, at)

    return ingest_file(runtime.catalog, runtime.store, account_id, Path(path), admit=admit, point_clouds_only=True)


def ingest_step(runtime: Runtime, job_id: str) -> JobRecord:
    """Store the source for the account, if the account's limits admit it; a refusal ends the job."""
    job = job_view(runtime, job_id)
    if job.state == JobState.FAILED.value:
        raise AdmissionRefusedJob(job_id, job.error)
    if job.file_id is None:
        account_id = job.account_id
        at = job.created_at

        def admit(candidate: Candidate) -> None:
            check_admission(runtime.settings, runtime.catalog, account_id, candidate, at)

        try:
            check_source(runtime.settings, runtime.store, account_id, job.source)
            with local_copy(runtime.settings, job.source, account_id) as path:
                _attach(
                    runtime,
                    job_id,
                    account_id,
                    path,
                    lambda: ingest_file(runtime.catalog, runtime.store, account_id, path, admit=admit),
                )
        except (AdmissionRefused, ForeignSource) as refused:
            refuse_job(runtime, job_id, str(refused))
    return job_view(runtime, job_id)


def attach_file(runtime: Runtime, job_id: str, path: Path, name: str) -> JobRecord:
    """Store a local file as the job's input, within the account's limits at the job's creation:
    what the ingest step does with a source it has fetched (the drop zone fetches its own)."""
    job = job_view(runtime, job_id)
    if job.state == JobState.FAILED.value:
        raise AdmissionRefusedJob(job_id, job.error)
    if job.file_id is None:
        account_id, at = job.account_id, job.created_at
        try:
            _attach(
                runtime,
                job_id,
                account_id,
                path,
                lambda: ingest_file(
                    runtime.catalog,
                    runtime.store,
                    account_id,
                    path,
                    name=name,
                    admit=lambda candidate: check_admission(
                        runtime.settings, runtime.catalog, account_id, candidate, at
                    ),
                ),
            )
        except AdmissionRefused as refused:
            refuse_job(runtime, job_id, str(refused))
    return job_view(runtime, job_id)


def _attach(
    runtime: Runtime, job_id: str, account_id: str, path: Path, store_file: Callable[[], StoredFileInfo]
) -> None:
    """Store the job's input (`store_file`: bytes stored before give their record) and make it the
    job's, holding the account's lock: every deletion of stored files holds it, so the record is
    still there, with its object, when the job takes it. Bytes found stored, then deleted before
    the lock was ours, are stored again for this job."""
    stored = store_file()
    with account_lock(runtime.catalog, account_id):
        with runtime.catalog.session() as session:
            record = session.get(StoredFile, stored.id)
            key, state = (record.key, record.state) if record is not None else (None, None)
        if key is None:
            stored = store_file()
        elif state != FileState.QUARANTINED.value and not runtime.store.exists(key):
            # A deletion that failed part-way keeps the record (the next run finishes it) but took the object.
            runtime.store.put_file(key, path)
        with runtime.catalog.session() as session:
            job_row(session, job_id).file_id = stored.id
