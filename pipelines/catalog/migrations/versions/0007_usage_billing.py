"""which billing run billed each usage event (late usage is billed once, on the next invoice)

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types
from pipelines.billing.periods import Period

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UTC = pipelines.catalog.types.UTCDateTime


def upgrade() -> None:
    usage_billing = op.create_table(
        "usage_billing",
        sa.Column("event_id", sa.String(length=128), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["usage_events.event_id"],
        ),
        sa.ForeignKeyConstraint(
            ["period"],
            ["billing_runs.period"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    with op.batch_alter_table("usage_billing", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_usage_billing_period"), ["period"], unique=False)

    # Months invoiced before this revision billed the events of their month that had arrived;
    # which ones came later cannot be told, so all count as billed: none is billed twice.
    events = sa.table(
        "usage_events", sa.column("event_id"), sa.column("kind"), sa.column("occurred_at", UTC(timezone=True))
    )
    connection = op.get_bind()
    for (period,) in connection.execute(sa.text("SELECT period FROM billing_runs")).all():
        month = Period.parse(period)
        op.execute(
            usage_billing.insert().from_select(
                ["event_id", "period"],
                sa.select(events.c.event_id, sa.literal(period))
                .where(events.c.kind == "classification")
                .where(events.c.occurred_at >= month.start)
                .where(events.c.occurred_at < month.end),
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("usage_billing", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_usage_billing_period"))
    op.drop_table("usage_billing")
