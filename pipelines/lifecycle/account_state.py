"""What the lifecycle rules know of one account and how they record what they do (`AccountState`):
its termination, legal hold, notices and recorded actions as of the run's start; an action recorded
once per (action, subject), a notice sent once per key, a deletion audited, a legal hold respected.
In a dry run, state changes stay in memory and nothing is sent. The rules are `rules.AccountRun`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from pipelines.billing.history import account_history
from pipelines.billing.overdue import OverdueBalance
from pipelines.billing.pricebook import PriceBook
from pipelines.billing.terms import History
from pipelines.catalog.models import Account, UsageEvent
from pipelines.lifecycle import notices
from pipelines.lifecycle.deletion import DeletionPlan, active_hold, execute_deletion
from pipelines.lifecycle.models import LifecycleAction, LifecycleNotice, Termination
from pipelines.lifecycle.policy import LifecyclePolicy, PlanPolicy
from pipelines.notify import Message

if TYPE_CHECKING:
    from pipelines.runtime import Runtime

ACTIONS = (
    "inactivity_notice",
    "inactivity_reminder",
    "closure_averted",
    "terminated",
    "data_locked",
    "data_deleted",
    "api_results_deleted",
    "trial_ended",
    "overdue_notice",
    "usage_records_deleted",
    "job_records_deleted",
    "deletion_resumed",
)


@dataclass(frozen=True)
class Action:
    """One thing a run did (or, in a dry run, would do)."""

    account_id: str
    action: str
    effective_at: datetime
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "action": self.action,
            "effective_at": iso(self.effective_at),
            "detail": self.detail,
        }


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


@dataclass(frozen=True)
class RunContext:
    """What one run gives every account: the moment, the policy and price book, the balances due."""

    runtime: Runtime
    as_of: datetime
    dry_run: bool
    policy: LifecyclePolicy
    pricebook: PriceBook
    overdue: dict[str, OverdueBalance]
    # Where the notices tell customers to reach support (notify.support_address).
    support: str | None = None


class AccountState:
    """One account's lifecycle state as of the run's start, and the recording of what its rules do."""

    def __init__(self, context: RunContext, account_id: str) -> None:
        self.context = context
        self.as_of = context.as_of
        self.dry_run = context.dry_run
        self.actions: list[Action] = []
        catalog = context.runtime.catalog
        with catalog.session() as session:
            self.account = session.get(Account, account_id)
            latest_event = session.scalar(
                select(func.max(UsageEvent.occurred_at)).where(
                    UsageEvent.account_id == account_id, UsageEvent.kind == "login"
                )
            )
            self.termination = session.get(Termination, account_id)
            self.hold = active_hold(session, account_id)
            self.notices = {
                n.key: n
                for n in session.scalars(select(LifecycleNotice).where(LifecycleNotice.account_id == account_id))
            }
            self.done = set(
                session.execute(
                    select(LifecycleAction.action, LifecycleAction.subject).where(
                        LifecycleAction.account_id == account_id
                    )
                ).all()
            )
            # The dated plan history billing reads: every rule judges the plan in force at its moment.
            self.history: History = account_history(session, self.account)
            session.expunge_all()
        # Logins come from account imports (last_login_at) and from login usage events: the latest counts.
        logins = [t for t in (self.account.last_login_at, latest_event) if t is not None]
        self.last_login = max(logins) if logins else None
        # accounts.plan is the latest recorded plan, whatever its date: the run's rules use the plan in force.
        self.plan = self.history.on(self.as_of.date()).plan
        self.plan_policy: PlanPolicy = context.policy.for_plan(self.plan)

    def plan_on(self, moment: datetime) -> str:
        """The plan in force at `moment` (a change takes effect at 00:00 UTC on its date)."""
        return self.history.on(moment.astimezone(UTC).date()).plan

    # -- recording -------------------------------------------------------------------------

    def _emit(self, action: str, subject: str, effective_at: datetime, detail: dict[str, Any]) -> None:
        """Record and report the action once; a concurrent run that recorded it first reports it."""
        if (action, subject) in self.done:
            return
        self.done.add((action, subject))
        if not self.dry_run:
            try:
                with self.context.runtime.catalog.session() as session:
                    session.add(
                        LifecycleAction(
                            account_id=self.account.account_id,
                            action=action,
                            subject=subject,
                            effective_at=effective_at,
                            as_of=self.as_of,
                            detail=detail,
                        )
                    )
            except IntegrityError:
                return
        self.actions.append(Action(self.account.account_id, action, effective_at, detail))

    def _notify(self, message: Message, detail: dict[str, Any]) -> LifecycleNotice | None:
        known = self.notices.get(message.key)
        if known is not None:
            return known
        if self.dry_run:
            notice = LifecycleNotice(
                key=message.key, kind=message.kind, sent_at=self.as_of, message_id=None, detail=detail
            )
        else:
            notice = notices.deliver(self.context.runtime, message, self.as_of, detail)
        if notice is not None:
            self.notices[message.key] = notice
        return notice

    def _save_termination(self) -> None:
        if not self.dry_run:
            with self.context.runtime.catalog.session() as session:
                session.merge(self.termination)

    def _blocked(self, action: str, subject: str, due_at: datetime) -> bool:
        """A legal hold stops every deletion; reported once per hold and subject."""
        if self.hold is None:
            return False
        self._emit(
            action,
            f"blocked:hold-{self.hold.id}:{subject}",
            self.as_of,
            {
                "status": "blocked",
                "reason": f"legal hold: {self.hold.reason}",
                "hold_placed_at": iso(self.hold.placed_at),
                "due_at": iso(due_at),
            },
        )
        return True

    def _delete(self, plan: DeletionPlan, rule: str, subject: str, due_at: datetime) -> dict[str, Any]:
        detail = {
            "status": "dry_run" if self.dry_run else "deleted",
            "rule": rule,
            "due_at": iso(due_at),
            **plan.summary(),
        }
        if not self.dry_run:
            runtime = self.context.runtime
            audit = execute_deletion(
                runtime.catalog, runtime.store, plan, self.account.account_id, rule, subject, self.as_of
            )
            detail["audit_id"] = audit.id
        return detail
