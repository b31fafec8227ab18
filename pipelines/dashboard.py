"""What the operators' page in the Airflow UI shows, read from the catalog and the object store.

`build_dashboard` gathers accounts, recent jobs, usage per month, invoices and the lifecycle
queue; `job_preview` and `invoice_document` fetch the only objects the page serves, each built
from the named account's own records and refused unless the key lies in that account's area.
The lifecycle queue reuses the rules themselves: what is due now is a dry run of
`run_lifecycle`, and scheduled dates are the ones the rules recorded.
"""

from __future__ import annotations

import io
import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select

from pipelines.billing.delivery import DOCUMENT_FORMATS, document_keys
from pipelines.billing.invoicing import invoice_view
from pipelines.billing.models import Invoice
from pipelines.billing.periods import Period, add_months
from pipelines.billing.usage import usage_daily
from pipelines.catalog.models import Account, Job, JobState
from pipelines.errors import PointflowError
from pipelines.export import SAMPLE_NAME, export_prefix, read_manifest
from pipelines.lifecycle.models import (
    LegalHold,
    LifecycleAction,
    LifecycleNotice,
    Termination,
)
from pipelines.lifecycle.operations import HoldView, ensure_active, is_locked
from pipelines.lifecycle.rules import Action, LifecycleRunError, run_lifecycle
from pipelines.preview import class_summary, colour_of
from pipelines.runtime import Runtime
from pipelines.storage import AccountArea, UnsafeKeyError, check_account_id

PREVIEW_MEDIA_TYPES = {"preview.png": "image/png", SAMPLE_NAME: "application/x-ply"}
DOCUMENT_MEDIA_TYPES = {
    "html": "text/html; charset=utf-8",
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "pdf": "application/pdf",
    "xml": "application/xml",
}
# Stacked bars, one colour per account, in a fixed order so a month's stack reads the same way.
# matplotlib's rcParams are process-wide and the web server renders charts from several threads.
_CHART_LOCK = threading.Lock()
ACCOUNT_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


class NotServed(PointflowError, LookupError):
    """No such object for this account (or not one the page may serve); the message says which."""


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
    notices: tuple[NoticeRow, ...]
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
    runtime: Runtime, as_of: datetime | None = None, months: int = 6, job_limit: int = 10, invoice_limit: int = 24
) -> Dashboard:
    as_of = (as_of or datetime.now(UTC)).astimezone(UTC)
    labels = month_labels(as_of.date(), months)
    usage = monthly_usage(runtime, labels)
    lifecycle = lifecycle_queue(runtime, as_of)
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
    with runtime.catalog.session() as session:
        accounts = list(session.scalars(select(Account).order_by(Account.account_id)))
        jobs = dict(session.execute(select(Job.account_id, func.count()).group_by(Job.account_id)).all())
        terminations = {t.account_id: t for t in session.scalars(select(Termination))}
        session.expunge_all()
    rows = []
    for account in accounts:
        termination = terminations.get(account.account_id)
        status: list[str] = []
        if termination is not None and termination.deleted_at is not None:
            status.append("data deleted")
        elif is_locked(runtime.catalog, account.account_id, as_of):
            status.append(f"closed ({termination.reason.replace('_', ' ')}), data locked")
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
            )
        )
    return rows


def recent_jobs(runtime: Runtime, limit: int, as_of: datetime) -> list[JobRow]:
    with runtime.catalog.session() as session:
        jobs = list(session.scalars(select(Job).order_by(Job.created_at.desc(), Job.job_id).limit(limit)))
        session.expunge_all()
    locked: dict[str, bool] = {}
    rows = []
    for job in jobs:
        counts = {int(k): int(v) for k, v in ((job.summary or {}).get("class_counts") or {}).items()}
        classes = tuple({**row, "colour": colour_of(row["class"])} for row in class_summary(counts)) if counts else ()
        if job.account_id not in locked:
            locked[job.account_id] = is_locked(runtime.catalog, job.account_id, as_of)
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


