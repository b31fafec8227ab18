"""buyer address and VAT ID on accounts; the credit an invoice left for later ones

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("street", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("postcode", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("city", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("vat_id", sa.String(length=20), nullable=True))
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("credit_remaining", pipelines.catalog.types.ExactDecimal(length=40), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.drop_column("credit_remaining")
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("vat_id")
        batch_op.drop_column("city")
        batch_op.drop_column("postcode")
        batch_op.drop_column("street")
