"""What the operators' page in the Airflow UI shows, read from the catalog and the object store.

`build_dashboard` gathers accounts, recent jobs, usage per month, invoices and the lifecycle
queue (the usage chart is `usage_chart`, the objects the page serves `served`).
The lifecycle queue reuses the rules themselves: what is due now is a dry run of
`run_lifecycle`, and scheduled dates are the ones the rules recorded.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select

from pipelines.billing.delivery import document_keys
from pipelines.billing.invoicing import invoice_view
from pipelines.billing.models import Invoice
from pipelines.billing.periods import Period, add_months
from pipelines.billing.pricebook import load_pricebook
from pipelines.billing.usage import usage_daily
from pipelines.catalog.models import TERMINAL_JOB_STATES, Account, Job, JobState, TrainedModelRecord
from pipelines.class_table import class_summary, colour_of
from pipelines.export import SAMPLE_NAME, export_prefix, read_manifest
from pipelines.lifecycle.account_state import Action
from pipelines.lifecycle.models import (
    LegalHold,
    LifecycleAction,
    LifecycleNotice,
    Termination,
)
from pipelines.lifecycle.operations import HoldView, is_locked
from pipelines.lifecycle.rules import LifecycleRunError, run_lifecycle
from pipelines.runtime import Runtime


@dataclass(frozen=True)
class AccountRow:
    account_id: str
    name: str
    email: str
    plan: str
    billing_cycle: str
    started_at: date
    last_login_at: datetime | None
    # Short labels, most important first: "active", "inactivity notice", "legal hold", "data locked", ...
    status: tuple[str, ...]
    jobs: int
    points_this_month: int
    models: int  # the account's own trained classifiers, deleted ones not counted


@dataclass(frozen=True)
class JobRow:
    job_id: str
    account_id: str
    state: str
    classifier: str
    classifier_version: str | None
    points: int
    created_at: datetime
    finished_at: datetime | None
    error: str | None
    classes: tuple[dict[str, Any], ...]  # class_summary rows plus each class's map colour
    locked: bool  # the account's contract ended: its results are no longer served
    has_preview: bool
    has_sample: bool  # the export holds the thinned 3D sample (exports before it do not)
    abort_requested_at: datetime | None

    @property
    def unfinished(self) -> bool:
        """Still running or waiting: what the page offers to abort."""
        return JobState(self.state) not in TERMINAL_JOB_STATES


@dataclass(frozen=True)
class MonthUsage:
    period: str
    account_id: str
    jobs: int
    billable_points: int
    failed_points: int


@dataclass(frozen=True)
class InvoiceRow:
    invoice_number: str
    account_id: str
    period: str
    issue_date: date
    due_date: date
    currency: str
    total: Decimal
    documents: tuple[str, ...]  # formats published in the account's invoices area


@dataclass(frozen=True)
class NoticeRow:
    account_id: str
    kind: str
    sent_at: datetime
    recipient: str
    closure_at: str | None
    deletion_at: str | None


@dataclass(frozen=True)
class ScheduledRow:
    account_id: str
    what: str  # "closure" or "deletion"
    rule: str  # "inactivity" or "termination"
    due_at: datetime
    reason: str
    blocked_by_hold: bool


@dataclass(frozen=True)
class LifecycleQueue:
    as_of: datetime
    due_now: tuple[Action, ...]  # what the nightly run would do at `as_of` (a dry run)
    due_now_error: str | None
    notices: tuple[NoticeRow, ...]  # the latest `notice_limit`, newest first
    notices_sent: int  # all notices ever sent, of which `notices` shows the latest
    scheduled: tuple[ScheduledRow, ...]
    holds: tuple[HoldView, ...]


@dataclass(frozen=True)
class Dashboard:
    as_of: datetime
    accounts: tuple[AccountRow, ...]
    jobs: tuple[JobRow, ...]
    months: tuple[str, ...]
    usage: tuple[MonthUsage, ...]
    invoices: tuple[InvoiceRow, ...]
    lifecycle: LifecycleQueue

    @property
    def account_names(self) -> dict[str, str]:
        return {a.account_id: a.name for a in self.accounts}


def build_dashboard(
    runtime: Runtime,
    as_of: datetime | None = None,
    months: int = 6,
    job_limit: int = 10,
    invoice_limit: int = 24,
    notice_limit: int = 50,
) -> Dashboard:
    as_of = (as_of or datetime.now(UTC)).astimezone(UTC)
    labels = month_labels(as_of.date(), months)
    usage = monthly_usage(runtime, labels)
    lifecycle = lifecycle_queue(runtime, as_of, notice_limit)
    return Dashboard(
        as_of=as_of,
        accounts=tuple(accounts_overview(runtime, as_of, lifecycle, usage)),
        jobs=tuple(recent_jobs(runtime, job_limit, as_of)),
        months=tuple(labels),
        usage=tuple(usage),
        invoices=tuple(recent_invoices(runtime, invoice_limit)),
        lifecycle=lifecycle,
    )


def month_labels(today: date, months: int) -> list[str]:
    """The last `months` calendar months up to and including today's, oldest first."""
    first = today.replace(day=1)
    return [Period.of(add_months(first, -back)).label for back in range(months - 1, -1, -1)]


