"""Monthly invoicing: from accounts, usage, outages, payments and credit notes to issued invoices;
the rule book itself is `drafting`, the value types `lines`.

`run_billing` invoices, for a month and every invoiced month before it, each account that no run
has covered yet (table `billing_coverage`): on a month's first run every account, on a re-run (or
a later month's run) only accounts added since with an earlier start. It gathers the facts in
bulk, drafts, numbers and stores the invoices in one transaction, under a lock that makes
concurrent runs take turns. An account is invoiced once per month: a re-run returns the stored
invoices and creates nothing for the accounts already covered.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from itertools import pairwise
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from pipelines.billing.documents import buyer_of, parties_json
from pipelines.billing.drafting import availability_correction_lines, correction_lines, draft_invoice
from pipelines.billing.history import histories
from pipelines.billing.ledger import Ledger, before_invoice
from pipelines.billing.lines import AccountFacts, BillingRunResult, InvoiceView, Line, UsageSlice, availability_percent
from pipelines.billing.models import (
    BillingCoverage,
    BillingRun,
    BillingTerms,
    ChangeBilling,
    CreditNote,
    Invoice,
    InvoiceLine,
    Outage,
    OutageBilling,
)
from pipelines.billing.periods import Period, start_of
from pipelines.billing.pricebook import PriceBook
from pipelines.billing.usage import (
    billable_points_by_account,
    billed_points_by_day,
    late_points_by_account_day,
    mark_usage,
)
from pipelines.catalog import Catalog, batches
from pipelines.catalog.models import Account
from pipelines.errors import UserError

# Held by every run: runs of any months take turns, so none bills what another is billing.
_LOCK = "billing"

Covered = set[tuple[str, str]]


class BillingError(UserError, ValueError):
    """A billing request that cannot be carried out as asked (month not over, unknown invoice, ...)."""


def issue_date_of(period: Period, now: datetime) -> date:
    """An invoice is dated the day it is really issued (UTC), never before the month after its
    month: a run on the 1st dates it the 1st, a late run (the DAG catching up) the day it runs, so
    its due date and dispute windows start when the customer gets it."""
    return max(now.astimezone(UTC).date(), period.next().first_day)


def latest_issue_date(catalog: Catalog) -> date | None:
    """The day of the latest invoice or credit note issued: no document may be dated before it, so
    that numbers and dates go up together."""
    with catalog.session() as session:
        days = [
            session.scalar(select(func.max(Invoice.issue_date))),
            session.scalar(select(func.max(CreditNote.issued_on))),
        ]
    return max((d for d in days if d is not None), default=None)


def run_billing(
    catalog: Catalog, period: Period | str, pricebook: PriceBook, now: datetime | None = None
) -> BillingRunResult:
    """Invoice `period`, dated the day of `now` (UTC): every account on the month's first run;
    on a later run, only the accounts no run of the month has covered yet, with the next numbers.
    Invoiced months before `period` are caught up the same way. The stored invoices of accounts
    already covered are returned unchanged, with the date they were issued on."""
    period = Period.parse(period) if isinstance(period, str) else period
    now = now or datetime.now(UTC)
    if now < period.end:
        raise BillingError(
            f"period {period} has not ended yet: it can be invoiced from {period.end:%Y-%m-%d %H:%M} UTC"
        )
    with catalog.lock(_LOCK), catalog.session() as session:
        first = session.get(BillingRun, period.label) is None
        if first:
            session.add(
                BillingRun(period=period.label, pricebook_sha256=pricebook.sha256, invoice_count=0, created_at=now)
            )
            session.flush()
        covered, issued = _invoice_uncovered(session, pricebook, period, now, first)
        invoices = _month_views(session, period)
    own = {invoice.invoice_number for invoice in invoices}
    caught_up = invoices_numbered(catalog, [number for number in issued if number not in own])
    return BillingRunResult(period.label, first or covered > 0, invoices, caught_up, tuple(issued))


def _invoice_uncovered(
    session: Session, pricebook: PriceBook, period: Period, now: datetime, first: bool
) -> tuple[int, list[str]]:
    """Invoice, oldest month first, every account no run has covered for `period` or an invoiced
    month before it, and record them as covered by this run. Only a month's first run takes new
    outages into account (and corrects the months they reach into on its invoices): a re-run
    invoices what the month's first run would have, had the account been there.
    Returns how many account-months were covered and the numbers of the invoices issued."""
    months = [Period.parse(label) for label in session.scalars(select(BillingRun.period).order_by(BillingRun.period))]
    outages = _outages(session, pricebook, period, claim=first)
    count, issued = 0, []
    this_run: Covered = set()
    for month in [m for m in months if m <= period]:
        ids = _uncovered(session, month)
        if not ids:
            continue
        covered = _coverage(session, ids)
        issued += _invoice_month(
            session,
            pricebook,
            month,
            _accounts(session, month, ids),
            issue_date_of(month, now),
            [m for m in months if m < month],
            covered,
            outages,
            # What this run covered took the outages it claims into account already.
            covered - this_run if first and month == period else None,
        )
        session.execute(
            insert(BillingCoverage),
            [{"account_id": i, "period": month.label, "run_period": period.label, "covered_at": now} for i in ids],
        )
        this_run.update((i, month.label) for i in ids)
        count += len(ids)
        session.get(BillingRun, month.label).invoice_count = session.scalar(
            select(func.count()).select_from(Invoice).where(Invoice.period == month.label)
        )
    return count, issued


def _coverage(session: Session, account_ids: Sequence[str]) -> Covered:
    """The (account, month) pairs covered so far of `account_ids`."""
    found: Covered = set()
    for chunk in batches(account_ids):
        found.update(
            session.execute(
                select(BillingCoverage.account_id, BillingCoverage.period).where(BillingCoverage.account_id.in_(chunk))
            ).tuples()
        )
    return found


def _uncovered(session: Session, month: Period) -> list[str]:
    """Accounts that had started by the month's last day and that no run has covered for it."""
    covered = select(BillingCoverage.account_id).where(
        BillingCoverage.period == month.label, BillingCoverage.account_id == Account.account_id
    )
    return list(
        session.scalars(
            select(Account.account_id)
            .where(Account.started_at <= month.last_day)
            .where(~covered.exists())
            .order_by(Account.account_id)
        )
    )


