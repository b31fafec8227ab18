"""credit note lines: what a credit note reverses, with the VAT of the invoice line it reverses

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "credit_note_lines",
        sa.Column("credit_note_number", sa.String(length=40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("invoice_position", sa.Integer(), nullable=True),
        sa.Column("description", sa.String(length=300), nullable=False),
        sa.Column("amount", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("taxable", sa.Boolean(), nullable=False),
        sa.Column("tax_rate", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("tax_category", sa.String(length=2), nullable=True),
        sa.ForeignKeyConstraint(
            ["credit_note_number"],
            ["credit_notes.credit_note_number"],
        ),
        sa.PrimaryKeyConstraint("credit_note_number", "position"),
    )


def downgrade() -> None:
    op.drop_table("credit_note_lines")