def usage_chart_svg(dashboard: Dashboard) -> str:
    """Billable points per month, one stacked bar segment per account, as an inline SVG element.

    Each segment carries the id `usage-<account>-<YYYY-MM>`, so the page (and its test) can tell
    which bar is which.
    """
    import matplotlib
    from matplotlib.figure import Figure

    accounts = sorted({u.account_id for u in dashboard.usage})
    by_key = {(u.account_id, u.period): u.billable_points for u in dashboard.usage}
    months = list(dashboard.months)
    with _CHART_LOCK, matplotlib.rc_context({"svg.fonttype": "none", "font.size": 10, "svg.hashsalt": "pointflow"}):
        figure = Figure(figsize=(10, 3.6), dpi=96)
        axes = figure.subplots()
        bottom = [0.0] * len(months)
        for index, account_id in enumerate(accounts):
            values = [by_key.get((account_id, m), 0) / 1e6 for m in months]
            bars = axes.bar(
                months,
                values,
                bottom=bottom,
                label=account_id,
                color=ACCOUNT_COLOURS[index % len(ACCOUNT_COLOURS)],
                width=0.6,
            )
            for bar, month, value in zip(bars, months, values, strict=True):
                if value:
                    bar.set_gid(f"usage-{account_id}-{month}")
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for month, total in zip(months, bottom, strict=True):
            if total:
                axes.annotate(
                    f"{total:,.2f} M",
                    (month, total),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    fontsize=9,
                    color="#333333",
                )
        axes.set_ylabel("billable points (millions)")
        axes.margins(y=0.12)
        axes.set_title("Classification usage per month (UTC)", loc="left")
        axes.spines[["top", "right"]].set_visible(False)
        axes.grid(axis="y", color="#dddddd", linewidth=0.8)
        axes.set_axisbelow(True)
        if accounts:
            axes.legend(title="account", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        else:
            axes.text(
                0.5, 0.5, "no usage recorded in these months", transform=axes.transAxes, ha="center", color="#777777"
            )
        figure.tight_layout()
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


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


def lifecycle_queue(runtime: Runtime, as_of: datetime) -> LifecycleQueue:
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
            for n in notices
        ),
        scheduled=tuple(sorted(scheduled, key=lambda s: s.due_at)),
        holds=tuple(HoldView(h.account_id, h.id, h.reason, h.placed_at, h.released_at) for h in holds),
    )


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def job_preview(runtime: Runtime, account_id: str, job_id: str, name: str) -> tuple[bytes, str]:
    """A preview (the class map, or the 3D sample) of the account's own published export of `job_id`, and its media type."""
    _check_account(account_id)
    if name not in PREVIEW_MEDIA_TYPES:
        raise NotServed(f"a job's previews are {', '.join(PREVIEW_MEDIA_TYPES)}, not {name!r}")
    with runtime.catalog.session() as session:
        job = session.get(Job, job_id)
        owner = None if job is None else job.account_id
    if owner != account_id:
        raise NotServed(f"account {account_id} has no job {job_id!r}")
    ensure_active(runtime.catalog, account_id)
    prefix = export_prefix(account_id, job_id)
    manifest = read_manifest(runtime.store, prefix)
    key = next((a["key"] for a in (manifest or {}).get("artifacts", []) if a.get("name") == name), None)
    # The manifest is data: a key it names is served only if it lies in this job's own export.
    if key is None or not AccountArea(account_id).owns(key) or not key.startswith(prefix):
        raise NotServed(f"job {job_id} of account {account_id} has no published {name}")
    return runtime.store.get_bytes(key), PREVIEW_MEDIA_TYPES[name]


def invoice_document(runtime: Runtime, account_id: str, invoice_number: str, fmt: str) -> tuple[bytes, str]:
    """One published document (html, csv, json; pdf and xml e-invoice) of the account's own invoice, and its media type."""
    _check_account(account_id)
    if fmt not in DOCUMENT_FORMATS:
        raise NotServed(f"invoice documents are {', '.join(DOCUMENT_FORMATS)}, not {fmt!r}")
    with runtime.catalog.session() as session:
        invoice = session.get(Invoice, invoice_number)
        view = None if invoice is None else invoice_view(invoice)
    if view is None or view.account_id != account_id:
        raise NotServed(f"account {account_id} has no invoice {invoice_number!r}")
    key = document_keys(view)[fmt]
    if not AccountArea(account_id).owns(key) or not runtime.store.exists(key):
        raise NotServed(f"invoice {invoice_number} has no published {fmt} document")
    return runtime.store.get_bytes(key), DOCUMENT_MEDIA_TYPES[fmt]


def _check_account(account_id: str) -> None:
    try:
        check_account_id(account_id)
    except UnsafeKeyError as error:
        raise NotServed(str(error)) from None
