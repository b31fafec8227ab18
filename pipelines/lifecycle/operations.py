"""What an operator does for one account: legal holds, termination, export of all data, deletion
on the customer's request, and the lock check the serving code calls."""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, delete, select, update
from sqlalchemy.orm import Session

from pipelines.accounts import get_account
from pipelines.billing.charges import invoiced_cycle
from pipelines.billing.corrections import TermsUpdate, set_billing_terms
from pipelines.billing.history import account_history, agreed_limits, agreed_on
from pipelines.billing.lines import CYCLE_MONTHS
from pipelines.billing.overdue import overdue_balances
from pipelines.billing.periods import Period, start_of
from pipelines.billing.pricebook import PlanLimits, PriceBook
from pipelines.billing.terms import History
from pipelines.catalog import Catalog, CatalogError, UnknownAccountError
from pipelines.catalog.models import TERMINAL_JOB_STATES, Account, BillingCycle, Job, JobState, Plan, StoredFile
from pipelines.lifecycle import notices
from pipelines.lifecycle.deletion import (
    REQUEST_RULE,
    DeletionPlan,
    account_deletion_plan,
    account_lock,
    execute_deletion,
    forget_account_objects,
    inventory,
    on_hold_message,
    plan_deletion,
)
from pipelines.lifecycle.deletion import (
    active_hold as active_hold_of,
)
from pipelines.lifecycle.models import DeletionAudit, LegalHold, LifecycleNotice, Termination
from pipelines.lifecycle.policy import LifecyclePolicy, load_policy
from pipelines.storage import AccountArea, ObjectStore

if TYPE_CHECKING:
    from pipelines.runtime import Runtime

TERMINATION_REASONS = ("customer", "non_payment")
BUNDLE_FOLDER = "all-data"  # exports/all-data/: earlier bundles, never packed into a new one


def export_bundles(store: ObjectStore, account_id: str) -> list[str]:
    """The keys of the account's `export-all` bundles: each holds copies of the account's objects,
    so a deletion of any of them deletes every bundle too (export-all makes a new one from what is
    left)."""
    return [o.key for o in store.list(AccountArea(account_id).key("exports", BUNDLE_FOLDER) + "/")]


class LifecycleError(CatalogError):
    """An operator request that cannot be done as asked; the message says why and what to do."""


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC)


def is_locked(catalog: Catalog, account_id: str, at: datetime | None = None, *, pricebook: PriceBook) -> bool:
    """True once the account's contract has ended: its data may no longer be served.

    Call it before serving or accepting data (ingest, new jobs, download links). The lock holds
    from the termination's effective moment, and from the end of a trial still on `trial` then
    (`trial_ends_at`, with `pricebook`'s trial days; a termination asked for a later day does not
    lengthen the trial), even before the nightly run has recorded it.
    Exporting all data for the customer during the grace period stays allowed.
    """
    return _standing(catalog, account_id, _now(at), pricebook)[0]


def _standing(catalog: Catalog, account_id: str, at: datetime, pricebook: PriceBook) -> tuple[bool, History | None]:
    """Whether the account is locked at `at` (`is_locked`), and the history the check read: None
    when it read none (locked by its termination, or no such account)."""
    with catalog.session() as session:
        termination = session.get(Termination, account_id)
        if termination is not None and (termination.locked_at is not None or termination.effective_at <= at):
            return True, None
        account = session.get(Account, account_id)
        if account is None:
            return False, None
        history = account_history(session, account)
        started = account.started_at
    ends_at = trial_ends_at(pricebook, history, started, at)
    return ends_at is not None and ends_at <= at, history


def trial_ends_at(pricebook: PriceBook, history: History, started: date, at: datetime) -> datetime | None:
    """When the trial of an account on `trial` at `at` ends: the price book's `trial_days` after its
    start (00:00 UTC). None when the plan in force at `at` is not `trial` (converted, or never one)
    or the price book gives trials no end."""
    if history.on(at.astimezone(UTC).date()).plan != Plan.TRIAL.value:
        return None
    days = pricebook.terms(Plan.TRIAL.value, started).trial_days
    return None if days is None else start_of(started) + timedelta(days=days)


