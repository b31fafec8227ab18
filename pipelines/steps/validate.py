"""The validate step: a refused file goes to quarantine with its report, and the account is told."""

from __future__ import annotations

import logging
from dataclasses import asdict

from pipelines.accounts import get_account
from pipelines.catalog.models import FileState, JobState
from pipelines.customer_text import render_mail
from pipelines.notify import DeliveryError, Message
from pipelines.runtime import Runtime
from pipelines.sources import readable_path
from pipelines.steps.record import (
    JobRecord,
    ValidationFailed,
    ValidationSummary,
    job_row,
    job_view,
    set_state,
    stored_file,
)
from pipelines.storage import LINK_LIFETIME, AccountArea
from pipelines.validate import ValidationReport, validate_file

log = logging.getLogger(__name__)


def validate_step(runtime: Runtime, job_id: str) -> JobRecord:
    """Validate once; a refused file goes to quarantine with its report and the account is told."""
    with runtime.catalog.session() as session:
        job = job_row(session, job_id)
        state = JobState(job.state)
        stored = stored_file(session, job)
        file_key, file_name, file_state, account_id = stored.key, stored.original_name, stored.state, job.account_id
    if state == JobState.QUARANTINED:
        # A rerun of the task retries a notice the mail server refused the first time.
        notify_quarantine(runtime, job_id, account_id, file_name, job.error or "input refused", job.report_key)
        raise ValidationFailed(job_id, job.error or "input refused", job.report_key)
    if state != JobState.RECEIVED:
        return job_view(runtime, job_id)

    area = AccountArea(account_id)
    if file_state == FileState.QUARANTINED.value:
        with runtime.catalog.session() as session:
            previous = stored_file(session, job_row(session, job_id))
            reason = f"this file was refused before (report {previous.report_key})"
            job = job_row(session, job_id)
            job.error, job.report_key = reason, previous.report_key
            set_state(job, JobState.QUARANTINED)
        notify_quarantine(runtime, job_id, account_id, file_name, reason, previous.report_key)
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
            job = job_row(session, job_id)
            job.report_key = report_key
            warnings = [w.explain for w in report.warnings]
            validation = ValidationSummary(report.mode, report.points_checked, warnings, report_key)
            job.summary = {"validation": asdict(validation)}
            stored_file(session, job).state = FileState.VALIDATED.value
            set_state(job, JobState.VALIDATED)
        return job_view(runtime, job_id)

    quarantine(runtime, job_id, account_id, file_key, file_name, report, report_key)


def quarantine(
    runtime: Runtime,
    job_id: str,
    account_id: str,
    file_key: str,
    file_name: str,
    report: ValidationReport,
    report_key: str,
) -> None:
    """Move a refused file to quarantine with its report, close the job, tell the customer."""
    area = AccountArea(account_id)
    quarantine_key = area.key("quarantine", f"{job_id}-{file_name}")
    runtime.store.move(file_key, quarantine_key)
    runtime.store.put_bytes(area.key("quarantine", f"{job_id}-{file_name}.report.html"), report.to_html())
    with runtime.catalog.session() as session:
        job = job_row(session, job_id)
        stored = stored_file(session, job)
        stored.key, stored.state, stored.report_key = quarantine_key, FileState.QUARANTINED.value, report_key
        job.error, job.report_key = report.reason, report_key
        set_state(job, JobState.QUARANTINED)
    notify_quarantine(runtime, job_id, account_id, file_name, report.reason, report_key)
    raise ValidationFailed(job_id, report.reason, report_key)


def reason_about(file_name: str, reason: str) -> str:
    """The reason as said after "we could not process <name>:": each finding's own leading
    "<name>: " dropped and "<name> is ..." said as "the file is ...", so the name is not repeated."""
    parts = []
    for part in reason.split("; "):
        if part.startswith(f"{file_name}: "):
            part = part[len(file_name) + 2 :]
        elif part.startswith(f"{file_name} "):
            part = "the file " + part[len(file_name) + 1 :]
        parts.append(part)
    return "; ".join(parts).rstrip(".")


def notify_quarantine(
    runtime: Runtime, job_id: str, account_id: str, file_name: str, reason: str, report_key: str
) -> None:
    """Tell the customer once per job; a refused delivery is logged and retried when the step reruns."""
    account = get_account(runtime.catalog, account_id)
    html_key = report_key.replace(".json", ".html")
    report_link = runtime.store.link(html_key, LINK_LIFETIME)
    mail = render_mail(
        "mail/quarantine.txt.j2",
        name=account.name,
        file_name=file_name,
        reason=reason_about(file_name, reason),
        report_link=report_link,
    )
    try:
        runtime.mailer.send_once(Message(f"quarantine:{job_id}", account_id, "quarantine", account.email, mail))
    except DeliveryError as error:
        # The quarantine stands either way; a missed notice must not turn into a lost file.
        log.warning("quarantine notice for %s not sent: %s", account_id, error)
