"""which accounts each invoiced month covered, so an account added after its month's run (with an
earlier start) is invoiced for it; every billed usage event marked

Revision ID: 0020
Revises: 0019
"""

from datetime import timedelta

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types
from pipelines.billing.periods import Period

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

UTC = pipelines.catalog.types.UTCDateTime
# Before this revision a run billed, unmarked, the events of its month recorded more than this
# long before it started (usage.COMMIT_MARGIN then), and marked the others it billed.
_COMMIT_MARGIN = timedelta(days=1)


def upgrade() -> None:
    op.create_table(
        "billing_coverage",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("run_period", sa.String(length=7), nullable=False),
        sa.Column("covered_at", UTC(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.account_id"]),
        sa.ForeignKeyConstraint(["period"], ["billing_runs.period"]),
        sa.ForeignKeyConstraint(["run_period"], ["billing_runs.period"]),
        sa.PrimaryKeyConstraint("account_id", "period"),
    )
    with op.batch_alter_table("billing_coverage", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_billing_coverage_run_period"), ["run_period"], unique=False)

    # What each run covered, as it was then decided: the accounts it invoiced, and those it saw
    # (created before it started, started by the month's end) and found nothing to charge. An
    # account created after the run is left uncovered: the next run invoices its month.
    connection = op.get_bind()
    accounts = sa.table(
        "accounts",
        sa.column("account_id", sa.String()),
        sa.column("started_at", sa.Date()),
        sa.column("created_at", UTC(timezone=True)),
    )
    invoices = sa.table("invoices", sa.column("account_id", sa.String()), sa.column("period", sa.String()))
    coverage = sa.table(
        "billing_coverage",
        sa.column("account_id", sa.String()),
        sa.column("period", sa.String()),
        sa.column("run_period", sa.String()),
        sa.column("covered_at", UTC(timezone=True)),
    )
    events = sa.table(
        "usage_events",
        sa.column("event_id", sa.String()),
        sa.column("account_id", sa.String()),
        sa.column("kind", sa.String()),
        sa.column("status", sa.String()),
        sa.column("occurred_at", UTC(timezone=True)),
        sa.column("recorded_at", UTC(timezone=True)),
    )
    marks = sa.table("usage_billing", sa.column("event_id", sa.String()), sa.column("period", sa.String()))
    billing_runs = sa.table(
        "billing_runs", sa.column("period", sa.String()), sa.column("created_at", UTC(timezone=True))
    )
    for label, started in connection.execute(sa.select(billing_runs.c.period, billing_runs.c.created_at)).all():
        month = Period.parse(label)
        invoiced = (
            sa.select(sa.literal(1))
            .where(invoices.c.account_id == accounts.c.account_id)
            .where(invoices.c.period == label)
            .exists()
        )
        seen = sa.and_(accounts.c.started_at <= month.last_day, accounts.c.created_at < started)
        connection.execute(
            coverage.insert().from_select(
                ["account_id", "period", "run_period", "covered_at"],
                sa.select(
                    accounts.c.account_id,
                    sa.literal(label),
                    sa.literal(label),
                    sa.literal(started, UTC(timezone=True)),
                ).where(sa.or_(invoiced, seen)),
            )
        )
        # The events its run billed without marking them: every billed event is marked from now on.
        covered = (
            sa.select(sa.literal(1))
            .where(coverage.c.account_id == events.c.account_id)
            .where(coverage.c.period == label)
            .exists()
        )
        unmarked = ~sa.select(sa.literal(1)).where(marks.c.event_id == events.c.event_id).exists()
        connection.execute(
            marks.insert().from_select(
                ["event_id", "period"],
                sa.select(events.c.event_id, sa.literal(label))
                .where(events.c.kind == "classification")
                .where(events.c.status.in_(("succeeded", "aborted")))
                .where(events.c.occurred_at >= month.start)
                .where(events.c.occurred_at < month.end)
                .where(events.c.recorded_at < started - _COMMIT_MARGIN)
                .where(covered)
                .where(unmarked),
            )
        )


def downgrade() -> None:
    # The marks added stay: each names the run that billed its event, as the revisions before read them.
    with op.batch_alter_table("billing_coverage", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_billing_coverage_run_period"))
    op.drop_table("billing_coverage")