def data_deleted(catalog: Catalog, account_id: str) -> bool:
    """True once the account's data has been deleted (after its contract ended)."""
    with catalog.session() as session:
        termination = session.get(Termination, account_id)
    return termination is not None and termination.deleted_at is not None


class AccountLocked(LifecycleError):
    """The account's contract has ended: no uploads, no new jobs, no download links."""


def ensure_active(catalog: Catalog, account_id: str, at: datetime | None = None, *, pricebook: PriceBook) -> None:
    _active_history(catalog, account_id, _now(at), pricebook)


def active_limits(catalog: Catalog, account_id: str, at: datetime, *, pricebook: PriceBook) -> tuple[str, PlanLimits]:
    """`ensure_active`, then the plan in force on `at`'s day and its limits (`account_limits`),
    from the history the lock check read: one read of it for both."""
    history = _active_history(catalog, account_id, _now(at), pricebook)
    if history is None:
        raise UnknownAccountError(account_id)
    return agreed_limits(pricebook, history.on(at.date()), at.date())


def _active_history(catalog: Catalog, account_id: str, at: datetime, pricebook: PriceBook) -> History | None:
    locked, history = _standing(catalog, account_id, at, pricebook)
    if locked:
        raise AccountLocked(
            f"account {account_id} is closed: its data is locked until deletion; "
            "'pointflow accounts export-all' still returns it to the customer"
        )
    return history


@dataclass(frozen=True)
class HoldView:
    account_id: str
    hold_id: int
    reason: str
    placed_at: datetime
    released_at: datetime | None


def _hold_view(hold: LegalHold) -> HoldView:
    return HoldView(hold.account_id, hold.id, hold.reason, hold.placed_at, hold.released_at)


def place_hold(catalog: Catalog, account_id: str, reason: str, now: datetime | None = None) -> HoldView:
    """Put the account on legal hold; an identical active hold is returned, not duplicated.

    Waits for a deletion of the account's data under way (it holds the account's lock): once the
    hold is committed, no deletion can start, and none is still working from an earlier check."""
    get_account(catalog, account_id)
    if not reason.strip():
        raise LifecycleError("a legal hold needs a reason (--reason), e.g. the case reference")
    with account_lock(catalog, account_id), catalog.session() as session:
        hold = session.scalars(
            select(LegalHold).where(
                LegalHold.account_id == account_id, LegalHold.released_at.is_(None), LegalHold.reason == reason.strip()
            )
        ).first()
        if hold is None:
            hold = LegalHold(account_id=account_id, reason=reason.strip(), placed_at=_now(now))
            session.add(hold)
            session.flush()
        return _hold_view(hold)


def release_holds(catalog: Catalog, account_id: str, now: datetime | None = None) -> list[HoldView]:
    """Release every active hold of the account; deletions that were due run on the next run."""
    get_account(catalog, account_id)
    with catalog.session() as session:
        holds = list(
            session.scalars(
                select(LegalHold).where(LegalHold.account_id == account_id, LegalHold.released_at.is_(None))
            )
        )
        if not holds:
            raise LifecycleError(f"account {account_id} is not on legal hold")
        for hold in holds:
            hold.released_at = _now(now)
        session.flush()
        return [_hold_view(h) for h in holds]


def active_hold(catalog: Catalog, account_id: str) -> HoldView | None:
    with catalog.session() as session:
        hold = active_hold_of(session, account_id)
        return None if hold is None else _hold_view(hold)


