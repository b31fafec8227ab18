"""Monthly invoicing: from accounts, usage, outages, payments and credit notes to issued invoices;
the rule book itself is `drafting`, the value types `lines`.

`run_billing` gathers the facts for every account in bulk, drafts, numbers and stores the month's
invoices in one transaction, and returns the stored invoices. A month is invoiced once: a re-run, or a run racing
another, returns the invoices that exist and creates nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from itertools import pairwise
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipelines.billing.documents import buyer_of, parties_json
from pipelines.billing.drafting import availability_correction_lines, correction_lines, draft_invoice
from pipelines.billing.history import histories
from pipelines.billing.ledger import Ledger, before_invoice
from pipelines.billing.lines import AccountFacts, BillingRunResult, InvoiceView, Line, UsageSlice, availability_percent
from pipelines.billing.models import (
    BillingRun,
    BillingTerms,
    ChangeBilling,
    Invoice,
    InvoiceLine,
    Outage,
    OutageBilling,
)
from pipelines.billing.periods import Period, start_of
from pipelines.billing.pricebook import PriceBook
from pipelines.billing.usage import (
    Claim,
    billable_points_by_account,
    billed_points_by_day,
    claim_usage,
    late_points_by_account_day,
)
from pipelines.catalog import Catalog
from pipelines.catalog.models import Account
from pipelines.errors import UserError

# Bounds the IN (...) list of one query, well under every database's parameter limit.
_KEYS_PER_QUERY = 500


class BillingError(UserError, ValueError):
    """A billing request that cannot be carried out as asked (month not over, unknown invoice, ...)."""


def issue_date_of(period: Period, now: datetime) -> date:
    """An invoice is dated the day it is really issued (UTC), never before the month after its
    month: a run on the 1st dates it the 1st, a late run (the DAG catching up) the day it runs, so
    its due date and dispute windows start when the customer gets it."""
    return max(now.astimezone(UTC).date(), period.next().first_day)


def run_billing(
    catalog: Catalog, period: Period | str, pricebook: PriceBook, now: datetime | None = None
) -> BillingRunResult:
    """Invoice every account for `period` once, dated the day of `now` (UTC); a re-run returns the
    stored invoices unchanged, with the date they were issued on."""
    period = Period.parse(period) if isinstance(period, str) else period
    now = now or datetime.now(UTC)
    if now < period.end:
        raise BillingError(
            f"period {period} has not ended yet: it can be invoiced from {period.end:%Y-%m-%d %H:%M} UTC"
        )
    existing = load_invoices(catalog, period)
    if existing is not None:
        return BillingRunResult(period.label, False, existing)
    try:
        with catalog.session() as session:
            # The run's row is written first: it is the lock a concurrent run of this month waits on.
            session.add(BillingRun(period=period.label, pricebook_sha256=pricebook.sha256, invoice_count=0))
            session.flush()
            count = _create_invoices(session, pricebook, period, issue_date_of(period, now))
            session.get(BillingRun, period.label).invoice_count = count
        created = True
    except IntegrityError:
        # Another run of the same month committed first; its invoices are the month's invoices.
        created = False
    invoices = load_invoices(catalog, period)
    if invoices is None:
        raise BillingError(f"billing run for {period} failed and left no invoices; run it again")
    return BillingRunResult(period.label, created, invoices)


def _create_invoices(session: Session, pricebook: PriceBook, period: Period, issue_date: date) -> int:
    runs = session.execute(
        select(BillingRun.period, BillingRun.created_at).where(BillingRun.period != period.label)
    ).all()
    started = session.get(BillingRun, period.label).created_at
    claim = claim_usage(
        session,
        period,
        started,
        max((created for _, created in runs), default=None),
        [Period.parse(label) for label, _ in runs if label < period.label],
    )
    accounts = _accounts(session, period)
    usage = _usage_slices(session, pricebook, period, accounts, claim)
    late = _late_usage(pricebook, late_points_by_account_day(session, period), {a.account_id: a for a in accounts})
    invoiced = [(Period.parse(label), at) for label, at in runs if label < period.label]
    outages = _claim_outages(session, pricebook, period)
    corrections = _corrections(session, pricebook, period, accounts, invoiced, outages)
    for account_id, lines in _outage_corrections(pricebook, accounts, invoiced, outages).items():
        corrections.setdefault(account_id, []).extend(lines)
    availability = outages.availability(period)
    # The month's content does not depend on the day it is run: the ledger as it stood when the month ended.
    ledgers = before_invoice(session, period)
    due_date = issue_date + timedelta(days=pricebook.payment_terms_days)

    invoice_rows: list[dict[str, Any]] = []
    line_rows: list[dict[str, Any]] = []
    for account in accounts:  # ordered by account id: numbers follow that order, without gaps
        slices = [UsageSlice(first, last, points.get(account.account_id, 0)) for first, last, points in usage]
        draft = draft_invoice(
            pricebook,
            period,
            account,
            slices,
            availability,
            ledgers.get(account.account_id, Ledger()),
            late.get(account.account_id, ()),
            corrections.get(account.account_id, ()),
        )
        if draft is None:
            continue
        sequence = len(invoice_rows) + 1
        number = f"{pricebook.invoice_prefix}-{period.label}-{sequence:04d}"
        invoice_rows.append(
            {
                "invoice_number": number,
                "account_id": account.account_id,
                "period": period.label,
                "sequence": sequence,
                "currency": pricebook.currency,
                "issue_date": issue_date,
                "due_date": due_date,
                "tax_rate": draft.tax_rate,
                "subtotal": draft.subtotal,
                "taxable_subtotal": draft.taxable_subtotal,
                "tax": draft.tax,
                "total": draft.total,
                "credit_applied": draft.credit_applied,
                "credit_remaining": draft.credit_remaining,
            }
        )
        line_rows.extend(
            {
                "invoice_number": number,
                "position": position,
                "kind": line.kind,
                "description": line.description,
                "quantity": line.quantity,
                "unit_price": line.unit_price,
                "amount": line.amount,
                "taxable": line.taxable,
                "tax_rate": line.tax_rate,
                "tax_category": line.tax_category,
                "base_quantity": None if line.base_quantity == 1 else line.base_quantity,
            }
            for position, line in enumerate(draft.lines, start=1)
        )
    if invoice_rows:
        parties = _issued_parties(session, pricebook, [row["account_id"] for row in invoice_rows])
        for row in invoice_rows:
            row["parties"] = parties[row["account_id"]]
        session.execute(insert(Invoice), invoice_rows)
        session.execute(insert(InvoiceLine), line_rows)
    return len(invoice_rows)


def _issued_parties(session: Session, pricebook: PriceBook, account_ids: list[str]) -> dict[str, str]:
    """Seller and buyer of each invoice as issued (kept with it: its documents never change)."""
    parties: dict[str, str] = {}
    for start in range(0, len(account_ids), _KEYS_PER_QUERY):
        chunk = account_ids[start : start + _KEYS_PER_QUERY]
        for account in session.scalars(select(Account).where(Account.account_id.in_(chunk))):
            parties[account.account_id] = parties_json(buyer_of(account), pricebook.seller)
    return parties


def _accounts(session: Session, period: Period) -> list[AccountFacts]:
    rows = session.execute(
        select(Account, BillingTerms.ended_on)
        .outerjoin(BillingTerms, BillingTerms.account_id == Account.account_id)
        .where(Account.started_at <= period.last_day)
        .order_by(Account.account_id)
    ).all()
    found = histories(session, [account for account, _ in rows])
    facts = []
    for account, ended_on in rows:
        if ended_on is not None and ended_on < account.started_at:
            continue
        history = found[account.account_id]
        facts.append(
            AccountFacts(
                account.account_id,
                account.country,
                history.plan,
                history.billing_cycle,
                account.started_at,
                account.tax_rate,
                account.tax_exempt,
                ended_on=ended_on,
                vat_id=account.vat_id,
                plan_steps=history.plan_steps,
                term_steps=history.term_steps,
                plan_ids=history.plan_ids,
                term_ids=history.term_ids,
                created_at=account.created_at,
            )
        )
    return facts


def _corrections(
    session: Session,
    pricebook: PriceBook,
    period: Period,
    accounts: Sequence[AccountFacts],
    invoiced: Sequence[tuple[Period, datetime]],
    outages: OutageFacts,
) -> dict[str, list[Line]]:
    """Take every plan and term change in force by the end of `period` into account, once: mark
    the ones no run has taken into account yet, and for those dated before `period` (recorded after
    the months they reach into were invoiced) return the lines correcting those invoiced months.
    `invoiced`: the earlier invoiced months with the time their run started."""
    marked = set(session.execute(select(ChangeBilling.kind, ChangeBilling.change_id)).tuples())
    marks: list[dict[str, Any]] = []
    found: dict[str, list[Line]] = {}
    for account in accounts:
        new_plans = [
            (i, s)
            for i, s in zip(account.plan_ids, account.plan_steps, strict=True)
            if ("plan", i) not in marked and s.effective_on <= period.last_day
        ]
        new_terms = [
            (i, s)
            for i, s in zip(account.term_ids, account.term_steps, strict=True)
            if ("terms", i) not in marked and (s.effective_on is None or s.effective_on <= period.last_day)
        ]
        marks += [{"kind": "plan", "change_id": i, "period": period.label} for i, _ in new_plans]
        marks += [{"kind": "terms", "change_id": i, "period": period.label} for i, _ in new_terms]
        before = account.history().without([s for _, s in new_plans], [s for _, s in new_terms])
        dates = [s.effective_on for _, s in new_plans]
        dates += [s.effective_on or account.started_at for _, s in new_terms if s.ended_on is None]
        if any(s.ended_on is not None for _, s in new_terms):
            # A contract end changes the days between the end known before and the one known now.
            ends = [e for e in (before.ended_on, account.history().ended_on) if e is not None]
            dates.append(min(ends) + timedelta(days=1))
        earliest = min((d for d in dates if d < period.first_day), default=None)
        if earliest is None:
            continue
        for month, run_started in sorted(invoiced):
            # A month invoiced before the account was added billed it nothing, so has nothing to correct.
            if month.last_day < earliest or (account.created_at is not None and account.created_at >= run_started):
                continue
            lines = correction_lines(
                pricebook,
                month,
                account,
                before,
                billed_points_by_day(session, account.account_id, month, period),
                # What the month was credited for (outages recorded since are corrected apart).
                outages.availability(month, known_only=True),
            )
            found.setdefault(account.account_id, []).extend(lines)
    if marks:
        session.execute(insert(ChangeBilling), marks)
    return found


def _slice_bounds(pricebook: PriceBook, period: Period, accounts: Sequence[AccountFacts]) -> list[date]:
    """The month cut on every day a price, a plan or a term of one of `accounts` changes."""
    next_month = period.next().first_day
    plans = {a.plan for a in accounts} | {step.plan for a in accounts for step in a.plan_steps}
    changes = {d for plan in plans for d in pricebook.change_dates(plan, period.first_day, next_month)}
    for account in accounts:
        if account.plan_steps or account.term_steps:
            changes.update(account.history().boundaries(period.first_day, period.last_day))
    return [period.first_day, *sorted(changes), next_month]


def _usage_slices(
    session: Session, pricebook: PriceBook, period: Period, accounts: Sequence[AccountFacts], claim: Claim
) -> list[tuple[date, date, dict[str, int]]]:
    """Billable points per account that this run bills for its month, between the days on which a
    price, a plan or a term changes: one query per slice (at most one per day of the month)."""
    return [
        (start, end - timedelta(days=1), billable_points_by_account(session, start_of(start), start_of(end), claim))
        for start, end in pairwise(_slice_bounds(pricebook, period, accounts))
    ]


def _late_usage(
    pricebook: PriceBook, points: dict[str, dict[date, int]], accounts: dict[str, AccountFacts]
) -> dict[str, list[UsageSlice]]:
    """Per account, the late points cut like their own month's usage would have been."""
    late: dict[str, list[UsageSlice]] = {}
    for account_id, days in points.items():
        account = accounts.get(account_id)
        if account is None:
            continue
        for month in sorted({Period.of(day) for day in days}):
            for start, end in pairwise(_slice_bounds(pricebook, month, [account])):
                total = sum(n for day, n in days.items() if start <= day < end)
                if total:
                    late.setdefault(account_id, []).append(UsageSlice(start, end - timedelta(days=1), total))
    return late