def accounts_overview(
    runtime: Runtime, as_of: datetime, lifecycle: LifecycleQueue, usage: list[MonthUsage]
) -> list[AccountRow]:
    this_month = Period.of(as_of.date()).label
    points = {u.account_id: u.billable_points for u in usage if u.period == this_month}
    held = {h.account_id for h in lifecycle.holds}
    notified = {s.account_id for s in lifecycle.scheduled if s.rule == "inactivity"}
    pricebook = load_pricebook(runtime.settings.pricebook_path)
    with runtime.catalog.session() as session:
        accounts = list(session.scalars(select(Account).order_by(Account.account_id)))
        jobs = dict(session.execute(select(Job.account_id, func.count()).group_by(Job.account_id)).all())
        models = dict(
            session.execute(
                select(TrainedModelRecord.account_id, func.count())
                .where(TrainedModelRecord.deleted_at.is_(None))
                .group_by(TrainedModelRecord.account_id)
            ).all()
        )
        terminations = {t.account_id: t for t in session.scalars(select(Termination))}
        session.expunge_all()
    rows = []
    for account in accounts:
        termination = terminations.get(account.account_id)
        status: list[str] = []
        if termination is not None and termination.deleted_at is not None:
            status.append("data deleted")
        elif is_locked(runtime.catalog, account.account_id, as_of, pricebook=pricebook):
            # A trial is locked from its end, before the nightly run records the termination.
            ended = termination is not None and termination.effective_at <= as_of
            reason = termination.reason if ended else "trial_ended"
            status.append(f"closed ({reason.replace('_', ' ')}), data locked")
        elif termination is not None:
            status.append(f"ends {termination.effective_at:%Y-%m-%d}")
        else:
            status.append("active")
        if account.account_id in notified:
            status.append("inactivity notice sent")
        if account.account_id in held:
            status.append("legal hold")
        rows.append(
            AccountRow(
                account.account_id,
                account.name,
                account.email,
                account.plan,
                account.billing_cycle,
                account.started_at,
                account.last_login_at,
                tuple(status),
                int(jobs.get(account.account_id, 0)),
                points.get(account.account_id, 0),
                int(models.get(account.account_id, 0)),
            )
        )
    return rows


def recent_jobs(runtime: Runtime, limit: int, as_of: datetime) -> list[JobRow]:
    with runtime.catalog.session() as session:
        jobs = list(session.scalars(select(Job).order_by(Job.created_at.desc(), Job.job_id).limit(limit)))
        session.expunge_all()
    locked: dict[str, bool] = {}
    pricebook = load_pricebook(runtime.settings.pricebook_path)
    rows = []
    for job in jobs:
        counts = {int(k): int(v) for k, v in ((job.summary or {}).get("class_counts") or {}).items()}
        classes = tuple({**row, "colour": colour_of(row["class"])} for row in class_summary(counts)) if counts else ()
        if job.account_id not in locked:
            locked[job.account_id] = is_locked(runtime.catalog, job.account_id, as_of, pricebook=pricebook)
        has_preview = (
            job.state == JobState.EXPORTED.value and job.export_prefix is not None and not locked[job.account_id]
        )
        manifest = read_manifest(runtime.store, export_prefix(job.account_id, job.job_id)) if has_preview else None
        has_sample = any(a.get("name") == SAMPLE_NAME for a in (manifest or {}).get("artifacts", []))
        rows.append(
            JobRow(
                job.job_id,
                job.account_id,
                job.state,
                job.classifier,
                job.classifier_version,
                job.points_processed,
                job.created_at,
                job.finished_at,
                job.error,
                classes,
                locked[job.account_id],
                has_preview,
                has_sample,
                job.abort_requested_at,
            )
        )
    return rows


