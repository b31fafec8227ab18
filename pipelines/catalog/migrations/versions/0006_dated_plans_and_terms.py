"""dated plan changes and term changes; VAT per invoice line

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UTC = pipelines.catalog.types.UTCDateTime
MONEY = pipelines.catalog.types.ExactDecimal


def upgrade() -> None:
    op.create_table(
        "plan_changes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("effective_on", sa.Date(), nullable=False),
        sa.Column("plan", sa.String(length=32), nullable=False),
        sa.Column("billing_cycle", sa.String(length=16), nullable=False),
        sa.Column("previous_plan", sa.String(length=32), nullable=False),
        sa.Column("previous_billing_cycle", sa.String(length=16), nullable=False),
        sa.Column("recorded_at", UTC(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.account_id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("plan_changes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_plan_changes_account_id"), ["account_id"], unique=False)

    term_changes = op.create_table(
        "term_changes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("effective_on", sa.Date(), nullable=True),
        sa.Column("seats", sa.Integer(), nullable=True),
        sa.Column("extra_storage_gb", sa.Integer(), nullable=True),
        sa.Column("monthly_fee", MONEY(length=40), nullable=True),
        sa.Column("price_per_million_points", MONEY(length=40), nullable=True),
        sa.Column("monthly_points_cap", sa.BigInteger(), nullable=True),
        sa.Column("tax_rate", MONEY(length=40), nullable=True),
        sa.Column("tax_exempt", sa.Boolean(), nullable=True),
        sa.Column("exempt_until", sa.Date(), nullable=True),
        sa.Column("recorded_at", UTC(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.account_id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("term_changes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_term_changes_account_id"), ["account_id"], unique=False)

    with op.batch_alter_table("invoice_lines", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tax_rate", MONEY(length=40), nullable=True))
        batch_op.add_column(sa.Column("tax_category", sa.String(length=2), nullable=True))

    # Terms agreed before they had dates applied to every month not yet invoiced, whole months:
    # the same as a change in force since the account started.
    terms = sa.table(
        "billing_terms",
        sa.column("account_id"),
        sa.column("seats"),
        sa.column("extra_storage_gb"),
        sa.column("monthly_fee", MONEY()),
        sa.column("price_per_million_points", MONEY()),
        sa.column("monthly_points_cap"),
        sa.column("updated_at", UTC(timezone=True)),
    )
    op.execute(
        term_changes.insert().from_select(
            [
                "account_id",
                "seats",
                "extra_storage_gb",
                "monthly_fee",
                "price_per_million_points",
                "monthly_points_cap",
                "recorded_at",
            ],
            sa.select(
                terms.c.account_id,
                terms.c.seats,
                terms.c.extra_storage_gb,
                terms.c.monthly_fee,
                terms.c.price_per_million_points,
                terms.c.monthly_points_cap,
                terms.c.updated_at,
            ),
        )
    )


def downgrade() -> None:
    with op.batch_alter_table("invoice_lines", schema=None) as batch_op:
        batch_op.drop_column("tax_category")
        batch_op.drop_column("tax_rate")
    with op.batch_alter_table("term_changes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_term_changes_account_id"))
    op.drop_table("term_changes")
    with op.batch_alter_table("plan_changes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_plan_changes_account_id"))
    op.drop_table("plan_changes")
