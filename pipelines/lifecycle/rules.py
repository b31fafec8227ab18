"""The lifecycle rules, applied as of one moment: `run_lifecycle(runtime, as_of, dry_run)`.

Every rule reads its state from the catalog and records what it did, once per (account, action,
subject), so successive runs with increasing `as_of` walk the timeline and a repeated run adds
nothing. Clocks that depend on an e-mail start when the e-mail was really delivered. What the
rules read of an account and how they record, send and delete is `account_state.AccountState`.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, delete, select, update

from pipelines.billing.overdue import overdue_balances
from pipelines.billing.periods import add_months, start_of
from pipelines.billing.pricebook import PriceBook, load_pricebook, plan_limits
from pipelines.catalog.models import TERMINAL_JOB_STATES, Account, Job, JobState, Plan, StoredFile, utcnow
from pipelines.errors import PointflowError
from pipelines.lifecycle import notices
from pipelines.lifecycle.account_state import AccountState, Action, RunContext, iso
from pipelines.lifecycle.deletion import (
    FAILED_JOB_RULE,
    REQUEST_RULE,
    DeletionIncomplete,
    account_deletion_plan,
    execute_deletion,
    forget_account_objects,
    forget_keys,
    plan_deletion,
    remainder,
)
from pipelines.lifecycle.models import DeletionAudit, LifecycleAction, LifecycleDeliveryFailure, Termination
from pipelines.lifecycle.operations import export_bundles, open_job, trial_ends_at
from pipelines.lifecycle.policy import LifecyclePolicy, load_policy
from pipelines.lifecycle.retention import (
    JOB_RULE,
    USAGE_RULE,
    delete_jobs,
    delete_usage,
    expired_jobs,
    expired_usage,
)
from pipelines.notify import support_address
from pipelines.scratch import job_folders
from pipelines.storage import AccountArea

if TYPE_CHECKING:
    from pipelines.runtime import Runtime

log = logging.getLogger(__name__)


class LifecycleRunError(PointflowError, RuntimeError):
    """Some accounts could not be processed; the others were. `actions` holds what was done."""

    def __init__(self, actions: list[Action], failures: list[str]) -> None:
        super().__init__("lifecycle run incomplete: " + "; ".join(failures))
        self.actions = actions
        self.failures = failures


def run_lifecycle(
    runtime: Runtime,
    as_of: datetime | None = None,
    dry_run: bool = False,
    policy: LifecyclePolicy | None = None,
    pricebook: PriceBook | None = None,
) -> list[Action]:
    """Apply every rule to every account as of `as_of` (default: now); returns the actions.

    Runs at the same moment take turns per account (a catalog lock), so each notice, closure and
    deletion happens once. A failure on one account (a deletion that left objects behind, an
    address no mail can go to) does not stop the others; it is raised at the end as
    LifecycleRunError, carrying the actions that were taken.
    """
    as_of = as_of or datetime.now(UTC)
    if as_of.tzinfo is None:
        raise ValueError(f"as_of {as_of.isoformat()} must carry a time zone (UTC)")
    as_of = as_of.astimezone(UTC)
    pricebook = pricebook or load_pricebook(runtime.settings.pricebook_path)
    context = RunContext(
        runtime=runtime,
        as_of=as_of,
        dry_run=dry_run,
        policy=policy or load_policy(runtime.settings.lifecycle_policy_path),
        pricebook=pricebook,
        overdue=overdue_balances(runtime.catalog, as_of),
        support=support_address(runtime.settings, pricebook),
    )
    with runtime.catalog.session() as session:
        account_ids = list(session.scalars(select(Account.account_id).order_by(Account.account_id)))
    actions: list[Action] = []
    failures: list[str] = []
    for account_id in account_ids:
        account_run = None
        try:
            # A dry run changes nothing: it need not wait for a real run's deletions.
            with contextlib.nullcontext() if dry_run else runtime.catalog.lock(f"lifecycle:{account_id}"):
                account_run = AccountRun(context, account_id)
                account_run.run()
        except Exception as error:  # noqa: BLE001 - reported at the end; the other accounts go on
            log.error("lifecycle of account %s: %s", account_id, error)
            failures.append(str(error) if isinstance(error, DeletionIncomplete) else f"account {account_id}: {error}")
        if account_run is not None:
            actions.extend(account_run.actions)
    if failures:
        raise LifecycleRunError(actions, failures)
    return actions


class AccountRun(AccountState):
    """The rules for one account, in the order a run applies them."""

    def run(self) -> None:
        # A termination asked for a day after the trial's end does not lengthen the trial.
        if self.termination is None or self.as_of < self.termination.effective_at:
            self._trial()
        if self.termination is None:
            self._inactivity()
        if self.termination is not None and self.as_of >= self.termination.effective_at:
            self._terminated()
        deleted = self.termination is not None and self.termination.deleted_at is not None
        # The API rule concerns the jobs run under `api`, whatever the account's plan is now.
        ever_api = Plan.API.value in {self.history.base.plan, *(step.plan for step in self.history.plan_steps)}
        if ever_api and not deleted:
            self._api_results()
        if self.termination is None or self.as_of < self.termination.effective_at:
            self._overdue()
        self._retention()
        self._unfinished_deletions()
        self._announce_deletions()

    def _trial(self) -> None:
        started = self.account.started_at
        ends_at = trial_ends_at(self.context.pricebook, self.history, started, self.as_of)
        if ends_at is None or self.as_of < ends_at:
            return
        days = (ends_at.date() - started).days
        self._emit("trial_ended", "trial", ends_at, {"started_on": started.isoformat(), "trial_days": days})
        self._terminate("trial_ended", ends_at)

    def _terminate(self, reason: str, effective_at: datetime) -> None:
        self.termination = Termination(
            account_id=self.account.account_id, reason=reason, effective_at=effective_at, requested_at=self.as_of
        )
        self._save_termination()

    def _inactivity(self) -> None:
        policy = self.plan_policy
        months = policy.inactivity_notice_after_months
        # An account that never logged in has been inactive since its contract started.
        reference = self.last_login or start_of(self.account.started_at)
        cycle = iso(reference)
        self._averted(cycle, reference)
        if months is None or self.as_of < add_months(reference, months):
            return
        notice = self.notices.get(f"lifecycle:inactivity_notice:{self.account.account_id}:{cycle}")
        if notice is not None:
            # A notice counts only for the period it announced: after a stretch on a plan without
            # the rule (a paid plan), the period that follows gets its own notice and reminders.
            since = self._rule_applies_since()
            if since is not None and notice.sent_at < start_of(since):
                cycle = f"{cycle}/{since.isoformat()}"
                notice = self.notices.get(f"lifecycle:inactivity_notice:{self.account.account_id}:{cycle}")
        grace = policy.grace_months
        if notice is None:
            closure_at = add_months(self.as_of, policy.closure_after_notice_months)
            deletion_at = add_months(closure_at, grace)
            detail = {
                "cycle": cycle,
                "last_login_at": iso(self.last_login),
                "closure_at": iso(closure_at),
                "deletion_at": iso(deletion_at),
            }
            notice = self._notify(
                notices.inactivity_notice(
                    self.account, cycle, reference, months, closure_at, deletion_at, support=self.context.support
                ),
                detail,
            )
            if notice is not None:
                self._emit("inactivity_notice", cycle, self.as_of, {**detail, "message_id": notice.message_id})
            return
        # The closure clock runs from the notice's real delivery, and the last reminder must have
        # been delivered (and its days given) before the account closes.
        closure_at = add_months(notice.sent_at, policy.closure_after_notice_months)
        final_days = min(policy.reminder_days_before_closure)
        final = self.notices.get(self._reminder_key(cycle, final_days))
        if final is not None:
            closure = max(closure_at, final.sent_at + timedelta(days=final_days))
            if self.as_of >= closure:
                self._terminate("inactivity", closure)
                return
        due = [d for d in policy.reminder_days_before_closure if self.as_of >= closure_at - timedelta(days=d)]
        if not due or self._reminder_key(cycle, min(due)) in self.notices:
            return
        days = min(due)
        # Reminders whose day passed unsent (outage, missed runs) are superseded by the nearest one.
        closure = max(closure_at, self.as_of + timedelta(days=final_days))
        deletion_at = add_months(closure, grace)
        detail = {
            "cycle": cycle,
            "days_before_closure": days,
            "closure_at": iso(closure),
            "deletion_at": iso(deletion_at),
        }
        reminder = self._notify(
            notices.inactivity_reminder(self.account, cycle, days, closure, deletion_at, support=self.context.support),
            detail,
        )
        if reminder is not None:
            self._emit(
                "inactivity_reminder", f"{cycle}:{days}", self.as_of, {**detail, "message_id": reminder.message_id}
            )

    def _rule_applies_since(self) -> date | None:
        """The first day of the account's current uninterrupted stretch of plans with an
        inactivity rule (its start if always on one); None if the plan in force has no rule."""
        history = self.history

        def has_rule(day: date) -> bool:
            plan = history.on(day).plan
            return self.context.policy.for_plan(plan).inactivity_notice_after_months is not None

        today = self.as_of.date()
        if not has_rule(today):
            return None
        for day in sorted({s.effective_on for s in history.plan_steps if s.effective_on <= today}, reverse=True):
            if not has_rule(day - timedelta(days=1)):
                return day
        return self.account.started_at

    def _reminder_key(self, cycle: str, days: int) -> str:
        return f"lifecycle:inactivity_reminder:{self.account.account_id}:{cycle}:{days}"

    def _averted(self, cycle: str, login: datetime) -> None:
        """A login after a notice (any notice of an older cycle) averts that cycle's closure. A
        cycle is the login it counts from, and after a stretch without the rule, "/" and the day
        the rule applied again."""
        prefix = f"lifecycle:inactivity_notice:{self.account.account_id}:"
        for key, notice in sorted(self.notices.items()):
            if (
                notice.kind == "inactivity_notice"
                and key.startswith(prefix)
                and key[len(prefix) :].split("/")[0] != cycle
            ):
                old_cycle = key[len(prefix) :]
                self._emit(
                    "closure_averted",
                    old_cycle,
                    login,
                    {"cycle": old_cycle, "notice_sent_at": iso(notice.sent_at), "login_at": iso(login)},
                )

    def _terminated(self) -> None:
        termination = self.termination
        policy = self.plan_policy
        self._emit("terminated", "termination", termination.effective_at, {"reason": termination.reason})
        newly_locked = termination.locked_at is None
        if newly_locked:
            termination.locked_at = self.as_of
            self._save_termination()
        if termination.announced_at is None:
            deletion_at = add_months(self.as_of, policy.grace_months)
            detail = {"reason": termination.reason, "deletion_at": iso(deletion_at)}
            notice = self._notify(
                notices.data_locked(
                    self.account,
                    termination.reason,
                    termination.effective_at,
                    deletion_at,
                    support=self.context.support,
                ),
                detail,
            )
            if notice is not None:
                # The grace period runs from the announcement: nobody loses data to a failed e-mail.
                termination.announced_at = notice.sent_at
                termination.deletion_due_at = add_months(notice.sent_at, policy.grace_months)
                self._save_termination()
            # The lock is reported when it happens; an announcement that failed then is reported
            # again once it goes out, because only then does the deletion date exist.
            if newly_locked or notice is not None:
                self._emit(
                    "data_locked",
                    "lock" if newly_locked else "announcement",
                    termination.effective_at,
                    {
                        "reason": termination.reason,
                        "locked_at": iso(termination.locked_at),
                        "deletion_at": iso(termination.deletion_due_at),
                        "notice": {"status": "sent", "message_id": notice.message_id}
                        if notice
                        else {"status": "not delivered, retried next run"},
                    },
                )
        if (
            termination.deletion_due_at is None
            or self.as_of < termination.deletion_due_at
            or termination.deleted_at is not None
        ):
            return
        if self._blocked("data_deleted", "account", termination.deletion_due_at):
            return
        # Held under the account's lock from here to the deletion's end: create_job takes it too,
        # so no job starts in between.
        if self._deferred(
            "data_deleted", "account", termination.deletion_due_at, Job.account_id == self.account.account_id
        ):
            return
        runtime = self.context.runtime
        plan = account_deletion_plan(runtime.store, runtime.settings.scratch_dir, self.account.account_id)
        detail = self._delete(plan, f"termination:{termination.reason}", "account", termination.deletion_due_at)
        if not self.dry_run:
            forget_account_objects(runtime.catalog, self.account.account_id, self.as_of)
            termination.deleted_at = self.as_of
            self._save_termination()
        self._emit("data_deleted", "account", self.as_of, detail)

    def _api_results(self) -> None:
        account_id = self.account.account_id
        with self.context.runtime.catalog.session() as session:
            jobs = list(
                session.scalars(select(Job).where(Job.account_id == account_id).order_by(Job.finished_at, Job.job_id))
            )
            files = {f.id: f for f in session.scalars(select(StoredFile).where(StoredFile.account_id == account_id))}
            session.expunge_all()

        def due_at(job: Job) -> datetime | None:
            # Only a job run under `api` (the plan in force when it finished, as billed) is due.
            if job.finished_at is None or self.plan_on(job.finished_at) != Plan.API.value:
                return None
            days = plan_limits(self.context.pricebook, Plan.API.value, job.finished_at.date()).result_retention_days
            return None if days is None else job.finished_at + timedelta(days=days)

        area = AccountArea(account_id)
        scratch = self.context.runtime.settings.scratch_dir
        bundles: list[str] | None = None  # listed once, when a job is first due
        for job in jobs:
            due = due_at(job)
            if due is None or self.as_of < due or ("api_results_deleted", job.job_id) in self.done:
                continue
            if self._blocked("api_results_deleted", job.job_id, due):
                continue
            stored = files.get(job.file_id) if job.file_id is not None else None
            # The same bytes uploaded twice are one file: it goes only when every job using it is
            # due, so never while one runs. A job not yet ingested takes stored bytes holding the
            # account's lock, which this run holds, and stores them again if they went
            # (steps.ingest._attach): it holds nothing back.
            sharers = [j for j in jobs if j.file_id == job.file_id]
            input_due = stored is not None and all((d := due_at(j)) is not None and self.as_of >= d for j in sharers)
            # Everything the job wrote: output, export (and its staging folder), reports, quarantine.
            prefixes = [
                area.key("classified", job.job_id) + "/",
                area.key("exports", job.job_id) + "/",
                area.key("tmp", "exports", job.job_id) + "/",
                area.key("reports", job.job_id) + "-",
                area.key("quarantine", job.job_id) + "-",
            ]
            # An export-all bundle holds copies of the results and inputs: every bundle made before
            # this deletion goes with it, so no copy outlives the retention (export-all makes a
            # new one from what is left). Export-all takes the account's lock, which this run
            # holds: no bundle comes while it runs, and the first deletion takes them all.
            if bundles is None:
                bundles = export_bundles(self.context.runtime.store, account_id)
            keys = list(bundles)
            if input_due:
                keys.append(stored.key)
            plan = plan_deletion(self.context.runtime.store, prefixes, keys, job_folders(scratch, job.job_id))
            try:
                done = self._delete(plan, "api_results", job.job_id, due)
            except DeletionIncomplete:
                self._announce_deletions()  # the jobs deleted before this one are announced all the same
                raise
            detail = {"job_id": job.job_id, "finished_at": iso(job.finished_at), **done}
            if not self.dry_run:
                bundles = []
                with self.context.runtime.catalog.session() as session:
                    session.execute(
                        update(Job)
                        .where(Job.job_id == job.job_id)
                        .values(classified_key=None, export_prefix=None, report_key=None)
                    )
                    if input_due:
                        session.execute(update(Job).where(Job.file_id == stored.id).values(file_id=None))
                        session.execute(delete(StoredFile).where(StoredFile.id == stored.id))
            self._emit("api_results_deleted", job.job_id, self.as_of, detail)

    def _retention(self) -> None:
        """Usage records are billing records: kept after the data is deleted, for the policy's
        retention, then deleted (`retention`); a finished job's row holds what its usage record
        held (file name, points, classes), so it goes with the record, never while the record is
        kept. Nothing to announce: no customer data goes."""
        cutoff = self.context.policy.usage_kept_since(self.as_of)
        if cutoff is None:
            return
        years = self.context.policy.usage_retention_years
        catalog, account_id = self.context.runtime.catalog, self.account.account_id
        # Records first: a job goes only once its records have (or go in this run).
        for action, subject, rule, count, find, delete_them, since in (
            (
                "usage_records_deleted",
                "usage",
                USAGE_RULE,
                "records",
                expired_usage,
                delete_usage,
                lambda r: max(r.occurred_at, r.recorded_at),
            ),
            ("job_records_deleted", "jobs", JOB_RULE, "jobs", expired_jobs, delete_jobs, lambda j: j.finished_at),
        ):
            with catalog.session() as session:
                expired = find(session, account_id, cutoff)
            if not expired:
                continue
            # When the oldest one's retention ended (an invoice that billed a record may have kept it longer).
            due = add_months(min(since(e) for e in expired), 12 * years)
            if self._blocked(action, subject, due):
                continue
            detail = {
                "status": "dry_run" if self.dry_run else "deleted",
                "rule": rule,
                "due_at": iso(due),
                "retention_years": years,
                "before": iso(cutoff),
                count: len(expired),
            }
            if not self.dry_run:
                detail["audit_id"] = delete_them(catalog, account_id, expired, cutoff, self.as_of).id
            self._emit(action, iso(cutoff), self.as_of, detail)

    def _unfinished_deletions(self) -> None:
        """Finish the deletions whose process died mid-way and that no rule redoes.

        Every deletion holds the account's lock, held here: an audit entry still `started` once
        this run's rules are done is one whose process ended, and that no later deletion took
        over. A deletion on the customer's request, or of a failed job's working objects (its job
        closed since), is finished now: what it listed that is still there as it was goes (an
        object written since it started is someone's new data and stays), the catalog forgets what
        it listed, the entry is closed as `interrupted` pointing at the new one, and an account
        deleted on request gets its confirmation. The rules' own deletions (termination, API
        results) are redone by their rule, which takes their entry over; until then they wait,
        as it does, for a legal hold's release or the account's running jobs."""
        catalog = self.context.runtime.catalog
        with catalog.session() as session:
            entries = list(
                session.scalars(
                    select(DeletionAudit)
                    .where(DeletionAudit.account_id == self.account.account_id, DeletionAudit.status == "started")
                    .order_by(DeletionAudit.id)
                )
            )
            session.expunge_all()
        for entry in entries:
            if not self._nothing_redoes(entry):
                continue
            subject = f"audit-{entry.id}"
            if self._blocked("deletion_resumed", subject, entry.as_of) or self._deferred(
                "deletion_resumed", subject, entry.as_of
            ):
                continue
            self._resume(entry)

    def _nothing_redoes(self, entry: DeletionAudit) -> bool:
        with self.context.runtime.catalog.session() as session:
            if session.get(DeletionAudit, entry.id).status != "started":
                return False  # taken over by the resumption of an earlier entry, just now
            if entry.rule == REQUEST_RULE:
                return True
            if entry.rule != FAILED_JOB_RULE:
                return False
            # The sweep that closes the job redoes it while the job is open.
            job = session.get(Job, entry.subject.removeprefix("job "))
            return job is not None and JobState(job.state) in TERMINAL_JOB_STATES

    def _resume(self, entry: DeletionAudit) -> None:
        runtime = self.context.runtime
        rest = remainder(runtime.store, entry)
        detail = {
            "status": "dry_run" if self.dry_run else "deleted",
            "rule": entry.rule,
            "subject": entry.subject,
            "interrupted": entry.id,
            "started_at": iso(entry.started_at),
            "kept": list(rest.kept),
            **rest.plan.summary(),
        }
        if self.dry_run:
            self._emit("deletion_resumed", f"audit-{entry.id}", self.as_of, detail)
            return
        account_id = self.account.account_id
        # Forgotten first: a run killed after this finds the entry still `started` and resumes it.
        kept = set(rest.kept)
        forget_keys(runtime.catalog, account_id, [o["key"] for o in entry.objects if o["key"] not in kept], self.as_of)
        audit = execute_deletion(
            runtime.catalog, runtime.store, rest.plan, account_id, entry.rule, entry.subject, self.as_of
        )
        with runtime.catalog.session() as session:
            killed = session.get(DeletionAudit, entry.id)
            if killed.status == "started":  # not taken over: something of it was kept, or left to a sweep
                killed.status, killed.finished_at = "interrupted", utcnow()
                note = f", keeping {len(kept)} object(s) written since it started" if kept else ""
                killed.error = f"its process ended before it finished; finished by #{audit.id}{note}"
        if (entry.rule, entry.subject) == (REQUEST_RULE, "account"):
            self._notify(notices.deleted_on_request(self.account, audit), {"audit_id": audit.id})
        self._emit("deletion_resumed", f"audit-{entry.id}", self.as_of, {**detail, "audit_id": audit.id})

    def _deferred(self, action: str, subject: str, due_at: datetime, *where: ColumnElement[bool]) -> bool:
        """A deletion waits while a job of the account matching `where` has not finished (it still
        reads or writes what would go): reported once per job, done on the first run after. Call
        it holding the account's lock (run_lifecycle does), which job creation takes too."""
        with self.context.runtime.catalog.session() as session:
            busy = open_job(session, Job.account_id == self.account.account_id, *where)
            state = None if busy is None else session.get(Job, busy).state
        if busy is None:
            return False
        self._emit(
            action,
            f"deferred:{busy}:{subject}",
            self.as_of,
            {
                "status": "deferred",
                "reason": f"job {busy} is still {state}: deleted on the first run after it has finished",
                "job_id": busy,
                "due_at": iso(due_at),
            },
        )
        return True

    def _announce_deletions(self) -> None:
        """Deletions are announced: one notice per run listing the jobs whose results it deleted,
        and a confirmation of each deletion on the customer's request (sent when it is done). A
        notice the mail server refused goes out on a later run, under its own key."""
        account_id = self.account.account_id
        api_prefix = notices.api_results_deleted_prefix(account_id)
        request_prefix = notices.deleted_on_request_prefix(account_id)
        with self.context.runtime.catalog.session() as session:
            unsent = {
                key
                for key in session.scalars(
                    select(LifecycleDeliveryFailure.key).where(
                        LifecycleDeliveryFailure.account_id == account_id,
                        LifecycleDeliveryFailure.kind.in_(["api_results_deleted", "deleted_on_request"]),
                    )
                )
                if key not in self.notices
            }
        moments = {datetime.fromisoformat(k[len(api_prefix) :]) for k in unsent if k.startswith(api_prefix)}
        if any(
            a.action == "api_results_deleted" and a.detail.get("status") not in ("blocked", "deferred")
            for a in self.actions
        ):
            moments.add(self.as_of)
        for moment in sorted(moments):
            self._announce_api_results(moment)
        for key in sorted(k for k in unsent if k.startswith(request_prefix)):
            with self.context.runtime.catalog.session() as session:
                audit = session.get(DeletionAudit, int(key[len(request_prefix) :]))
                session.expunge_all()
            if audit is not None:
                self._notify(notices.deleted_on_request(self.account, audit), {"audit_id": audit.id})

    def _announce_api_results(self, moment: datetime) -> None:
        """The notice of the run at `moment`: the jobs it deleted (recorded, or this run's)."""
        with self.context.runtime.catalog.session() as session:
            recorded = list(
                session.scalars(
                    select(LifecycleAction.detail).where(
                        LifecycleAction.account_id == self.account.account_id,
                        LifecycleAction.action == "api_results_deleted",
                        LifecycleAction.as_of == moment,
                    )
                )
            )
        ours = [a.detail for a in self.actions if a.action == "api_results_deleted"] if moment == self.as_of else []
        jobs: dict[str, dict] = {}
        for detail in [*recorded, *ours]:
            if detail.get("status") in ("deleted", "dry_run"):
                due, finished = datetime.fromisoformat(detail["due_at"]), datetime.fromisoformat(detail["finished_at"])
                jobs[detail["job_id"]] = {"job_id": detail["job_id"], "finished_at": finished, "due_at": due}
        if not jobs:
            return
        listed = sorted(jobs.values(), key=lambda j: (j["finished_at"], j["job_id"]))
        days = ", ".join(sorted({str((j["due_at"] - j["finished_at"]).days) for j in listed}))
        self._notify(
            notices.api_results_deleted(self.account, moment, listed, days),
            {"rule": "api_results", "deleted_at": iso(moment), "jobs": [j["job_id"] for j in listed]},
        )

    def _overdue(self) -> None:
        balance = self.context.overdue.get(self.account.account_id)
        if balance is None:
            return
        policy = self.plan_policy
        stop_at = start_of(balance.oldest_due_date) + timedelta(days=policy.overdue_service_stop_days)
        notice_days = timedelta(days=policy.overdue_notice_days)
        if self.as_of < stop_at - notice_days:
            return
        # A late run never gives less warning than the policy promises.
        stop_at = max(stop_at, self.as_of + notice_days)
        due = balance.oldest_due_date.isoformat()
        currency = self.context.pricebook.currency
        detail = {
            "amount": str(balance.amount),
            "currency": currency,
            "oldest_due_date": due,
            "service_stops_at": iso(stop_at),
        }
        notice = self._notify(
            notices.overdue_notice(
                self.account,
                balance,
                currency,
                stop_at,
                support=self.context.support,
                seller=self.context.pricebook.seller,
            ),
            detail,
        )
        if notice is not None:
            self._emit("overdue_notice", due, self.as_of, {**notice.detail, "message_id": notice.message_id})
