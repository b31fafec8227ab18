"""message claims: a customer e-mail is claimed before it is sent, so it is sent once

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "message_claims",
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.String(length=255), nullable=False),
        sa.Column("claimed_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )


def downgrade() -> None:
    op.drop_table("message_claims")