def monthly_usage(runtime: Runtime, labels: list[str]) -> list[MonthUsage]:
    """Classification usage per account and month, summed from the billing module's daily figures."""
    first, last = Period.parse(labels[0]), Period.parse(labels[-1])
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for day in usage_daily(runtime.catalog, first.first_day, last.last_day):
        total = totals[(Period.of(day.day).label, day.account_id)]
        total[0] += day.jobs
        total[1] += day.billable_points
        total[2] += day.failed_points
    return [MonthUsage(period, account_id, *values) for (period, account_id), values in sorted(totals.items())]


def recent_invoices(runtime: Runtime, limit: int) -> list[InvoiceRow]:
    with runtime.catalog.session() as session:
        invoices = [
            invoice_view(i)
            for i in session.scalars(select(Invoice).order_by(Invoice.period.desc(), Invoice.sequence).limit(limit))
        ]
    rows = []
    for invoice in invoices:
        published = tuple(fmt for fmt, key in document_keys(invoice).items() if runtime.store.exists(key))
        rows.append(
            InvoiceRow(
                invoice.invoice_number,
                invoice.account_id,
                invoice.period,
                invoice.issue_date,
                invoice.due_date,
                invoice.currency,
                invoice.total,
                published,
            )
        )
    return rows


def lifecycle_queue(runtime: Runtime, as_of: datetime, notice_limit: int = 50) -> LifecycleQueue:
    error = None
    try:
        due_now = run_lifecycle(runtime, as_of, dry_run=True)
    except LifecycleRunError as failed:
        due_now, error = failed.actions, str(failed)
    with runtime.catalog.session() as session:
        notices = list(session.scalars(select(LifecycleNotice).order_by(LifecycleNotice.sent_at.desc())))
        terminations = list(session.scalars(select(Termination).order_by(Termination.effective_at)))
        holds = list(
            session.scalars(select(LegalHold).where(LegalHold.released_at.is_(None)).order_by(LegalHold.placed_at))
        )
        averted = set(
            session.execute(
                select(LifecycleAction.account_id, LifecycleAction.subject).where(
                    LifecycleAction.action == "closure_averted"
                )
            ).all()
        )
        session.expunge_all()
    held = {h.account_id for h in holds}
    terminated = {t.account_id for t in terminations}
    scheduled: list[ScheduledRow] = []
    # An inactivity cycle's closure date is the one its latest notice or reminder announced.
    open_cycles: dict[tuple[str, str], LifecycleNotice] = {}
    for notice in sorted(notices, key=lambda n: n.sent_at):
        cycle = notice.detail.get("cycle")
        if (
            notice.kind in ("inactivity_notice", "inactivity_reminder")
            and cycle
            and (notice.account_id, cycle) not in averted
        ):
            open_cycles[(notice.account_id, cycle)] = notice
    for (account_id, _cycle), notice in open_cycles.items():
        if account_id not in terminated and notice.detail.get("closure_at"):
            scheduled.append(
                ScheduledRow(
                    account_id,
                    "closure",
                    "inactivity",
                    _instant(notice.detail["closure_at"]),
                    "no login (inactivity notice sent)",
                    False,
                )
            )
    for termination in terminations:
        if termination.deleted_at is None and termination.deletion_due_at is not None:
            reason = f"contract ended ({termination.reason.replace('_', ' ')})"
            scheduled.append(
                ScheduledRow(
                    termination.account_id,
                    "deletion",
                    "termination",
                    termination.deletion_due_at,
                    reason,
                    termination.account_id in held,
                )
            )
        elif termination.locked_at is None and termination.effective_at > as_of:
            scheduled.append(
                ScheduledRow(
                    termination.account_id,
                    "closure",
                    "termination",
                    termination.effective_at,
                    f"contract ends ({termination.reason.replace('_', ' ')})",
                    False,
                )
            )
    return LifecycleQueue(
        as_of=as_of,
        due_now=tuple(due_now),
        due_now_error=error,
        notices=tuple(
            NoticeRow(
                n.account_id,
                n.kind,
                n.sent_at,
                n.recipient,
                n.detail.get("closure_at"),
                n.detail.get("deletion_at") or n.detail.get("service_stops_at"),
            )
            # Every notice ever sent would grow the page without end: the latest only.
            for n in notices[:notice_limit]
        ),
        notices_sent=len(notices),
        scheduled=tuple(sorted(scheduled, key=lambda s: s.due_at)),
        holds=tuple(HoldView(h.account_id, h.id, h.reason, h.placed_at, h.released_at) for h in holds),
    )


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)
