"""A classification job from start to finish: each step is one Airflow task, safe to retry.

Every step reads the job's state first and skips work already done, so a retried task never
writes an output twice or meters a job twice; the catalog enforces the state machine.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipelines.accounts import get_account
from pipelines.admission import AdmissionRefused, Candidate, check_admission
from pipelines.billing.history import account_limits
from pipelines.billing.pricebook import load_pricebook
from pipelines.catalog import CatalogError
from pipelines.catalog.models import (
    JOB_TRANSITIONS,
    TERMINAL_JOB_STATES,
    FileState,
    Job,
    JobState,
    SentMessage,
    StoredFile,
    utcnow,
)
from pipelines.classify import classify_file
from pipelines.customer_text import render_mail
from pipelines.errors import USER_ERRORS, PointflowError
from pipelines.export import (
    MANIFEST_NAME,
    build_artifacts,
    build_manifest,
    download_links,
    export_prefix,
    publish,
    read_manifest,
)
from pipelines.gate import NotPointCloudError
from pipelines.ingest import ForeignSource, StoredFileInfo, check_source, ingest_file, local_copy, readable_path
from pipelines.lifecycle.operations import ensure_active, is_locked
from pipelines.links import LinkSigner
from pipelines.metering import UsageRecord, record_usage
from pipelines.notify import DeliveryError, send_once
from pipelines.preview import class_summary, file_frame
from pipelines.runtime import Runtime
from pipelines.scratch import work_dir
from pipelines.storage import LINK_LIFETIME, AccountArea, safe_name
from pipelines.training import resolve_classifier
from pipelines.validate import Finding, ValidationReport, validate_file

log = logging.getLogger(__name__)


class IllegalTransition(CatalogError):
    pass


class AdmissionRefusedJob(PointflowError):
    """The account's limits refused the file before anything was stored; nothing is charged."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id}: {reason}")


class ValidationFailed(PointflowError):
    """The input was quarantined; nothing downstream may run."""

    def __init__(self, job_id: str, reason: str, report_key: str | None) -> None:
        super().__init__(f"job {job_id}: input refused: {reason}")
        self.reason = reason
        self.report_key = report_key


def job_id_for(dag_id: str, run_id: str) -> str:
    """Stable across task retries, unique per DAG run, and safe in object keys."""
    return "job-" + uuid.uuid5(uuid.NAMESPACE_URL, f"pointflow:{dag_id}:{run_id}").hex[:20]


def _set_state(job: Job, state: JobState) -> None:
    current = JobState(job.state)
    if state != current and state not in JOB_TRANSITIONS[current]:
        raise IllegalTransition(f"job {job.job_id}: cannot go from {current.value} to {state.value}")
    job.state = state.value
    if state in TERMINAL_JOB_STATES and job.finished_at is None:
        job.finished_at = utcnow()


