"""invoice lines: the item price base quantity (EN 16931 BT-149), so quantity x price = amount

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL on lines issued before: their unit price is per one unit (plain ALTER TABLE, no batch copy).
    op.add_column(
        "invoice_lines",
        sa.Column("base_quantity", pipelines.catalog.types.ExactDecimal(length=40), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("invoice_lines", "base_quantity")
