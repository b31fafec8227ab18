"""intake claims: one job per version of a file dropped in an account's incoming area

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "intake_claims",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("source_key", sa.String(length=1024), nullable=False),
        sa.Column("version", sa.String(length=255), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("claimed_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source_key", "version", name="uq_intake_claims_source_version"),
    )
    op.create_index(op.f("ix_intake_claims_account_id"), "intake_claims", ["account_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_intake_claims_account_id"), table_name="intake_claims")
    op.drop_table("intake_claims")
