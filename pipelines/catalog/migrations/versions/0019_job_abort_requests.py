"""when the customer or an operator asked to abort a job (`pointflow jobs abort`); the running
classification polls it between tiles

Revision ID: 0019
Revises: 0018
"""

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("abort_requested_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("abort_requested_at")
