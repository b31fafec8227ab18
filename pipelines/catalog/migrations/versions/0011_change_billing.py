"""which billing run took each dated plan or term change into account (a change dated in an invoiced month is corrected once, on the next invoice)

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

from pipelines.billing.periods import Period

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    change_billing = op.create_table(
        "change_billing",
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("change_id", sa.Integer(), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.ForeignKeyConstraint(
            ["period"],
            ["billing_runs.period"],
        ),
        sa.PrimaryKeyConstraint("kind", "change_id"),
    )
    with op.batch_alter_table("change_billing", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_change_billing_period"), ["period"], unique=False)

    # Before this revision a change dated in an invoiced month was refused, so every recorded change
    # that reaches into an invoiced month was known to that month's run: it is marked as taken into
    # account by the first invoiced month on or after its date (the first invoiced month at all for
    # a change in force since the account started). Later changes wait for their month's run.
    connection = op.get_bind()
    invoiced = sorted(
        Period.parse(label) for (label,) in connection.execute(sa.text("SELECT period FROM billing_runs"))
    )
    if not invoiced:
        return
    rows = []
    for kind, table in (("plan", "plan_changes"), ("terms", "term_changes")):
        changes = sa.table(table, sa.column("id", sa.Integer()), sa.column("effective_on", sa.Date()))
        for change_id, effective_on in connection.execute(sa.select(changes.c.id, changes.c.effective_on)):
            month = None if effective_on is None else Period.of(effective_on)
            first = next((p for p in invoiced if month is None or p >= month), None)
            if first is not None:
                rows.append({"kind": kind, "change_id": change_id, "period": first.label})
    if rows:
        op.bulk_insert(change_billing, rows)


def downgrade() -> None:
    with op.batch_alter_table("change_billing", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_change_billing_period"))
    op.drop_table("change_billing")
