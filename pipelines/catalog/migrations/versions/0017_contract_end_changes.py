"""a contract end is recorded among the term changes, so an end in an invoiced month is corrected

Revision ID: 0017
Revises: 0016
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("term_changes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ended_on", sa.Date(), nullable=True))

    # Every end recorded before this revision becomes a change of its own, already taken into
    # account: it was known to the runs after it was recorded, and no run corrects it again.
    connection = op.get_bind()
    terms = sa.table("billing_terms", sa.column("account_id", sa.String()), sa.column("ended_on", sa.Date()))
    ends = connection.execute(
        sa.select(terms.c.account_id, terms.c.ended_on)
        .where(terms.c.ended_on.is_not(None))
        .order_by(terms.c.account_id)
    ).all()
    if not ends:
        return
    changes = sa.table(
        "term_changes",
        sa.column("id", sa.Integer()),
        sa.column("account_id", sa.String()),
        sa.column("effective_on", sa.Date()),
        sa.column("ended_on", sa.Date()),
        sa.column("recorded_at", pipelines.catalog.types.UTCDateTime(timezone=True)),
    )
    now = datetime.now(UTC)
    latest = connection.execute(sa.text("SELECT max(period) FROM billing_runs")).scalar()
    for account_id, ended_on in ends:
        change_id = connection.execute(
            sa.insert(changes)
            .values(account_id=account_id, effective_on=None, ended_on=ended_on, recorded_at=now)
            .returning(changes.c.id)
        ).scalar_one()
        if latest is not None:
            connection.execute(
                sa.text("INSERT INTO change_billing (kind, change_id, period) VALUES ('terms', :id, :period)"),
                {"id": change_id, "period": latest},
            )


def downgrade() -> None:
    connection = op.get_bind()
    connection.execute(
        sa.text(
            "DELETE FROM change_billing WHERE kind = 'terms' AND change_id IN "
            "(SELECT id FROM term_changes WHERE ended_on IS NOT NULL)"
        )
    )
    connection.execute(sa.text("DELETE FROM term_changes WHERE ended_on IS NOT NULL"))
    with op.batch_alter_table("term_changes", schema=None) as batch_op:
        batch_op.drop_column("ended_on")