@dataclass(frozen=True)
class OutageFacts:
    """The outages that count (maintenance announced early enough does not) up to the end of a
    run's month: those earlier runs took into account, and those this run takes into account first."""

    known: tuple[tuple[datetime, datetime], ...]
    new: tuple[tuple[datetime, datetime], ...]

    def availability(self, month: Period, known_only: bool = False) -> Fraction:
        return availability_percent(self.known if known_only else self.known + self.new, month)


def _claim_outages(session: Session, pricebook: PriceBook, period: Period) -> OutageFacts:
    """Every outage that started before the end of `period`, read once; those no run has taken
    into account yet are marked as this run's (table `outage_billing`), so that an outage recorded
    after its month was invoiced is credited by the next run, and by no later one."""
    notice = timedelta(hours=pricebook.maintenance_notice_hours)
    rows = session.execute(
        select(
            Outage.id,
            Outage.started_at,
            Outage.ended_at,
            Outage.scheduled,
            Outage.announced_at,
            OutageBilling.outage_id.is_not(None),
        )
        .outerjoin(OutageBilling, OutageBilling.outage_id == Outage.id)
        .where(Outage.started_at < period.end)
    ).all()
    known: list[tuple[datetime, datetime]] = []
    new: list[tuple[datetime, datetime]] = []
    for _, start, end, scheduled, announced, marked in rows:
        # Maintenance counts as outage unless it was scheduled and announced early enough.
        if not (scheduled and (announced is None or announced <= start - notice)):
            (known if marked else new).append((start, end))
    marks = [{"outage_id": row[0], "period": period.label} for row in rows if not row[5]]
    if marks:
        session.execute(insert(OutageBilling), marks)
    return OutageFacts(tuple(known), tuple(new))