def _invoice_month(
    session: Session,
    pricebook: PriceBook,
    period: Period,
    accounts: Sequence[AccountFacts],
    issue_date: date,
    invoiced: Sequence[Period],
    covered: Covered,
    outages: OutageFacts,
    correct_outages_of: Collection[tuple[str, str]] | None,
) -> list[str]:
    """Draft, number (after the month's last number) and store the invoices of `accounts` for
    `period`; returns their numbers. `invoiced`: the invoiced months before `period`; `covered`:
    which accounts they covered; `correct_outages_of`: on a first run of `period`, the
    account-months covered before it, whose availability credit its new outages correct."""
    mark_usage(session, period, [a.account_id for a in accounts], invoiced)
    usage = _usage_slices(session, pricebook, period, accounts)
    late = _late_usage(pricebook, late_points_by_account_day(session, period), {a.account_id: a for a in accounts})
    corrections = _corrections(session, pricebook, period, accounts, invoiced, covered, outages)
    if correct_outages_of is not None:
        for account_id, lines in _outage_corrections(
            pricebook, accounts, invoiced, correct_outages_of, outages
        ).items():
            corrections.setdefault(account_id, []).extend(lines)
    availability = outages.availability(period)
    # The month's content does not depend on the day it is run: the ledger as it stood when the month ended.
    ledgers = before_invoice(session, period)
    due_date = issue_date + timedelta(days=pricebook.payment_terms_days)
    last = session.scalar(select(func.coalesce(func.max(Invoice.sequence), 0)).where(Invoice.period == period.label))

    invoice_rows: list[dict[str, Any]] = []
    line_rows: list[dict[str, Any]] = []
    for account in accounts:  # ordered by account id: numbers follow that order, without gaps
        slices = [UsageSlice(first, end, points.get(account.account_id, 0)) for first, end, points in usage]
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
        sequence = last + len(invoice_rows) + 1
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
    return [row["invoice_number"] for row in invoice_rows]


def _issued_parties(session: Session, pricebook: PriceBook, account_ids: list[str]) -> dict[str, str]:
    """Seller and buyer of each invoice as issued (kept with it: its documents never change)."""
    parties: dict[str, str] = {}
    for chunk in batches(account_ids):
        for account in session.scalars(select(Account).where(Account.account_id.in_(chunk))):
            parties[account.account_id] = parties_json(buyer_of(account), pricebook.seller)
    return parties


