"""which run took an outage into account, so an outage recorded after its month was invoiced is
credited on the next invoice, once

Revision ID: 0018
Revises: 0017
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outage_billing",
        sa.Column("outage_id", sa.Integer(), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.ForeignKeyConstraint(["outage_id"], ["outages.id"]),
        sa.ForeignKeyConstraint(["period"], ["billing_runs.period"]),
        sa.PrimaryKeyConstraint("outage_id"),
    )
    with op.batch_alter_table("outage_billing", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_outage_billing_period"), ["period"], unique=False)

    # Every outage recorded before this revision counts as taken into account by the latest run:
    # those of invoiced months were on their invoice, or on no invoice and credited by hand
    # (`invoices credit`, as the README said to): no run credits them again. Outages of months not
    # invoiced yet stay unmarked, for those months' own runs.
    connection = op.get_bind()
    latest = connection.execute(sa.text("SELECT max(period) FROM billing_runs")).scalar()
    if latest is None:
        return
    year, month = (int(part) for part in latest.split("-"))
    first_after = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    outages = sa.table(
        "outages",
        sa.column("id", sa.Integer()),
        sa.column("started_at", pipelines.catalog.types.UTCDateTime(timezone=True)),
    )
    ids = connection.execute(sa.select(outages.c.id).where(outages.c.started_at < first_after)).scalars().all()
    for outage_id in ids:
        connection.execute(
            sa.text("INSERT INTO outage_billing (outage_id, period) VALUES (:id, :period)"),
            {"id": outage_id, "period": latest},
        )


def downgrade() -> None:
    with op.batch_alter_table("outage_billing", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outage_billing_period"))
    op.drop_table("outage_billing")