def _outage_corrections(
    pricebook: PriceBook,
    accounts: Sequence[AccountFacts],
    invoiced: Sequence[tuple[Period, datetime]],
    outages: OutageFacts,
) -> dict[str, list[Line]]:
    """For every invoiced month whose availability the outages recorded since its invoicing lower,
    the lines correcting its availability credit, per account that month billed."""
    found: dict[str, list[Line]] = {}
    for month, run_started in sorted(invoiced):
        before, after = outages.availability(month, known_only=True), outages.availability(month)
        if before == after:
            continue
        for account in accounts:
            # A month invoiced before the account was added billed it nothing, so has nothing to correct.
            if account.created_at is not None and account.created_at >= run_started:
                continue
            lines = availability_correction_lines(pricebook, month, account, before, after)
            if lines:
                found.setdefault(account.account_id, []).extend(lines)
    return found


def load_invoices(catalog: Catalog, period: Period) -> list[InvoiceView] | None:
    """The stored invoices of a month in number order, or None if the month has not been run."""
    with catalog.session() as session:
        if session.get(BillingRun, period.label) is None:
            return None
        invoices = session.scalars(select(Invoice).where(Invoice.period == period.label).order_by(Invoice.sequence))
        return [invoice_view(invoice) for invoice in invoices]


def invoice_view(invoice: Invoice) -> InvoiceView:
    return InvoiceView(
        invoice_number=invoice.invoice_number,
        account_id=invoice.account_id,
        period=invoice.period,
        currency=invoice.currency,
        issue_date=invoice.issue_date,
        due_date=invoice.due_date,
        tax_rate=invoice.tax_rate,
        lines=tuple(
            Line(
                line.kind,
                line.description,
                line.quantity,
                line.unit_price,
                line.amount,
                line.taxable,
                line.tax_rate,
                line.tax_category,
                Decimal(1) if line.base_quantity is None else line.base_quantity,
            )
            for line in invoice.lines
        ),
        subtotal=invoice.subtotal,
        tax=invoice.tax,
        total=invoice.total,
    )
