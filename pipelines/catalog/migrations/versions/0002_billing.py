"""billing: terms, runs, invoices and lines, payments, outages, credit notes, disputes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 00:00:27.041225
"""

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "billing_runs",
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("pricebook_sha256", sa.String(length=64), nullable=False),
        sa.Column("invoice_count", sa.Integer(), nullable=False),
        sa.Column("created_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("period"),
    )
    op.create_table(
        "outages",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("started_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("ended_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("scheduled", sa.Boolean(), nullable=False),
        sa.Column("announced_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("recorded_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("started_at", "ended_at", name="uq_outages_interval"),
    )
    op.create_table(
        "billing_terms",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("seats", sa.Integer(), nullable=False),
        sa.Column("extra_storage_gb", sa.Integer(), nullable=False),
        sa.Column("monthly_fee", pipelines.catalog.types.ExactDecimal(length=40), nullable=True),
        sa.Column("price_per_million_points", pipelines.catalog.types.ExactDecimal(length=40), nullable=True),
        sa.Column("monthly_points_cap", sa.BigInteger(), nullable=True),
        sa.Column("ended_on", sa.Date(), nullable=True),
        sa.Column("updated_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.account_id"],
        ),
        sa.PrimaryKeyConstraint("account_id"),
    )
    op.create_table(
        "invoices",
        sa.Column("invoice_number", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("issue_date", sa.Date(), nullable=False),
        sa.Column("due_date", sa.Date(), nullable=False),
        sa.Column("tax_rate", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("subtotal", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("taxable_subtotal", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("tax", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("total", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("credit_applied", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("created_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.account_id"],
        ),
        sa.ForeignKeyConstraint(
            ["period"],
            ["billing_runs.period"],
        ),
        sa.PrimaryKeyConstraint("invoice_number"),
        sa.UniqueConstraint("account_id", "period", name="uq_invoices_account_period"),
        sa.UniqueConstraint("period", "sequence", name="uq_invoices_period_sequence"),
    )
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_invoices_account_id"), ["account_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_invoices_period"), ["period"], unique=False)

    op.create_table(
        "credit_notes",
        sa.Column("credit_note_number", sa.String(length=40), nullable=False),
        sa.Column("invoice_number", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("issued_on", sa.Date(), nullable=False),
        sa.Column("amount", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("tax", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("total", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("created_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.account_id"],
        ),
        sa.ForeignKeyConstraint(
            ["invoice_number"],
            ["invoices.invoice_number"],
        ),
        sa.PrimaryKeyConstraint("credit_note_number"),
        sa.UniqueConstraint("invoice_number", "amount", "reason", name="uq_credit_notes_replay"),
    )
    with op.batch_alter_table("credit_notes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_credit_notes_account_id"), ["account_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_credit_notes_invoice_number"), ["invoice_number"], unique=False)

    op.create_table(
        "disputes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("invoice_number", sa.String(length=40), nullable=False),
        sa.Column("opened_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("billing_error", sa.Boolean(), nullable=False),
        sa.Column("created_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["invoice_number"],
            ["invoices.invoice_number"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("invoice_number", "reason", name="uq_disputes_replay"),
    )
    with op.batch_alter_table("disputes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_disputes_invoice_number"), ["invoice_number"], unique=False)

    op.create_table(
        "invoice_lines",
        sa.Column("invoice_number", sa.String(length=40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("description", sa.String(length=300), nullable=False),
        sa.Column("quantity", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("unit_price", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("amount", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("taxable", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["invoice_number"],
            ["invoices.invoice_number"],
        ),
        sa.PrimaryKeyConstraint("invoice_number", "position"),
    )
    op.create_table(
        "payments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("payment_key", sa.String(length=300), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("invoice_number", sa.String(length=40), nullable=True),
        sa.Column("amount", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("paid_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.account_id"],
        ),
        sa.ForeignKeyConstraint(
            ["invoice_number"],
            ["invoices.invoice_number"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("payment_key"),
    )
    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_payments_account_id"), ["account_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_payments_account_id"))

    op.drop_table("payments")
    op.drop_table("invoice_lines")
    with op.batch_alter_table("disputes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_disputes_invoice_number"))

    op.drop_table("disputes")
    with op.batch_alter_table("credit_notes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_credit_notes_invoice_number"))
        batch_op.drop_index(batch_op.f("ix_credit_notes_account_id"))

    op.drop_table("credit_notes")
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_invoices_period"))
        batch_op.drop_index(batch_op.f("ix_invoices_account_id"))

    op.drop_table("invoices")
    op.drop_table("billing_terms")
    op.drop_table("outages")
    op.drop_table("billing_runs")