def paid_term_end(catalog: Catalog, account_id: str, on: date) -> date:
    """The first day after the paid term that contains `on`, on the plan and cycle in force then:
    monthly terms are calendar months; quarterly and yearly terms are the prepaid cycle invoicing
    billed, which runs from the plan period's start (the account's start or its latest plan change)."""
    agreed = agreed_on(catalog, account_id, on)
    if agreed.billing_cycle == BillingCycle.MONTHLY.value:
        return Period.of(on).next().first_day
    _, last = invoiced_cycle(agreed.plan_since, CYCLE_MONTHS[agreed.billing_cycle], on)
    return last + timedelta(days=1)


@dataclass(frozen=True)
class TerminationView:
    account_id: str
    reason: str
    effective_at: datetime
    last_day_of_service: date


def terminate_account(
    catalog: Catalog,
    account_id: str,
    reason: str = "customer",
    effective: date | None = None,
    now: datetime | None = None,
    policy: LifecyclePolicy | None = None,
) -> TerminationView:
    """End the contract: access continues until `effective` (default: the end of the paid term),
    then the data is locked and, after the plan's grace period, deleted by the lifecycle run.

    For non-payment, only once the overdue notice was delivered: see `check_overdue_notice`
    (`policy` gives the notice period; default: the lifecycle policy shipped with pointflow)."""
    if reason not in TERMINATION_REASONS:
        raise LifecycleError(f"reason {reason!r} is not one of {', '.join(TERMINATION_REASONS)}")
    account = get_account(catalog, account_id)
    now = _now(now)
    effective = effective or paid_term_end(catalog, account.account_id, now.date())
    if reason == "non_payment":
        check_overdue_notice(catalog, account, start_of(effective), policy or load_policy())
    with catalog.session() as session:
        known = session.get(Termination, account_id)
        if known is not None:
            raise LifecycleError(
                f"account {account_id} is already terminated ({known.reason}, effective {known.effective_at.isoformat()})"
            )
        session.add(
            Termination(account_id=account_id, reason=reason, effective_at=start_of(effective), requested_at=now)
        )
    last_day = effective - timedelta(days=1)
    # Billing stops with the service: the subscription is prorated up to the last day.
    set_billing_terms(catalog, account_id, TermsUpdate(ended_on=last_day))
    return TerminationView(account_id, reason, start_of(effective), last_day)


def check_overdue_notice(catalog: Catalog, account: Account, effective_at: datetime, policy: LifecyclePolicy) -> None:
    """Services stop for non-payment only for a balance overdue at `effective_at` whose overdue
    notice (the one for its oldest due date) was delivered, and no earlier than the notice period
    (the policy's overdue_notice_days) after its delivery, nor than the stop date it stated."""
    account_id = account.account_id
    balance = overdue_balances(catalog, effective_at).get(account_id)
    if balance is None:
        raise LifecycleError(
            f"account {account_id} has no overdue balance at {effective_at.isoformat()}: services stop for "
            "non-payment only for one; end the contract with --reason customer if that is what was asked"
        )
    due = balance.oldest_due_date.isoformat()
    with catalog.session() as session:
        notice = session.get(LifecycleNotice, f"lifecycle:overdue_notice:{account_id}:{due}")
        if notice is not None:
            session.expunge(notice)
    days = policy.for_plan(agreed_on(catalog, account_id, effective_at.date()).plan).overdue_notice_days
    if notice is None:
        raise LifecycleError(
            f"account {account_id} was sent no overdue notice for its balance due since {due}: services stop for "
            f"non-payment at least {days} days after it is delivered. 'pointflow lifecycle run' (nightly) sends it; "
            "terminate on or after the stop date it states"
        )
    stated = notice.detail.get("service_stops_at")
    earliest = max(notice.sent_at + timedelta(days=days), datetime.fromisoformat(stated) if stated else notice.sent_at)
    if effective_at < earliest:
        first = earliest.date() if earliest == start_of(earliest.date()) else earliest.date() + timedelta(days=1)
        raise LifecycleError(
            f"the overdue notice to account {account_id} was delivered at {notice.sent_at.isoformat()} and states that "
            f"services stop at {stated}; with {days} days' notice they may stop from {earliest.isoformat()}: "
            f"use --effective {first.isoformat()} or later"
        )


