"""The deliver step: the e-mail that says the export is ready, on the terms of the account's plan."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pipelines.accounts import get_account
from pipelines.billing.pricebook import load_pricebook
from pipelines.catalog.models import JobState, utcnow
from pipelines.class_table import class_summary
from pipelines.customer_text import render_mail
from pipelines.export import download_links
from pipelines.lifecycle.operations import active_limits
from pipelines.links import LinkSigner
from pipelines.notify import Message
from pipelines.runtime import Runtime
from pipelines.steps.meter import meter_step
from pipelines.steps.record import JobRecord, held_out_scores, job_file_name, job_view
from pipelines.storage import LINK_LIFETIME


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
    pricebook = load_pricebook(runtime.settings.pricebook_path)
    limits = active_limits(runtime.catalog, account_id, at, pricebook=pricebook)[1]
    return DeliveryTerms(
        limits.downloads, timedelta(days=limits.result_retention_days) if limits.result_retention_days else None
    )


def deliver_step(runtime: Runtime, job_id: str) -> JobRecord:
    """Tell the customer the export is ready: links, class summary, classifier version (for their own model,
    also the held-out figures it was offered on). Sent once, and only once the job is metered: the
    run meters it before this step; a job whose run ended before its meter step (killed, a DAG run
    marked failed) is metered here first, so no customer is told of a job never billed."""
    job = job_view(runtime, job_id)
    if job.state == JobState.EXPORTED.value and job.metered_at is None:
        job = meter_step(runtime, job_id)
    account = get_account(runtime.catalog, job.account_id)
    terms = delivery_terms(runtime, account.account_id)
    expires_at = terms.links_expire(job.finished_at, utcnow())
    links = download_links(
        runtime.store,
        LinkSigner.from_settings(runtime.settings),
        account.account_id,
        job_id,
        terms.downloads,
        expires_at,
    )
    summary = job.figures
    mail = render_mail(
        "mail/export_ready.txt.j2",
        name=account.name,
        file_name=job_file_name(job.source),
        summary=summary,
        judged=held_out_scores(summary.classifier_params),
        classes=class_summary(job.class_counts),
        links=links,
        downloads=terms.downloads,
        expires_at=expires_at,
    )
    runtime.mailer.send_once(Message(f"export:{job_id}", account.account_id, "export_ready", account.email, mail))
    return job