def _accounts(session: Session, period: Period, account_ids: Sequence[str]) -> list[AccountFacts]:
    """The facts of `account_ids` for invoicing `period`, ordered by account id (an account whose
    contract ended before it started has nothing to invoice and is left out)."""
    rows = []
    for chunk in batches(account_ids):
        rows += session.execute(
            select(Account, BillingTerms.ended_on)
            .outerjoin(BillingTerms, BillingTerms.account_id == Account.account_id)
            .where(Account.account_id.in_(chunk))
            .where(Account.started_at <= period.last_day)
        ).all()
    rows.sort(key=lambda row: row[0].account_id)
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
            )
        )
    return facts


def _corrections(
    session: Session,
    pricebook: PriceBook,
    period: Period,
    accounts: Sequence[AccountFacts],
    invoiced: Sequence[Period],
    covered: Covered,
    outages: OutageFacts,
) -> dict[str, list[Line]]:
    """Take every plan and term change of `accounts` in force by the end of `period` into account,
    once: mark the ones no invoice has taken into account yet, and for those dated before `period`
    (recorded after the months they reach into were invoiced) return the lines correcting those
    months. `invoiced`: the invoiced months before `period`; `covered`: which accounts they covered."""
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
        for month in sorted(invoiced):
            # A month that did not cover the account (it had not started) billed it nothing to correct.
            if month.last_day < earliest or (account.account_id, month.label) not in covered:
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
    session: Session, pricebook: PriceBook, period: Period, accounts: Sequence[AccountFacts]
) -> list[tuple[date, date, dict[str, int]]]:
    """Billable points per account that the month's invoices bill for the month, between the days
    on which a price, a plan or a term changes: one query per slice (at most one per day of the month)."""
    return [
        (start, end - timedelta(days=1), billable_points_by_account(session, start_of(start), start_of(end), period))
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


def _outages(session: Session, pricebook: PriceBook, period: Period, claim: bool) -> OutageFacts:
    """Every outage that started before the end of `period`, read once: those runs have taken into
    account, and, when `claim` (a month's first run), those none has yet, marked as this run's
    (table `outage_billing`), so that an outage recorded after its month was invoiced is credited
    by the next month's first run, and by no later one. A re-run ignores the ones not marked: the
    invoices it adds are corrected with the others' by that next run."""
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
            if marked:
                known.append((start, end))
            elif claim:
                new.append((start, end))
    marks = [{"outage_id": row[0], "period": period.label} for row in rows if not row[5]]
    if claim and marks:
        session.execute(insert(OutageBilling), marks)
    return OutageFacts(tuple(known), tuple(new))


def _outage_corrections(
    pricebook: PriceBook,
    accounts: Sequence[AccountFacts],
    invoiced: Sequence[Period],
    covered: Collection[tuple[str, str]],
    outages: OutageFacts,
) -> dict[str, list[Line]]:
    """For every invoiced month whose availability the outages recorded since its invoicing lower,
    the lines correcting its availability credit, per account that month covered (`covered`)."""
    found: dict[str, list[Line]] = {}
    for month in sorted(invoiced):
        before, after = outages.availability(month, known_only=True), outages.availability(month)
        if before == after:
            continue
        for account in accounts:
            if (account.account_id, month.label) not in covered:
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
        return _month_views(session, period)


def _month_views(session: Session, period: Period) -> list[InvoiceView]:
    invoices = session.scalars(select(Invoice).where(Invoice.period == period.label).order_by(Invoice.sequence))
    return [invoice_view(invoice) for invoice in invoices]


def run_invoices(catalog: Catalog, period: Period) -> list[InvoiceView] | None:
    """The invoices the runs of `period` issued, oldest month and number first: the month's own,
    and those of earlier months they caught up; None if the month has not been run."""
    with catalog.session() as session:
        if session.get(BillingRun, period.label) is None:
            return None
        invoices = session.scalars(
            select(Invoice)
            .join(
                BillingCoverage,
                (BillingCoverage.account_id == Invoice.account_id) & (BillingCoverage.period == Invoice.period),
            )
            .where(BillingCoverage.run_period == period.label)
            .order_by(Invoice.period, Invoice.sequence)
        )
        return [invoice_view(invoice) for invoice in invoices]


def invoices_numbered(catalog: Catalog, numbers: Sequence[str]) -> list[InvoiceView]:
    """The stored invoices of `numbers`, oldest month and number first."""
    found: list[InvoiceView] = []
    with catalog.session() as session:
        for chunk in batches(numbers):
            found += [
                invoice_view(i) for i in session.scalars(select(Invoice).where(Invoice.invoice_number.in_(chunk)))
            ]
    return sorted(found, key=lambda invoice: invoice.invoice_number)


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