@dataclass(frozen=True)
class ExportBundle:
    account_id: str
    key: str
    link: str
    link_expires_at: datetime
    objects: int
    bytes: int


def export_all(runtime: Runtime, account_id: str, policy: LifecyclePolicy, now: datetime | None = None) -> ExportBundle:
    """Pack every current object of the account into one zip in its exports area; return a link.

    "Every object" is what deleting the account's data would delete (the deletion plan's
    inventory: its prefix and its drop zone, as `accounts delete` lists them) and the billing
    records deletion keeps; not earlier bundles, nor local working copies in scratch. Drop-zone
    files are under `incoming/` in the zip. Allowed while the account is locked: the grace period
    is the customer's retrieval window.
    """
    get_account(runtime.catalog, account_id)  # an unknown account is refused by name
    now = _now(now)
    # Under the account's lock, as every deletion is: a bundle made while one deletes would keep a
    # copy of what it deletes (deletions take the bundles with them), or miss what it had listed.
    with account_lock(runtime.catalog, account_id):
        with runtime.catalog.session() as session:
            termination = session.get(Termination, account_id)
        if termination is not None and termination.deleted_at is not None:
            raise LifecycleError(
                f"the data of account {account_id} was deleted on {termination.deleted_at.isoformat()}; nothing to export"
            )
        area = AccountArea(account_id)
        skip = area.key("exports", BUNDLE_FOLDER) + "/"
        plan = account_deletion_plan(runtime.store, runtime.settings.scratch_dir, account_id)
        found = [*plan.objects, *(o for kept in plan.kept for o in inventory(runtime.store, kept))]
        # Keys whose current version is a delete marker hold old versions only: nothing to return.
        objects = sorted(
            (o for o in found if o.current_bytes is not None and not o.key.startswith(skip)), key=lambda o: o.key
        )

        def path(key: str) -> str:
            if key.startswith(area.incoming_prefix):
                return "incoming/" + key[len(area.incoming_prefix) :]
            return key[len(area.prefix) :]

        key = area.key("exports", BUNDLE_FOLDER, f"{account_id}-{now:%Y%m%dT%H%M%SZ}.zip")
        runtime.settings.scratch_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"export-{account_id}-", dir=runtime.settings.scratch_dir))
        try:
            bundle = work / "bundle.zip"
            with zipfile.ZipFile(bundle, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
                for item in objects:
                    # One object on disk at a time: memory and scratch space stay bounded.
                    local = work / "object"
                    runtime.store.get_file(item.key, local)
                    archive.write(local, path(item.key))
                    local.unlink()
                archive.writestr(
                    "MANIFEST.json",
                    json.dumps(
                        {
                            "account_id": account_id,
                            "created_at": now.isoformat(),
                            "objects": [{"path": path(o.key), "bytes": o.current_bytes} for o in objects],
                        },
                        indent=2,
                    ),
                )
            runtime.store.put_file(key, bundle)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    lifetime = timedelta(days=policy.for_plan(agreed_on(runtime.catalog, account_id, now.date()).plan).export_link_days)
    return ExportBundle(
        account_id,
        key,
        runtime.store.link(key, lifetime),
        now + lifetime,
        len(objects),
        sum(o.current_bytes for o in objects),
    )


def refuse_under_hold(catalog: Catalog, account_id: str) -> None:
    """Nothing of an account on legal hold may be deleted, on anyone's request."""
    with catalog.session() as session:
        hold = active_hold_of(session, account_id)
        if hold is not None:
            raise LifecycleError(on_hold_message(account_id, hold))


def open_job(session: Session, *where: ColumnElement[bool]) -> str | None:
    """A job not yet finished that matches `where`: what it works on may not be deleted."""
    open_states = [s.value for s in JobState if s not in TERMINAL_JOB_STATES]
    return session.scalars(select(Job.job_id).where(Job.state.in_(open_states), *where)).first()


def deletion_plan(runtime: Runtime, account_id: str) -> DeletionPlan:
    get_account(runtime.catalog, account_id)
    return account_deletion_plan(runtime.store, runtime.settings.scratch_dir, account_id)


def delete_account_data(runtime: Runtime, account_id: str, now: datetime | None = None) -> DeletionAudit:
    """Delete all of the account's data now, on the customer's request; refused under legal hold
    and while a job of the account has not finished (it is still reading or writing its data)."""
    get_account(runtime.catalog, account_id)
    with account_lock(runtime.catalog, account_id):
        refuse_under_hold(runtime.catalog, account_id)
        with runtime.catalog.session() as session:
            busy = open_job(session, Job.account_id == account_id)
            if busy is not None:
                raise LifecycleError(
                    f"job {busy} is still {session.get(Job, busy).state}: delete account {account_id}'s data once "
                    "it has finished (a job whose run was killed is closed by 'pointflow jobs close-stale')"
                )
        plan = deletion_plan(runtime, account_id)
        audit = execute_deletion(runtime.catalog, runtime.store, plan, account_id, REQUEST_RULE, "account", _now(now))
        forget_account_objects(runtime.catalog, account_id, audit.as_of)
    # Confirmed to the customer; a request that found nothing left to delete sends nothing. A
    # refused delivery is recorded and the next lifecycle run sends it.
    if plan.objects or plan.local_paths:
        message = notices.deleted_on_request(get_account(runtime.catalog, account_id), audit)
        notices.deliver(runtime, message, audit.as_of, {"audit_id": audit.id})
    return audit


def delete_stored_file(runtime: Runtime, account_id: str, key: str, now: datetime | None = None) -> DeletionAudit:
    """Delete one stored input file on the customer's request (every version of its object), so it
    no longer counts against the plan; audited like any deletion and refused under legal hold or
    while a job still reads it. Its jobs, their results and its usage stay."""
    get_account(runtime.catalog, account_id)
    with account_lock(runtime.catalog, account_id):
        refuse_under_hold(runtime.catalog, account_id)
        with runtime.catalog.session() as session:
            stored = session.scalars(
                select(StoredFile).where(StoredFile.account_id == account_id, StoredFile.key == key)
            ).first()
            if stored is None:
                raise LifecycleError(
                    f"account {account_id} has no stored file {key!r}: see 'pointflow files list --account {account_id}'"
                )
            busy = open_job(session, Job.file_id == stored.id)
            if busy is not None:
                raise LifecycleError(f"job {busy} is still working on {key}: delete the file once it has finished")
            file_id = stored.id
        # A quarantined file keeps its refusal report beside it: it goes with the file.
        report = key + ".report.html"
        keys = [key, report] if runtime.store.exists(report) else [key]
        # The account's export-all bundles hold a copy of the file: they go with it.
        plan = plan_deletion(runtime.store, [], [*keys, *export_bundles(runtime.store, account_id)], [])
        audit = execute_deletion(
            runtime.catalog, runtime.store, plan, account_id, REQUEST_RULE, f"file {key}"[:255], _now(now)
        )
        with runtime.catalog.session() as session:
            session.execute(update(Job).where(Job.file_id == file_id).values(file_id=None))
            session.execute(delete(StoredFile).where(StoredFile.id == file_id))
    return audit


def deletion_audit(catalog: Catalog, account_id: str | None = None) -> list[DeletionAudit]:
    with catalog.session() as session:
        query = select(DeletionAudit).order_by(DeletionAudit.id)
        if account_id is not None:
            query = query.where(DeletionAudit.account_id == account_id)
        rows = list(session.scalars(query))
        session.expunge_all()
        return rows
