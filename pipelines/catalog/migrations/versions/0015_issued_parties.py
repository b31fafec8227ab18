"""seller and buyer as issued, kept with each invoice and credit note

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL on documents issued before: they are shown with the account's and price book's data.
    # Plain ALTER TABLE (no batch copy): SQLite would otherwise recreate invoices, which invoice
    # lines, payments and credit notes reference.
    op.add_column("invoices", sa.Column("parties", sa.Text(), nullable=True))
    op.add_column("credit_notes", sa.Column("parties", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("credit_notes", "parties")
    op.drop_column("invoices", "parties")