def _job(session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise CatalogError(f"unknown job {job_id!r}")
    return job


def job_view(runtime: Runtime, job_id: str) -> dict[str, Any]:
    with runtime.catalog.session() as session:
        job = _job(session, job_id)
        return {c.name: getattr(job, c.name) for c in Job.__table__.columns}


def create_job(runtime: Runtime, job_id: str, account_id: str, source: str, classifier: str) -> dict[str, Any]:
    get_account(runtime.catalog, account_id)
    with runtime.catalog.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            ensure_active(runtime.catalog, account_id)
            resolve_classifier(runtime, account_id, classifier)
            session.add(Job(job_id=job_id, account_id=account_id, source=source, classifier=classifier))
        elif job.account_id != account_id or job.source != source:
            raise CatalogError(f"job {job_id} exists for another account or source")
    return job_view(runtime, job_id)


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


def ingest_step(runtime: Runtime, job_id: str) -> dict[str, Any]:
    """Store the source for the account, if the account's limits admit it; a refusal ends the job."""
    job = job_view(runtime, job_id)
    if job["state"] == JobState.FAILED.value:
        raise AdmissionRefusedJob(job_id, job["error"])
    if job["file_id"] is None:
        account_id = job["account_id"]
        at = job["created_at"]

        def admit(candidate: Candidate) -> None:
            check_admission(runtime.settings, runtime.catalog, account_id, candidate, at)

        try:
            check_source(runtime.settings, runtime.store, account_id, job["source"])
            with local_copy(job["source"], runtime.settings.scratch_dir, account_id) as path:
                stored = ingest_file(runtime.catalog, runtime.store, account_id, path, admit=admit)
        except (AdmissionRefused, ForeignSource) as refused:
            refuse_job(runtime, job_id, str(refused))
        with runtime.catalog.session() as session:
            _job(session, job_id).file_id = stored.id
    return job_view(runtime, job_id)


def refuse_job(runtime: Runtime, job_id: str, reason: str) -> None:
    """End a job whose input was refused before it was stored; raises AdmissionRefusedJob."""
    with runtime.catalog.session() as session:
        record = _job(session, job_id)
        record.error = reason
        _set_state(record, JobState.FAILED)
    raise AdmissionRefusedJob(job_id, reason) from None


def attach_file(runtime: Runtime, job_id: str, path: Path, name: str) -> dict[str, Any]:
    """Store a local file as the job's input, within the account's limits at the job's creation:
    what the ingest step does with a source it has fetched (the drop zone fetches its own)."""
    job = job_view(runtime, job_id)
    if job["state"] == JobState.FAILED.value:
        raise AdmissionRefusedJob(job_id, job["error"])
    if job["file_id"] is None:
        account_id, at = job["account_id"], job["created_at"]
        try:
            stored = ingest_file(runtime.catalog, runtime.store, account_id, path, name=name, admit=lambda candidate: check_admission(runtime.settings, runtime.catalog, account_id, candidate, at))
        except AdmissionRefused as refused:
            refuse_job(runtime, job_id, str(refused))
        with runtime.catalog.session() as session:
            _job(session, job_id).file_id = stored.id
    return job_view(runtime, job_id)


def _file(session, job: Job) -> StoredFile:
    if job.file_id is None:
        raise CatalogError(f"job {job.job_id} has no ingested file yet")
    return session.get(StoredFile, job.file_id)


def validate_step(runtime: Runtime, job_id: str) -> dict[str, Any]:
    """Validate once; a refused file goes to quarantine with its report and the account is told."""
    with runtime.catalog.session() as session:
        job = _job(session, job_id)
        state = JobState(job.state)
        stored = _file(session, job)
        file_key, file_name, file_state, account_id = stored.key, stored.original_name, stored.state, job.account_id
    if state == JobState.QUARANTINED:
        # A rerun of the task retries a notice the mail server refused the first time.
        _notify_quarantine(runtime, job_id, account_id, file_name, job.error or "input refused", job.report_key)
        raise ValidationFailed(job_id, job.error or "input refused", job.report_key)
    if state != JobState.RECEIVED:
        return job_view(runtime, job_id)

    area = AccountArea(account_id)
    if file_state == FileState.QUARANTINED.value:
        with runtime.catalog.session() as session:
            previous = _file(session, _job(session, job_id))
            reason = f"this file was refused before (report {previous.report_key})"
            job = _job(session, job_id)
            job.error, job.report_key = reason, previous.report_key
            _set_state(job, JobState.QUARANTINED)
        _notify_quarantine(runtime, job_id, account_id, file_name, reason, previous.report_key)
        raise ValidationFailed(job_id, reason, previous.report_key)

    with readable_path(runtime.store, file_key, runtime.settings.scratch_dir) as path:
        report = validate_file(path, display_name=file_name)
    report_key = area.key("reports", f"{job_id}-validation.json")
    runtime.store.put_bytes(report_key, report.to_json())
    html_key = area.key("reports", f"{job_id}-validation.html")
    runtime.store.put_bytes(html_key, report.to_html())
    # Locations, never presigned links: whoever reads task logs must not be able to fetch customer files.
    log.info("validation of %s: %s; report: %s", file_name, report.reason, runtime.store.location(html_key))

    if report.ok:
        with runtime.catalog.session() as session:
            job = _job(session, job_id)
            job.report_key = report_key
            job.summary = {"validation": {"mode": report.mode, "points_checked": report.points_checked, "warnings": [w.explain for w in report.warnings], "report_key": report_key}}
            _file(session, job).state = FileState.VALIDATED.value
            _set_state(job, JobState.VALIDATED)
        return job_view(runtime, job_id)

    _quarantine(runtime, job_id, account_id, file_key, file_name, report, report_key)


def _quarantine(runtime: Runtime, job_id: str, account_id: str, file_key: str, file_name: str, report: ValidationReport, report_key: str) -> None:
    """Move a refused file to quarantine with its report, close the job, tell the customer."""
    area = AccountArea(account_id)
    quarantine_key = area.key("quarantine", f"{job_id}-{file_name}")
    runtime.store.move(file_key, quarantine_key)
    runtime.store.put_bytes(area.key("quarantine", f"{job_id}-{file_name}.report.html"), report.to_html())
    with runtime.catalog.session() as session:
        job = _job(session, job_id)
        stored = _file(session, job)
        stored.key, stored.state, stored.report_key = quarantine_key, FileState.QUARANTINED.value, report_key
        job.error, job.report_key = report.reason, report_key
        _set_state(job, JobState.QUARANTINED)
    _notify_quarantine(runtime, job_id, account_id, file_name, report.reason, report_key)
    raise ValidationFailed(job_id, report.reason, report_key)


def _notify_quarantine(runtime: Runtime, job_id: str, account_id: str, file_name: str, reason: str, report_key: str) -> None:
    """Tell the customer once per job; a refused delivery is logged and retried when the step reruns."""
    account = get_account(runtime.catalog, account_id)
    html_key = report_key.replace(".json", ".html")
    report_link = runtime.store.link(html_key, LINK_LIFETIME)
    mail = render_mail("mail/quarantine.txt.j2", name=account.name, file_name=file_name, reason=reason, report_link=report_link)
    try:
        send_once(runtime.settings, runtime.catalog, f"quarantine:{job_id}", account_id, "quarantine", account.email, mail.subject, mail.body)
    except DeliveryError as error:
        # The quarantine stands either way; a missed notice must not turn into a lost file.
        log.warning("quarantine notice for %s not sent: %s", account_id, error)


def classify_step(runtime: Runtime, job_id: str, workers: int | None = None, client: Any = None) -> dict[str, Any]:
    """Classify the validated file; points the sample-based validation could not see are checked
    here, and a file found bad now is quarantined like one refused by validation."""
    with runtime.catalog.session() as session:
        job = _job(session, job_id)
        if JobState(job.state) in (JobState.CLASSIFIED, JobState.EXPORTED) and job.classified_key and runtime.store.exists(job.classified_key):
            return job_view(runtime, job_id)
        _set_state(job, JobState.CLASSIFYING)
        stored = _file(session, job)
        file_key, name, account_id, classifier = stored.key, stored.original_name, job.account_id, job.classifier

    refused: NotPointCloudError | None = None
    with work_dir(runtime.settings.scratch_dir, "job", account_id, job_id) as work:
        output = work / (Path(name).stem + ".laz")
        with readable_path(runtime.store, file_key, runtime.settings.scratch_dir) as path:
            model = resolve_classifier(runtime, account_id, classifier)
            try:
                result = classify_file(path, output, runtime.settings, classifier=model, workers=workers, client=client, account_id=account_id, job_id=job_id)
            except NotPointCloudError as error:
                refused = NotPointCloudError(str(error).replace(path.name, name), error.check)
        if refused is None:
            classified_key = AccountArea(account_id).key("classified", job_id, output.name)
            runtime.store.put_file(classified_key, output)
    if refused is not None:
        finding = Finding("gate", refused.check, "error", str(refused), "found while classifying every point")
        report = ValidationReport(name, False, "full", 0, None, errors=[finding])
        report_key = AccountArea(account_id).key("reports", f"{job_id}-classification.json")
        runtime.store.put_bytes(report_key, report.to_json())
        runtime.store.put_bytes(report_key.replace(".json", ".html"), report.to_html())
        _quarantine(runtime, job_id, account_id, file_key, name, report, report_key)

    with runtime.catalog.session() as session:
        job = _job(session, job_id)
        job.classified_key = classified_key
        job.points_processed = result.output_points
        job.classifier_version = result.classifier_version
        job.classifier_params = result.classifier_params
        job.summary = {**(job.summary or {}), **{
            "input_points": result.input_points,
            "output_points": result.output_points,
            "class_counts": {str(k): v for k, v in result.class_counts.items()},
            "classifier": result.classifier,
            "classifier_version": result.classifier_version,
            "classifier_params": result.classifier_params,
            "tiles": result.tiles,
            "tile_size": result.tile_size,
            "tile_buffer": result.tile_buffer,
            "sparse_points": result.sparse_points,
            "workers": result.workers,
            "units": result.units.to_dict(),
            "timings": result.timings,
        }}
        _set_state(job, JobState.CLASSIFIED)
    return job_view(runtime, job_id)


def export_step(runtime: Runtime, job_id: str, export_format: str = "laz") -> dict[str, Any]:
    """Publish the classified points, class summaries, preview and report; manifest last."""
    job = job_view(runtime, job_id)
    prefix = export_prefix(job["account_id"], job_id)
    if job["state"] == JobState.EXPORTED.value and read_manifest(runtime.store, prefix) is not None:
        return job
    if job["state"] != JobState.CLASSIFIED.value:
        raise IllegalTransition(f"job {job_id} is {job['state']}, not classified: nothing to export")
    with runtime.catalog.session() as session:
        stored = _file(session, _job(session, job_id))
        input_file = {"key": stored.key, "name": stored.original_name, "sha256": stored.sha256, "size": stored.size, "points": stored.point_count, "crs": stored.crs}
    stem = Path(safe_name(input_file["name"])).stem
    report_key = job["report_key"].replace(".json", ".html") if job["report_key"] else None
    report_html = runtime.store.get_bytes(report_key) if report_key and runtime.store.exists(report_key) else None
    counts = {int(k): v for k, v in job["summary"]["class_counts"].items()}
    scratch = runtime.settings.scratch_dir
    with readable_path(runtime.store, job["classified_key"], scratch) as path, work_dir(scratch, "export", job["account_id"], job_id) as work:
        artifacts = build_artifacts(path, work, stem, export_format, counts, report_html, f"{input_file['name']}: classes")
        coordinates = file_frame(path)
        publish(runtime.store, job["account_id"], job_id, artifacts, lambda described: build_manifest(job, input_file, described, job["summary"], coordinates, utcnow()))
    with runtime.catalog.session() as session:
        record = _job(session, job_id)
        record.export_prefix = prefix
        _set_state(record, JobState.EXPORTED)
    log.info("export published: %s", runtime.store.location(prefix + MANIFEST_NAME))
    return job_view(runtime, job_id)


@dataclass(frozen=True)
class DeliveryTerms:
    downloads: bool  # the plan allows downloading point files
    retention: timedelta | None  # results are deleted this long after the job (None: kept)

    def links_expire(self, finished_at: datetime, now: datetime) -> datetime:
        """Links last as long as the results where the plan deletes them, else LINK_LIFETIME."""
        return finished_at + self.retention if self.retention else now + LINK_LIFETIME


def delivery_terms(runtime: Runtime, account_id: str, at: datetime | None = None) -> DeliveryTerms:
    """What the account's plan allows for its results at `at` (now by default); refused once it is locked."""
    at = at or utcnow()
    ensure_active(runtime.catalog, account_id, at)
    limits = account_limits(runtime.catalog, load_pricebook(runtime.settings.pricebook_path), account_id, at.date())[1]
    return DeliveryTerms(limits.downloads, timedelta(days=limits.result_retention_days) if limits.result_retention_days else None)


def deliver_step(runtime: Runtime, job_id: str) -> dict[str, Any]:
    """Tell the customer the export is ready: links, class summary, classifier version. Sent once."""
    job = job_view(runtime, job_id)
    account = get_account(runtime.catalog, job["account_id"])
    terms = delivery_terms(runtime, account.account_id)
    expires_at = terms.links_expire(job["finished_at"], utcnow())
    links = download_links(runtime.store, LinkSigner.from_settings(runtime.settings), account.account_id, job_id, terms.downloads, expires_at)
    summary = job["summary"]
    mail = render_mail(
        "mail/export_ready.txt.j2",
        name=account.name,
        file_name=job["classified_key"].rsplit("/", 1)[-1],
        summary=summary,
        classes=class_summary({int(k): v for k, v in summary["class_counts"].items()}),
        links=links,
        downloads=terms.downloads,
        expires_at=expires_at,
    )
    send_once(runtime.settings, runtime.catalog, f"export:{job_id}", account.account_id, "export_ready", account.email, mail.subject, mail.body)
    return job


def finish_step(runtime: Runtime, job_id: str) -> dict[str, Any]:
    """Close the job and meter it exactly once, whatever happened upstream."""
    with runtime.catalog.session() as session:
        job = _job(session, job_id)
        state = JobState(job.state)
        if state not in TERMINAL_JOB_STATES:
            job.error = job.error or f"pipeline stopped while {state.value}"
            _set_state(job, JobState.FAILED)
        stored = session.get(StoredFile, job.file_id) if job.file_id else None
        status = "succeeded" if job.state == JobState.EXPORTED.value else "aborted" if job.state == JobState.ABORTED.value else "failed"
        event = UsageRecord(
            event_id=f"{job_id}:classification",
            account_id=job.account_id,
            kind="classification",
            occurred_at=job.finished_at,
            points=job.points_processed,
            status=status,
            classifier=job.classifier,
            classifier_version=job.classifier_version,
            filename=stored.original_name if stored else None,
            job_id=job_id,
        )
    record_usage(runtime.catalog, [event])
    return job_view(runtime, job_id)


def cause(error: BaseException) -> str:
    """One line for the job's record: what went wrong, without a traceback."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if isinstance(error, USER_ERRORS) else f"{type(error).__name__}: {text}".rstrip(": ")


def run_step(runtime: Runtime, job_id: str, step: str, **options: Any) -> dict[str, Any]:
    """Run one step (a function of this module) for the job; a failure's cause is recorded on the
    job before it propagates, so `pointflow jobs show` and the meter step can tell it."""
    try:
        return globals()[step](runtime, job_id, **options)
    except (AdmissionRefusedJob, ValidationFailed):
        raise  # the step recorded why
    except Exception as error:
        with runtime.catalog.session() as session:
            job = _job(session, job_id)
            if JobState(job.state) not in TERMINAL_JOB_STATES:
                job.error = f"{step.removesuffix('_step')}: {cause(error)}"
        raise


def run_job(
    runtime: Runtime,
    account_id: str,
    source: str,
    classifier: str = "standard",
    job_id: str | None = None,
    workers: int | None = None,
    export_format: str = "laz",
) -> dict[str, Any]:
    """All steps in this process, as the DAG runs them; used by the CLI and tests."""
    job_id = job_id or "job-" + uuid.uuid4().hex[:20]
    create_job(runtime, job_id, account_id, source, classifier)
    return run_steps(runtime, job_id, workers, export_format)


def run_steps(runtime: Runtime, job_id: str, workers: int | None = None, export_format: str = "laz") -> dict[str, Any]:
    """Every step of a created job in this process, metered once at the end; the ingest step is
    a no-op for a job whose file is already stored (a drop-zone job)."""
    try:
        run_step(runtime, job_id, "ingest_step")
        run_step(runtime, job_id, "validate_step")
        run_step(runtime, job_id, "classify_step", workers=workers)
        run_step(runtime, job_id, "export_step", export_format=export_format)
        run_step(runtime, job_id, "deliver_step")
    except (AdmissionRefusedJob, ValidationFailed):
        pass
    except DeliveryError as error:
        # The export is published and metered either way; only the e-mail is missing.
        log.warning("job %s is exported, but the ready e-mail was not sent: %s; check POINTFLOW_SMTP_URL", job_id, error)
    finally:
        final = finish_step(runtime, job_id)
    return final


def close_stale_jobs(runtime: Runtime, as_of: datetime | None = None) -> list[dict[str, Any]]:
    """Close as failed every job that made no progress for POINTFLOW_STALE_JOB_HOURS: its run was
    killed or lost (a CLI process killed, a DAG run deleted). Each is metered once as failed, so
    nothing is billed; the customer is not mailed, since nothing in the input was theirs to fix
    (a bad input is refused, and told, when it is found)."""
    as_of = as_of or utcnow()
    timeout = timedelta(hours=runtime.settings.stale_job_hours)
    open_states = [s.value for s in JobState if s not in TERMINAL_JOB_STATES]
    with runtime.catalog.session() as session:
        stale = list(session.scalars(select(Job.job_id).where(Job.state.in_(open_states), Job.updated_at < as_of - timeout).order_by(Job.created_at)))
    closed = []
    for job_id in stale:
        with runtime.catalog.session() as session:
            job = _job(session, job_id)
            if JobState(job.state) in TERMINAL_JOB_STATES:
                continue  # finished meanwhile
            last = f" (last error: {job.error})" if job.error else ""
            job.error = f"no progress since {job.updated_at:%Y-%m-%d %H:%M} UTC while {job.state}{last}: closed after {runtime.settings.stale_job_hours} h, nothing billed"
            _set_state(job, JobState.FAILED)
        closed.append(finish_step(runtime, job_id))
    return closed


# A ready e-mail the pipeline could not send is retried by the nightly sweep: only for jobs whose run
# has settled (the deliver task and its retries are over, so the two never race), and only while
# the customer can still use the news.
UNSENT_SETTLE_TIME = timedelta(minutes=30)
UNSENT_RETRY_WINDOW = timedelta(days=14)


@dataclass(frozen=True)
class UnsentReport:
    sent: list[str]  # job ids whose ready e-mail went out now
    failed: dict[str, str]  # job id -> why it still could not be sent
    skipped_locked: list[str]  # the account's data is locked: no links to send


def deliver_unsent(runtime: Runtime, as_of: datetime) -> UnsentReport:
    """Send the ready e-mails that the pipeline could not (mail server down past the task's retries)."""
    with runtime.catalog.session() as session:
        pending = list(
            session.execute(
                select(Job.job_id, Job.account_id)
                .where(Job.state == JobState.EXPORTED.value)
                .where(Job.finished_at.is_not(None), Job.finished_at <= as_of - UNSENT_SETTLE_TIME, Job.finished_at > as_of - UNSENT_RETRY_WINDOW)
                .where(~select(SentMessage.key).where(SentMessage.key == "export:" + Job.job_id).exists())
                .order_by(Job.finished_at)
            ).all()
        )
    sent: list[str] = []
    failed: dict[str, str] = {}
    locked: list[str] = []
    for job_id, account_id in pending:
        if is_locked(runtime.catalog, account_id, as_of):
            locked.append(job_id)
            continue
        try:
            deliver_step(runtime, job_id)
            sent.append(job_id)
        except DeliveryError as error:
            failed[job_id] = str(error)
    if failed:
        log.warning("%d ready e-mail(s) still not sent (next try tomorrow); check POINTFLOW_SMTP_URL: %s", len(failed), next(iter(failed.values())))
    return UnsentReport(sent, failed, locked)


def jobs_for_account(runtime: Runtime, account_id: str) -> list[dict[str, Any]]:
    with runtime.catalog.session() as session:
        rows = session.scalars(select(Job).where(Job.account_id == account_id).order_by(Job.created_at))
        return [{c.name: getattr(j, c.name) for c in Job.__table__.columns} for j in rows]
